"""Automatic brightness and squareness scores of a square crop, as in the paper.

Both scores are integers 0..4, higher meaning brighter / more square. They are computed from the
crop and its open-area mask (``xcryonet.extract.crop_square``), so they need no operator.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage as ndi
from scipy.spatial import ConvexHull, QhullError
from skimage.feature import canny

from xcryonet.extract import Levels, block_mean

# Upper bin edges of the squareness ratio for scores 0..3 (4 above the last).
SQUARENESS_BINS = (0.5, 0.7, 0.85, 0.93)
# Canny runs on the crop downsampled to at most this side, px.
CANNY_MAX_PX = 256


def brightness_fraction(crop: np.ndarray, mask: np.ndarray, levels: Levels) -> float:
    """Mean open-area intensity as a fraction of the grid's bar-to-vacuum range.

    ``(mean(crop[mask]) - levels.bar) / (levels.vacuum - levels.bar)``, clipped to [0, 1]; 0 when
    the mask is empty. ``levels.bar`` is the opaque bars and ``levels.vacuum`` the brightest
    open-square level of the same atlas, so the fraction does not depend on the dose, gain or
    offset of the atlas and is comparable between grids.

    Args:
        crop: (S, S) intensities.
        mask: (S, S) bool open area.
        levels: the atlas' levels (``ExtractionResult.levels``).
    """
    if not mask.any():
        return 0.0
    mean = float(np.mean(crop[mask], dtype=np.float64))
    span = levels.vacuum - levels.bar
    if not span > 0:
        return 0.0
    return float(np.clip((mean - levels.bar) / span, 0.0, 1.0))


def auto_brightness(crop: np.ndarray, mask: np.ndarray, levels: Levels) -> int:
    """Brightness score 0..4: the mean of the open-area (non-zero mask) pixels, scaled.

    Scaling: ``b = brightness_fraction(crop, mask, levels)`` (the mean relative to the atlas' own
    bar level (0) and vacuum-like level (1)); the score is ``min(4, floor(5 * b))``, i.e. b in
    [0, 0.2) -> 0, [0.2, 0.4) -> 1, [0.4, 0.6) -> 2, [0.6, 0.8) -> 3, [0.8, 1] -> 4.

    Args:
        crop: (S, S) intensities.
        mask: (S, S) bool open area.
        levels: the atlas' levels.
    """
    return int(min(4, math.floor(5 * brightness_fraction(crop, mask, levels))))


def _min_bounding_square(points: np.ndarray) -> float:
    """Side of the smallest square (any orientation) containing ``points`` (N, 2), px.

    Scans the orientation in 0.5 degree steps over the convex hull (the side varies smoothly with
    the angle, so the scan is within 0.01 % of the optimum for a square).
    """
    if len(points) < 3:
        return 1.0
    try:
        hull = points[ConvexHull(points).vertices]
    except QhullError:  # collinear points
        hull = points
    theta = np.radians(np.arange(0.0, 90.0, 0.5))
    c, s = np.cos(theta), np.sin(theta)
    u = hull[:, 0:1] * c + hull[:, 1:2] * s
    v = -hull[:, 0:1] * s + hull[:, 1:2] * c
    side = np.maximum(np.ptp(u, axis=0), np.ptp(v, axis=0)) + 1.0  # pixel extent, not centres
    return float(side.min())


def squareness_ratio(crop: np.ndarray, mask: np.ndarray, nominal_px: float | None = None) -> float:
    """Edge-enclosed open area over the area of its minimum-area bounding square, in [0, 1].

    The crop is block-averaged to at most ``CANNY_MAX_PX`` px (the mask by majority). Canny edges
    (sigma 1.5 px, hysteresis at the 80th/90th percentile of the gradient) that lie on this
    square's open area (the mask dilated by 2 px) outline it; the region is those edges plus the
    open-area mask, with enclosed holes filled (contamination inside the square does not make it
    less square), and its largest connected part is kept. The minimum-area bounding square is the
    smallest square at any orientation that contains the region, or, with ``nominal_px``, not
    smaller than the grid's open square (then a square shrunk by occluded sides also scores
    less). 0 when the mask is empty.

    Args:
        crop: (S, S) intensities.
        mask: (S, S) bool open area.
        nominal_px: the grid's open-square side (``Lattice.square_px``), px, or None.
    """
    if not mask.any():
        return 0.0
    f = max(1, math.ceil(max(crop.shape) / CANNY_MAX_PX))
    small = block_mean(crop, f, workers=1)
    small_mask = block_mean(mask.astype(np.float32), f, workers=1) >= 0.5
    if not small_mask.any():
        return 0.0
    edges = canny(small, sigma=1.5, low_threshold=0.8, high_threshold=0.9, use_quantiles=True)
    near = ndi.binary_dilation(small_mask, iterations=2)
    region = ndi.binary_fill_holes((edges & near) | small_mask)
    lab, n = ndi.label(region)
    if n > 1:
        sizes = np.bincount(lab.ravel())[1:]
        region = lab == (int(np.argmax(sizes)) + 1)
    pts = np.argwhere(region).astype(float)
    side = _min_bounding_square(pts)
    if nominal_px is not None:
        side = max(side, nominal_px / f)
    return float(np.clip(region.sum() / side**2, 0.0, 1.0))


def auto_squareness(crop: np.ndarray, mask: np.ndarray, nominal_px: float | None = None) -> int:
    """Squareness score 0..4 from Canny edges (see ``squareness_ratio``), scaled.

    Scaling: ratio r = open area / minimum bounding square area; score 0 for r < 0.5, 1 for
    [0.5, 0.7), 2 for [0.7, 0.85), 3 for [0.85, 0.93), 4 for r >= 0.93. An intact square
    measures 0.96 to 0.98 (pixelation of its edges and rounded corners cost the rest); one with
    a quarter of its area occluded from a side about 0.75 (2).

    Args:
        crop: (S, S) intensities.
        mask: (S, S) bool open area.
        nominal_px: the grid's open-square side, px (see ``squareness_ratio``), or None.
    """
    r = squareness_ratio(crop, mask, nominal_px)
    return int(np.searchsorted(np.asarray(SQUARENESS_BINS), r, side="right"))
