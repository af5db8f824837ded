"""Stitch overlapping tiles into one image: refine offsets from the overlaps, then blend.

Pure array functions. Tiles may be memory maps of any numeric dtype; they are read one band at a
time, so the only full-size array is the float32 output.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from scipy import fft as sfft
from scipy import ndimage as ndi

# Longest side of an overlap crop used for registration: longer strips add time, not accuracy.
_MAX_CROP = 1024
# Output rows per blending band are chosen so one band buffer is about this many pixels.
_BAND_PIXELS = 1 << 24


def stitch_tiles(
    tiles: Sequence[np.ndarray],
    origins_rc: np.ndarray,
    *,
    refine: bool = True,
    shape: tuple[int, int] | None = None,
    max_shift_px: float = 32.0,
    min_overlap_px: int = 16,
    min_corr: float = 0.3,
    flat: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Place tiles at their origins, refine the offsets from the overlaps, and blend.

    Refinement registers every pair of edge neighbours from their overlap crops (band-limited
    phase correlation polished by normalised cross-correlation, see ``register_translation``).
    A pair is used only if its shift is within ``max_shift_px`` and the normalised
    cross-correlation after the shift is at least ``min_corr``. The accepted pair
    shifts are solved for all tiles at once by least squares, weakly anchored to the given
    origins (so a tile with no reliable overlap keeps its metadata placement, and the mosaic
    as a whole does not drift); pairs that disagree with the solution by more than 1.5 px are
    dropped one at a time.

    Blending weights fall linearly from a tile's centre to its edges (a feathered tent), so
    seams and vignetted tile borders fade out. Pixels no tile covers are 0.

    Args:
        tiles: N tiles, each (rows, cols), any real dtype.
        origins_rc: (N, 2) metadata (row, col) of each tile's top-left pixel in the output, px.
        refine: refine the origins from the overlaps; else use them as given.
        shape: output (rows, cols); default: just large enough for the given origins.
        max_shift_px: largest accepted correction of a pair offset, px.
        min_overlap_px: pairs overlapping by less than this (in either axis) are not registered.
        min_corr: smallest accepted normalised cross-correlation of a registered overlap.
        flat: the tiles' illumination profile (rows, cols), 1 where brightest (see
            ``estimate_flat_field``); every tile is divided by it before blending. All tiles
            must then have its shape. None: no correction.

    Returns:
        ``(image, origins)``: the float32 (rows, cols) image, and the (N, 2) float64 origins the
        tiles were placed at (integer-valued: tiles are placed at whole pixels).
    """
    n = len(tiles)
    origins = np.asarray(origins_rc, dtype=np.float64).reshape(n, 2)
    if not np.isfinite(origins).all():
        raise ValueError("tile origins must be finite")
    shapes = np.array([t.shape[-2:] for t in tiles], dtype=np.int64).reshape(n, 2)
    base = np.rint(origins).astype(np.int64)
    if shape is None:
        ext = (base + shapes).max(axis=0) if n else np.zeros(2, np.int64)
        shape = (int(max(ext[0], 0)), int(max(ext[1], 0)))
    if refine and n > 1:
        delta = _refine_offsets(tiles, base, shapes, max_shift_px, min_overlap_px, min_corr)
        # The anchor leaves the mosaic as a whole at a fractional offset. Move it by under half
        # a pixel so the tiles' common sub-pixel offset (the circular mean of their fractional
        # parts) is 0, then round: tiles keep their relative placement as well as whole pixels
        # allow, instead of splitting between two roundings.
        phase = 2 * np.pi * delta
        common = np.arctan2(np.sin(phase).mean(axis=0), np.cos(phase).mean(axis=0)) / (2 * np.pi)
        delta -= common
        base = base + np.rint(delta).astype(np.int64)
    if flat is not None and (shapes != np.array(flat.shape)).any():
        raise ValueError(f"flat field {flat.shape} does not match every tile's shape")
    image = _blend(tiles, base, shapes, shape, flat)
    return image, base.astype(np.float64)


