"""How far are the operator's labels from the truth, and do the methods differ against the truth?

    python bench/label_noise.py out/EXPERIMENT [--labeled 900] [--truth data/truth]
        [--unlabeled 1500] [--squares DIR] [--labels CSV]

The simulated operator slips by one on 15 % of the scores (``simulate.operator_labels``), so
even a scorer that knows the truth has an MAE above 0 against the labels: that is the floor of
the experiment's table. For every repeat of the folder's CNN runs at each ``--labeled`` count,
this fits gradient boosting on the split's labelled squares (as ``xcryonet experiment`` does),
scores the saved CNN models, and prints the rounded-prediction MAE of each method on three
test sets:

- ``labels``: the split's labelled test squares, against the operator's labels (the table's
  figures), with the simulator's truth scored as a method (the floor);
- ``truth``: the same squares, against the truth;
- ``unseen``: every complete square no method of the split trained on (not a training label,
  not one of the ``--unlabeled`` squares an SS run of that split would see), against the truth:
  about 6 to 13 times as many squares as ``labels``.

Then the paired claims of ``xcryonet.experiment.claims`` on each set, so a lead can be checked
against the truth with the test squares' share of the noise taken out. First, for cracking and
contamination, every labelled square counted by operator label and true score (where the
slips fall).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import add_data_args, read_truth, report_or_one_line_error  # noqa: E402  (bench/ sibling)

from xcryonet.errors import InputError  # noqa: E402
from xcryonet.labels import JOIN_RADIUS_PITCH, SCORE_NAMES  # noqa: E402

SETS = ("labels", "truth", "unseen")


def truth_scores(table: pd.DataFrame, truth: pd.DataFrame) -> np.ndarray:
    """(N, 5) true scores (``SCORE_NAMES`` order) of the extracted squares of ``table``: each
    square matched to a simulated square of its grid in stage coordinates by
    ``extract.match_squares`` (one-to-one, nearest first) within ``JOIN_RADIUS_PITCH`` pitches
    (the labels' join radius); NaN where none matches."""
    from xcryonet.extract import match_squares

    out = np.full((len(table), len(SCORE_NAMES)), np.nan)
    truth = truth[truth["x_um"].notna() & truth["y_um"].notna()]
    for grid_id, sub in table.groupby("grid_id", sort=False):
        tg = truth[truth["grid_id"].astype(str) == str(grid_id)]
        if tg.empty:
            continue
        m = match_squares(
            sub[["x_um", "y_um"]].to_numpy(float),
            tg[["x_um", "y_um"]].to_numpy(float),
            tg["complete"].to_numpy(bool),
            JOIN_RADIUS_PITCH * float(sub["pitch_um"].median()),
        )
        ok = m.truth_index >= 0
        rows = table.index.get_indexer(sub.index)
        out[rows[ok]] = tg[list(SCORE_NAMES)].to_numpy(float)[m.truth_index[ok]]
    return out


def cnn_runs(folder: Path, n: int) -> dict[int, list[Path]]:
    """The finished CNN runs of ``folder`` at ``n`` labels, by repeat."""
    runs: dict[int, list[Path]] = {}
    for d in sorted((folder / "runs").glob(f"*-*-{n}-r*")):
        if (d / "metrics.json").exists():
            runs.setdefault(int(d.name.rsplit("-r", 1)[1]), []).append(d)
    return runs


def mae_row(pred: np.ndarray, ref: np.ndarray, **keys: object) -> dict[str, object]:
    """One results row: the mean absolute error of (M, 5) ``pred`` against ``ref`` per score
    over the finite entries of ``ref``."""
    err = np.abs(pred - ref)
    return {**keys, **{s: float(np.nanmean(err[:, k])) for k, s in enumerate(SCORE_NAMES)}}


def evaluate_folder(
    folder: Path,
    squares: Path,
    labels: Path,
    truth: pd.DataFrame,
    counts: list[int],
    unlabeled: int,
) -> pd.DataFrame:
    """Rows (set, method, labeled, repeat, n_test, one MAE column per score) for every repeat."""
    import torch

    from xcryonet.baselines import FeaturesGBM, GBMConfig, square_features
    from xcryonet.experiment import method_name, raw_crops
    from xcryonet.train import (
        MODEL_FILE,
        key_rows,
        load_checkpoint,
        load_model,
        load_squares_set,
        predict_tensor,
        read_table,
        split_rows,
    )

    table = read_table(squares, labels)
    y = table[[f"label_{s}" for s in SCORE_NAMES]].to_numpy(float)
    t_all = truth_scores(table, truth)
    complete = table["complete"].astype(bool).to_numpy() & np.isfinite(t_all).all(1)
    found = {n: cnn_runs(folder, n) for n in counts}
    if not any(found.values()):
        raise InputError(folder, f"no finished runs at {counts} labels under runs/")
    scored = np.flatnonzero(complete | table["labelled"].to_numpy())
    crops, masks = raw_crops(squares, table.iloc[scored])
    x, _ = square_features(crops, masks)
    features = np.full((len(table), x.shape[1]), np.nan)
    features[scored] = x
    rows: list[dict[str, object]] = []
    for n, by_repeat in found.items():
        for r, run_dirs in sorted(by_repeat.items()):
            saved = {d: load_checkpoint(d / MODEL_FILE)["run"] for d in run_dirs}
            frac = float(saved[run_dirs[0]]["train"]["test_fraction"])
            lab, _, test = split_rows(
                table, supervision="fs", labeled=n, unlabeled=0, test_fraction=frac, seed=r
            )
            _, unl, _ = split_rows(
                table, supervision="ss", labeled=n, unlabeled=unlabeled, test_fraction=frac, seed=r
            )
            seen = np.zeros(len(table), bool)
            seen[lab] = seen[unl] = True
            unseen = np.flatnonzero(complete & ~seen)
            both = np.union1d(test, unseen)  # every square scored (test is among the unseen)
            sets = {
                "labels": (test, y[test]),
                "truth": (test, t_all[test]),
                "unseen": (unseen, t_all[unseen]),
            }
            gbm = FeaturesGBM(GBMConfig(round_scores=False)).fit_features(features[lab], y[lab])
            preds = {"features_gbm": np.full((len(table), len(SCORE_NAMES)), np.nan)}
            preds["features_gbm"][both] = np.rint(gbm.predict_features(features[both]))
            for d in run_dirs:
                if not np.array_equal(key_rows(table, saved[d]["test_keys"], d), test):
                    raise InputError(d, f"its test squares are not split {r}'s of {labels}")
                model, cfg = load_model(d)
                data = load_squares_set(squares, table.iloc[both], cfg, np.ones(len(both), bool))
                v, s = d.name.split("-")[:2]
                preds[method_name(v, s)] = np.full_like(preds["features_gbm"], np.nan)
                with torch.inference_mode():
                    preds[method_name(v, s)][both] = np.rint(predict_tensor(model, data.x).numpy())
            preds["truth"] = t_all
            for name, (idx, ref) in sets.items():
                for method, p in preds.items():
                    if method == "truth" and name != "labels":
                        continue
                    keys = {"set": name, "method": method, "labeled": n, "repeat": r}
                    rows.append(mae_row(p[idx], ref, **keys, n_test=len(idx)))
    return pd.DataFrame(rows)


def label_truth_counts(squares: Path, labels: Path, truth: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Per defect score, the labelled squares counted by operator label (rows) and true score
    (columns): where the slips fall."""
    from xcryonet.train import read_table

    table = read_table(squares, labels)
    true = truth_scores(table, truth)
    out = {}
    for score in ("cracking", "contamination"):
        k = SCORE_NAMES.index(score)
        ok = table[f"label_{score}"].notna().to_numpy() & np.isfinite(true[:, k])
        out[score] = pd.crosstab(
            table.loc[ok, f"label_{score}"].astype(int).rename("label"),
            pd.Series(true[ok, k].astype(int), index=table.index[ok], name="truth"),
        )
    return out


def report(args: argparse.Namespace) -> int:
    from xcryonet.experiment import claims

    truth = read_truth(args.truth)
    if truth is None:
        return 2
    for score, counts in label_truth_counts(Path(args.squares), Path(args.labels), truth).items():
        print(f"\n== {score}: labelled squares by operator label (rows) and truth (columns)")
        print(counts.to_string())
    res = evaluate_folder(
        Path(args.folder),
        Path(args.squares),
        Path(args.labels),
        truth,
        args.labeled,
        args.unlabeled,
    )
    pd.set_option("display.width", 160)
    cols = ["cracking", "contamination", "overall", "brightness", "squareness"]
    for name in SETS:
        part = res[res["set"] == name]
        table = part.groupby(["labeled", "method"], sort=False)[cols + ["n_test"]].mean()
        print(f"\n== {name}: rounded MAE, mean over {part['repeat'].nunique()} repeats")
        print(table.round(3).to_string())
        checks = claims(part[part["method"] != "truth"].drop(columns="set"))
        if not checks.empty:
            show = [*checks.columns[:5], "mean_diff", "ci_low", "ci_high", "won", "lost"]
            print(checks[[*show, "verdict"]].round(3).to_string(index=False))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folder", help="an `xcryonet experiment --out` folder")
    ap.add_argument("--labeled", type=int, nargs="+", default=[100, 500, 900])
    ap.add_argument("--truth", default=str(ROOT / "data" / "truth"))
    ap.add_argument("--unlabeled", type=int, default=1500, help="the protocol's SS squares")
    add_data_args(ap, ROOT)
    return report_or_one_line_error("label_noise", report, ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
