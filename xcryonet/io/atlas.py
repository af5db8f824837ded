"""The ``Atlas`` value every reader returns, and the pixel -> stage affine fit."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Tile:
    """One acquired tile (EPU tile or SerialEM montage piece) and where it sits.

    Attributes:
        name: tile name, e.g. ``Tile_1234_0_5678`` or ``piece 3``.
        path: the tile's image file, or None when the tile is a section of a stack / absent.
        origin_rc: (row, col) of the tile's top-left corner in the stitched image, px.
        shape: (rows, cols) of the tile in stitched-image px.
        stage_xy_um: stage (x, y) of the tile centre in µm, when the metadata gives it.
    """

    name: str
    path: Path | None
    origin_rc: tuple[float, float]
    shape: tuple[int, int]
    stage_xy_um: tuple[float, float] | None


@dataclass(frozen=True)
class SoftwareSquare:
    """A grid square as the acquisition software itself found it (EPU ``Atlas.dm`` nodes).

    Attributes:
        square_id: the software's id for it.
        row_px, col_px: centre in the stitched image, px.
        x_um, y_um: the software's physical stage centre (``PositionOnTheAtlas/Physical``), µm.
        size_px: (rows, cols) size in stitched-image px.
        quality: EPU's own quality label, if any.
    """

    square_id: str
    row_px: float
    col_px: float
    x_um: float
    y_um: float
    size_px: tuple[float, float]
    quality: str | None = None


@dataclass(frozen=True)
class Atlas:
    """A stitched grid atlas with its geometry.

    Attributes:
        path: what was read.
        format: ``"epu"``, ``"serialem"`` or ``"mrc"``.
        image: stitched image, float32 (row, col); None when only metadata exists.
        shape: (rows, cols) of the stitched image in px (known even without ``image``).
        pixel_size_um: µm per stitched-image pixel.
        affine: (2, 3) float64; ``[x_um, y_um] = affine @ [row, col, 1]``.
        affine_source: how the affine was obtained, e.g. ``"fit to 35 tiles (rms 0.15 µm)"`` or
            ``"no stage metadata: image axes centred on the image"``.
        tiles: the tiles and their placement (empty for a single MRC).
        software_squares: squares found by the acquisition software (empty if none).
    """

    path: Path
    format: str
    image: np.ndarray | None
    shape: tuple[int, int]
    pixel_size_um: float
    affine: np.ndarray
    affine_source: str
    tiles: tuple[Tile, ...] = field(default_factory=tuple)
    software_squares: tuple[SoftwareSquare, ...] = field(default_factory=tuple)

    def pixel_to_stage(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Stage positions (N, 2) in µm of pixel centres ``rows``, ``cols`` (N,) in px."""
        rc1 = np.stack([np.asarray(rows, float), np.asarray(cols, float), np.ones(np.size(rows))])
        return (self.affine @ rc1.reshape(3, -1)).T

    def stage_to_pixel(self, xy_um: np.ndarray) -> np.ndarray:
        """(row, col) px (N, 2) of stage positions ``xy_um`` (N, 2) in µm."""
        lin, off = self.affine[:, :2], self.affine[:, 2]
        return np.linalg.solve(lin, (np.asarray(xy_um, float) - off).T).T


def fit_affine(rc: np.ndarray, xy_um: np.ndarray) -> tuple[np.ndarray, float]:
    """Least-squares affine from pixel (row, col) (N, 2) to stage (x, y) µm (N, 2).

    Returns the (2, 3) affine and the RMS residual in µm. Needs N >= 3 non-collinear points;
    with fewer, a similarity cannot be fit and the caller must fall back.
    """
    rc = np.asarray(rc, float)
    xy_um = np.asarray(xy_um, float)
    design = np.column_stack([rc, np.ones(len(rc))])
    coef, *_ = np.linalg.lstsq(design, xy_um, rcond=None)
    affine = coef.T
    resid = design @ coef - xy_um
    rms = float(np.sqrt(np.mean(np.sum(resid**2, axis=1)))) if len(rc) else 0.0
    return affine, rms