def _unit_centres(count: int, step: int, side: int) -> np.ndarray:
    """Centres of ``count`` cells of ``step`` px along a tile side of ``side`` px, in [-1, 1]."""
    return (np.arange(count) + 0.5) * step / side * 2 - 1


def _poly_terms(y: np.ndarray, x: np.ndarray, degree: int) -> list[np.ndarray]:
    """Monomials y^i x^j, 0 < i + j <= degree (no constant), broadcast over y and x."""
    return [y**i * x**j for i in range(degree + 1) for j in range(degree + 1 - i) if i + j]


def estimate_flat_field(
    tiles: Sequence[np.ndarray],
    *,
    degree: int = 2,
    factor: int = 8,
    open_fraction: float = 0.3,
    min_tiles: int = 16,
    min_segment_px: int = 30,
    min_segments: int = 20,
) -> np.ndarray | None:
    """The illumination profile (vignetting) common to all tiles, from the tiles themselves.

    Every tile is block-averaged by ``factor`` and thresholded into open areas (brighter than
    its 5th percentile + ``open_fraction`` x (90th - 5th)). Each eroded connected open area
    (one grid square, or the part of one that a tile sees) has its own unknown level: its ice.
    So the profile is fitted *within* areas: log intensity minus the area's mean, against a
    polynomial in tile coordinates minus its mean over the same pixels (a fixed-effects least
    squares fit, refitted once without pixels over 3 robust s.d. off: cracks, contamination).
    Ice that differs from square to square then cannot leak into the profile, as it does when
    tiles are simply averaged.

    Args:
        tiles: N tiles (rows, cols) of one shape, any real dtype (memory maps are read once).
        degree: degree of the polynomial in the tile's (row, col), each scaled to [-1, 1].
        factor: block size for the fit, px.
        open_fraction: the open-area threshold, as in extraction.
        min_tiles, min_segment_px, min_segments: below these (tiles, block pixels of one area,
            areas in all) the profile is not estimated.

    Returns:
        float32 (rows, cols), 1 at the brightest point and < 1 elsewhere; None when there are
        too few tiles or open areas, the tiles differ in shape, the profile is flat (under
        1 %) or implausible (a drop of over 60 %), or the fits to the even and the odd tiles
        differ (rms over the tile) by more than its own rms depth.
    """
    if len(tiles) < min_tiles or len({t.shape[-2:] for t in tiles}) != 1:
        return None
    h, w = tiles[0].shape[-2:]
    hb, wb = h // factor, w // factor
    if hb < 8 or wb < 8:
        return None
    yc = _unit_centres(hb, factor, h)[:, None]
    xc = _unit_centres(wb, factor, w)[None, :]
    terms = [np.broadcast_to(t, (hb, wb)) for t in _poly_terms(yc, xc, degree)]
    design: list[np.ndarray] = []
    target: list[np.ndarray] = []
    half: list[int] = []  # which half of the tiles (even / odd index) an area came from
    for i, tile in enumerate(tiles):
        a = np.asarray(tile[: hb * factor, : wb * factor], dtype=np.float32)
        a = a.reshape(hb, factor, wb, factor).mean(axis=(1, 3))
        p5, p90 = np.percentile(a, [5, 90])
        if not p90 > p5:
            continue
        lab, n = ndi.label(ndi.binary_erosion(a > p5 + open_fraction * (p90 - p5)))
        sizes = np.bincount(lab.ravel(), minlength=n + 1)
        for k in np.flatnonzero(sizes[1:] >= min_segment_px) + 1:
            m = lab == k
            vals = a[m]
            if vals.min() <= 0:
                continue
            la = np.log(vals)
            block = np.stack([t[m] for t in terms], axis=1)
            design.append(block - block.mean(axis=0))
            target.append(la - la.mean())
            half.append(i % 2)
    if len(design) < min_segments:
        return None
    yf = _unit_centres(h, 1, h)[:, None]
    xf = _unit_centres(w, 1, w)[None, :]
    full_terms = _poly_terms(yf, xf, degree)

    def fit(pick: list[int]) -> np.ndarray:
        d = np.concatenate([design[k] for k in pick])
        b = np.concatenate([target[k] for k in pick])
        coef, *_ = np.linalg.lstsq(d, b, rcond=None)
        resid = b - d @ coef
        keep = np.abs(resid) < 3 * 1.4826 * max(float(np.median(np.abs(resid))), 1e-12)
        coef, *_ = np.linalg.lstsq(d[keep], b[keep], rcond=None)
        log_flat = np.zeros((h, w))
        for c, t in zip(coef, full_terms, strict=True):
            log_flat += c * t
        return log_flat - log_flat.max()

    log_flat = fit(list(range(len(design))))
    drop = float(-log_flat.min())
    # Texture inside the open areas can fake a profile when there are few tiles. The fits to
    # the two halves of the tiles differ by about twice the full fit's error (rms over the
    # tile), which must be under half the profile's own rms depth.
    halves = [[k for k, hk in enumerate(half) if hk == j] for j in (0, 1)]
    if min(len(p) for p in halves) < min_segments // 2:
        return None
    diff = fit(halves[0]) - fit(halves[1])
    disagree = float(diff.std())
    depth = float(log_flat.std())
    if not np.isfinite(drop) or drop < 0.01 or drop > -np.log(0.4) or disagree > depth:
        return None
    return np.exp(log_flat).astype(np.float32)


