"""Are the attention maps meaningful? Compare them with the simulator's per-pixel defect map.

The demo grids are re-simulated in memory (``dataset_plan`` + ``simulate_grid``: deterministic,
nothing is written), which gives ``SimulatedGrid.defects`` in the simulator's image frame. Each
extracted square is matched to its truth square by stage position; the defect map is cropped
with the extracted crop's window, moved into the simulator frame by the local offset between
the reader's stitched frame and the simulator's (the median over nearby matched squares of
extracted minus true centre, px), and resampled (nearest) to the model's input size. Then
``contrast`` compares the attention on defect pixels with the attention on the rest of the
open area: cracking attention on crack and broken-film pixels, contamination attention on
contamination pixels.

The open area is the extracted crop's open mask (bars and occluded parts excluded) joined with
every true crack, broken-film and contamination pixel: the extractor's mask leaves out dark
debris, which is exactly where the contamination attention should look.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from xcryonet.config import SimulateConfig
from xcryonet.errors import InputError
from xcryonet.model import XCryoNet
from xcryonet.simulate import (
    DEFECT_BROKEN,
    DEFECT_CONTAMINATION,
    DEFECT_CRACK,
    DEFECT_OCCLUDED,
    SimulatedGrid,
    dataset_plan,
    simulate_grid,
    truth_in_frame,
)

# What each attention channel should find: (report name, channel, defect classes).
TARGETS: tuple[tuple[str, int, tuple[int, ...]], ...] = (
    ("crack", 0, (DEFECT_CRACK,)),
    ("broken", 0, (DEFECT_BROKEN,)),
    ("cracking", 0, (DEFECT_CRACK, DEFECT_BROKEN)),
    ("contamination", 1, (DEFECT_CONTAMINATION,)),
)

# crops (list of (S, S) relative transmission) -> attention maps (N, 2, P, P).
AttentionFn = Callable[[Sequence[np.ndarray]], np.ndarray]


def rank_auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """Fraction of (pos, neg) pairs with pos > neg (ties count half): Mann-Whitney AUC by ranks.

    NaN when either side is empty.
    """
    from scipy.stats import rankdata

    pos, neg = np.ravel(pos), np.ravel(neg)
    n_p, n_n = len(pos), len(neg)
    if n_p == 0 or n_n == 0:
        return float("nan")
    ranks = rankdata(np.concatenate([pos, neg]))
    u = float(ranks[:n_p].sum()) - n_p * (n_p + 1) / 2
    return u / (n_p * n_n)


def contrast(maps: np.ndarray, defect_masks: np.ndarray, open_masks: np.ndarray) -> dict[str, Any]:
    """How much more attention falls on defect pixels than on the rest of the open area.

    Args:
        maps: (N, P, P) attention of one channel.
        defect_masks: (N, P, P) bool, the true defect pixels.
        open_masks: (N, P, P) bool, the open area (defect pixels outside it are ignored).

    Returns:
        Over the squares with at least one defect pixel and one other open pixel: ``n_squares``,
        ``mean_in`` / ``mean_out`` (pooled over all their defect / other open pixels),
        ``ratio`` = mean_in / mean_out, and the per-square AUC (probability that a defect pixel
        outranks another open pixel of the same square) as ``auc_mean`` and ``auc_median``.
        The figures are NaN when no square qualifies.
    """
    maps = np.asarray(maps, np.float64)
    inside = np.asarray(defect_masks, bool) & np.asarray(open_masks, bool)
    outside = ~np.asarray(defect_masks, bool) & np.asarray(open_masks, bool)
    sum_in = sum_out = 0.0
    n_in = n_out = 0
    aucs: list[float] = []
    for m, a, b in zip(maps, inside, outside, strict=True):
        if not a.any() or not b.any():
            continue
        pos, neg = m[a], m[b]
        sum_in += float(pos.sum())
        sum_out += float(neg.sum())
        n_in += len(pos)
        n_out += len(neg)
        aucs.append(rank_auc(pos, neg))
    nan = float("nan")
    mean_in = sum_in / n_in if n_in else nan
    mean_out = sum_out / n_out if n_out else nan
    return {
        "n_squares": len(aucs),
        "mean_in": mean_in,
        "mean_out": mean_out,
        "ratio": mean_in / mean_out if n_in and mean_out > 0 else nan,
        "auc_mean": float(np.mean(aucs)) if aucs else nan,
        "auc_median": float(np.median(aucs)) if aucs else nan,
    }


def crop_window(image: np.ndarray, top_left: tuple[int, int], side: int) -> np.ndarray:
    """(side, side) window of ``image`` at (row, col) ``top_left``; 0 outside the image."""
    r0, c0 = top_left
    out = np.zeros((side, side), image.dtype)
    a0, a1 = max(r0, 0), min(r0 + side, image.shape[0])
    b0, b1 = max(c0, 0), min(c0 + side, image.shape[1])
    if a1 > a0 and b1 > b0:
        out[a0 - r0 : a1 - r0, b0 - c0 : b1 - c0] = image[a0:a1, b0:b1]
    return out


def resample_nearest(a: np.ndarray, px: int) -> np.ndarray:
    """(..., S, S) -> (..., px, px) by nearest pixel centre (labels and masks stay exact)."""
    s = a.shape[-1]
    idx = np.minimum(((np.arange(px) + 0.5) * s / px).astype(np.int64), s - 1)
    return a[..., idx[:, None], idx[None, :]]


def local_offsets(found_rc: np.ndarray, offsets: np.ndarray, k: int = 9) -> np.ndarray:
    """Per square, the median offset (row, col) of its ``k`` nearest matched squares.

    Args:
        found_rc: (N, 2) positions of all squares, px.
        offsets: (N, 2) extracted minus true centre, NaN for unmatched squares.

    Returns:
        (N, 2) int64 offsets (0 where no square matched). The reader stitches tiles that may
        sit a few px apart, so the offset is only locally constant; the median over
        neighbours removes each centre's own detection error.
    """
    from scipy.spatial import cKDTree

    ok = ~np.isnan(offsets).any(axis=1)
    out = np.zeros((len(found_rc), 2), np.int64)
    if not ok.any():
        return out
    kk = min(k, int(ok.sum()))
    _, nn = cKDTree(found_rc[ok]).query(found_rc, k=kk)
    nn = np.asarray(nn).reshape(len(found_rc), kk)
    out[:] = np.rint(np.median(offsets[ok][nn], axis=1)).astype(np.int64)
    return out


def _ncc(a: np.ndarray, b: np.ndarray) -> float:
    """Normalised cross-correlation of two equal arrays (NaN if either is flat)."""
    a = a.astype(np.float64).ravel() - a.mean()
    b = b.astype(np.float64).ravel() - b.mean()
    den = float(np.sqrt((a @ a) * (b @ b)))
    return float(a @ b) / den if den > 0 else float("nan")


def grid_samples(
    grid: SimulatedGrid,
    layout: str,
    squares: pd.DataFrame,
    crops: np.ndarray,
    masks: np.ndarray,
) -> dict[str, Any]:
    """Defect crops of one grid's extracted squares, aligned with their extracted crops.

    Args:
        grid: the re-simulated grid (with ``defects``).
        layout: how it was written; an ``mrc`` grid's stage frame is image-centred.
        squares: the grid's squares.csv rows (x_um, y_um, row_px, col_px, square_id, pitch_um).
        crops, masks: the grid's crops.npz arrays (all squares), (M, S, S).

    Returns:
        ``index`` (K,) rows of ``squares`` that matched a truth square; ``defects`` (K, S, S)
        uint8; ``crops`` (K, S, S) and ``masks`` (K, S, S) of those squares; ``offsets`` (K, 2)
        px applied; ``ncc`` (K,) correlation of each crop with the noise-free image window
        (near 1 when the frames line up); ``kinds`` (K,) the truth's planted defects
        (e.g. ``"crack+contamination"`` or ``"none"``).
    """
    from xcryonet.extract import match_squares
    from xcryonet.io.atlas import centred_affine

    if grid.defects is None:
        raise ValueError("the simulated grid carries no defect map")
    truth = grid.truth
    if layout == "mrc":
        truth = truth_in_frame(truth, centred_affine(grid.image.shape, grid.pixel_size_um))
    pitch = float(squares["pitch_um"].iloc[0]) if len(squares) else grid.spec.pitch_um
    m = match_squares(
        squares[["x_um", "y_um"]].to_numpy(float),
        truth[["x_um", "y_um"]].to_numpy(float),
        truth["complete"].to_numpy(bool),
        0.3 * pitch,
    )
    hit = m.truth_index >= 0
    found_rc = squares[["row_px", "col_px"]].to_numpy(float)
    true_rc = truth[["row_px", "col_px"]].to_numpy(float)
    offsets = np.full((len(squares), 2), np.nan)
    offsets[hit] = found_rc[hit] - true_rc[m.truth_index[hit]]
    local = local_offsets(found_rc, offsets)
    side = crops.shape[-1]
    index = np.flatnonzero(hit)
    ids = squares["square_id"].to_numpy(int)[index]
    out_d = np.zeros((len(index), side, side), np.uint8)
    ncc = np.zeros(len(index))
    for k, i in enumerate(index):
        # The extracted crop's top-left in the reader's frame, moved into the simulator's.
        r0 = int(round(found_rc[i, 0])) - side // 2 - int(local[i, 0])
        c0 = int(round(found_rc[i, 1])) - side // 2 - int(local[i, 1])
        out_d[k] = crop_window(grid.defects, (r0, c0), side)
        ncc[k] = _ncc(crop_window(grid.image, (r0, c0), side), crops[ids[k]])
    return {
        "index": index,
        "defects": out_d,
        "crops": np.asarray(crops[ids], np.float32),
        "masks": np.asarray(masks[ids], bool),
        "offsets": local[index],
        "ncc": ncc,
        "kinds": truth["defects"].to_numpy(str)[m.truth_index[index]],
    }


def _attend_with(model: XCryoNet) -> AttentionFn:
    from xcryonet.explain import square_attention

    def attend(crops: Sequence[np.ndarray]) -> np.ndarray:
        return square_attention(model, crops)[1]

    return attend


def attention_contrast(
    model: XCryoNet | AttentionFn,
    squares_dir: str | Path,
    sim_cfg: SimulateConfig,
    *,
    grids: Sequence[str] | None = None,
    max_squares: int | None = None,
) -> dict[str, Any]:
    """Attention on the simulator's true defects against attention elsewhere in the open area.

    Args:
        model: a trained XCryoNet (maps from ``xcryonet.explain.square_attention``), or any
            function from crops (list of (S, S) relative transmission) to (N, 2, P, P) maps,
            channel 0 cracking, 1 contamination.
        squares_dir: output of ``xcryonet extract`` on the demo grids of ``sim_cfg``.
        sim_cfg: the config the demo was simulated with (re-simulated here, in memory).
        grids: grid ids to use (default: every grid in ``squares_dir``).
        max_squares: at most this many squares, spread evenly over the grids.

    Returns:
        ``squares`` used, ``grids``, alignment figures (``offset_px_median`` of |offset| and
        ``ncc_median`` of each crop against the noise-free image window), and one ``contrast``
        dict per entry of ``TARGETS`` (crack, broken, cracking = crack + broken, contamination)
        and ``contamination_planted`` (only the squares planted with contamination, not just
        the specks every square has).
    """
    from xcryonet.stages import load_crops, load_squares

    attend = _attend_with(model) if isinstance(model, XCryoNet) else model
    squares_dir = Path(squares_dir)
    table = load_squares(squares_dir)
    plans = {spec.grid_id: (spec, layout, seed) for spec, layout, seed in dataset_plan(sim_cfg)}
    wanted = sorted(set(table["grid_id"]) if grids is None else grids)
    unknown = [g for g in wanted if g not in plans]
    if unknown:
        raise InputError(squares_dir, f"grids {unknown} are not in the simulator's demo plan")
    per_grid = None if max_squares is None else -(-max_squares // max(len(wanted), 1))
    maps_all, defects_all, open_all = [], [], []
    offsets, nccs, kinds = [], [], []
    for grid_id in wanted:
        spec, layout, seed = plans[grid_id]
        grid = simulate_grid(replace(spec, with_tiles=False), seed)
        sq = table[table["grid_id"] == grid_id].reset_index(drop=True)
        crops, masks = load_crops(squares_dir, grid_id)
        s = grid_samples(grid, layout, sq, crops, masks)
        del grid
        take = slice(None) if per_grid is None else slice(0, per_grid)
        maps = np.asarray(attend(list(s["crops"][take])), np.float32)
        px = maps.shape[-1]
        defects = resample_nearest(s["defects"][take], px)
        open_ = resample_nearest(s["masks"][take], px) | np.isin(
            defects, (DEFECT_CRACK, DEFECT_BROKEN, DEFECT_CONTAMINATION)
        )
        open_ &= defects != DEFECT_OCCLUDED
        maps_all.append(maps)
        defects_all.append(defects)
        open_all.append(open_)
        offsets.append(s["offsets"][take])
        nccs.append(s["ncc"][take])
        kinds.append(s["kinds"][take])
    maps_c = np.concatenate(maps_all)
    defects_c = np.concatenate(defects_all)
    open_c = np.concatenate(open_all)
    off = np.concatenate(offsets)
    result: dict[str, Any] = {
        "squares": len(maps_c),
        "grids": wanted,
        "offset_px_median": float(np.median(np.abs(off))) if len(off) else float("nan"),
        "ncc_median": float(np.nanmedian(np.concatenate(nccs))) if len(off) else float("nan"),
    }
    for name, channel, classes in TARGETS:
        result[name] = contrast(maps_c[:, channel], np.isin(defects_c, classes), open_c)
    # Every square has a few specks; the squares planted with contamination show real blobs.
    planted = np.array(["contamination" in k for k in np.concatenate(kinds)], bool)
    result["contamination_planted"] = contrast(
        maps_c[planted, 1], defects_c[planted] == DEFECT_CONTAMINATION, open_c[planted]
    )
    return result
