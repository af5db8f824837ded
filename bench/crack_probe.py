"""How much of the cracking label is one number: the bright share of the square's own opening?

    python bench/crack_probe.py [--squares squares] [--labels data/labels.csv]
        [--labeled 100 500 900] [--repeats 4] [--all-features]

On the experiment's own splits (``train.split_rows``, seeds 0..repeats-1, the same test squares
as ``xcryonet experiment``'s table) it fits a monotone (isotonic) map from one statistic to the
cracking label on the labelled training squares and prints the test MAE of its rounded
predictions, mean ± s.d. over the repeats. The statistics, on the model's own input:

- ``own opening``: ``xcryonet.model.crack_share``, the number ``model.crack_stat`` hands the
  classifiers: the share of the opening joined to the crop's centre that lies more than
  ``CRACK_HEADROOM`` of the way from its median to full transmission;
- ``whole crop``: the same over every pixel above the open-area threshold, so the slivers of
  the neighbouring squares' openings beyond the bars count too (what a network pooling over
  the whole crop sees);
- ``own opening, profile``: the seven numbers ``model.crack_profile`` hands the classifiers
  (the share, the shares above more margins, soft shares), through ``features_gbm``'s
  gradient boosting instead of a monotone map;
- ``own opening, profile + input_stats``: those seven and ``input_stats``'s seven through a
  small MLP (``mlp_maes``);
- ``boosting, 77 features`` with ``--all-features``: the ``features_gbm`` baseline itself, for
  comparison (about 2 min more).

If the first does about as well as boosting, the cracking label is that number binned.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import (  # noqa: E402  (bench/ sibling)
    add_data_args,
    fs_splits,
    label_matrix,
    monotone_fit_maes,
    report_or_one_line_error,
)

from xcryonet import model as xm  # noqa: E402
from xcryonet.baselines import FeaturesGBM, mae, square_features  # noqa: E402
from xcryonet.config import load_params  # noqa: E402
from xcryonet.errors import InputError  # noqa: E402
from xcryonet.experiment import raw_crops  # noqa: E402
from xcryonet.labels import SCORE_NAMES  # noqa: E402
from xcryonet.train import load_squares_set, read_table  # noqa: E402

Splits = list[tuple[np.ndarray, np.ndarray]]  # ``fs_splits``: (labelled rows, test rows)
Learner = Callable[[np.ndarray, np.ndarray, Splits], list[float]]  # (feats, y, splits) -> MAEs


def gbm_maes(feats: np.ndarray, y: np.ndarray, splits: Splits) -> list[float]:
    """Rounded cracking MAE per split (``fs_splits``) of the ``features_gbm`` learner on
    ``feats`` (N, F)."""
    maes = []
    for lab, test in splits:
        gbm = FeaturesGBM().fit_features(feats[lab], y[lab])
        pred = np.rint(np.clip(gbm.predict_features(feats[test]), 0, 4))
        maes.append(mae(y[test], pred)["cracking"])
    return maes


def mlp_maes(feats: np.ndarray, y: np.ndarray, splits: Splits) -> list[float]:
    """Rounded cracking MAE per split of a small MLP (64-64 hidden, scikit-learn, seed 0) on
    ``feats`` (N, F): what a cracking path reading only statistics could learn."""
    from sklearn.neural_network import MLPRegressor

    cracking = SCORE_NAMES.index("cracking")
    maes = []
    for lab, test in splits:
        ok, ok_test = lab[~np.isnan(y[lab, cracking])], test[~np.isnan(y[test, cracking])]
        mlp = MLPRegressor(hidden_layer_sizes=(64, 64), max_iter=2000, random_state=0, alpha=1e-3)
        mlp.fit(feats[ok], y[ok, cracking])
        pred = np.rint(np.clip(mlp.predict(feats[ok_test]), 0, 4))
        maes.append(float(np.abs(pred - y[ok_test, cracking]).mean()))
    return maes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_data_args(ap, ROOT)
    ap.add_argument("--labeled", type=int, nargs="+", default=[100, 500, 900])
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--all-features", action="store_true", help="also the 77-feature baseline")
    ap.add_argument("--params", default=str(ROOT / "params.yaml"), help="params file")
    return report_or_one_line_error(Path(__file__).name, report, ap.parse_args(argv))


def report(args: argparse.Namespace) -> int:
    """Print the table for ``args``."""
    if args.repeats < 1:
        raise InputError("--repeats", f"must be >= 1, got {args.repeats}")
    torch.set_num_threads(1)
    params = load_params(args.params)
    cfg = dataclasses.replace(params.model, extremes=True)
    table = read_table(args.squares, args.labels)
    y = label_matrix(table)
    rows = np.flatnonzero(table["labelled"].to_numpy())
    x = load_squares_set(args.squares, table.iloc[rows], cfg, np.ones(len(rows), bool)).x
    gate = xm.HOLE_MIN_CONTRAST / cfg.norm_std
    share = {
        own: xm.crack_share(x, cfg.norm_mean, cfg.norm_std, gate, own=own)[:, 0].numpy()
        for own in (True, False)
    }
    cracking = SCORE_NAMES.index("cracking")

    def monotone(feats: np.ndarray, y: np.ndarray, splits: Splits) -> list[float]:
        return monotone_fit_maes(feats[:, 0], y[:, cracking], splits)

    # name -> (statistics (labelled rows, F), the learner that maps them to the label)
    sets: dict[str, tuple[np.ndarray, Learner]] = {
        "own opening": (share[True][:, None], monotone),
        "whole crop": (share[False][:, None], monotone),
    }
    profile = xm.crack_share(x, cfg.norm_mean, cfg.norm_std, gate, profile=True).numpy()
    sets["own opening, profile (7, boosting)"] = (profile, gbm_maes)
    with_stats = np.concatenate([profile, xm.input_stats(x[:, :1]).numpy()], axis=1)
    sets["own opening, profile + input_stats (14, MLP)"] = (with_stats, mlp_maes)
    if args.all_features:
        crops, masks = raw_crops(Path(args.squares), table.iloc[rows])
        sets["boosting, 77 features"] = (square_features(crops, masks)[0], gbm_maes)
    test_fraction = params.train.test_fraction
    splits = {
        n: fs_splits(table, n, args.repeats, test_fraction, args.labels) for n in args.labeled
    }
    print("statistic | labelled | cracking MAE (rounded), mean ± s.d. | per repeat")
    for name, (f, learner) in sets.items():
        feats = np.zeros((len(table), f.shape[1]))
        feats[rows] = f
        for n in args.labeled:
            maes = learner(feats, y, splits[n])
            per = " ".join(f"{m:.3f}" for m in maes)
            print(f"{name} | {n} | {np.mean(maes):.3f} ± {np.std(maes, ddof=1):.3f} | {per}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
