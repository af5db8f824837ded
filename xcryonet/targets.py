"""Targets: turn per-square scores into a ranked table of squares to collect.

The table is what ``xcryonet score`` writes as ``targets.csv`` and what the SerialEM navigator
writer (:mod:`xcryonet.io.nav`) reads. Pure functions on frames and arrays; no file I/O.

Ranking rules (per grid: every grid is loaded and collected on its own, so ranks restart at 1):

* scores are rounded to 2 decimals first, and the order is decided on the rounded values, so the
  order can always be explained from the CSV alone;
* higher ``overall`` first; ties go to the lower ``cracking + contamination`` (both scores grow
  with damage), then to the lower ``square_id``;
* only complete squares get a rank. A square cut by the atlas edge (``complete`` false) has a crop
  of part of the square only, so its scores describe what was seen, not the square; it keeps its
  scores but gets a blank rank (pandas ``<NA>``, an empty cell in the CSV) and sorts after every
  ranked square of its grid, or is dropped with ``include_incomplete=False``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from xcryonet.labels import SCORE_NAMES

TARGET_COLUMNS = ("grid_id", "square_id", "x_um", "y_um", *SCORE_NAMES, "rank")
SQUARE_COLUMNS = ("grid_id", "square_id", "x_um", "y_um", "complete")
DECIMALS = 2


def _complete_flags(values: pd.Series) -> np.ndarray:
    """``complete`` as bool; accepts bools, 0/1 and the strings True/False (any case)."""
    if values.dtype == bool:
        return values.to_numpy()
    text = values.astype(str).str.strip().str.lower()
    mapping = {"true": True, "1": True, "1.0": True, "false": False, "0": False, "0.0": False}
    bad = ~text.isin(list(mapping))
    if bad.any():
        raise ValueError(f"complete has a value that is not true/false: {values[bad].iloc[0]!r}")
    return text.map(mapping).to_numpy(dtype=bool)


def rank_targets(
    squares: pd.DataFrame, scores: np.ndarray, *, include_incomplete: bool = True
) -> pd.DataFrame:
    """Rank the squares of one or more grids by their predicted scores.

    Args:
        squares: one row per square with at least ``grid_id, square_id, x_um, y_um, complete``
            (stage position in µm), e.g. a ``squares.csv``.
        scores: (N, 5) float, one row per row of ``squares``, columns in ``SCORE_NAMES`` order
            (brightness, squareness, cracking, contamination, overall; 0..4 scale).
        include_incomplete: keep squares that are not complete (blank rank, sorted last in their
            grid); ``False`` drops them.

    Returns:
        A new frame with exactly the columns ``TARGET_COLUMNS``, sorted by grid then rank, with a
        fresh index. Scores are rounded to 2 decimals; ``rank`` is nullable ``Int64`` (1 = best).

    Raises:
        ValueError: missing columns, a shape mismatch, non-finite scores or stage positions.
    """
    missing = [c for c in SQUARE_COLUMNS if c not in squares.columns]
    if missing:
        raise ValueError(f"squares lack column(s) {', '.join(missing)}")
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or scores.shape != (len(squares), len(SCORE_NAMES)):
        raise ValueError(
            f"scores must have shape ({len(squares)}, {len(SCORE_NAMES)}), got {scores.shape}"
        )
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinity")

    out = pd.DataFrame(
        {
            "grid_id": squares["grid_id"].astype(str).to_numpy(),
            "square_id": squares["square_id"].to_numpy(),
            "x_um": pd.to_numeric(squares["x_um"]).to_numpy(dtype=np.float64),
            "y_um": pd.to_numeric(squares["y_um"]).to_numpy(dtype=np.float64),
        }
    )
    if not (np.isfinite(out["x_um"]).all() and np.isfinite(out["y_um"]).all()):
        raise ValueError("x_um/y_um contain NaN or infinity")
    for j, name in enumerate(SCORE_NAMES):
        out[name] = np.round(scores[:, j], DECIMALS)
    complete = _complete_flags(squares["complete"])
    if not include_incomplete:
        out = out[complete]
        complete = complete[complete]

    out["_incomplete"] = ~complete
    out["_damage"] = out["cracking"] + out["contamination"]
    out = out.sort_values(
        ["grid_id", "_incomplete", "overall", "_damage", "square_id"],
        ascending=[True, True, False, True, True],
        kind="mergesort",
    )
    # Complete squares come first in each grid, so their running count is their rank.
    rank = out.groupby("grid_id", sort=False).cumcount() + 1
    out["rank"] = rank.astype("Int64").where(~out["_incomplete"].to_numpy(), pd.NA)
    return out[list(TARGET_COLUMNS)].reset_index(drop=True)


def select_top(targets: pd.DataFrame, n: int, *, min_overall: float | None = None) -> pd.DataFrame:
    """The best ``n`` ranked squares of each grid, optionally only those scoring well enough.

    Args:
        targets: a frame from :func:`rank_targets` (or a ``targets.csv`` read back).
        n: how many squares per grid, at most; 0 gives an empty frame.
        min_overall: keep only squares with ``overall >= min_overall`` (0..4 scale).

    Returns:
        A new frame, same columns, sorted by grid then rank, fresh index. Unranked (incomplete)
        squares are never selected.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    missing = [c for c in ("grid_id", "overall", "rank") if c not in targets.columns]
    if missing:
        raise ValueError(f"targets lack column(s) {', '.join(missing)}")
    rank = pd.to_numeric(targets["rank"], errors="coerce")
    keep = rank.notna() & (rank <= n)
    if min_overall is not None:
        keep &= pd.to_numeric(targets["overall"], errors="coerce") >= min_overall
    out = targets[keep.to_numpy()].copy()
    out["_rank"] = rank[keep]
    out = out.sort_values(["grid_id", "_rank"], kind="mergesort").drop(columns="_rank")
    return out.reset_index(drop=True)