def tent_weight(length: int) -> np.ndarray:
    """1D feathering weight (length,) float32: 1 at the ends, rising linearly to the middle."""
    i = np.arange(length, dtype=np.float32)
    return np.minimum(i + 1, length - i)


def _workers() -> int:
    """Threads for band blending and pair registration (numpy and scipy release the GIL)."""
    return max(1, min(4, os.cpu_count() or 1))


def _blend(
    tiles: Sequence[np.ndarray],
    base: np.ndarray,
    shapes: np.ndarray,
    shape: tuple[int, int],
    flat: np.ndarray | None = None,
) -> np.ndarray:
    """Weighted average of the tiles placed at integer ``base`` origins, one row band at a time
    (bands in parallel threads; each writes only its own rows of the output). Each tile is
    divided by ``flat`` first when it is given."""
    rows, cols = shape
    image = np.zeros((rows, cols), dtype=np.float32)
    if rows == 0 or cols == 0:
        return image
    band = max(16, _BAND_PIXELS // max(1, cols))
    wr = [tent_weight(int(h)) for h in shapes[:, 0]]
    wc = [tent_weight(int(w)) for w in shapes[:, 1]]
    inv = None if flat is None else (1.0 / flat).astype(np.float32)

    def blend_band(b0: int) -> None:
        b1 = min(rows, b0 + band)
        num = np.zeros((b1 - b0, cols), dtype=np.float32)
        den = np.zeros((b1 - b0, cols), dtype=np.float32)
        for k, tile in enumerate(tiles):
            (r, c), (h, w) = base[k], shapes[k]
            r0, r1 = max(b0, r), min(b1, r + h)
            c0, c1 = max(0, c), min(cols, c + w)
            if r0 >= r1 or c0 >= c1:
                continue
            w_r = wr[k][r0 - r : r1 - r, None]
            w_c = wc[k][c0 - c : c1 - c]
            block = np.multiply(tile[r0 - r : r1 - r, c0 - c : c1 - c], w_r, dtype=np.float32)
            block *= w_c
            if inv is not None:
                block *= inv[r0 - r : r1 - r, c0 - c : c1 - c]
            num[r0 - b0 : r1 - b0, c0:c1] += block
            np.multiply(w_r, w_c, out=block)
            den[r0 - b0 : r1 - b0, c0:c1] += block
        np.divide(num, den, out=image[b0:b1], where=den > 0)

    # Two bands per worker at most in flight keeps the band buffers' memory bounded.
    with ThreadPoolExecutor(max_workers=_workers()) as pool:
        list(pool.map(blend_band, range(0, rows, band)))
    return image


def _overlap_pairs(
    base: np.ndarray, shapes: np.ndarray, min_overlap_px: int
) -> list[tuple[int, int, tuple[int, int, int, int]]]:
    """Edge-neighbour tile pairs (i, j, (r0, r1, c0, c1)) whose rectangles overlap enough."""
    pairs = []
    lo = base
    hi = base + shapes
    for i in range(len(base)):
        r0 = np.maximum(lo[i, 0], lo[i + 1 :, 0])
        r1 = np.minimum(hi[i, 0], hi[i + 1 :, 0])
        c0 = np.maximum(lo[i, 1], lo[i + 1 :, 1])
        c1 = np.minimum(hi[i, 1], hi[i + 1 :, 1])
        ok = (r1 - r0 >= min_overlap_px) & (c1 - c0 >= min_overlap_px)
        # Only edge neighbours: the overlap must run along half a tile side. Corner overlaps
        # are small and, with a lattice in view, ambiguous.
        side_r = np.minimum(shapes[i, 0], shapes[i + 1 :, 0])
        side_c = np.minimum(shapes[i, 1], shapes[i + 1 :, 1])
        ok &= (2 * (r1 - r0) >= side_r) | (2 * (c1 - c0) >= side_c)
        for k in np.flatnonzero(ok):
            pairs.append((i, i + 1 + int(k), (int(r0[k]), int(r1[k]), int(c0[k]), int(c1[k]))))
    return pairs


def _centre_crop(r0: int, r1: int, limit: int) -> tuple[int, int]:
    """Shrink [r0, r1) to its central ``limit`` pixels."""
    if r1 - r0 <= limit:
        return r0, r1
    mid = (r0 + r1) // 2
    return mid - limit // 2, mid - limit // 2 + limit


def _refine_offsets(
    tiles: Sequence[np.ndarray],
    base: np.ndarray,
    shapes: np.ndarray,
    max_shift_px: float,
    min_overlap_px: int,
    min_corr: float,
) -> np.ndarray:
    """(N, 2) corrections to ``base`` from pairwise registration and a least-squares solve."""
    n = len(tiles)

    def measure(
        pair: tuple[int, int, tuple[int, int, int, int]],
    ) -> tuple[int, int, np.ndarray, float] | None:
        i, j, (r0, r1, c0, c1) = pair
        r0, r1 = _centre_crop(r0, r1, _MAX_CROP)
        c0, c1 = _centre_crop(c0, c1, _MAX_CROP)
        (ri, ci), (rj, cj) = base[i], base[j]
        a = np.asarray(tiles[i][r0 - ri : r1 - ri, c0 - ci : c1 - ci], dtype=np.float64)
        b = np.asarray(tiles[j][r0 - rj : r1 - rj, c0 - cj : c1 - cj], dtype=np.float64)
        shift, corr = register_translation(a, b, max_shift_px)
        if shift is None or corr < min_corr:
            return None
        return (i, j, shift, corr)

    with ThreadPoolExecutor(max_workers=_workers()) as pool:
        found = list(pool.map(measure, _overlap_pairs(base, shapes, min_overlap_px)))
    return solve_offsets(n, [m for m in found if m is not None])


def solve_offsets(
    n: int, meas: list[tuple[int, int, np.ndarray, float]], *, anchor: float = 1e-3
) -> np.ndarray:
    """Least-squares tile corrections (N, 2) from pair measurements ``delta_j - delta_i = s``.

    Each measurement ``(i, j, s, weight)`` is weighted by ``weight``; every tile is also pulled
    towards 0 with weight ``anchor``. Measurements whose residual exceeds 1.5 px are dropped,
    worst first, until all agree.
    """
    meas = list(meas)
    while True:
        m = len(meas)
        design = np.zeros((m + n, n))
        rhs = np.zeros((m + n, 2))
        for k, (i, j, s, w) in enumerate(meas):
            design[k, i], design[k, j] = -w, w
            rhs[k] = w * np.asarray(s)
        design[m:, :] = anchor * np.eye(n)
        delta, *_ = np.linalg.lstsq(design, rhs, rcond=None)
        if not meas:
            return delta
        resid = np.array([np.hypot(*(delta[j] - delta[i] - s)) for i, j, s, _ in meas])
        worst = int(np.argmax(resid))
        if resid[worst] <= 1.5:
            return delta
        meas.pop(worst)


def _deplane(img: np.ndarray) -> np.ndarray:
    """``img`` (float64) less its least-squares plane: removes vignetting gradients to first
    order. On a full grid the centred row and column ramps are orthogonal, so the fit is
    closed-form."""
    h, w = img.shape
    r = np.arange(h) - (h - 1) / 2
    c = np.arange(w) - (w - 1) / 2
    out = img - img.mean()
    if h > 1:
        out -= np.multiply.outer(r, np.ones(w)) * (r @ out.sum(axis=1) / (w * (r @ r)))
    if w > 1:
        out -= np.multiply.outer(np.ones(h), c) * (out.sum(axis=0) @ c / (h * (c @ c)))
    return out


def _tukey(n: int, alpha: float = 0.5) -> np.ndarray:
    """Tukey window (n,): flat in the middle, cosine tapers over ``alpha / 2`` of each end."""
    if n < 3:
        return np.ones(n)
    x = np.linspace(0.0, 1.0, n)
    w = np.ones(n)
    edge = alpha / 2
    lo, hi = x < edge, x > 1 - edge
    w[lo] = 0.5 * (1 + np.cos(np.pi * (x[lo] / edge - 1)))
    w[hi] = 0.5 * (1 + np.cos(np.pi * ((x[hi] - 1) / edge + 1)))
    return w


def _band_weight(h: int, w: int) -> np.ndarray:
    """Spectral weight (h, w // 2 + 1) for phase correlation: drops the lowest frequencies
    (shading, what the window leaks) and damps the highest (pixel noise)."""
    fr = np.fft.fftfreq(h)[:, None]
    fc = np.fft.rfftfreq(w)[None, :]
    f2 = fr**2 + fc**2
    low = 2.0 / min(h, w)  # about two cycles across the crop's short side
    return (1 - np.exp(-f2 / (2 * low**2))) * np.exp(-f2 / (2 * 0.2**2))


def register_translation(
    ref: np.ndarray, mov: np.ndarray, max_shift_px: float, *, candidates: int = 3
) -> tuple[np.ndarray | None, float]:
    """Shift (drow, dcol) that registers ``mov`` onto ``ref``, and its quality.

    Both crops are lightly smoothed and have their best-fit plane removed (shading). Band-limited
    phase correlation of the apodised crops proposes the ``candidates`` best peaks within
    ``max_shift_px`` (and within 40% of the crop, so at least 60% still overlaps). The
    normalised cross-correlation (NCC) of the unwindowed crops then picks among them and is
    hill-climbed over neighbouring integer shifts: it stays accurate in the narrow overlap
    strips where windowing blurs the phase-correlation peak. A parabola through the NCC gives
    the sub-pixel part. Sign convention as in ``skimage.registration``: ``mov`` shifted by the
    result matches ``ref``, i.e. ``ref[p] ~ mov[p - shift]``.

    Args:
        ref, mov: (rows, cols) crops of the same size.
        max_shift_px: largest shift searched, px.
        candidates: phase-correlation peaks checked.

    Returns:
        ``(shift, corr)``: shift (2,) float64 px, or None when nothing can be measured (no
        peak inside the search window); corr is the NCC at the best integer shift.
    """
    if ref.shape != mov.shape or min(ref.shape) < 4:
        return None, 0.0
    a = _deplane(ndi.gaussian_filter(np.asarray(ref, dtype=np.float64), 1.0))
    b = _deplane(ndi.gaussian_filter(np.asarray(mov, dtype=np.float64), 1.0))
    h, w = a.shape
    win = np.multiply.outer(_tukey(h), _tukey(w))
    cross = sfft.rfft2(a * win) * np.conj(sfft.rfft2(b * win))
    cross *= _band_weight(h, w) / (np.abs(cross) + 1e-12 * float(np.abs(cross).max() + 1e-30))
    corr_map = sfft.irfft2(cross, s=(h, w))
    lim_r = int(min(max_shift_px, 0.4 * h))
    lim_c = int(min(max_shift_px, 0.4 * w))
    # Only the search window matters: gather it with wrapped indices and rank it.
    rows = np.arange(-lim_r, lim_r + 1)
    cols = np.arange(-lim_c, lim_c + 1)
    window = corr_map[np.ix_(rows % h, cols % w)]
    top = np.argsort(window, axis=None)[::-1][: max(1, candidates)]
    ncc: dict[tuple[int, int], float] = {}

    def score(sr: int, sc: int) -> float:
        if abs(sr) > lim_r or abs(sc) > lim_c:
            return -1.0
        if (sr, sc) not in ncc:
            ncc[(sr, sc)] = _overlap_ncc(a, b, sr, sc)
        return ncc[(sr, sc)]

    starts = [(int(rows[k // len(cols)]), int(cols[k % len(cols)])) for k in top]
    best = max(starts, key=lambda st: score(*st))
    # Hill-climb the NCC from the best candidate (a few steps at most: the phase-correlation
    # peak is within a pixel or two of the NCC peak).
    for _ in range(8):
        nbrs = [(best[0] + i, best[1] + j) for i in (-1, 0, 1) for j in (-1, 0, 1)]
        nxt = max(nbrs, key=lambda st: score(*st))
        if score(*nxt) <= score(*best):
            break
        best = nxt
    best_val = score(*best)
    # A best match on the edge of the search window whose NCC still rises outward is the
    # flank of a peak outside the window: no measurement.
    for i in (-1, 0, 1):
        for j in (-1, 0, 1):
            out = (best[0] + i, best[1] + j)
            outside = abs(out[0]) > lim_r or abs(out[1]) > lim_c
            if outside and abs(out[0]) < h // 2 and abs(out[1]) < w // 2:
                if _overlap_ncc(a, b, *out) > best_val:
                    return None, 0.0
    shift = np.array(best, dtype=np.float64)
    for axis in (0, 1):
        lo, hi = list(best), list(best)
        lo[axis] -= 1
        hi[axis] += 1
        v0, v1, v2 = score(*lo), best_val, score(*hi)
        denom = v0 - 2 * v1 + v2
        if v0 > -1 and v2 > -1 and denom < 0:
            shift[axis] += float(np.clip(0.5 * (v0 - v2) / denom, -0.5, 0.5))
    return shift, float(best_val)


def _overlap_ncc(a: np.ndarray, b: np.ndarray, sr: int, sc: int) -> float:
    """Normalised cross-correlation of ``a[p]`` with ``b[p - (sr, sc)]`` where both exist."""
    h, w = a.shape
    x = a[max(0, sr) : min(h, h + sr), max(0, sc) : min(w, w + sc)]
    y = b[max(0, -sr) : min(h, h - sr), max(0, -sc) : min(w, w - sc)]
    n = x.size
    if n < 64:
        return 0.0
    x = x.ravel()
    y = y.ravel()
    sx, sy = x.sum(), y.sum()
    cov = x @ y - sx * sy / n
    var = (x @ x - sx * sx / n) * (y @ y - sy * sy / n)
    return float(cov / np.sqrt(var)) if var > 0 else 0.0
