"""Are a trained model's attention maps meaningful? Print their contrast on the simulator's truth.

    python bench/attention.py --model out/experiment/runs/xcryonet-ss-100-r0 [--squares squares]
        [--grids grid01 grid02] [--max-squares 600]

The demo grids are re-simulated in memory with the ``simulate`` section of params.yaml (the
same settings ``make demo`` used), so the per-pixel defect map (crack, broken film,
contamination) is known for every extracted square. For each target the script prints the mean
cracking or contamination attention on the true defect pixels against the mean on the rest of
the open area, their ratio, and the per-square AUC (0.5 = the map ignores the defect, 1 = every
defect pixel outranks every other open pixel). The model's maps are shown from one view and as
the mean over the square's 8 flips/rotations (what ``xcryonet score`` draws when ``model.tta``
is on). As a reference it prints the same figures for an image-only stand-in (cracking: how much
brighter than the square's median a pixel is; contamination: how much darker), which shows what
the check can detect; for the stand-in averaged to the model's feature-map raster (the best a
map that coarse can do with this cue); and for a constant map (AUC 0.5). See
``xcryonet.attention_check``.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from common import report_or_one_line_error  # noqa: E402  (bench/ sibling)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from xcryonet.attention_check import TARGETS, attention_contrast  # noqa: E402
from xcryonet.config import load_params  # noqa: E402
from xcryonet.model import XCryoNet  # noqa: E402
from xcryonet.train import load_model, resample  # noqa: E402


def intensity_standin(px: int, grid: int | None = None):  # type: ignore[no-untyped-def]
    """Crops -> (N, 2, px, px): intensity above the median (cracking), below it (contamination).

    ``grid``: the stand-in averaged over a grid x grid raster and upsampled back, as the model's
    maps are (its feature maps are input_px / (4 x stem_stride) wide): the best a map of that
    resolution could do with this cue.
    """

    def attend(crops: Sequence[np.ndarray]) -> np.ndarray:
        out = []
        for c in crops:
            x = resample(np.asarray(c, np.float32)[None], px)[0, 0].numpy()
            d = x - np.median(x)
            out.append(np.stack([d, -d]))
        maps = torch.from_numpy(np.asarray(out, np.float32))
        if grid is not None and len(maps):
            coarse = F.adaptive_avg_pool2d(maps, grid)
            maps = F.interpolate(coarse, size=(px, px), mode="bilinear", align_corners=False)
        return maps.numpy()

    return attend


def with_views(model: XCryoNet, tta: bool) -> XCryoNet:
    """A copy of the model with ``cfg.tta`` set: maps from one view, or the mean of the 8."""
    twin = copy.deepcopy(model)
    twin.cfg = replace(model.cfg, tta=tta)
    return twin


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="model folder (model.pt)")
    ap.add_argument("--squares", default=str(ROOT / "squares"), help="xcryonet extract output")
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--grids", nargs="+", help="grid ids (default: all)")
    ap.add_argument("--max-squares", type=int, default=None, help="spread over the grids")
    args = ap.parse_args(argv)
    return report_or_one_line_error(Path(__file__).name, report, args)


def report(args: argparse.Namespace) -> int:
    """Print the attention-contrast table for ``args``."""
    params = load_params(args.params)
    model, cfg = load_model(args.model)
    grid = cfg.input_px // (4 * cfg.stem_stride)
    sources = {
        f"model ({model.variant}, {cfg.input_px} px), 1 view": with_views(model, False),
        "model, mean of 8 views": with_views(model, True),
        "image stand-in": intensity_standin(cfg.input_px),
        f"image stand-in at {grid} x {grid}": intensity_standin(cfg.input_px, grid),
        "constant map": lambda crops: np.full((len(crops), 2, cfg.input_px, cfg.input_px), 0.5),
    }
    print(
        f"{'maps':32s} {'target':22s} {'squares':>7s} {'in':>6s} {'out':>6s} "
        f"{'ratio':>6s} {'AUC':>6s}"
    )
    for label, source in sources.items():
        res = attention_contrast(
            source, args.squares, params.simulate, grids=args.grids, max_squares=args.max_squares
        )
        for name in [t[0] for t in TARGETS] + ["contamination_planted"]:
            c = res[name]
            print(
                f"{label:32s} {name:22s} {c['n_squares']:7d} {c['mean_in']:6.3f} "
                f"{c['mean_out']:6.3f} {c['ratio']:6.2f} {c['auc_mean']:6.3f}"
            )
    print(
        f"alignment: median |offset| {res['offset_px_median']:.2f} px, "
        f"median NCC {res['ncc_median']:.3f}, {res['squares']} squares"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
