"""How finely should the crack statistics be read? (``model.stat_px``)

    python bench/stat_px_probe.py [--px 64 128] [--labeled 100 500 900] [--repeats 4]
        [--seeds 3] [--truth data/truth] [--squares DIR] [--labels CSV]

For each side in ``--px`` this computes, with the model's own code (``XCryoNet.input_statistics``
of a model built with ``model.stat_px`` = that side; 64 = the network's raster, no pooling),
the statistics the classifiers get in the tuned setting (``input_stats``, the crack profile,
the hole share: 15 numbers; only the crack profile depends on the side). Then, on the
experiment's own splits (``train.split_rows``, repeats 0..``--repeats``-1), it fits a small MLP
(64-64 hidden, standardised inputs, ``--seeds`` seeds) and ``features_gbm``'s gradient boosting
on the split's labelled squares, and prints the rounded cracking MAE:

- ``labels``: the split's test squares against the operator's labels (the table's figures;
  160 squares, with the operator's slips);
- ``truth``: every complete square no method of the split trained on, against the simulator's
  truth (``bench/label_noise.py``'s ``unseen`` set, about 900-1700 squares a split).

If the finer side lowers the truth column, the statistics read at 64 px lose cracks.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import add_data_args, read_truth, report_or_one_line_error  # noqa: E402  (bench/ sibling)
from label_noise import truth_scores  # noqa: E402

from xcryonet.config import ModelConfig  # noqa: E402
from xcryonet.errors import InputError  # noqa: E402
from xcryonet.labels import SCORE_NAMES  # noqa: E402

CRACKING = SCORE_NAMES.index("cracking")


def statistics(
    squares: Path, table: pd.DataFrame, rows: np.ndarray, cfg: ModelConfig
) -> np.ndarray:
    """(len(table), n_stats) the primary classifier's statistics of ``rows`` (0 elsewhere)."""
    import torch

    from xcryonet.model import build_model, n_stats_of
    from xcryonet.train import load_squares_set

    model = build_model("xcryonet", cfg).eval()
    out = np.zeros((len(table), n_stats_of(cfg)), np.float32)
    for k in range(0, len(rows), 400):
        part = rows[k : k + 400]
        x = load_squares_set(squares, table.iloc[part], cfg, np.ones(len(part), bool)).x
        with torch.inference_mode():
            stats = model.input_statistics(x.float())
        assert stats is not None
        out[part] = stats.numpy()
    return out


def report(args: argparse.Namespace) -> int:
    """Print the table for ``args``."""
    import torch
    from sklearn.neural_network import MLPRegressor
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from xcryonet.baselines import FeaturesGBM
    from xcryonet.config import load_params
    from xcryonet.train import read_table, split_rows

    if args.repeats < 1 or args.seeds < 1:
        raise InputError("--repeats/--seeds", "must be >= 1")
    truth = read_truth(args.truth)
    if truth is None:
        return 1
    torch.set_num_threads(1)
    params = load_params(args.params)
    base = dataclasses.replace(
        params.model,
        extremes=True,
        input_stats=True,
        hole_stat=True,
        crack_stat=True,
        crack_profile=True,
        input_px=64,
    )
    bad = [px for px in args.px if px < 64 or px % 64]
    if bad:
        raise InputError("--px", f"each side must be a multiple of 64, got {bad}")
    squares = Path(args.squares)
    table = read_table(squares, args.labels)
    y = table[[f"label_{s}" for s in SCORE_NAMES]].to_numpy(float)
    true = truth_scores(table, truth)
    complete = table["complete"].astype(bool).to_numpy() & np.isfinite(true).all(1)
    rows = np.flatnonzero(complete | table["labelled"].to_numpy())
    feats = {
        px: statistics(squares, table, rows, dataclasses.replace(base, stat_px=px))
        for px in args.px
    }
    frac = params.train.test_fraction
    print("side px | labelled | learner | cracking MAE labels (160/split) | truth (unseen)")
    for n in args.labeled:
        for px, x in feats.items():
            errs: dict[str, list[tuple[float, float]]] = {"MLP": [], "boosting": []}
            for r in range(args.repeats):
                lab, _, test = split_rows(
                    table, supervision="fs", labeled=n, unlabeled=0, test_fraction=frac, seed=r
                )
                _, unl, _ = split_rows(
                    table,
                    supervision="ss",
                    labeled=n,
                    unlabeled=args.unlabeled,
                    test_fraction=frac,
                    seed=r,
                )
                seen = np.zeros(len(table), bool)
                seen[lab] = seen[unl] = True
                unseen = np.flatnonzero(complete & ~seen)
                test = test[np.isfinite(y[test, CRACKING])]
                ok = lab[np.isfinite(y[lab, CRACKING])]
                for seed in range(args.seeds):
                    mlp = make_pipeline(
                        StandardScaler(),
                        MLPRegressor(
                            hidden_layer_sizes=(64, 64),
                            max_iter=2000,
                            random_state=seed,
                            alpha=1e-3,
                        ),
                    ).fit(x[ok], y[ok, CRACKING])
                    errs["MLP"].append(_maes(mlp.predict, x, y, true, test, unseen))
                gbm = FeaturesGBM().fit_features(x[lab], y[lab])
                predict = lambda f, g=gbm: g.predict_features(f)[:, CRACKING]  # noqa: E731
                errs["boosting"].append(_maes(predict, x, y, true, test, unseen))
            for learner, e in errs.items():
                a = np.asarray(e)
                print(f"{px} | {n} | {learner} | {a[:, 0].mean():.3f} | {a[:, 1].mean():.3f}")
    return 0


def _maes(
    predict: Callable[[np.ndarray], np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
    true: np.ndarray,
    test: np.ndarray,
    unseen: np.ndarray,
) -> tuple[float, float]:
    """Rounded cracking MAE on the test squares (labels) and on the unseen ones (truth)."""
    got = [np.rint(np.clip(predict(x[idx]), 0, 4)) for idx in (test, unseen)]
    return (
        float(np.abs(got[0] - y[test, CRACKING]).mean()),
        float(np.abs(got[1] - true[unseen, CRACKING]).mean()),
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_data_args(ap, ROOT)
    ap.add_argument("--px", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--labeled", type=int, nargs="+", default=[100, 500, 900])
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--seeds", type=int, default=3, help="MLP seeds per split")
    ap.add_argument("--unlabeled", type=int, default=1500, help="an SS run's unlabelled squares")
    ap.add_argument("--truth", default=str(ROOT / "data" / "truth"), help="simulator truth")
    ap.add_argument("--params", default=str(ROOT / "params.yaml"), help="params file")
    return report_or_one_line_error(Path(__file__).name, report, ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
