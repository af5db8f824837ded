"""Find the grid squares of an atlas: lattice, NCC template matching, lattice fit, refinement.

The method follows the paper (normalized cross-correlation with a template made from the grid's
own intensity distribution) and adds what makes it fast and complete on big atlases:

1. ``block_mean`` the atlas to about 1024 px and read the mesh pitch and orientation off the
   strongest pair of perpendicular Fourier peaks (``estimate_lattice``).
2. Downsample further to about ``cfg.coarse_px_per_pitch`` px per pitch (the *coarse* image). Fold
   every coarse pixel into one unit cell of the lattice; the folded cell's profiles give the open
   square's side and the lattice phase, and the pixels at square centres and bar centres give the
   grid's intensity levels (``Levels``: bars, open squares, the brightest vacuum-like level).
3. Draw the template from those estimates: one bright square of the estimated side, surrounded by
   dark bars of the estimated width, at the estimated angle. Match it over the coarse image with
   ``ncc_match`` (NCC, as ``skimage.feature.match_template``) and take the local maxima above
   ``cfg.ncc_threshold``.
4. Fit the lattice (origin + two basis vectors) to those peaks, growing outwards from the centre so
   a small pitch error cannot mis-index far peaks. Every lattice site in the image is a candidate:
   peaks off the lattice are dropped; a site is a square when its NCC passes, or its open area is
   brighter than the bars around it (``cfg.min_contrast``: dark, contaminated, broken squares),
   or it lies inside the convex hull of those squares (the meshed area is a disk, so an opaque
   thick-ice or occluded square inside it is still a square).
5. Refine each square at full resolution: edge profiles across the four bar edges (three
   sub-bands per axis, median of the edge estimates) give its centre and side. The lattice is
   refitted to the refined centres; a refined centre that disagrees with it (plus the local drift
   of its neighbours: bent mesh, stitching) by more than 1.2 % of the pitch, or whose edges are
   not a square side apart, was misled by a defect and is replaced by the lattice prediction.
6. A square is ``complete`` when it lies inside the image and no part of it is under a large dark
   region (the grid rim, or an area without data): opaque stretches just inside its edges count
   when the bar and the next cell beyond them lie in the dark mask opened with a disk wider than
   an opaque square with its bars (which erases bars and lone dark squares but keeps the rim), or
   when they hold no data (0 or outside the image).

Coordinates are (row, col) px of the full-resolution image; a coarse pixel ``i`` covers full pixels
``[i*f, (i+1)*f)`` so its centre is at ``i*f + (f-1)/2``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from scipy import fft as sfft
from scipy import ndimage as ndi
from skimage.feature import peak_local_max
from skimage.filters import threshold_otsu

from xcryonet.config import ExtractConfig

# A square's edge is where its profile first rises this fraction of the way from the bar level to
# its open level: just above the bars, so that ice thickening towards the bars (the meniscus)
# does not pull the edge inwards; the copper edge is a step, so the position barely depends on it.
EDGE_LEVEL = 0.12


class NoLatticeError(ValueError):
    """The image shows no mesh lattice that squares could be found on."""


@dataclass(frozen=True)
class Lattice:
    """The mesh lattice in full-resolution pixels.

    Square centres sit at ``origin_rc + i * e1_rc + j * e2_rc`` for integers ``i, j`` (to within
    the local drift that refinement absorbs).

    Attributes:
        pitch_px: mean length of the two basis vectors, px.
        angle_deg: direction of ``e1_rc`` from the +col axis towards +row, in [-45, 45).
        square_px: side of the open square, px.
        origin_rc: one lattice site (a square centre), (row, col) px.
        e1_rc: basis vector along the lattice's column-like axis, (row, col) px.
        e2_rc: basis vector along the lattice's row-like axis, (row, col) px.
    """

    pitch_px: float
    angle_deg: float
    square_px: float
    origin_rc: tuple[float, float]
    e1_rc: tuple[float, float]
    e2_rc: tuple[float, float]

    @property
    def bar_px(self) -> float:
        """Bar width, px."""
        return self.pitch_px - self.square_px


@dataclass(frozen=True)
class Levels:
    """The grid's intensity levels, in the atlas' own units.

    Attributes:
        bar: median of the bar centres (opaque copper, the darkest level).
        open: median of the open squares' centres.
        vacuum: brightest level seen in open squares (99.5th percentile of square centres), a
            stand-in for vacuum (broken film) that makes brightness comparable between grids.
        threshold: Otsu threshold between bars and open squares.
    """

    bar: float
    open: float
    vacuum: float
    threshold: float


@dataclass(frozen=True)
class FoundSquare:
    """One grid square found in an atlas.

    Attributes:
        row_px, col_px: centre of the open square, full-resolution px.
        size_px: side of the open square, px (measured from its edges; the lattice's square side
            when its edges could not be measured).
        angle_deg: lattice angle, degrees (see ``Lattice.angle_deg``).
        ncc: normalized cross-correlation with the template at this site (coarse image).
        complete: the square lies fully inside the image and no part is under the rim or an area
            without data.
        index: lattice index (i, j) of the site.
        contrast: open-area evidence, (mean of the square's centre - bars around it) /
            (open - bar level); about 1 for a typical square, near 0 for no square.
        refined: the centre came from the square's own edges (False: lattice prediction).
        bar_level, open_level: local intensity of the bars around it and of its open area.
        crop_px: side of the crop ``crop_square`` cuts, px (the same for every square of a grid).
    """

    row_px: float
    col_px: float
    size_px: float
    angle_deg: float
    ncc: float
    complete: bool
    index: tuple[int, int]
    contrast: float
    refined: bool
    bar_level: float
    open_level: float
    crop_px: int


@dataclass(frozen=True)
class ExtractionResult:
    """Everything ``find_squares`` found.

    Attributes:
        squares: the squares in the lattice's reading order (``index[1]``, then ``index[0]``).
        lattice: the fitted lattice.
        levels: the grid's intensity levels.
        coarse_factor: downsampling factor of the coarse matching pass.
        n_peaks: NCC peaks above the threshold; ``n_on_lattice`` of them were on the lattice.
        n_recovered: squares kept on open-area evidence although their NCC was below threshold.
    """

    squares: list[FoundSquare]
    lattice: Lattice
    levels: Levels
    coarse_factor: int
    n_peaks: int
    n_on_lattice: int
    n_recovered: int


# ---------------------------------------------------------------------------------------------
# Downsampling and the Fourier lattice estimate


def block_mean(image: np.ndarray, factor: int, *, workers: int = 2) -> np.ndarray:
    """Mean over non-overlapping ``factor`` x ``factor`` blocks.

    Works band by band (a memory-mapped atlas is never copied whole) on ``workers`` threads;
    trailing rows/cols that do not fill a block are dropped.

    Args:
        image: (rows, cols) any real dtype.
        factor: block side, px.

    Returns:
        (rows // factor, cols // factor) float32.
    """
    factor = max(1, int(factor))
    rows, cols = (image.shape[0] // factor) * factor, (image.shape[1] // factor) * factor
    if factor == 1:
        return np.array(image[:rows, :cols], dtype=np.float32)
    out = np.empty((rows // factor, cols // factor), np.float32)
    band = max(1, (1 << 22) // max(cols, 1) // factor) * factor  # ~4 Mpx (16 MB) per band
    scale = np.float32(1.0 / (factor * factor))

    def work(r0: int) -> None:
        blk = np.asarray(image[r0 : r0 + band, :cols], dtype=np.float32)
        n = blk.shape[0] // factor
        s = blk[: n * factor].reshape(n, factor, cols // factor, factor).sum(axis=(1, 3))
        out[r0 // factor : r0 // factor + n] = s * scale

    starts = range(0, rows, band)
    if workers > 1 and len(starts) > 1:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(work, starts))
    else:
        for r0 in starts:
            work(r0)
    return out


def _fourier_lattice(img: np.ndarray, pmin: float, pmax: float) -> tuple[float, float, float]:
    """Pitch (px) and angle (rad, [-pi/4, pi/4)) of a square lattice from its Fourier peaks.

    The lattice's fundamental is the strongest peak of a square-wave mesh (the (1, 0) coefficient
    of a square of side a in pitch p is sinc(a/p), larger than every harmonic), and its partner is
    the same peak turned by 90 degrees. Candidates are scored by the power of both.

    Returns:
        pitch_px, angle_rad, and the peak's power relative to the median power in the annulus.
    """
    n = int(sfft.next_fast_len(max(img.shape)))
    # Remove the rim, the ice gradient and vignetting (periods far beyond the longest pitch). A box
    # filter one longest pitch wide costs O(N) at any size and passes every lattice frequency.
    x = img.astype(np.float32)
    x = x - ndi.uniform_filter(x, size=max(3, int(pmax)), mode="reflect")
    x *= np.hanning(img.shape[0])[:, None].astype(np.float32)
    x *= np.hanning(img.shape[1])[None, :].astype(np.float32)
    spec = np.abs(sfft.fftshift(sfft.fft2(x, s=(n, n), workers=2))) ** 2
    spec = ndi.gaussian_filter(spec, 0.7)
    c = n // 2
    kr, kc = np.mgrid[-c : n - c, -c : n - c]
    rad = np.hypot(kr, kc)
    kmin, kmax = n / pmax, min(n / pmin, c - 2)
    annulus = (rad >= kmin) & (rad <= kmax)
    if kmax <= kmin or not annulus.any():
        raise NoLatticeError("image too small to show a mesh lattice")
    masked = np.where(annulus, spec, 0.0)
    peaks = peak_local_max(masked, min_distance=2, num_peaks=16, exclude_border=2)
    if len(peaks) == 0:
        raise NoLatticeError("no Fourier peak")

    def power_near(q: np.ndarray) -> float:
        r, cc = int(round(q[0])) + c, int(round(q[1])) + c
        if not (1 <= r < n - 1 and 1 <= cc < n - 1):
            return 0.0
        return float(spec[r - 1 : r + 2, cc - 1 : cc + 2].max())

    best, best_score = None, -1.0
    for p in peaks:
        q = p - c
        score = spec[p[0], p[1]] + power_near(np.array([q[1], -q[0]], float))
        if score > best_score:
            best, best_score = q.astype(float), score
    assert best is not None

    def centroid(q: np.ndarray) -> np.ndarray:
        r, cc = int(round(q[0])) + c, int(round(q[1])) + c
        r, cc = int(np.clip(r, 3, n - 4)), int(np.clip(cc, 3, n - 4))
        win = spec[r - 2 : r + 3, cc - 2 : cc + 3]
        # Move to the local maximum first, then take the centroid above the window minimum.
        dr, dc = np.unravel_index(np.argmax(win), win.shape)
        r, cc = int(np.clip(r + dr - 2, 3, n - 4)), int(np.clip(cc + dc - 2, 3, n - 4))
        win = spec[r - 2 : r + 3, cc - 2 : cc + 3]
        w = win - win.min()
        gr, gc = np.mgrid[-2:3, -2:3]
        tot = w.sum() or 1.0
        return np.array([r - c + (w * gr).sum() / tot, cc - c + (w * gc).sum() / tot])

    q1 = centroid(best)
    q2 = centroid(np.array([q1[1], -q1[0]]))
    k = 0.5 * (np.hypot(*q1) + np.hypot(*q2))
    # Average the two directions modulo 90 degrees on the doubled-angle circle (x4 for 90 deg).
    angles = np.array([math.atan2(q1[0], q1[1]), math.atan2(q2[0], q2[1])])
    mean4 = math.atan2(np.sin(4 * angles).sum(), np.cos(4 * angles).sum()) / 4
    angle = (mean4 + math.pi / 4) % (math.pi / 2) - math.pi / 4
    contrast = best_score / 2 / max(float(np.median(spec[annulus])), 1e-30)
    return n / k, angle, contrast


def _unit_axes(angle_rad: float) -> tuple[np.ndarray, np.ndarray]:
    """Unit lattice axes (row, col): ê1 at ``angle`` from +col towards +row, ê2 = ê1 turned 90°."""
    s, c = math.sin(angle_rad), math.cos(angle_rad)
    return np.array([s, c]), np.array([c, -s])


# ---------------------------------------------------------------------------------------------
# Folding: square size, lattice phase and intensity levels from the grid's own pixels


@dataclass(frozen=True)
class _Fold:
    square_frac: float  # open square side / pitch
    phase: tuple[float, float]  # (u, v) of a square centre in pitch units, [0, 1)
    levels: Levels


def _two_level_width(profile: np.ndarray) -> tuple[float, float] | None:
    """Bright-run width (fraction of the period) and its centre (fraction) of a circular profile.

    The threshold is halfway between the profile's low and high plateaus, which is unbiased for
    any symmetric blur of the edges.
    """
    nb = len(profile)
    lo, hi = np.percentile(profile, [5, 95])
    if not hi > lo:
        return None
    t = 0.5 * (lo + hi)
    above = profile > t
    if above.all() or not above.any():
        return None
    nxt = np.roll(profile, -1)
    idx = np.nonzero(above != np.roll(above, -1))[0]
    cross = idx + (t - profile[idx]) / (nxt[idx] - profile[idx])  # between bin idx and idx+1
    rising = [x for x, i in zip(cross, idx, strict=True) if not above[i]]
    falling = [x for x, i in zip(cross, idx, strict=True) if above[i]]
    best: tuple[float, float] | None = None
    for r in rising:
        # The bright run starting at r ends at the first falling crossing after it (circularly).
        f = min(falling, key=lambda x: (x - r) % nb)
        width = (f - r) % nb
        if best is None or width > best[0]:
            best = (width, (r + width / 2 + 0.5) % nb)
    assert best is not None
    return best[0] / nb, best[1] / nb


def _circular_profile(phase: np.ndarray, vals: np.ndarray, nb: int) -> np.ndarray:
    """Mean of ``vals`` in ``nb`` bins of ``phase`` in [0, 1); empty bins interpolated."""
    b = np.minimum((phase * nb).astype(np.int64), nb - 1)
    cnt = np.bincount(b, minlength=nb)
    if (cnt > 0).sum() < nb // 2:
        raise NoLatticeError("too few pixels to fold the lattice cell")
    prof = np.bincount(b, vals, minlength=nb) / np.maximum(cnt, 1)
    if (cnt == 0).any():
        x = np.nonzero(cnt)[0]
        prof = np.interp(np.arange(nb), x, prof[x], period=nb)
    return prof


def _fold(coarse: np.ndarray, valid: np.ndarray, pitch: float, angle: float, nb: int = 48) -> _Fold:
    """Fold the coarse image onto one lattice cell; see the module docstring (step 2)."""
    e1, e2 = _unit_axes(angle)
    rows, cols = np.nonzero(valid)
    vals = coarse[rows, cols].astype(np.float64)
    u = ((rows * e1[0] + cols * e1[1]) / pitch) % 1.0
    v = ((rows * e2[0] + cols * e2[1]) / pitch) % 1.0
    # About one bin per coarse pixel: a lattice aligned with the pixels and an integer pitch
    # visits only ``pitch`` distinct phases.
    nb = int(np.clip(math.floor(pitch), 8, nb))
    mu = _circular_profile(u, vals, nb)
    mv = _circular_profile(v, vals, nb)
    wu, wv = _two_level_width(mu), _two_level_width(mv)
    if wu is None or wv is None:
        raise NoLatticeError("the folded lattice cell shows no square")
    # The u-marginal's bright run spans the square side (the bars along v darken it uniformly).
    frac = float(np.clip(0.5 * (wu[0] + wv[0]), 0.2, 0.97))
    phase = (wu[1], wv[1])
    du = (u - phase[0] + 0.5) % 1.0 - 0.5
    dv = (v - phase[1] + 0.5) % 1.0 - 0.5
    inner = (np.abs(du) < 0.3 * frac) & (np.abs(dv) < 0.3 * frac)
    bar_half = 0.5 * (1 - frac)
    on_bar = (np.abs(du) > 0.5 - 0.35 * bar_half * 2) | (np.abs(dv) > 0.5 - 0.35 * bar_half * 2)
    if inner.sum() < 4 or on_bar.sum() < 4:
        raise NoLatticeError("the lattice cell is too small at the coarse scale")
    both = np.concatenate([vals[inner], vals[on_bar]])
    otsu = float(threshold_otsu(both)) if np.ptp(both) > 0 else float(both[0])
    bars = vals[on_bar]
    bars = bars[bars <= otsu] if (bars <= otsu).any() else bars
    opens = vals[inner]
    opens = opens[opens > otsu] if (opens > otsu).any() else opens
    levels = Levels(
        bar=float(np.median(bars)),
        open=float(np.median(opens)),
        vacuum=float(np.percentile(opens, 99.5)),
        threshold=otsu,
    )
    return _Fold(frac, phase, levels)


def _fourier_image(
    image: np.ndarray, pixel_size_um: float, fourier_px: int, workers: int = 2
) -> tuple[np.ndarray, int, float, float]:
    """Downsample to about ``fourier_px`` and estimate pitch (full-res px) and angle (rad)."""
    factor = max(1, math.ceil(max(image.shape) / fourier_px))
    small = block_mean(image, factor, workers=workers)
    pitch_full, angle = _pitch_angle(small, factor, pixel_size_um)
    if pitch_full / factor < 10 and factor > 1:
        # Too few pixels per pitch at this scale: redo on a central crop at a finer scale.
        factor = max(1, int(factor * (pitch_full / factor) / 24))
        side = fourier_px * factor
        r0 = max(0, (image.shape[0] - side) // 2)
        c0 = max(0, (image.shape[1] - side) // 2)
        crop = block_mean(image[r0 : r0 + side, c0 : c0 + side], factor, workers=workers)
        pitch_full, angle = _pitch_angle(crop, factor, pixel_size_um)
        small = block_mean(image, factor, workers=workers)
    return small, factor, pitch_full, angle


def _pitch_angle(small: np.ndarray, factor: int, pixel_size_um: float) -> tuple[float, float]:
    # Plausible meshes: 15 µm (2000 mesh) to 600 µm (40 mesh) pitch, and at least 5 pitches across.
    pmin = max(5.0, 15.0 / (pixel_size_um * factor)) if pixel_size_um > 0 else 5.0
    pmax = min(
        max(small.shape) / 5.0, 600.0 / (pixel_size_um * factor) if pixel_size_um > 0 else 1e9
    )
    if pmax <= pmin:
        raise NoLatticeError(f"image of {small.shape} px too small for a {pmin:.0f} px pitch")
    pitch, angle, strength = _fourier_lattice(small, pmin, pmax)
    if strength < 8.0:
        raise NoLatticeError(
            f"no clear lattice peak in the Fourier spectrum (strength {strength:.1f})"
        )
    return pitch * factor, angle


def estimate_lattice(image: np.ndarray, pixel_size_um: float, *, fourier_px: int = 1024) -> Lattice:
    """Pitch, orientation, square side and phase of the mesh lattice of an atlas.

    A rough estimate (from the Fourier peaks and the folded lattice cell, no peak fit); the
    lattice returned by ``find_squares`` is fitted to the matched squares and more accurate.

    Args:
        image: atlas (rows, cols), px.
        pixel_size_um: µm per px; bounds the plausible pitch (15 to 600 µm).
        fourier_px: the Fourier estimate runs on the atlas downsampled to about this side.

    Raises:
        NoLatticeError: no mesh lattice is visible.
    """
    small, factor, pitch, angle = _fourier_image(image, pixel_size_um, fourier_px)
    valid = np.ones(small.shape, bool)
    fold = _fold(small, valid, pitch / factor, angle)
    e1, e2 = _unit_axes(angle)
    origin = (fold.phase[0] * e1 + fold.phase[1] * e2) * pitch + (factor - 1) / 2
    return Lattice(
        pitch_px=float(pitch),
        angle_deg=math.degrees(angle),
        square_px=float(fold.square_frac * pitch),
        origin_rc=(float(origin[0]), float(origin[1])),
        e1_rc=(float(e1[0] * pitch), float(e1[1] * pitch)),
        e2_rc=(float(e2[0] * pitch), float(e2[1] * pitch)),
    )


# ---------------------------------------------------------------------------------------------
# Template matching and the lattice fit (coarse image)


def ncc_match(image: np.ndarray, template: np.ndarray) -> np.ndarray:
    """Normalized cross-correlation of a (m, n) template at every pixel of a (M, N) image.

    Returns (M, N) in [-1, 1]: the correlation coefficient of the template with the image
    window centred on each pixel (the image reflect-padded at its edges); 0 where the window is
    flat. The same numbers as ``skimage.feature.match_template(image, template,
    pad_input=True, mode="reflect")`` (the same algorithm: FFT correlation and running window
    sums), without importing ``scipy.signal``, which costs 0.4-0.9 s of every command's start.
    """
    dtype = np.float32 if image.dtype == np.float32 else np.float64
    image = np.asarray(image, dtype)
    template = np.asarray(template, dtype)
    (m, n), (rows, cols) = template.shape, image.shape
    padded = np.pad(image, ((m, m), (n, n)), mode="reflect")

    def window_sum(a: np.ndarray) -> np.ndarray:
        s = np.cumsum(a, axis=0)
        s = s[m:-1] - s[: -m - 1]
        s = np.cumsum(s, axis=1)
        return s[:, n:-1] - s[:, : -n - 1]

    win_sum, win_sum2 = window_sum(padded), window_sum(padded**2)
    t_mean = template.mean()
    t_ssd = np.sum((template - t_mean) ** 2)
    # Correlation = convolution with the flipped template, keeping the "valid" part.
    shape = [
        sfft.next_fast_len(padded.shape[0] + m - 1, real=True),
        sfft.next_fast_len(padded.shape[1] + n - 1, real=True),
    ]
    spectrum = sfft.rfft2(padded, shape) * sfft.rfft2(template[::-1, ::-1], shape)
    full = sfft.irfft2(spectrum, shape)
    valid_rows, valid_cols = padded.shape[0] - m + 1, padded.shape[1] - n + 1
    xcorr = full[m - 1 : m - 1 + valid_rows, n - 1 : n - 1 + valid_cols][1:-1, 1:-1]
    numerator = xcorr - win_sum * t_mean
    denominator = np.sqrt(np.maximum((win_sum2 - win_sum * win_sum / (m * n)) * t_ssd, 0))
    response = np.zeros_like(xcorr, dtype=dtype)
    ok = denominator > np.finfo(dtype).eps
    response[ok] = numerator[ok] / denominator[ok]
    r0, c0 = (m - 1) // 2, (n - 1) // 2
    return response[r0 : r0 + rows, c0 : c0 + cols]


def square_template(pitch: float, square: float, angle_rad: float, levels: Levels) -> np.ndarray:
    """One bright open square of side ``square`` inside dark bars, turned by ``angle_rad``.

    The template spans the square plus a full bar width on every side (``2 * pitch - square``),
    is anti-aliased by 4x supersampling, and is drawn at the grid's own open and bar levels
    (NCC is invariant to a gain and offset, so the levels set its contrast sign, not its scale).

    Returns:
        (T, T) float32 with T odd, px.
    """
    side = int(round(2 * pitch - square)) | 1
    ss = 4
    g = (np.arange(side * ss) + 0.5) / ss - side / 2
    rr, cc = np.meshgrid(g, g, indexing="ij")
    e1, e2 = _unit_axes(angle_rad)
    u = rr * e1[0] + cc * e1[1]
    v = rr * e2[0] + cc * e2[1]
    inside = (np.abs(u) <= square / 2) & (np.abs(v) <= square / 2)
    frac = inside.reshape(side, ss, side, ss).mean(axis=(1, 3))
    return (levels.bar + frac * (levels.open - levels.bar)).astype(np.float32)


def _fit_lattice(
    peaks: np.ndarray, origin: np.ndarray, basis: np.ndarray, centre: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Fit ``x = origin + basis @ (i, j)`` to peaks (N, 2), growing outwards from ``centre``.

    Args:
        peaks: (N, 2) peak positions, px.
        origin: (2,) initial site position.
        basis: (2, 2) initial basis, columns e1, e2.
        centre: (2,) where to start growing.

    Returns:
        origin (2,), basis (2, 2), indices (N, 2) int, inlier mask (N,).
    """
    pitch = float(np.mean(np.linalg.norm(basis, axis=0)))
    dist = np.linalg.norm(peaks - centre, axis=1)
    radius = 4.0 * pitch
    idx = np.zeros((len(peaks), 2), np.int64)
    inl = np.zeros(len(peaks), bool)
    for _ in range(40):
        sel = dist <= radius
        for _ in range(3):
            idx = np.rint(np.linalg.solve(basis, (peaks - origin).T).T).astype(np.int64)
            pred = origin + idx @ basis.T
            inl = sel & (np.linalg.norm(peaks - pred, axis=1) < 0.3 * pitch)
            if inl.sum() < 4 or np.linalg.matrix_rank(idx[inl] - idx[inl].mean(0)) < 2:
                break
            design = np.column_stack([np.ones(inl.sum()), idx[inl]])
            coef, *_ = np.linalg.lstsq(design, peaks[inl], rcond=None)
            origin, basis = coef[0], coef[1:].T
        if sel.all():
            break
        radius *= 1.6
    idx = np.rint(np.linalg.solve(basis, (peaks - origin).T).T).astype(np.int64)
    pred = origin + idx @ basis.T
    inl = np.linalg.norm(peaks - pred, axis=1) < 0.3 * pitch
    return origin, basis, idx, inl


def _inside_hull(points: np.ndarray, hull_of: np.ndarray) -> np.ndarray:
    """Which integer points (N, 2) lie inside (or on) the convex hull of ``hull_of`` (M, 2)."""
    from scipy.spatial import ConvexHull, QhullError

    out = np.zeros(len(points), bool)
    if len(hull_of) < 3:
        return out
    try:
        eq = ConvexHull(hull_of.astype(float)).equations  # (F, 3): normal . x + offset <= 0
    except QhullError:  # all collinear
        return out
    return np.asarray((points.astype(float) @ eq[:, :2].T + eq[:, 2] <= 1e-6).all(axis=1))


def _fit_affine_lattice(
    idx: np.ndarray, pos: np.ndarray
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Robust least-squares ``pos = origin + basis @ idx`` (idx, pos (N, 2)); None if too few.

    Three rounds, each dropping points further than 3 robust s.d. (at least 1 px) from the fit.
    """
    keep = np.ones(len(idx), bool)
    origin = basis = None
    for _ in range(3):
        if keep.sum() < 6 or np.linalg.matrix_rank(idx[keep] - idx[keep].mean(0)) < 2:
            return origin, basis
        design = np.column_stack([np.ones(keep.sum()), idx[keep]])
        coef, *_ = np.linalg.lstsq(design, pos[keep], rcond=None)
        origin, basis = coef[0], coef[1:].T
        res = np.linalg.norm(pos - (origin + idx @ basis.T), axis=1)
        mad = float(np.median(res[keep])) * 1.4826
        keep = res <= max(3 * mad, 1.0)
    return origin, basis


def _sample(img: np.ndarray, rc: np.ndarray) -> np.ndarray:
    """Bilinear samples of ``img`` at (..., 2) positions; NaN outside."""
    flat = rc.reshape(-1, 2).T
    out = ndi.map_coordinates(img, flat, order=1, mode="constant", cval=np.nan)
    return out.reshape(rc.shape[:-1])


def _dark_region_mask(
    coarse: np.ndarray, threshold: float, pitch: float, square: float
) -> np.ndarray:
    """Dark areas wider than a dark square with its bars (the rim, areas without data).

    The dark mask is opened with a disk of diameter ``1.2 * (2 * pitch - square)`` (by two
    distance transforms): bars and a lone opaque square with its bars (``2 * pitch - square``
    across) vanish, while the rim keeps its exact edge. Outside the image counts as dark.
    """
    dark = coarse <= threshold
    radius = 0.6 * (2 * pitch - square)
    pad = int(radius) + 2
    padded = np.pad(dark, pad, constant_values=True)  # outside the image counts as no data
    eroded = ndi.distance_transform_edt(padded) > radius
    opened = ndi.distance_transform_edt(~eroded) <= radius
    return opened[pad:-pad, pad:-pad]


# ---------------------------------------------------------------------------------------------
# Full-resolution refinement


def _edge_profile_fit(
    image: np.ndarray,
    centre: np.ndarray,
    axis: np.ndarray,
    perp: np.ndarray,
    square: float,
    bar: float,
    stride_rows: bool,
) -> tuple[float | None, float | None, float, float]:
    """Locate the two edges of a square along ``axis`` at full resolution.

    Pixels within a band of half-width ``0.3 * square`` across the square's centre are binned by
    their position along ``axis`` into three sub-bands; each sub-band profile gives a rising and
    a falling crossing of the level halfway between the open area and the bars; the median over
    sub-bands is robust to a blob on one of them. Rows (or columns) are strided, which keeps full
    resolution along ``axis`` (it is within 45 degrees of the other image axis).

    Returns:
        (lo_edge, hi_edge, inner_level, bar_level): edge positions along ``axis`` relative to
        ``centre`` (px, None if not found) and the two levels.
    """
    half_u = square / 2 + 0.75 * bar
    half_w = 0.3 * square
    hr = half_u * abs(axis[0]) + half_w * abs(perp[0])
    hc = half_u * abs(axis[1]) + half_w * abs(perp[1])
    r_lo, r_hi = int(math.floor(centre[0] - hr)), int(math.ceil(centre[0] + hr)) + 1
    c_lo, c_hi = int(math.floor(centre[1] - hc)), int(math.ceil(centre[1] + hc)) + 1
    r_lo, c_lo = max(r_lo, 0), max(c_lo, 0)
    r_hi, c_hi = min(r_hi, image.shape[0]), min(c_hi, image.shape[1])
    nan = float("nan")
    if r_hi - r_lo < 2 or c_hi - c_lo < 2:
        return None, None, nan, nan
    stride = max(1, int(2 * half_w / 48))
    if stride_rows:
        block = image[r_lo:r_hi:stride, c_lo:c_hi]
        rr = np.arange(r_lo, r_hi, stride, dtype=np.float32)[:, None] - np.float32(centre[0])
        cc = np.arange(c_lo, c_hi, dtype=np.float32)[None, :] - np.float32(centre[1])
    else:
        block = image[r_lo:r_hi, c_lo:c_hi:stride]
        rr = np.arange(r_lo, r_hi, dtype=np.float32)[:, None] - np.float32(centre[0])
        cc = np.arange(c_lo, c_hi, stride, dtype=np.float32)[None, :] - np.float32(centre[1])
    u = rr * np.float32(axis[0]) + cc * np.float32(axis[1])
    w = rr * np.float32(perp[0]) + cc * np.float32(perp[1])
    binw = max(0.5, half_u / 600)
    nbins = int(math.ceil(2 * half_u / binw))
    keep = (np.abs(u) < half_u) & (np.abs(w) < half_w)
    ub = ((u[keep] + half_u) / binw).astype(np.int64)
    sb = np.minimum(((w[keep] + half_w) / (2 * half_w) * 3).astype(np.int64), 2)
    key = sb * nbins + np.minimum(ub, nbins - 1)
    vals = np.asarray(block, dtype=np.float32)[keep]
    cnt = np.bincount(key, minlength=3 * nbins).reshape(3, nbins)
    tot = np.bincount(key, vals, minlength=3 * nbins).reshape(3, nbins)
    with np.errstate(invalid="ignore", divide="ignore"):
        prof = tot / cnt
    pos = (np.arange(nbins) + 0.5) * binw - half_u
    inner_sel = np.abs(pos) < max(square / 2 - 0.15 * square, binw)
    bar_sel = np.abs(pos) > square / 2 + 0.25 * bar
    all_prof = tot.sum(0) / np.maximum(cnt.sum(0), 1)
    has = cnt.sum(0) > 0
    if not (inner_sel & has).any() or not (bar_sel & has).any():
        return None, None, nan, nan
    inner = float(np.median(all_prof[inner_sel & has]))
    outer = float(np.median(all_prof[bar_sel & has]))
    if not inner > outer:
        return None, None, inner, outer
    t = outer + EDGE_LEVEL * (inner - outer)
    window = max(0.5 * bar, 0.08 * square, 3 * binw)
    lo_est, hi_est = [], []
    for k in range(3):
        p = prof[k]
        ok = np.isfinite(p)
        if ok.sum() < nbins // 2:
            continue
        p = np.interp(pos, pos[ok], p[ok])
        above = p > t
        i = np.nonzero(above[1:] != above[:-1])[0]
        x = pos[i] + (t - p[i]) / (p[i + 1] - p[i]) * binw
        rising = x[~above[i]]
        falling = x[above[i]]
        r = rising[np.abs(rising + square / 2) < window]
        f = falling[np.abs(falling - square / 2) < window]
        if len(r):
            lo_est.append(float(r[np.argmin(np.abs(r + square / 2))]))
        if len(f):
            hi_est.append(float(f[np.argmin(np.abs(f - square / 2))]))
    lo = float(np.median(lo_est)) if len(lo_est) >= 2 else None
    hi = float(np.median(hi_est)) if len(hi_est) >= 2 else None
    return lo, hi, inner, outer


def _dark_edge_runs(
    image: np.ndarray,
    centre: np.ndarray,
    side: float,
    ax1: np.ndarray,
    ax2: np.ndarray,
    threshold: float,
) -> list[tuple[np.ndarray, float, bool]]:
    """Stretches along the inside of a square's edges that are opaque (at or below ``threshold``).

    Samples a ring 1.5 and 3 % of the side (+ 1.5 px) inside the edges (past the edge blur) at
    full resolution, 48 samples per side, averages the two depths and 3 neighbours along the ring,
    and returns each run of at least two dark samples as (outward unit normal of its side,
    position of the run's middle along the side in units of the side, -0.5..0.5, whether it
    has no data: outside the image or exactly 0).
    """
    n_side = 48
    t = (np.arange(n_side) + 0.5) / n_side - 0.5
    # Past the edge blur: the measured side reaches out to the foot of the edge ramp.
    depth = np.array([0.015, 0.03]) + 1.5 / max(side, 1.0)
    sides = [(sgn * ax, oth) for ax, oth in ((ax1, ax2), (ax2, ax1)) for sgn in (-1.0, 1.0)]
    ring = np.stack(
        [
            centre + side * ((0.5 - depth)[None, :, None] * nrm + t[:, None, None] * oth)
            for nrm, oth in sides
        ]
    )  # (4, n_side, 2 depths, 2)
    flat = ring.reshape(-1, 2)
    lo = np.maximum(np.floor(flat.min(0)).astype(int) - 1, 0)
    hi = np.minimum(np.ceil(flat.max(0)).astype(int) + 2, image.shape)
    if (hi <= lo).any():
        return []
    win = np.asarray(image[lo[0] : hi[0], lo[1] : hi[1]], dtype=np.float32)
    raw = _sample(win, ring - lo)  # (4, n_side, 2)
    # No data (outside the image, or never imaged: exactly 0 at both depths).
    nodata = ~np.isfinite(raw).all(axis=2) | (raw == 0).all(axis=2)
    smooth = ndi.uniform_filter1d(raw.mean(axis=2), 3, axis=1, mode="nearest")
    dark = ~(smooth > threshold) | nodata
    runs = []
    for k, (nrm, _oth) in enumerate(sides):
        lab, n = ndi.label(dark[k])
        for r in range(1, n + 1):
            where = np.nonzero(lab == r)[0]
            if len(where) >= 2 or nodata[k, where].any():
                runs.append((nrm, float(t[where].mean()), bool(nodata[k, where].any())))
    return runs


# ---------------------------------------------------------------------------------------------
# The pipeline


def find_squares(image: np.ndarray, pixel_size_um: float, cfg: ExtractConfig) -> ExtractionResult:
    """Find every grid square of an atlas (see the module docstring for the method).

    Args:
        image: atlas (rows, cols), any real dtype, may be memory-mapped.
        pixel_size_um: µm per px (bounds the plausible pitch only; no size is assumed).
        cfg: extraction settings.

    Returns:
        the squares (partial ones included, with ``complete=False``), lattice and levels.

    Raises:
        NoLatticeError: no mesh lattice is visible in the image.
    """
    if image.ndim != 2 or min(image.shape) < 16:
        raise NoLatticeError(f"need a 2D image, got shape {image.shape}")
    small, ff, pitch_full, angle = _fourier_image(
        image, pixel_size_um, cfg.fourier_px, max(1, cfg.threads)
    )
    g = max(1, int(round(pitch_full / ff / cfg.coarse_px_per_pitch)))
    coarse = block_mean(small, g, workers=1) if g > 1 else small
    f = ff * g
    pc = pitch_full / f
    valid = np.ones(coarse.shape, bool)
    fold = _fold(coarse, valid, pc, angle)

    def to_full(rc: np.ndarray) -> np.ndarray:
        return rc * f + (f - 1) / 2.0

    e1, e2 = _unit_axes(angle)
    basis = np.column_stack([e1, e2]) * pc
    origin = (fold.phase[0] * e1 + fold.phase[1] * e2) * pc
    centre = np.array(coarse.shape, float) / 2
    # Two rounds of template -> peaks -> lattice fit -> refold: the fitted pitch and angle give
    # a sharper folded cell (square side, levels), hence a better template for the second round.
    n_peaks, n_on = 0, 0
    ncc = np.zeros_like(coarse)
    for _round in range(2):
        sq_c = fold.square_frac * pc
        tmpl = square_template(pc, sq_c, angle, fold.levels)
        if min(coarse.shape) <= tmpl.shape[0]:
            raise NoLatticeError(f"image of {image.shape} px holds too few pitches")
        ncc = ncc_match(coarse, tmpl)
        peaks = peak_local_max(
            ncc,
            min_distance=max(1, int(0.4 * pc)),
            threshold_abs=cfg.ncc_threshold,
            exclude_border=False,
        ).astype(float)
        n_peaks = len(peaks)
        if n_peaks < 4:
            raise NoLatticeError(f"only {n_peaks} template matches above the NCC threshold")
        # Start from the folded phase next to the strongest peak near the centre.
        near = np.argsort(np.linalg.norm(peaks - centre, axis=1))[: max(4, n_peaks // 4)]
        seed = peaks[near[np.argmax(ncc[tuple(peaks[near].astype(int).T)])]]
        k0 = np.rint(np.linalg.solve(basis, seed - origin))
        origin_seed = origin + basis @ k0
        if np.linalg.norm(seed - origin_seed) < 0.3 * pc:
            origin_seed = seed
        origin, basis, idx, inl = _fit_lattice(peaks, origin_seed, basis, seed)
        n_on = int(inl.sum())
        if n_on < 4:
            raise NoLatticeError("the template matches do not form a lattice")
        pc = float(np.mean(np.linalg.norm(basis, axis=0)))
        angle = _basis_angle(basis)
        # Refold with the fitted lattice (phase from the fit), for the square size and levels.
        e1, e2 = _unit_axes(angle)
        fold = _fold(coarse, valid, pc, angle)
        uv = np.array([origin @ e1, origin @ e2]) / pc % 1.0
        fold = _Fold(fold.square_frac, (float(uv[0]), float(uv[1])), fold.levels)
    levels = fold.levels
    sq_c = fold.square_frac * pc

    # Candidate sites: every lattice site whose square overlaps the image.
    corners = np.array([[0, 0], [0, coarse.shape[1]], [coarse.shape[0], 0], list(coarse.shape)])
    ij = np.linalg.solve(basis, (corners - origin).T).T
    i_rng = range(int(np.floor(ij[:, 0].min())) - 1, int(np.ceil(ij[:, 0].max())) + 2)
    j_rng = range(int(np.floor(ij[:, 1].min())) - 1, int(np.ceil(ij[:, 1].max())) + 2)
    sites = np.array([(i, j) for i in i_rng for j in j_rng], np.int64).reshape(-1, 2)
    pred = origin + sites @ basis.T
    m = sq_c / 2
    inside = (
        (pred[:, 0] > -m)
        & (pred[:, 0] < coarse.shape[0] - 1 + m)
        & (pred[:, 1] > -m)
        & (pred[:, 1] < coarse.shape[1] - 1 + m)
    )
    sites, pred = sites[inside], pred[inside]
    # Local drift (bent mesh, stitching): median residual of on-lattice peaks within 2 sites.
    resid = {tuple(k): peaks[n] - (origin + basis @ k) for n, k in enumerate(idx) if inl[n]}
    drift = np.zeros_like(pred)
    for n, (i, j) in enumerate(sites):
        near_res = [
            resid[(i + di, j + dj)]
            for di in range(-2, 3)
            for dj in range(-2, 3)
            if (i + di, j + dj) in resid
        ]
        if len(near_res) >= 3:
            drift[n] = np.median(near_res, axis=0)
    pred = pred + drift
    # Evidence at each site: best NCC within 0.2 pitch, and open-area contrast.
    rad = max(1, int(round(0.2 * pc)))
    site_ncc = np.full(len(sites), -1.0)
    pos_c = pred.copy()
    for n, (r, c) in enumerate(pred):
        r0, c0 = int(round(r)), int(round(c))
        a0, a1 = max(r0 - rad, 0), min(r0 + rad + 1, ncc.shape[0])
        b0, b1 = max(c0 - rad, 0), min(c0 + rad + 1, ncc.shape[1])
        if a1 <= a0 or b1 <= b0:
            continue
        win = ncc[a0:a1, b0:b1]
        k = np.unravel_index(int(np.argmax(win)), win.shape)
        site_ncc[n] = float(win[k])
        if site_ncc[n] >= cfg.ncc_threshold:
            pos_c[n] = (a0 + k[0], b0 + k[1])
    grid = np.linspace(-0.3, 0.3, 5) * sq_c
    su, sv = np.meshgrid(grid, grid, indexing="ij")
    inner_off = su[..., None] * e1 + sv[..., None] * e2  # (5, 5, 2)
    t = np.array([-0.25, 0.0, 0.25]) * sq_c
    bar_off = np.concatenate(
        [
            s * pc / 2 * ax + tt * oth
            for ax, oth in ((e1, e2), (e2, e1))
            for s in (-1, 1)
            for tt in t
        ]
    ).reshape(-1, 2)
    inner_v = _sample(coarse, pred[:, None, None, :] + inner_off[None])
    bar_v = _sample(coarse, pred[:, None, :] + bar_off[None])
    with np.errstate(invalid="ignore"):
        span = max(levels.open - levels.bar, 1e-12)
        n_in = np.isfinite(inner_v).reshape(len(sites), -1).sum(1)
        n_bar = np.isfinite(bar_v).sum(1)
        inner_mean = np.nansum(inner_v.reshape(len(sites), -1), 1) / np.maximum(n_in, 1)
        bar_med = np.array(
            [np.median(b[np.isfinite(b)]) if np.isfinite(b).any() else np.nan for b in bar_v]
        )
        contrast = np.where((n_in > 0) & (n_bar > 0), (inner_mean - bar_med) / span, -np.inf)
    by_ncc = site_ncc >= cfg.ncc_threshold
    seen = (by_ncc & (contrast > 0.5 * cfg.min_contrast)) | (contrast >= cfg.min_contrast)
    # The meshed area is convex (a disk, cut by the image): every site inside the hull of the
    # squares that show is a square too, however dark (thick ice, occluded, without data).
    accept = seen | _inside_hull(sites, sites[seen])
    n_recovered = int((accept & ~by_ncc).sum())
    sites, pred, pos_c = sites[accept], pred[accept], pos_c[accept]
    site_ncc, contrast = site_ncc[accept], contrast[accept]

    # Full-resolution refinement.
    square_full = sq_c * f
    bar_full = max((pc - sq_c) * f, 2.0)
    centres = to_full(pos_c)
    bar_lv = np.full(len(sites), levels.bar)
    open_lv = np.full(len(sites), levels.open)
    ax1, ax2 = _unit_axes(angle)

    edges = np.full((len(sites), 4), np.nan)  # lo1, hi1, lo2, hi2 relative to the centre

    def refine(n: int) -> None:
        ctr = centres[n]
        lo1, hi1, in1, out1 = _edge_profile_fit(image, ctr, ax1, ax2, square_full, bar_full, True)
        lo2, hi2, in2, out2 = _edge_profile_fit(image, ctr, ax2, ax1, square_full, bar_full, False)
        edges[n] = [np.nan if x is None else x for x in (lo1, hi1, lo2, hi2)]
        lv_in = [x for x in (in1, in2) if np.isfinite(x)]
        lv_out = [x for x in (out1, out2) if np.isfinite(x)]
        if lv_in:
            open_lv[n] = float(np.mean(lv_in))
        if lv_out:
            bar_lv[n] = float(np.mean(lv_out))

    with ThreadPoolExecutor(max(1, cfg.threads)) as pool:
        list(pool.map(refine, range(len(sites))))

    # The square side, as the edges define it: the median over the grid.
    sides = np.stack([edges[:, 1] - edges[:, 0], edges[:, 3] - edges[:, 2]], axis=1)
    ok_sides = sides[np.isfinite(sides) & (np.abs(sides - square_full) < 0.2 * square_full)]
    if ok_sides.size >= 4:
        square_full = float(np.median(ok_sides))
    # An edge pair whose spacing is off the grid's square side belongs to a defect (occluded
    # side, debris on the edge), not to the square's own bars.
    size_ok = np.abs(sides - square_full) <= max(0.025 * square_full, 2.0)
    refined: np.ndarray = np.asarray(size_ok.all(axis=1))
    shift = (edges[:, 0:1] + edges[:, 1:2]) / 2 * ax1 + (edges[:, 2:3] + edges[:, 3:4]) / 2 * ax2
    centres[refined] += shift[refined]
    sizes = np.full(len(sites), square_full)
    sizes[refined] = sides[refined].mean(axis=1)

    # Lattice consistency. Refit the lattice to the refined centres at full resolution. A refined
    # centre is kept when its offset from the lattice agrees (within 1.2 % of the pitch) with
    # those of at least two refined neighbours: tiles stitched a few px off, or a bent mesh, move
    # neighbours together, while a defect on the edges misleads one square alone. The others get
    # lattice + the median offset of their refined neighbours.
    origin_f, basis_f = _fit_affine_lattice(sites[refined], centres[refined])
    if origin_f is None or basis_f is None:
        origin_f, basis_f = to_full(origin), basis * f
    lattice_full = origin_f + sites @ basis_f.T
    offs = centres - lattice_full
    key = {tuple(k): n for n, k in enumerate(sites)}
    pitch_full_fit = float(np.mean(np.linalg.norm(basis_f, axis=0)))
    angle_f = _basis_angle(basis_f)
    tol = max(0.012 * pitch_full_fit, 2.0)
    was_refined = refined.copy()

    def refined_near(i: int, j: int, reach: int) -> list[int]:
        return [
            key[(i + di, j + dj)]
            for di in range(-reach, reach + 1)
            for dj in range(-reach, reach + 1)
            if (di or dj) and (i + di, j + dj) in key and was_refined[key[(i + di, j + dj)]]
        ]

    for n, (i, j) in enumerate(sites):
        nbrs = refined_near(i, j, 1)
        if was_refined[n]:
            dist = np.linalg.norm(offs[nbrs] - offs[n], axis=1) if nbrs else np.zeros(0)
            if nbrs and (dist <= tol).sum() >= min(2, len(nbrs)):
                continue
            if not nbrs and np.linalg.norm(offs[n]) <= 3 * tol:
                continue
        if len(nbrs) < 2:
            nbrs = refined_near(i, j, 2)
        local = np.median(offs[nbrs], axis=0) if len(nbrs) >= 2 else np.zeros(2)
        centres[n] = lattice_full[n] + local
        refined[n] = False
        sizes[n] = square_full

    # Completeness: inside the image, and not touching a large dark region. Nearly opaque only:
    # thick ice still transmits, the rim and areas without data do not.
    dark_thr = levels.bar + 0.2 * (levels.open - levels.bar)
    dark = _dark_region_mask(coarse, dark_thr, pc, sq_c)
    # Openings have slightly rounded corners: test the footprint at 0.48 of the side.
    grid9 = np.linspace(-0.48, 0.48, 9)
    gu, gv = np.meshgrid(grid9, grid9, indexing="ij")
    foot = (gu[..., None] * ax1 + gv[..., None] * ax2).reshape(-1, 2)  # unit square (81, 2)
    # The crop must hold the turned square: its axis-aligned extent is side * (|cos| + |sin|).
    extent = square_full * (abs(math.cos(angle_f)) + abs(math.sin(angle_f)))
    crop_px = cfg.crop_px if cfg.crop_px > 0 else int(math.ceil(cfg.crop_margin * extent / 2)) * 2
    squares = []
    h, w = image.shape
    pitch_full_vec = (np.linalg.norm(basis_f[:, 0]), np.linalg.norm(basis_f[:, 1]))

    def in_dark(rc_full: np.ndarray) -> bool:
        rc = np.rint((rc_full - (f - 1) / 2.0) / f).astype(int)
        if (rc < 0).any() or rc[0] >= dark.shape[0] or rc[1] >= dark.shape[1]:
            return False  # unknown: the in-image probes decide
        return bool(dark[rc[0], rc[1]])

    for n in range(len(sites)):
        ctr = centres[n]
        pts = ctr + foot * sizes[n]
        complete = bool(((pts >= 0) & (pts[:, :1] <= h - 1) & (pts[:, 1:] <= w - 1)).all())
        if complete:
            # An opaque stretch inside an edge is the rim (or an area without data) when the
            # bar and the next cell beyond it are inside a large dark region too; otherwise it
            # is debris or an occluded side of this square alone.
            for nrm, along, nodata in _dark_edge_runs(image, ctr, sizes[n], ax1, ax2, dark_thr):
                first = abs(nrm @ ax1) > 0.5
                step = pitch_full_vec[0] if first else pitch_full_vec[1]
                perp = ax2 if first else ax1
                base = ctr + perp * along * sizes[n]
                probes = [
                    base + nrm * d
                    for d in (
                        (sizes[n] + bar_full) / 2,
                        sizes[n] / 2 + bar_full + 0.25 * sizes[n],
                        step,
                    )
                ]
                if nodata or any(in_dark(q) for q in probes):
                    complete = False
                    break
        squares.append(
            FoundSquare(
                row_px=float(ctr[0]),
                col_px=float(ctr[1]),
                size_px=float(sizes[n]),
                angle_deg=math.degrees(angle_f),
                ncc=float(site_ncc[n]),
                complete=complete,
                index=(int(sites[n][0]), int(sites[n][1])),
                contrast=float(contrast[n]),
                refined=bool(refined[n]),
                bar_level=float(bar_lv[n]),
                open_level=float(open_lv[n]),
                crop_px=crop_px,
            )
        )
    squares.sort(key=lambda s: (s.index[1], s.index[0]))  # lattice rows, then columns
    lattice = Lattice(
        pitch_px=pitch_full_fit,
        angle_deg=math.degrees(angle_f),
        square_px=float(square_full),
        origin_rc=(float(origin_f[0]), float(origin_f[1])),
        e1_rc=(float(basis_f[0, 0]), float(basis_f[1, 0])),
        e2_rc=(float(basis_f[0, 1]), float(basis_f[1, 1])),
    )
    return ExtractionResult(squares, lattice, levels, f, n_peaks, n_on, n_recovered)


def _basis_angle(basis: np.ndarray) -> float:
    """Lattice angle (rad, [-pi/4, pi/4)) of a fitted basis (columns e1 ~ +col, e2 ~ +row)."""
    a1 = math.atan2(basis[0, 0], basis[1, 0])
    a2 = math.atan2(-basis[1, 1], basis[0, 1])  # e2 = (cos, -sin) -> angle
    a = np.array([a1, a2])
    mean4 = math.atan2(np.sin(4 * a).sum(), np.cos(4 * a).sum()) / 4
    return (mean4 + math.pi / 4) % (math.pi / 2) - math.pi / 4


# ---------------------------------------------------------------------------------------------
# Crops and evaluation


def crop_square(
    image: np.ndarray, sq: FoundSquare, cfg: ExtractConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Crop a square at native resolution, axis-aligned, and its open-area mask.

    The crop side is ``sq.crop_px`` (``cfg.crop_px`` when > 0, else ``cfg.crop_margin`` x the
    axis-aligned extent of the lattice's turned square, ``side * (|cos| + |sin|)``: the same for
    every square of a grid, so crops stack). Outside the
    image the crop is 0 and the mask False.

    The open-area mask is the pixels inside the square's footprint (its side x 1.1, at the
    lattice angle) that are brighter, after a 3 x 3 mean, than ``bar + cfg.open_fraction *
    (open - bar)``: ``bar`` is the square's local bar level and ``open`` the 90th percentile of
    its footprint (the film or vacuum the beam passes, so a thick-ice square still has its open
    area, while opaque debris, occluded parts and the rim are left out).

    Returns:
        crop (S, S) float32 and mask (S, S) bool, S = ``sq.crop_px``.
    """
    side = int(sq.crop_px) if sq.crop_px > 0 else int(cfg.crop_px)
    r0 = int(round(sq.row_px)) - side // 2
    c0 = int(round(sq.col_px)) - side // 2
    crop = np.zeros((side, side), np.float32)
    valid = np.zeros((side, side), bool)
    a0, a1 = max(r0, 0), min(r0 + side, image.shape[0])
    b0, b1 = max(c0, 0), min(c0 + side, image.shape[1])
    if a1 > a0 and b1 > b0:
        crop[a0 - r0 : a1 - r0, b0 - c0 : b1 - c0] = image[a0:a1, b0:b1]
        valid[a0 - r0 : a1 - r0, b0 - c0 : b1 - c0] = True
    ax1, ax2 = _unit_axes(math.radians(sq.angle_deg))
    rr = (np.arange(side, dtype=np.float32) + r0 - np.float32(sq.row_px))[:, None]
    cc = (np.arange(side, dtype=np.float32) + c0 - np.float32(sq.col_px))[None, :]
    half = np.float32(0.55 * sq.size_px)
    foot = (np.abs(rr * ax1[0] + cc * ax1[1]) <= half) & (np.abs(rr * ax2[0] + cc * ax2[1]) <= half)
    foot &= valid
    if not foot.any():
        return crop, foot
    smooth = ndi.uniform_filter(crop, 3, mode="nearest")
    step = max(1, side // 256)  # the percentile of a subsample is plenty
    sample = smooth[::step, ::step][foot[::step, ::step]]
    open_level = float(np.percentile(sample, 90)) if sample.size else sq.open_level
    thr = sq.bar_level + cfg.open_fraction * (open_level - sq.bar_level)
    mask = foot & (smooth > thr)
    return crop, mask


@dataclass(frozen=True)
class MatchResult:
    """Found squares matched to the truth (see ``match_squares``).

    Attributes:
        tp: complete truth squares matched by a found square.
        fn: complete truth squares matched by none.
        fp: found squares matching no truth square at all.
        ignored: found squares matching a non-complete truth square (neither TP nor FP).
        recall, precision: tp / (tp + fn), tp / (tp + fp).
        error_px: (tp,) distances of the matched complete squares, px.
        flag_agreement: fraction of the matched complete truth squares flagged complete, and of
            the matched non-complete ones flagged not complete (NaN if none).
        truth_index: (n_found,) index of the matched truth square, or -1.
    """

    tp: int
    fn: int
    fp: int
    ignored: int
    recall: float
    precision: float
    error_px: np.ndarray
    complete_agreement: float
    partial_agreement: float
    truth_index: np.ndarray


def match_squares(
    found_rc: np.ndarray,
    truth_rc: np.ndarray,
    truth_complete: np.ndarray,
    radius_px: float,
    found_complete: np.ndarray | None = None,
) -> MatchResult:
    """Match found squares to true ones: one-to-one, nearest first, within ``radius_px``.

    Scoring is on the complete truth squares: a complete truth square matched by a found square
    is a TP, one matched by none an FN; a found square matching no truth square is an FP; a found
    square matching a non-complete truth square (cut by the image edge or the rim) is neither.
    A second found square near an already matched truth square matches nothing, so it is an FP.

    Args:
        found_rc: (N, 2) found centres, px.
        truth_rc: (M, 2) true centres, px.
        truth_complete: (M,) bool.
        radius_px: match radius, px (0.3 pitch in the acceptance).
        found_complete: (N,) the finder's complete flags, for the agreement figures.
    """
    from scipy.spatial import cKDTree

    found_rc = np.asarray(found_rc, float).reshape(-1, 2)
    truth_rc = np.asarray(truth_rc, float).reshape(-1, 2)
    truth_complete = np.asarray(truth_complete, bool)
    match = np.full(len(found_rc), -1)
    if len(found_rc) and len(truth_rc):
        dist, nn = cKDTree(truth_rc).query(found_rc, k=min(4, len(truth_rc)))
        dist, nn = dist.reshape(len(found_rc), -1), nn.reshape(len(found_rc), -1)
        pairs = sorted(
            (d, i, j)
            for i in range(len(found_rc))
            for d, j in zip(dist[i], nn[i], strict=True)
            if d <= radius_px
        )
        used_t: set[int] = set()
        for _d, i, j in pairs:
            if match[i] < 0 and j not in used_t:
                match[i] = j
                used_t.add(int(j))
    matched_t = np.zeros(len(truth_rc), bool)
    matched_t[match[match >= 0]] = True
    tp = int((matched_t & truth_complete).sum())
    fn = int((~matched_t & truth_complete).sum())
    fp = int((match < 0).sum())
    ignored = int(((match >= 0) & ~truth_complete[np.maximum(match, 0)]).sum()) if len(match) else 0
    sel = (match >= 0) & truth_complete[np.maximum(match, 0)] if len(match) else np.zeros(0, bool)
    err = np.linalg.norm(found_rc[sel] - truth_rc[match[sel]], axis=1) if sel.any() else np.zeros(0)
    ca = pa = float("nan")
    if found_complete is not None and len(match):
        fc = np.asarray(found_complete, bool)
        if sel.any():
            ca = float(fc[sel].mean())
        part = (match >= 0) & ~truth_complete[np.maximum(match, 0)]
        if part.any():
            pa = float((~fc[part]).mean())
    return MatchResult(
        tp=tp,
        fn=fn,
        fp=fp,
        ignored=ignored,
        recall=tp / (tp + fn) if tp + fn else float("nan"),
        precision=tp / (tp + fp) if tp + fp else float("nan"),
        error_px=err,
        complete_agreement=ca,
        partial_agreement=pa,
        truth_index=match,
    )


def squares_array(squares: Sequence[FoundSquare]) -> np.ndarray:
    """(N, 2) (row, col) centres of ``squares``, px."""
    return np.array([(s.row_px, s.col_px) for s in squares], float).reshape(-1, 2)
