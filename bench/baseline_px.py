"""Does the CNN's input size lose the defects? Gradient boosting on native vs. downsampled crops.

    python bench/baseline_px.py [--px 64] [--repeats 1] [--squares squares] [--labels ...]

For each repeat (the experiment's seeded splits) and 100 / 900 labelled squares, fits the
``features_gbm`` baseline on the native crops and on the crops resampled to ``--px`` (what the
CNN sees; the masks are resampled too) and prints the rounded-prediction MAE per score on the
same test squares. If the downsampled figures stay close to the native ones, the information
is in the model's input and a CNN that does worse is too weak, not starved.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import add_data_args, labelled_crops, report_or_one_line_error  # noqa: E402  (bench/ sibling)

from xcryonet.baselines import build_baseline  # noqa: E402
from xcryonet.labels import SCORE_NAMES  # noqa: E402
from xcryonet.train import resample, split_rows  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--px", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=1)
    add_data_args(ap, ROOT)
    args = ap.parse_args(argv)
    return report_or_one_line_error(Path(__file__).name, report, args)


def report(args: argparse.Namespace) -> int:
    """Print the table for ``args``."""
    table, y, crops, masks = labelled_crops(args.squares, args.labels)
    small = [resample(c[None], args.px)[0, 0].numpy() for c in crops]
    small_m = [resample(m[None].astype(np.float32), args.px)[0, 0].numpy() > 0.5 for m in masks]
    print(
        f"{'repeat':>6} {'labels':>6} {'input':>8} " + " ".join(f"{s[:8]:>8}" for s in SCORE_NAMES)
    )
    for r in range(args.repeats):
        for n in (100, 900):
            lab, _, test = split_rows(
                table, supervision="fs", labeled=n, unlabeled=0, test_fraction=0.15, seed=r
            )
            for name, c, m in (("native", crops, masks), (f"{args.px} px", small, small_m)):
                model = build_baseline("features_gbm", round_scores=True)
                model.fit([c[i] for i in lab], [m[i] for i in lab], y[lab])
                pred = model.predict([c[i] for i in test], [m[i] for i in test])
                err = np.nanmean(np.abs(pred - y[test]), axis=0)
                print(f"{r:>6} {n:>6} {name:>8} " + " ".join(f"{e:8.3f}" for e in err))
    return 0


if __name__ == "__main__":
    sys.exit(main())