def _fit_similarity(rc: np.ndarray, xy_um: np.ndarray, mirrored: bool) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, shift; ``mirrored`` adds a flip)."""
    r, c = rc[:, 0], rc[:, 1]
    one, zero = np.ones_like(r), np.zeros_like(r)
    # Linear part [[a, -b], [b, a]] (proper) or [[a, b], [b, -a]] (mirrored); unknowns a, b, tx, ty.
    if mirrored:
        rows_x = np.column_stack([r, c, one, zero])
        rows_y = np.column_stack([-c, r, zero, one])
    else:
        rows_x = np.column_stack([r, -c, one, zero])
        rows_y = np.column_stack([c, r, zero, one])
    design = np.vstack([rows_x, rows_y])
    target = np.concatenate([xy_um[:, 0], xy_um[:, 1]])
    (a, b, tx, ty), *_ = np.linalg.lstsq(design, target, rcond=None)
    lin = np.array([[a, b], [b, -a]]) if mirrored else np.array([[a, -b], [b, a]])
    return np.column_stack([lin, [tx, ty]])


def f2_critical(d2: int, alpha: float) -> float:
    """The critical value of the F(2, d2) distribution at upper-tail probability ``alpha``.

    With 2 numerator degrees of freedom the tail has a closed form, P(F > x) = (1 + 2x/d2)^(-d2/2),
    so x = d2/2 (alpha^(-2/d2) - 1): ``scipy.stats.f.isf(alpha, 2, d2)`` without importing
    scipy.stats or scipy.special (0.2-0.4 s of every command's start).
    """
    return d2 / 2 * (alpha ** (-2 / d2) - 1)


def fit_stage_affine(rc: np.ndarray, xy_um: np.ndarray) -> tuple[np.ndarray, float, str]:
    """Fit pixel (row, col) (N, 2) -> stage (x, y) µm (N, 2), choosing the model by the evidence.

    Both a general affine (6 parameters: any shear, anisotropy or flip, as real EPU stage frames
    have) and a similarity (4 parameters: rotation, scale, shift, with or without a flip) are fit;
    the affine is kept only when an F-test says its extra parameters are real (p < 0.001). With
    few tiles and
    stage errors of a few µm the general fit would turn noise into shear, so the simpler model
    is the better map there; with many tiles a real anisotropy is still found.

    Returns:
        The (2, 3) affine, its RMS residual in µm, and ``"affine"`` or ``"similarity"``.
    """
    rc = np.asarray(rc, float)
    xy_um = np.asarray(xy_um, float)
    n_obs = 2 * len(rc)

    def rss(aff: np.ndarray) -> float:
        pred = (aff @ np.column_stack([rc, np.ones(len(rc))]).T).T
        return float(np.sum((pred - xy_um) ** 2))

    affine, _ = fit_affine(rc, xy_um)
    best = min((_fit_similarity(rc, xy_um, mirrored) for mirrored in (False, True)), key=rss)
    if n_obs > 6:
        # F-test of the two extra parameters: keep the affine only on strong evidence (p < 0.001).
        rss_a, rss_s = rss(affine), rss(best)
        floor = 1e-18 * max(1.0, float(np.sum(xy_um**2)))
        f_stat = ((rss_s - rss_a) / 2) / (max(rss_a, floor) / (n_obs - 6))
        if f_stat > f2_critical(n_obs - 6, 1e-3):
            best, model = affine, "affine"
        else:
            model = "similarity"
    else:
        # Three points fix an affine exactly, noise included: the similarity is the better map.
        model = "similarity"
    rms = float(np.sqrt(rss(best) / max(len(rc), 1)))
    return best, rms, model


def centred_affine(shape: tuple[int, int], pixel_size_um: float) -> np.ndarray:
    """Affine for an image without stage metadata: x along cols, y along rows, 0 at the centre."""
    rows, cols = shape
    return np.array(
        [
            [0.0, pixel_size_um, -pixel_size_um * (cols - 1) / 2],
            [pixel_size_um, 0.0, -pixel_size_um * (rows - 1) / 2],
        ]
    )
