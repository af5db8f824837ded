"""Does a monotone map fitted on a run's own labelled training squares fix the CNN's shrunken
scores? Per-run test MAE, rounded, with and without it.

    python bench/calibration.py out/EXPERIMENT [--squares squares] [--labels data/labels.csv]

For every finished run under ``EXPERIMENT/runs/`` it predicts (with the model's own test-time
augmentation) its labelled training squares and its test squares, fits per score an isotonic
(monotone, 0..4) map and a straight line from the training predictions to the training
labels, and prints the test MAE of the rounded predictions raw and mapped, then the mean over
the runs. A regression head trained with MSE on 100 labels pulls rare high scores toward the
mean (docs/experiment.md, "Where contamination at 100 labels goes wrong"); if the ranking is
right, a monotone map stretches it back.

Then, for cracking and contamination, the mean raw prediction of the squares with each label
value: the CNN on its test and its training squares, and gradient boosting (fitted on the same
training squares, as ``xcryonet experiment`` does) on the test squares.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import (  # noqa: E402  (bench/ sibling)
    add_data_args,
    finished_runs,
    label_matrix,
    report_or_one_line_error,
)

from xcryonet.baselines import FeaturesGBM, GBMConfig  # noqa: E402
from xcryonet.labels import SCORE_NAMES  # noqa: E402
from xcryonet.train import (  # noqa: E402
    MODEL_FILE,
    key_rows,
    load_checkpoint,
    load_model,
    load_squares_set,
    predict_tensor,
    read_table,
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("experiment", help="an `xcryonet experiment --out` folder")
    add_data_args(ap, ROOT)
    args = ap.parse_args(argv)
    return report_or_one_line_error(Path(__file__).name, report, args)


def report(args: argparse.Namespace) -> int:
    """Print raw and mapped test MAE per run and their means."""
    from sklearn.isotonic import IsotonicRegression

    runs = finished_runs(args.experiment)
    torch.set_num_threads(2)
    table = read_table(args.squares, args.labels)
    y_all = label_matrix(table)
    features = labelled_features(args.squares, table)
    print("run | " + " | ".join(f"{s} raw / isotonic / linear" for s in SCORE_NAMES))
    errors = []  # per run: (5 scores, 3 forms) test MAE
    by_label: list[pd.DataFrame] = []  # mean prediction per label value, per run
    for run in runs:
        rec = load_checkpoint(run / MODEL_FILE)["run"]
        model, cfg = load_model(run)
        lab = key_rows(table, rec["train_keys"][: int(rec["labeled"])], run)
        test = key_rows(table, rec["test_keys"], run)
        p_tr, p_te = (
            predict_tensor(
                model, load_squares_set(args.squares, table.iloc[r], cfg, np.ones(len(r), bool)).x
            ).numpy()
            for r in (lab, test)
        )
        y_tr, y_te = y_all[lab], y_all[test]
        gbm = FeaturesGBM(GBMConfig(round_scores=False)).fit_features(features[lab], y_tr)
        p_gbm = gbm.predict_features(features[test])
        by_label.append(
            means_by_label(
                {"CNN test": (p_te, y_te), "CNN train": (p_tr, y_tr), "GBM test": (p_gbm, y_te)}
            )
        )
        err = np.zeros((len(SCORE_NAMES), 3))
        for k in range(len(SCORE_NAMES)):
            ok = np.isfinite(y_tr[:, k])
            iso = IsotonicRegression(y_min=0, y_max=4, out_of_bounds="clip")
            iso.fit(p_tr[ok, k], y_tr[ok, k])
            mapped = iso.predict(p_te[:, k])
            a, b = np.polyfit(p_tr[ok, k], y_tr[ok, k], 1)
            linear = np.clip(a * p_te[:, k] + b, 0, 4)
            t = np.isfinite(y_te[:, k])
            for j, pred in enumerate((p_te[:, k], mapped, linear)):
                err[k, j] = np.abs(np.rint(pred[t]) - y_te[t, k]).mean()
        errors.append(err)
        print(f"{run.name} | " + _cells(err), flush=True)
    print(f"mean of {len(errors)} | " + _cells(np.mean(errors, axis=0)))
    print("\nMean raw prediction per label value, mean over the runs (n: test squares a run):")
    print(pd.concat(by_label).groupby(level=[0, 1], sort=False).mean().round(2).to_string())
    return 0


def labelled_features(squares: str | Path, table: pd.DataFrame) -> np.ndarray:
    """Boosting's hand-crafted features (N, F) of ``table``'s labelled rows (NaN elsewhere)."""
    from xcryonet.baselines import square_features
    from xcryonet.experiment import raw_crops

    rows = np.flatnonzero(table["labelled"].to_numpy())
    crops, masks = raw_crops(Path(squares), table.iloc[rows])
    x, _ = square_features(crops, masks)
    out = np.full((len(table), x.shape[1]), np.nan)
    out[rows] = x
    return out


def means_by_label(preds: dict[str, tuple[np.ndarray, np.ndarray]]) -> pd.DataFrame:
    """Rows (score, what): the mean raw prediction of the squares labelled 0..4, for cracking
    and contamination; ``preds``: what -> (predictions (N, 5), labels (N, 5))."""
    rows = {}
    for score in ("cracking", "contamination"):
        k = SCORE_NAMES.index(score)
        for what, (p, y) in preds.items():
            rows[(score, what)] = {
                v: p[y[:, k] == v, k].mean() if (y[:, k] == v).any() else np.nan for v in range(5)
            }
        y_test = preds["CNN test"][1][:, k]
        rows[(score, "n")] = {v: float((y_test == v).sum()) for v in range(5)}
    return pd.DataFrame.from_dict(rows, orient="index")


def _cells(err: np.ndarray) -> str:
    """(5, 3) MAE -> ``raw / isotonic / linear`` per score, joined by ``|``."""
    return " | ".join(" / ".join(f"{v:.3f}" for v in row) for row in err)


if __name__ == "__main__":
    sys.exit(main())
