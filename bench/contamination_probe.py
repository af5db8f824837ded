"""How much of the contamination label is one number: the enclosed dark share of the open area?

    python bench/contamination_probe.py [--squares squares] [--labels data/labels.csv]
        [--labeled 100 900] [--repeats 4]

On the experiment's own splits (``train.split_rows``, seeds 0..repeats-1, the same test squares
as ``xcryonet experiment``'s table) it fits a monotone (isotonic) map from one statistic to the
contamination label on the labelled training squares and prints the test MAE of its rounded
predictions, mean ± s.d. over the repeats. The statistics:

- ``extractor``: holes of the extractor's open-area mask at native resolution, as a share of
  the filled mask (``scipy.ndimage.binary_fill_holes``), as the boosted features see them;
- ``model``: the same share on the model's own input (``model.input_px``, normalised), with
  the input statistics' open-area threshold and black squares at 0: the number
  ``model.hole_stat`` hands the classifiers (``xcryonet.model.hole_share``).

If one number does about as well as gradient boosting on 77 features, the contamination label
is that number binned, and a model without it has to learn "is this dark patch enclosed by
film?" from the labels, which two ResBlocks' receptive field cannot see. (Handing the CNN's
classifiers this number as one more input statistic did not close the gap with the regression
head, docs/experiment.md "Follow-up 4"; with the coral head it does, "Follow-up 13".)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import ndimage as ndi

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import (  # noqa: E402  (bench/ sibling)
    add_data_args,
    fs_splits,
    labelled_crops,
    monotone_fit_maes,
    report_or_one_line_error,
)  # noqa: E402  (bench/ sibling)

from xcryonet.config import ModelConfig, load_params  # noqa: E402
from xcryonet.errors import InputError  # noqa: E402
from xcryonet.labels import SCORE_NAMES  # noqa: E402
from xcryonet.model import HOLE_MIN_CONTRAST, hole_share  # noqa: E402
from xcryonet.train import load_squares_set  # noqa: E402

CONTAMINATION = SCORE_NAMES.index("contamination")


def mask_hole_share(masks: list[np.ndarray]) -> np.ndarray:
    """(N,) share of each filled open-area mask that is holes."""
    out = np.zeros(len(masks))
    for i, m in enumerate(masks):
        if m.size:
            filled = ndi.binary_fill_holes(m)
            n_filled = int(np.count_nonzero(filled))
            out[i] = np.count_nonzero(filled & ~m) / max(n_filled, 1)
    return out


def model_hole_share(squares: str, table: pd.DataFrame, cfg: ModelConfig) -> np.ndarray:
    """(N,) share of the filled open area that is holes on the model's input, per table row:
    ``xcryonet.model.hole_share``, the statistic ``model.hole_stat`` hands the classifiers
    (black squares 0), as the share itself."""
    data = load_squares_set(squares, table, cfg, np.ones(len(table), bool))
    stat = hole_share(data.x, HOLE_MIN_CONTRAST / cfg.norm_std)[:, 0].numpy()
    return (stat / 4) ** 2


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_data_args(ap, ROOT)
    ap.add_argument("--labeled", type=int, nargs="+", default=[100, 900])
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--params", default=str(ROOT / "params.yaml"), help="params file")
    args = ap.parse_args(argv)
    return report_or_one_line_error(Path(__file__).name, report, args)


def report(args: argparse.Namespace) -> int:
    if args.repeats < 1:
        raise InputError("--repeats", f"must be >= 1, got {args.repeats}")
    torch.set_num_threads(1)
    params = load_params(args.params)
    table, y, _, masks = labelled_crops(args.squares, args.labels)
    labelled = table["labelled"].to_numpy()
    stats = {"extractor": np.full(len(table), np.nan), "model": np.full(len(table), np.nan)}
    rows = np.flatnonzero(labelled)
    stats["extractor"][rows] = mask_hole_share([masks[i] for i in rows])
    stats["model"][rows] = model_hole_share(args.squares, table.iloc[rows], params.model)
    print("statistic | labelled | contamination MAE (rounded), mean ± s.d. | per repeat")
    for name, s in stats.items():
        for n in args.labeled:
            splits = fs_splits(table, n, args.repeats, params.train.test_fraction, args.labels)
            maes = monotone_fit_maes(s, y[:, CONTAMINATION], splits)
            per = " ".join(f"{m:.3f}" for m in maes)
            print(f"{name} | {n} | {np.mean(maes):.3f} ± {np.std(maes, ddof=1):.3f} | {per}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
