"""Grid simulator: synthetic cryo-EM grid atlases with per-square ground truth.

No real atlas images can be shipped, so this module is the stand-in for the microscope. It
renders a circular 3 mm grid (solid rim, 200/300/400 mesh at any rotation, rounded square
openings) as expected detector counts, cuts it into overlapping vignetted noisy tiles, and
records for every grid square what is really there: ice thickness, cracks, broken film,
contamination, occlusion, and the five 0..4 scores derived from them (see ``docs/simulator.md``).

Frames: ``image`` is (row, col) in native pixels of the tile mosaic, whose (0, 0) is the mosaic's
top-left pixel; stage positions are (x, y) in µm with ``[x, y] = affine @ [row, col, 1]``. The
affine has a mirrored x axis and a small rotation like real EPU atlases.

Everything random comes from an explicit integer seed; each square and each tile draws from its
own seeded generator, so a square's content does not depend on what was drawn before it.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from xcryonet.config import SimulateConfig

# Mesh -> (pitch, hole) in µm. Pitches are 25.4 mm / mesh; holes follow common Cu grids
# (Gilder/Quantifoil): 200 mesh 90 µm holes and 37 µm bars, 300 mesh 58/27, 400 mesh 37/27.
MESH_GEOMETRY: dict[int, tuple[float, float]] = {
    200: (127.0, 90.0),
    300: (84.7, 58.0),
    400: (63.5, 37.0),
}

DEFECT_KINDS = ("crack", "broken", "contamination", "occluded", "ice")
# Classes of ``SimulatedGrid.defects``, the per-pixel defect map (uint8). They follow the truth's
# exclusive classes: occluded pixels of the visible opening, then within the open area broken
# film, contamination (blob or speck core, alpha >= 0.5) and cracks (crack alpha >= 0.5). "ice"
# is a whole-square defect and has no pixel class; ice, bars and everything else are NONE.
DEFECT_NONE, DEFECT_CRACK, DEFECT_BROKEN, DEFECT_CONTAMINATION, DEFECT_OCCLUDED = range(5)
DEFECT_CLASSES = ("none", "crack", "broken", "contamination", "occluded")
LAYOUTS = ("epu", "serialem", "mrc")

# --- scoring: every threshold the docs describe lives here --------------------------------
# brightness: mean transmission (I / I_vacuum) of the open area.
BRIGHTNESS_EDGES = (0.2, 0.4, 0.6, 0.8)
# squareness: min(open_fraction, fill_ratio).
SQUARENESS_EDGES = (0.5, 0.7, 0.85, 0.95)
# cracking: crack_fraction + broken_fraction of the open area (higher = worse).
CRACKING_EDGES = (0.002, 0.01, 0.03, 0.10)
# contamination: contamination_fraction of the open area (higher = worse).
CONTAMINATION_EDGES = (0.005, 0.03, 0.10, 0.25)
# ice: usable thickness window in nm; below the thin edges the square is (nearly) empty,
# above the thick edges it is too thick to image through.
ICE_THIN_EDGES_NM = (4.0, 8.0, 15.0, 25.0)
ICE_THICK_EDGES_NM = (100.0, 150.0, 250.0, 400.0)

TRUTH_COLUMNS = (
    "grid_id",
    "square_id",
    "row_px",
    "col_px",
    "x_um",
    "y_um",
    "size_um",
    "complete",
    "open_fraction",
    "crack_fraction",
    "broken_fraction",
    "contamination_fraction",
    "ice_thickness_nm",
    "brightness",
    "squareness",
    "cracking",
    "contamination",
    "overall",
    # Beyond the contract: what the scores are computed from, and what was planted.
    "transmission",
    "fill_ratio",
    "defects",
)

# Relative transmissions (of vacuum). The carbon support film absorbs a little; copper bars,
# the rim and the clip ring let almost nothing through but are not exactly zero.
_FILM_T = 0.9
_BAR_T = 0.02
_RIM_T = 0.012
_OUTSIDE_T = 0.004
# Effective attenuation length of vitreous ice at atlas magnification (objective aperture in).
_ICE_MFP_NM = 300.0


@dataclass(frozen=True)
class GridSpec:
    """What to simulate. Lengths in µm unless the name says otherwise.

    Attributes:
        grid_id: name of the grid (folder name on disk).
        mesh: 200, 300 or 400 (lines per inch); sets pitch and hole size (``MESH_GEOMETRY``).
        rotation_deg: rotation of the mesh lattice in the image.
        pixel_size_um: native pixel size of the tiles, µm/px.
        field_um: side of the imaged field (the tile raster covers it to within 5% of a step).
        field_offset_um: (row, col) offset of the field centre from the grid centre, µm.
        tile_shape: (rows, cols) of one tile, px.
        overlap: fraction of a tile shared with its neighbour.
        defect_fraction: probability that a square carries a planted defect.
        defect_weights: relative frequencies of ``DEFECT_KINDS`` among defective squares.
        ice_nm: median ice thickness over the grid, nm.
        ice_gradient: grid-wide ice gradient: log-thickness change across the grid radius.
        ice_sigma: per-square log-normal spread of the ice thickness.
        specks_per_square: mean number of tiny contamination specks on every square.
        dose: expected counts per pixel through vacuum.
        read_noise: detector read noise, counts (Gaussian).
        vignetting: fractional intensity drop at a tile's edge midpoints (corners ~ twice).
        stage_rotation_deg: rotation of the stage frame relative to the image.
        stage_centre_um: stage (x, y) of the grid centre.
        stage_error_um: s.d. of the error of each reported tile stage position (per axis).
        tile_jitter_um: s.d. of where tiles really land relative to the nominal raster.
        mesh_diameter_um: diameter of the meshed area; outside it is the solid rim.
        grid_diameter_um: outer diameter of the grid (3.05 mm); outside it is the clip ring.
        film_hole_um, film_pitch_um: holey support film (Quantifoil R1.2/1.3); drawn only when
            the pitch spans at least 8 px, else folded into the film's mean transmission.
        with_tiles: also make the noisy tiles (skip for image-only benchmarks).
    """

    grid_id: str = "grid01"
    mesh: int = 300
    rotation_deg: float = 0.0
    pixel_size_um: float = 0.47
    field_um: float = 1000.0
    field_offset_um: tuple[float, float] = (0.0, 0.0)
    tile_shape: tuple[int, int] = (1024, 1024)
    overlap: float = 0.09
    defect_fraction: float = 0.33
    defect_weights: tuple[float, ...] = (0.30, 0.15, 0.25, 0.20, 0.10)
    ice_nm: float = 70.0
    ice_gradient: float = 0.6
    ice_sigma: float = 0.3
    specks_per_square: float = 3.0
    dose: float = 400.0
    read_noise: float = 3.0
    vignetting: float = 0.12
    stage_rotation_deg: float = -3.5
    stage_centre_um: tuple[float, float] = (0.0, 0.0)
    stage_error_um: float = 2.0
    tile_jitter_um: float = 1.0
    mesh_diameter_um: float = 2500.0
    grid_diameter_um: float = 3050.0
    film_hole_um: float = 1.2
    film_pitch_um: float = 2.5
    with_tiles: bool = True

    @property
    def pitch_um(self) -> float:
        """Mesh pitch (centre-to-centre spacing of the squares), µm."""
        return MESH_GEOMETRY[self.mesh][0]

    @property
    def hole_um(self) -> float:
        """Side of a square opening, µm."""
        return MESH_GEOMETRY[self.mesh][1]


@dataclass
class SimulatedGrid:
    """One simulated atlas and its ground truth.

    Attributes:
        grid_id: the grid's name.
        spec: what was simulated.
        image: noise-free stitched truth, float32 (rows, cols) expected counts, no vignetting.
        pixel_size_um: µm/px of ``image`` and the tiles.
        affine: (2, 3) true pixel -> stage map, ``[x_um, y_um] = affine @ [row, col, 1]``.
        tiles: noisy vignetted tiles, uint16 (tile rows, tile cols) counts each.
        tile_origins_rc: (N, 2) int64 true top-left (row, col) of each tile in ``image``.
        tile_nominal_rc: (N, 2) int64 nominal raster positions (what a montage records).
        tile_stage_xy_um: (N, 2) REPORTED stage (x, y) of each tile centre: true + stage error.
        truth: one row per square with any visible opening; columns ``TRUTH_COLUMNS``.
        defects: per-pixel defect map, uint8, same shape and frame as ``image``: 0 none,
            1 crack, 2 broken film, 3 contamination, 4 occluded (``DEFECT_CLASSES``); counted
            over a square's open area (classes 1-3) it gives the truth's fractions exactly.
            In memory only; nothing writes it.
    """

    grid_id: str
    spec: GridSpec
    image: np.ndarray
    pixel_size_um: float
    affine: np.ndarray
    tiles: list[np.ndarray]
    tile_origins_rc: np.ndarray
    tile_nominal_rc: np.ndarray
    tile_stage_xy_um: np.ndarray
    truth: pd.DataFrame = field(repr=False)
    defects: np.ndarray | None = field(default=None, repr=False)


# ------------------------------------------------------------------------------------------
# Scores
# ------------------------------------------------------------------------------------------


def _bin(values: Any, edges: Sequence[float]) -> np.ndarray:
    """0..len(edges) bin index: the number of edges <= value."""
    return np.digitize(np.asarray(values, dtype=np.float64), np.asarray(edges)).astype(np.int64)


def brightness_score(transmission: Any) -> np.ndarray:
    """Brightness 0..4 from the mean open-area transmission (0 = opaque, 1 = vacuum)."""
    return _bin(transmission, BRIGHTNESS_EDGES)


def squareness_value(open_fraction: Any, fill_ratio: Any) -> np.ndarray:
    """How complete and square the open area is, 0..1: the smaller of the two fractions."""
    return np.minimum(np.asarray(open_fraction, float), np.asarray(fill_ratio, float))


def squareness_score(open_fraction: Any, fill_ratio: Any) -> np.ndarray:
    """Squareness 0..4 (higher = a fuller, more square opening)."""
    return _bin(squareness_value(open_fraction, fill_ratio), SQUARENESS_EDGES)


def cracking_score(crack_fraction: Any, broken_fraction: Any) -> np.ndarray:
    """Cracking 0..4 (higher = worse) from the cracked plus broken share of the open area."""
    damaged = np.asarray(crack_fraction, float) + np.asarray(broken_fraction, float)
    return _bin(damaged, CRACKING_EDGES)


def contamination_score(contamination_fraction: Any) -> np.ndarray:
    """Contamination 0..4 (higher = worse) from the contaminated share of the open area."""
    return _bin(contamination_fraction, CONTAMINATION_EDGES)


def ice_score(ice_thickness_nm: Any) -> np.ndarray:
    """Ice quality 0..4: 4 inside 25..100 nm, falling towards empty (< 4 nm) and thick (> 400)."""
    t = np.asarray(ice_thickness_nm, float)
    thin = _bin(t, ICE_THIN_EDGES_NM)
    thick = 4 - np.digitize(t, np.asarray(ICE_THICK_EDGES_NM), right=True)
    return np.minimum(thin, thick).astype(np.int64)


def overall_score(ice: Any, squareness: Any, cracking: Any, contamination: Any) -> np.ndarray:
    """Overall 0..4 (higher = better), the way an operator weighs the attributes.

    The square is only as good as its weakest attribute, and every visible defect costs:
    ``min(ice, squareness, 4 - cracking, 4 - contamination)`` (a hairline crack or a few specks
    take a point off a perfect square, one clear crack two), minus one more when it is both
    clearly cracked and clearly contaminated (both >= 2).
    """
    ice = np.asarray(ice, np.int64)
    sq = np.asarray(squareness, np.int64)
    cr = np.asarray(cracking, np.int64)
    co = np.asarray(contamination, np.int64)
    best = np.minimum(np.minimum(ice, sq), np.minimum(4 - cr, 4 - co))
    both = ((cr >= 2) & (co >= 2)).astype(np.int64)
    return np.clip(best - both, 0, 4)


def score_squares(truth: pd.DataFrame) -> pd.DataFrame:
    """The five scores (columns brightness, squareness, cracking, contamination, overall) of
    truth rows with columns transmission, open_fraction, fill_ratio, crack_fraction,
    broken_fraction, contamination_fraction and ice_thickness_nm. Returns a new frame."""
    out = pd.DataFrame(index=truth.index)
    out["brightness"] = brightness_score(truth["transmission"])
    out["squareness"] = squareness_score(truth["open_fraction"], truth["fill_ratio"])
    out["cracking"] = cracking_score(truth["crack_fraction"], truth["broken_fraction"])
    out["contamination"] = contamination_score(truth["contamination_fraction"])
    out["overall"] = overall_score(
        ice_score(truth["ice_thickness_nm"]),
        out["squareness"],
        out["cracking"],
        out["contamination"],
    )
    # A square with no open area at all is worthless whatever its fractions say.
    empty = truth["open_fraction"].to_numpy() <= 0
    out.loc[empty, ["brightness", "squareness", "overall"]] = 0
    return out


# ------------------------------------------------------------------------------------------
# Geometry
# ------------------------------------------------------------------------------------------


def stage_affine(
    pixel_size_um: float,
    rotation_deg: float,
    centre_rc: Sequence[float],
    centre_xy_um: Sequence[float],
) -> np.ndarray:
    """True pixel -> stage affine (2, 3): EPU-like, x mirrored, then rotated.

    In image axes (x_px = col, y_px = row) the linear part is ``p * R(rotation) @ diag(-1, 1)``,
    e.g. ``[[-0.469, 0.029], [0.029, 0.469]]`` for 0.47 µm/px and -3.5°, like the real EPU
    fixture. ``centre_rc`` (px) maps to ``centre_xy_um``.
    """
    a = math.radians(rotation_deg)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    lin_xy = pixel_size_um * rot @ np.diag([-1.0, 1.0])  # acts on (x_px, y_px) = (col, row)
    lin = lin_xy[:, [1, 0]]  # acts on (row, col)
    off = np.asarray(centre_xy_um, float) - lin @ np.asarray(centre_rc, float)
    return np.column_stack([lin, off])


def field_for_squares(
    mesh: int,
    n_squares: int,
    rotation_deg: float = 0.0,
    mesh_diameter_um: float = 2500.0,
) -> float:
    """Field side (µm) whose centred square field holds about ``n_squares`` complete squares.

    A square is complete when its whole opening lies in the field and in the meshed disk, so
    its centre must lie in the field shrunk by the opening's half-extent and in the disk shrunk
    by the opening's half-diagonal. The expected count is that area over pitch²; when the
    disk cannot hold ``n_squares``, the field that covers the whole disk is returned.
    """
    pitch, hole = MESH_GEOMETRY[mesh]
    a = math.radians(rotation_deg)
    half_ext = hole / 2 * (abs(math.cos(a)) + abs(math.sin(a)))
    r_ok = mesh_diameter_um / 2 - hole / math.sqrt(2)
    u = (np.arange(400) + 0.5) / 400 * 2 - 1

    def expected(side: float) -> float:
        half = side / 2 - half_ext
        if half <= 0:
            return 0.0
        x = u * half
        inside = (x[:, None] ** 2 + x[None, :] ** 2) <= r_ok**2
        return float(inside.mean()) * (2 * half) ** 2 / pitch**2

    lo, hi = hole, mesh_diameter_um + 2 * half_ext
    if expected(hi) <= n_squares:
        return hi
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if expected(mid) < n_squares else (lo, mid)
    return hi


def tile_side_for(field_px: float, tile_px: int, overlap: float) -> int:
    """Tile side near ``tile_px`` whose raster with ``overlap`` spans ``field_px`` exactly."""
    n = max(1, round((field_px / tile_px - overlap) / (1 - overlap)))
    return int(math.ceil(field_px / (n * (1 - overlap) + overlap)))


def paper_scale_spec(grid_id: str = "paper") -> GridSpec:
    """A SmartScope/paper-scale atlas: 200 mesh at 0.1 µm/px, 14256² px, squares 900 px."""
    return GridSpec(
        grid_id=grid_id,
        mesh=200,
        rotation_deg=7.0,
        pixel_size_um=0.1,
        field_um=1420.0,
        tile_shape=(3072, 3072),
        overlap=0.09,
    )


# ------------------------------------------------------------------------------------------
# Rendering helpers (all in window pixel coordinates, float32)
# ------------------------------------------------------------------------------------------


@dataclass
class _Ctx:
    """Per-grid constants the square renderer needs."""

    shape: tuple[int, int]
    p: float  # µm/px
    sin: float
    cos: float
    h: float  # half opening, px
    rc: float  # corner radius, px
    soft: float  # edge softness, px
    gc: tuple[float, float]  # grid centre (row, col), px
    r_mesh: float  # px
    dose: float
    bar: float  # bar counts
    tiles_lo: np.ndarray  # (N, 2) tile top-left (true)
    tiles_hi: np.ndarray  # (N, 2) tile bottom-right, exclusive


def _smooth_field(
    rng: np.random.Generator, rr: np.ndarray, cc: np.ndarray, scale_px: float
) -> np.ndarray:
    """Smooth zero-mean random field (len(rr), len(cc)), unit variance, features ~scale_px.

    A sum of isotropic Gaussian bumps with random amplitudes on a grid of spacing
    ``scale_px``: ``Br @ G @ Bc.T`` with Gaussian basis matrices, so it costs a few outer
    products instead of per-pixel transcendental functions.
    """

    def basis(x: np.ndarray) -> np.ndarray:
        lo = float(x.min()) - scale_px * rng.uniform(1.0, 2.0)
        k = int(math.ceil((float(x.max()) + scale_px - lo) / scale_px)) + 1
        centres = lo + scale_px * np.arange(k)
        z = (x[:, None].astype(np.float64) - centres[None, :]) / (0.75 * scale_px)
        # Zero the far tails: float32 denormals would make the products 100x slower.
        b = np.where(np.abs(z) < 5, np.exp(-0.5 * z * z), 0.0)
        # Normalise rows so every pixel gets unit variance.
        return (b / np.sqrt((b * b).sum(axis=1, keepdims=True))).astype(np.float32)

    br, bc = basis(rr), basis(cc)
    g = rng.standard_normal((br.shape[1], bc.shape[1])).astype(np.float32)
    a = br @ g  # small
    # The big product as a sum of outer products: a multi-threaded BLAS call here thrashes
    # on 2 cores (several times slower), and this keeps the result independent of threads.
    out = np.multiply.outer(a[:, 0], bc[:, 0])
    tmp = np.empty_like(out)
    for k in range(1, bc.shape[1]):
        np.multiply.outer(a[:, k], bc[:, k], out=tmp)
        out += tmp
    return out


def _draw_segment(
    alpha: np.ndarray, a: np.ndarray, b: np.ndarray, width: float, soft: float = 1.0
) -> None:
    """Max-composite an anti-aliased line segment a->b (row, col px) of ``width`` px into alpha."""
    pad = width / 2 + soft + 1
    r0 = max(int(math.floor(min(a[0], b[0]) - pad)), 0)
    r1 = min(int(math.ceil(max(a[0], b[0]) + pad)) + 1, alpha.shape[0])
    c0 = max(int(math.floor(min(a[1], b[1]) - pad)), 0)
    c1 = min(int(math.ceil(max(a[1], b[1]) + pad)) + 1, alpha.shape[1])
    if r0 >= r1 or c0 >= c1:
        return
    rr = np.arange(r0, r1, dtype=np.float32)[:, None] - np.float32(a[0])
    cc = np.arange(c0, c1, dtype=np.float32)[None, :] - np.float32(a[1])
    d = b - a
    dd = float(d @ d)
    t = np.clip((rr * d[0] + cc * d[1]) / dd, 0, 1) if dd > 0 else np.zeros_like(rr * cc)
    dist = np.hypot(rr - t * np.float32(d[0]), cc - t * np.float32(d[1]))
    val = np.clip((width / 2 - dist) / soft + 0.5, 0, 1)
    np.maximum(alpha[r0:r1, c0:c1], val, out=alpha[r0:r1, c0:c1])


def _crack_paths(rng: np.random.Generator, h: float, n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Random branching polylines in square-local (du, dv) px, with a relative width per vertex.

    Cracks mostly start at the film's edge on a bar and run inwards, nearly straight with small
    turns; some branch. Widths taper towards the tips; branches are thinner.
    """
    paths: list[tuple[np.ndarray, np.ndarray]] = []

    def grow(start: np.ndarray, angle: float, steps: int, rel_w: float, depth: int) -> None:
        pts = [start]
        pos = start.copy()
        for _ in range(steps):
            angle += rng.normal(0, 0.08)
            step = rng.uniform(0.03, 0.07) * 2 * h
            pos = pos + step * np.array([math.cos(angle), math.sin(angle)])
            pts.append(pos.copy())
            if np.abs(pos).max() > 1.02 * h:
                break
            if depth < 2 and rng.random() < 0.04:
                side = 1 if rng.random() < 0.5 else -1
                turn = side * rng.uniform(0.4, 1.1)
                grow(pos.copy(), angle + turn, int(rng.integers(4, 16)), rel_w * 0.6, depth + 1)
        k = len(pts)
        # Full width for the first 60% of the path, then thinning to 35% at the tip.
        frac = np.arange(k) / max(k - 1, 1)
        widths = rel_w * np.clip(1 - (frac - 0.6) / 0.4 * 0.65, 0.35, 1)
        paths.append((np.array(pts), widths))

    for _ in range(n):
        if rng.random() < 0.7:
            side = int(rng.integers(4))
            s = rng.uniform(-0.9, 0.9) * h
            start = np.array([[-h, s], [h, s], [s, -h], [s, h]][side], float)
        else:
            start = rng.uniform(-0.8, 0.8, size=2) * h
        inward = math.atan2(-start[1], -start[0]) if np.any(start) else rng.uniform(0, 2 * np.pi)
        grow(start, inward + rng.normal(0, 0.5), 80, 1.0, 0)
    return paths


def _power_law(rng: np.random.Generator, lo: float, hi: float, alpha: float, n: int) -> np.ndarray:
    """n samples from p(r) ~ r**-alpha on [lo, hi] (inverse CDF)."""
    u = rng.random(n)
    e = 1.0 - alpha
    return (lo**e + u * (hi**e - lo**e)) ** (1.0 / e)


def _blobs(
    rng: np.random.Generator, h: float, p: float, target: float, max_blobs: int = 3000
) -> np.ndarray:
    """Contamination blobs for a target covered fraction of a (2h)² opening.

    Returns (n, 6): du, dv, radius px, aspect, angle, transmission. Radii follow a power law
    (many specks, few large chunks); half of the blobs cluster, as ethane/ice debris does.
    """
    area = (2 * h) ** 2 * target * 1.15  # overlaps hide some of the drawn area
    r_lo = max(0.4 / p, 0.7)
    r_hi = max(r_lo * 1.5, 0.3 * h)
    out: list[np.ndarray] = []
    drawn = 0.0
    centres = rng.uniform(-0.8, 0.8, size=(3, 2)) * h
    while drawn < area and sum(len(o) for o in out) < max_blobs:
        r = _power_law(rng, r_lo, r_hi, 2.6, 32)
        aspect = rng.uniform(0.55, 1.0, 32)
        a = np.cumsum(np.pi * r * r * aspect)
        k = int(np.searchsorted(a, area - drawn)) + 1
        k = min(k, 32)
        r, aspect = r[:k], aspect[:k]
        clustered = rng.random(k) < 0.5
        pos = rng.uniform(-1.05, 1.05, size=(k, 2)) * h
        near = centres[rng.integers(0, 3, k)] + rng.normal(0, 0.2 * h, size=(k, 2))
        pos[clustered] = near[clustered]
        big = r > 0.08 * h
        t = np.where(big, rng.uniform(0.01, 0.12, k), rng.uniform(0.08, 0.45, k))
        ang = rng.uniform(0, np.pi, k)
        out.append(np.column_stack([pos, r, aspect, ang, t]))
        drawn += float(a[k - 1])
    return np.concatenate(out) if out else np.zeros((0, 6))


def _draw_blobs(
    trans: np.ndarray,
    mask: np.ndarray,
    blobs: np.ndarray,
    centre_rc: tuple[float, float],
    ctx: _Ctx,
    rng: np.random.Generator,
    vacuum: np.ndarray | None,
) -> None:
    """Darken ``trans`` by each blob and mark its core (alpha >= 0.5) in ``mask``, in place.

    Each blob is drawn in its own bounding box. Pixels in ``vacuum`` (broken film) are left
    alone: nothing sits on a hole in the film.
    """
    s, c = ctx.sin, ctx.cos
    for du, dv, r, aspect, ang, t in blobs:
        pr = centre_rc[0] + s * du + c * dv
        pc = centre_rc[1] + c * du - s * dv
        pad = r + 2
        r0, r1 = max(int(pr - pad), 0), min(int(pr + pad) + 2, trans.shape[0])
        c0, c1 = max(int(pc - pad), 0), min(int(pc + pad) + 2, trans.shape[1])
        if r0 >= r1 or c0 >= c1:
            continue
        y = np.arange(r0, r1, dtype=np.float32)[:, None] - np.float32(pr)
        x = np.arange(c0, c1, dtype=np.float32)[None, :] - np.float32(pc)
        ca, sa = math.cos(ang), math.sin(ang)
        xr = x * ca + y * sa
        yr = (-x * sa + y * ca) / np.float32(aspect)
        d = np.hypot(xr, yr)
        rad = np.float32(r)
        if r > 4:
            # Irregular outline: a couple of random harmonics of the polar angle.
            phi = np.arctan2(yr, xr)
            k2, k3 = rng.uniform(0, 2 * np.pi, 2)
            rad = rad * (1 + 0.12 * np.cos(2 * phi + k2) + 0.08 * np.cos(3 * phi + k3))
        a = np.clip(rad - d + 0.5, 0, 1).astype(np.float32)
        if vacuum is not None:
            a[vacuum[r0:r1, c0:c1]] = 0
        trans[r0:r1, c0:c1] *= 1 - a * np.float32(1 - t)
        mask[r0:r1, c0:c1] |= a >= 0.5


def _region_from_side(
    rng: np.random.Generator,
    du: np.ndarray,
    dv: np.ndarray,
    inside: np.ndarray,
    h: float,
    frac: float,
    wobble: float,
    rr: np.ndarray,
    cc: np.ndarray,
    jag: float = 0.0,
) -> np.ndarray:
    """Boolean region covering ``frac`` of ``inside``, entering from a random side.

    A linear ramp towards one side (tilted up to ~15°) plus ``wobble`` times a smooth random
    field, thresholded at the quantile that gives the wanted fraction.
    """
    side = rng.integers(4) * np.pi / 2 + rng.normal(0, 0.15)
    g = (du * np.float32(math.cos(side)) + dv * np.float32(math.sin(side))) / np.float32(h)
    if wobble > 0:
        g = g + np.float32(wobble) * _smooth_field(rng, rr, cc, 0.6 * h)
    if jag > 0:
        # Torn film: a fine ragged component on top of the smooth outline.
        g = g + np.float32(jag) * _smooth_field(rng, rr, cc, max(0.08 * h, 2.0))
    vals = g[inside]
    if vals.size == 0 or frac <= 0:
        return np.zeros_like(inside)
    if frac >= 1:
        return inside.copy()
    thr = np.quantile(vals, 1.0 - frac)
    return (g > thr) & inside


# ------------------------------------------------------------------------------------------
# One square
# ------------------------------------------------------------------------------------------


@dataclass
class _Plan:
    """What a square will contain, decided before rendering."""

    ij: tuple[int, int]
    centre: tuple[float, float]  # (row, col) px in the mosaic
    ice_nm: float
    kinds: tuple[str, ...]
    seed: tuple[int, ...]


def _plan_square(
    spec: GridSpec, seed: int, ij: tuple[int, int], centre: tuple[float, float], base_ice: float
) -> _Plan:
    """Draw which defects a square gets (its own generator, so order does not matter)."""
    key = (seed, 1, ij[0] + (1 << 20), ij[1] + (1 << 20))
    rng = np.random.default_rng(key)
    ice = base_ice * math.exp(spec.ice_sigma * rng.normal())
    kinds: list[str] = []
    if rng.random() < spec.defect_fraction:
        w = np.asarray(spec.defect_weights, float)
        w = w / w.sum()
        first = str(DEFECT_KINDS[int(rng.choice(len(w), p=w))])
        kinds.append(first)
        if rng.random() < 0.2:
            second = str(DEFECT_KINDS[int(rng.choice(len(w), p=w))])
            if second != first:
                kinds.append(second)
    return _Plan(ij, centre, ice, tuple(sorted(kinds, key=DEFECT_KINDS.index)), key)


def _render_square(
    plan: _Plan, spec: GridSpec, ctx: _Ctx, image: np.ndarray, defects: np.ndarray | None = None
) -> dict[str, Any] | None:
    """Render one square into ``image`` (adds to the bar level) and measure its truth.

    If ``defects`` (uint8, like ``image``) is given, the square's visible pixels get their
    ``DEFECT_CLASSES`` label in it (the same hard masks the truth fractions count).

    Works in the square's own window with in-place float32 arithmetic (paper-scale windows are
    ~1 Mpx, and fresh temporaries cost page faults). Returns the truth record, or None if no
    part of the opening is visible.
    """
    rng = np.random.default_rng(plan.seed + (2,))
    h, p = ctx.h, ctx.p
    f32 = np.float32
    s, c = f32(ctx.sin), f32(ctx.cos)
    cr, cc_ = plan.centre
    ext = h * (abs(ctx.sin) + abs(ctx.cos)) + ctx.soft + 2
    r0, r1 = int(math.floor(cr - ext)), int(math.ceil(cr + ext)) + 1
    c0, c1 = int(math.floor(cc_ - ext)), int(math.ceil(cc_ + ext)) + 1
    rows, cols = ctx.shape
    if r1 <= 0 or c1 <= 0 or r0 >= rows or c0 >= cols:
        return None
    # Centre-relative pixel coordinates of the (unclipped) window, and square-local axes.
    rr = np.arange(r0, r1, dtype=np.float32) - f32(cr)
    cc = np.arange(c0, c1, dtype=np.float32) - f32(cc_)
    du = np.add.outer(rr * s, cc * c)
    dv = np.add.outer(rr * c, -cc * s)
    # Rounded-square signed distance (px), negative inside the opening.
    inner = f32(h - ctx.rc)
    qx = np.abs(du)
    qx -= inner
    qy = np.abs(dv)
    qy -= inner
    edge = np.maximum(qx, qy)  # also: (distance to the nearest bar) - rc, for the meniscus
    np.maximum(qx, 0, out=qx)
    np.maximum(qy, 0, out=qy)
    sdf = np.hypot(qx, qy, out=qx)
    sdf += np.minimum(edge, 0, out=qy)
    sdf -= f32(ctx.rc)
    del qx, qy
    nominal = sdf <= 0
    n_nominal = int(np.count_nonzero(nominal))
    alpha = sdf  # soft opening mask, reusing the buffer
    alpha *= f32(-1 / ctx.soft)
    alpha += f32(0.5)
    np.clip(alpha, 0, 1, out=alpha)

    # Where the opening can be seen: inside the mosaic, covered by a tile, inside the meshed disk.
    valid = np.zeros((r1 - r0, c1 - c0), bool)
    hit = (
        (ctx.tiles_lo[:, 0] < r1)
        & (ctx.tiles_hi[:, 0] > r0)
        & (ctx.tiles_lo[:, 1] < c1)
        & (ctx.tiles_hi[:, 1] > c0)
    )
    for (tr0, tc0), (tr1, tc1) in zip(ctx.tiles_lo[hit], ctx.tiles_hi[hit], strict=True):
        valid[max(tr0, r0) - r0 : min(tr1, r1) - r0, max(tc0, c0) - c0 : min(tc1, c1) - c0] = True
    dcentre = math.hypot(cr - ctx.gc[0], cc_ - ctx.gc[1])
    if dcentre + ext * 1.5 > ctx.r_mesh - ctx.soft:
        dr2 = (np.arange(r0, r1, dtype=np.float32) - f32(ctx.gc[0])) ** 2
        dc2 = (np.arange(c0, c1, dtype=np.float32) - f32(ctx.gc[1])) ** 2
        disk = np.sqrt(np.add.outer(dr2, dc2))
        disk *= f32(-1 / ctx.soft)
        disk += f32(ctx.r_mesh / ctx.soft + 0.5)
        np.clip(disk, 0, 1, out=disk)
        valid &= disk >= 0.5
        alpha *= disk
        del disk
    visible = nominal & valid
    if not visible.any():
        return None

    # Ice: per-square thickness, thicker towards the bars (meniscus), a little texture.
    meniscus = f32(rng.uniform(0.3, 0.9))
    ice_nm = plan.ice_nm
    if "ice" in plan.kinds:
        ice_nm = rng.uniform(0.0, 6.0) if rng.random() < 0.4 else ice_nm * rng.uniform(4, 9)
    t = edge  # q = min(max(|du|, |dv|) / h, 1); t = ice * (1 + meniscus * q**4) * texture
    t += inner
    t *= f32(1 / h)
    np.minimum(t, 1, out=t)
    np.square(t, out=t)
    np.square(t, out=t)
    t *= f32(meniscus * ice_nm)
    t += f32(ice_nm)
    tex = _smooth_field(rng, rr, cc, 0.7 * h)
    tex *= f32(0.06)
    t *= np.exp(tex, out=tex)
    del tex, edge
    trans = t * f32(-1 / _ICE_MFP_NM)
    np.exp(trans, out=trans)
    trans *= f32(_FILM_T)
    film_pitch = spec.film_pitch_um / p
    if film_pitch >= 8:
        # Holey support film resolved: holes (no carbon) are a little brighter than the carbon.
        fa = du * f32(1 / film_pitch)
        fa += f32(rng.random())
        fa -= np.rint(fa)
        fb = dv * f32(1 / film_pitch)
        fb += f32(rng.random())
        fb -= np.rint(fb)
        hole = np.hypot(fa, fb, out=fa)
        del fb
        hole *= f32(-film_pitch)
        hole += f32(spec.film_hole_um / 2 / p + 0.5)
        np.clip(hole, 0, 1, out=hole)
        hole *= f32(0.5 * (1 / _FILM_T - 1))
        hole += 1
        trans *= hole
        del hole

    crack = broken = occluded = None
    if "crack" in plan.kinds:
        crack = np.zeros_like(trans)
        n_cracks = int(rng.geometric(0.55)) + int(rng.random() < 0.3)
        width = max(0.012 * 2 * h * math.exp(rng.normal(0, 0.35)), 0.6)
        for path, rel in _crack_paths(rng, h, n_cracks):
            pr = (cr - r0) + s * path[:, 0] + c * path[:, 1]
            pc = (cc_ - c0) + c * path[:, 0] - s * path[:, 1]
            pts = np.column_stack([pr, pc]).astype(np.float64)
            for k in range(len(pts) - 1):
                _draw_segment(crack, pts[k], pts[k + 1], width * float(rel[k + 1]))
        trans += crack * (1 - trans)
    if "broken" in plan.kinds:
        frac = rng.uniform(0.85, 1.0) if rng.random() < 0.3 else rng.uniform(0.05, 0.6)
        broken = _region_from_side(rng, du, dv, nominal, h, frac, 0.3, rr, cc, jag=0.06)
        trans[broken] = 1.0

    # Contamination: a few specks everywhere, many blobs on contaminated squares.
    contaminated = np.zeros(trans.shape, bool)
    centre_w = (cr - r0, cc_ - c0)
    n_specks = int(rng.poisson(spec.specks_per_square))
    if n_specks:
        rs = _power_law(rng, max(0.3 / p, 0.6), max(1.5 / p, 0.9), 2.6, n_specks)
        specks = np.column_stack(
            [
                rng.uniform(-h, h, (n_specks, 2)),
                rs,
                rng.uniform(0.6, 1, n_specks),
                rng.uniform(0, np.pi, n_specks),
                rng.uniform(0.1, 0.5, n_specks),
            ]
        )
        _draw_blobs(trans, contaminated, specks, centre_w, ctx, rng, broken)
    if "contamination" in plan.kinds:
        target = math.exp(rng.uniform(math.log(0.01), math.log(0.45)))
        blobs = _blobs(rng, h, p, target)
        _draw_blobs(trans, contaminated, blobs, centre_w, ctx, rng, broken)

    if "occluded" in plan.kinds:
        mode = rng.random()
        if mode < 0.35:  # two sides covered: looks like a smaller square
            f1, f2 = rng.uniform(0.1, 0.35, 2)
            sgn = rng.choice([-1.0, 1.0], 2)
            wob = f32(0.02 * h) * _smooth_field(rng, rr, cc, 0.5 * h)
            occluded = ((sgn[0] * du + wob) > h * (1 - 2 * f1)) | (
                (sgn[1] * dv + wob) > h * (1 - 2 * f2)
            )
            occluded &= nominal
        else:  # a fold, a bent bar or debris from one side
            wobble = 0.06 if mode < 0.75 else 0.6
            occluded = _region_from_side(
                rng, du, dv, nominal, h, rng.uniform(0.1, 0.7), wobble, rr, cc
            )
        trans[occluded] = f32(rng.uniform(0.015, 0.06))

    # Truth, from hard masks at pixel centres.
    open_ = visible if occluded is None else visible & ~occluded
    n_open = int(np.count_nonzero(open_))
    rec: dict[str, Any] = {
        "row_px": cr,
        "col_px": cc_,
        "complete": bool(int(np.count_nonzero(visible)) == n_nominal),
        "open_fraction": n_open / max(n_nominal, 1),
        "defects": "+".join(plan.kinds) if plan.kinds else "none",
    }
    if n_open == 0:
        rec.update(
            crack_fraction=0.0,
            broken_fraction=0.0,
            contamination_fraction=0.0,
            ice_thickness_nm=float(ice_nm),
            transmission=0.0,
            fill_ratio=0.0,
        )
    else:
        b_mask = broken & open_ if broken is not None else np.zeros_like(open_)
        k_mask = contaminated & open_
        c_mask = (crack >= 0.5) & open_ & ~k_mask if crack is not None else np.zeros_like(open_)
        if broken is not None:
            c_mask &= ~b_mask
        ice_mask = open_ & ~b_mask & ~k_mask & ~c_mask
        u_open, v_open = du[open_], dv[open_]
        side = max(np.ptp(u_open), np.ptp(v_open)) + 1
        rec.update(
            crack_fraction=int(np.count_nonzero(c_mask)) / n_open,
            broken_fraction=int(np.count_nonzero(b_mask)) / n_open,
            contamination_fraction=int(np.count_nonzero(k_mask)) / n_open,
            ice_thickness_nm=float(t[ice_mask].mean()) if ice_mask.any() else float(ice_nm),
            transmission=float(trans[open_].mean(dtype=np.float64)),
            fill_ratio=min(1.0, n_open / float(side) ** 2),
        )
    if defects is not None:
        # Labels only on the visible opening, so neighbouring windows never overwrite each other.
        lab = np.zeros(visible.shape, np.uint8)
        if occluded is not None:
            lab[occluded & visible] = DEFECT_OCCLUDED
        if n_open:
            lab[c_mask] = DEFECT_CRACK
            lab[b_mask] = DEFECT_BROKEN
            lab[k_mask] = DEFECT_CONTAMINATION
        dr0, dr1, dc0, dc1 = max(r0, 0), min(r1, rows), max(c0, 0), min(c1, cols)
        dst = defects[dr0:dr1, dc0:dc1]
        np.maximum(dst, lab[dr0 - r0 : dr1 - r0, dc0 - c0 : dc1 - c0], out=dst)

    # Add into the image (the window may stick out of the mosaic): alpha * (counts - bar).
    trans *= f32(ctx.dose)
    trans -= f32(ctx.bar)
    trans *= alpha
    ir0, ir1, ic0, ic1 = max(r0, 0), min(r1, rows), max(c0, 0), min(c1, cols)
    image[ir0:ir1, ic0:ic1] += trans[ir0 - r0 : ir1 - r0, ic0 - c0 : ic1 - c0]
    return rec


# ------------------------------------------------------------------------------------------
# The grid
# ------------------------------------------------------------------------------------------


def _tile_layout(
    spec: GridSpec, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """Nominal and true tile origins (N, 2) int64 and the mosaic shape.

    Tiles form a raster that covers the field with the given overlap; each really lands a
    little off its nominal place (``tile_jitter_um``). The mosaic frame starts at the smallest
    true origin.
    """
    th, tw = spec.tile_shape
    field_px = spec.field_um / spec.pixel_size_um
    step = (max(1, round(th * (1 - spec.overlap))), max(1, round(tw * (1 - spec.overlap))))
    # A few pixels short of the field do not earn another row of tiles.
    n_r = max(1, math.ceil((field_px - th) / step[0] - 0.05) + 1)
    n_c = max(1, math.ceil((field_px - tw) / step[1] - 0.05) + 1)
    ii, jj = np.meshgrid(np.arange(n_r), np.arange(n_c), indexing="ij")
    nominal = np.column_stack([ii.ravel() * step[0], jj.ravel() * step[1]]).astype(np.int64)
    jitter = np.rint(rng.normal(0, spec.tile_jitter_um / spec.pixel_size_um, nominal.shape))
    true = nominal + jitter.astype(np.int64)
    true -= true.min(axis=0)
    shape = tuple(int(v) for v in (true + np.array([th, tw])).max(axis=0))
    return nominal, true, (shape[0], shape[1])


def _base_layer(image: np.ndarray, ctx: _Ctx, r_grid: float, rim: float, outside: float) -> None:
    """Fill the bar level inside the meshed disk, the rim beyond it and the clip ring outside."""
    rows, cols = image.shape
    band = max(1, (1 << 22) // max(cols, 1))
    gr, gcol = ctx.gc
    colsq = ((np.arange(cols, dtype=np.float32) - np.float32(gcol)) ** 2)[None, :]
    for b0 in range(0, rows, band):
        b1 = min(rows, b0 + band)
        dr = np.arange(b0, b1, dtype=np.float32) - np.float32(gr)
        # Farthest pixel of the band from the grid centre: all bar if inside the disk.
        far = math.sqrt(float(np.max(dr**2)) + float(colsq.max()))
        if far < ctx.r_mesh - 2 * ctx.soft:
            image[b0:b1] = ctx.bar
            continue
        dist = np.sqrt((dr**2)[:, None] + colsq)
        in_mesh = np.clip((ctx.r_mesh - dist) / ctx.soft + 0.5, 0, 1)
        in_grid = np.clip((r_grid - dist) / ctx.soft + 0.5, 0, 1)
        image[b0:b1] = outside + in_grid * (rim - outside) + in_mesh * (ctx.bar - rim)


def _noisy_tile(patch: np.ndarray, spec: GridSpec, rng: np.random.Generator) -> np.ndarray:
    """One detector tile: vignetting, a small gain drift, shot and read noise, uint16 counts.

    Shot noise uses the normal limit of Poisson statistics (variance = expected counts),
    which is indistinguishable from Poisson at these counts and several times faster.
    """
    th, tw = patch.shape
    a = np.float32(spec.vignetting)
    off = rng.normal(0, 0.05, 2)
    yr = np.linspace(-1, 1, th, dtype=np.float32) - np.float32(off[0])
    xr = np.linspace(-1, 1, tw, dtype=np.float32) - np.float32(off[1])
    gain = np.float32(1 + rng.normal(0, 0.02))
    lam = np.multiply.outer(gain * (1 - a * yr**2), 1 - a * xr**2)
    lam *= patch
    noise = rng.standard_normal(lam.shape, dtype=np.float32)
    sigma = lam + np.float32(spec.read_noise**2)
    np.sqrt(sigma, out=sigma)
    noise *= sigma
    del sigma
    noise += lam
    np.rint(noise, out=noise)
    np.clip(noise, 0, 65535, out=noise)
    return noise.astype(np.uint16)


def simulate_grid(spec: GridSpec, seed: int) -> SimulatedGrid:
    """Simulate one grid atlas and its per-square ground truth.

    Args:
        spec: what to simulate.
        seed: the only source of randomness; the same (spec, seed) gives identical output.

    Returns:
        The stitched truth image, the noisy tiles with true and reported placement, the true
        stage affine and the truth table (one row per square with a visible opening, sorted
        in reading order; ``square_id`` counts from 1).
    """
    if spec.mesh not in MESH_GEOMETRY:
        raise ValueError(f"mesh must be one of {sorted(MESH_GEOMETRY)}, got {spec.mesh}")
    rng = np.random.default_rng((seed, 0))
    p = spec.pixel_size_um
    nominal, origins, shape = _tile_layout(spec, rng)
    th, tw = spec.tile_shape
    # Field centre = mosaic centre; the grid centre sits at -field_offset from it.
    fc = ((shape[0] - 1) / 2, (shape[1] - 1) / 2)
    gc = (fc[0] - spec.field_offset_um[0] / p, fc[1] - spec.field_offset_um[1] / p)
    theta = math.radians(spec.rotation_deg)
    pitch_px, hole_px = spec.pitch_um / p, spec.hole_um / p
    ctx = _Ctx(
        shape=shape,
        p=p,
        sin=math.sin(theta),
        cos=math.cos(theta),
        h=hole_px / 2,
        rc=0.07 * hole_px,
        soft=max(1.0, 0.6 / p),
        gc=gc,
        r_mesh=spec.mesh_diameter_um / 2 / p,
        dose=spec.dose,
        bar=spec.dose * _BAR_T,
        tiles_lo=origins,
        tiles_hi=origins + np.array([th, tw]),
    )
    image = np.empty(shape, np.float32)
    defects = np.zeros(shape, np.uint8)
    _base_layer(
        image, ctx, spec.grid_diameter_um / 2 / p, spec.dose * _RIM_T, spec.dose * _OUTSIDE_T
    )

    # Lattice: origin at the grid centre plus a random phase; cells whose window meets the mosaic.
    phase = rng.uniform(-0.5, 0.5, 2) * pitch_px
    u_dir = np.array([ctx.sin, ctx.cos])  # (row, col) step of lattice index i
    v_dir = np.array([ctx.cos, -ctx.sin])  # (row, col) step of lattice index j
    lat0 = np.asarray(gc) + phase[0] * u_dir + phase[1] * v_dir
    corners = np.array([[0, 0], [0, shape[1]], [shape[0], 0], [shape[0], shape[1]]], float)
    rel = corners - lat0
    iu, jv = rel @ u_dir / pitch_px, rel @ v_dir / pitch_px
    ii, jj = np.meshgrid(
        np.arange(math.floor(iu.min()) - 1, math.ceil(iu.max()) + 2),
        np.arange(math.floor(jv.min()) - 1, math.ceil(jv.max()) + 2),
        indexing="ij",
    )
    centres = lat0 + pitch_px * (
        np.multiply.outer(ii.ravel(), u_dir) + np.multiply.outer(jj.ravel(), v_dir)
    )
    reach = ctx.h * 1.5 + 2
    keep = (
        (centres[:, 0] > -reach)
        & (centres[:, 0] < shape[0] + reach)
        & (centres[:, 1] > -reach)
        & (centres[:, 1] < shape[1] + reach)
        & (np.hypot(centres[:, 0] - gc[0], centres[:, 1] - gc[1]) < ctx.r_mesh + reach)
    )
    # Grid-wide ice: a log-linear gradient along a random direction plus a radial term.
    g_ang = rng.uniform(0, 2 * np.pi)
    g_dir = np.array([math.cos(g_ang), math.sin(g_ang)])
    radial = rng.uniform(-0.3, 0.3)
    records = []
    for (i, j), centre in zip(
        zip(ii.ravel()[keep], jj.ravel()[keep], strict=True), centres[keep], strict=True
    ):
        rel_c = (centre - np.asarray(gc)) / ctx.r_mesh
        base_ice = spec.ice_nm * math.exp(
            spec.ice_gradient * float(rel_c @ g_dir) + radial * float(rel_c @ rel_c)
        )
        plan = _plan_square(
            spec, seed, (int(i), int(j)), (float(centre[0]), float(centre[1])), base_ice
        )
        rec = _render_square(plan, spec, ctx, image, defects)
        if rec is not None:
            records.append(rec)
    # Pixels no tile covers were never imaged.
    spread = np.ptp(origins - nominal, axis=0)
    _blank_uncovered(image, ctx, (int(spread[0]) + 1, int(spread[1]) + 1))

    affine = stage_affine(p, spec.stage_rotation_deg, gc, spec.stage_centre_um)
    truth = _truth_frame(records, spec, affine)

    tiles: list[np.ndarray] = []
    if spec.with_tiles:
        for k, (r, c) in enumerate(origins):
            trng = np.random.default_rng((seed, 3, k))
            tiles.append(_noisy_tile(image[r : r + th, c : c + tw], spec, trng))
    centres_rc = origins + (np.array([th, tw]) - 1) / 2
    true_xy = (affine @ np.column_stack([centres_rc, np.ones(len(origins))]).T).T
    srng = np.random.default_rng((seed, 4))
    reported = true_xy + srng.normal(0, spec.stage_error_um, true_xy.shape)
    return SimulatedGrid(
        grid_id=spec.grid_id,
        spec=spec,
        image=image,
        pixel_size_um=p,
        affine=affine,
        tiles=tiles,
        tile_origins_rc=origins,
        tile_nominal_rc=nominal,
        tile_stage_xy_um=reported,
        truth=truth,
        defects=defects,
    )


def _blank_uncovered(image: np.ndarray, ctx: _Ctx, margin: tuple[int, int]) -> None:
    """Zero the mosaic-border slivers that no (jittered) tile covers.

    Only a band of ``margin`` (rows, cols) px along each edge can be uncovered: tiles overlap
    far more than they jitter.
    """
    rows, cols = image.shape
    mr, mc = min(margin[0], rows), min(margin[1], cols)
    strips = [
        (0, mr, 0, cols),
        (rows - mr, rows, 0, cols),
        (0, rows, 0, mc),
        (0, rows, cols - mc, cols),
    ]
    for r0, r1, c0, c1 in strips:
        if r1 <= r0 or c1 <= c0:
            continue
        covered = np.zeros((r1 - r0, c1 - c0), bool)
        for (tr0, tc0), (tr1, tc1) in zip(ctx.tiles_lo, ctx.tiles_hi, strict=True):
            a0, a1, b0, b1 = max(tr0, r0), min(tr1, r1), max(tc0, c0), min(tc1, c1)
            if a0 < a1 and b0 < b1:
                covered[a0 - r0 : a1 - r0, b0 - c0 : b1 - c0] = True
        image[r0:r1, c0:c1][~covered] = 0.0


def _truth_frame(records: list[dict[str, Any]], spec: GridSpec, affine: np.ndarray) -> pd.DataFrame:
    """Truth table in reading order with stage positions and scores."""
    df = pd.DataFrame.from_records(records)
    if df.empty:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in TRUTH_COLUMNS})
    pitch_px = spec.pitch_um / spec.pixel_size_um
    order = np.lexsort((df["col_px"].to_numpy(), np.floor(df["row_px"].to_numpy() / pitch_px)))
    df = df.iloc[order].reset_index(drop=True)
    xy = (affine @ np.column_stack([df["row_px"], df["col_px"], np.ones(len(df))]).T).T
    df["x_um"], df["y_um"] = xy[:, 0], xy[:, 1]
    df["grid_id"] = spec.grid_id
    df["square_id"] = np.arange(1, len(df) + 1)
    df["size_um"] = spec.hole_um
    scores = score_squares(df)
    for col in scores:
        df[col] = scores[col].astype(np.int64)
    return df[list(TRUTH_COLUMNS)]


# ------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------


def atlas_id_for(grid_id: str) -> int:
    """A stable 7-digit EPU atlas id for a grid name."""
    return 1_000_000 + zlib.crc32(grid_id.encode()) % 9_000_000


def write_grid(grid: SimulatedGrid, out_dir: str | Path, layout: str) -> Path:
    """Write a simulated grid the way a microscope would, into ``out_dir/<grid_id>``.

    Layouts: ``"epu"`` -> ``<grid_id>/Atlas/`` (Atlas.dm, int16 tiles with their XML, and the
    stitched ``Atlas_<id>.mrc`` at 1/4 scale); tile pixel positions are what EPU derives from
    the reported stage positions, so they are off by the stage error. ``"serialem"`` ->
    ``<grid_id>/<grid_id>.mrc`` (uint16 stack) + ``.mrc.mdoc`` with the nominal piece raster,
    the aligned (true) piece positions and the reported stage positions. ``"mrc"`` ->
    ``<grid_id>/<grid_id>.mrc``, the tiles blended at their true positions, int16.

    The grid folder is replaced as a whole (no stale files from another layout).

    Returns:
        The grid folder.
    """
    from xcryonet.io import write_epu_atlas, write_mrc, write_serialem_montage
    from xcryonet.io.atomic import atomic_dir
    from xcryonet.io.stitch import stitch_tiles

    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if not grid.tiles:
        raise ValueError("write_grid needs the tiles (simulate with with_tiles=True)")
    final = Path(out_dir) / grid.grid_id
    p = grid.pixel_size_um
    with atomic_dir(final) as tmp:
        if layout == "epu":
            th, tw = grid.tiles[0].shape
            lin, off = grid.affine[:, :2], grid.affine[:, 2]
            centres = np.linalg.solve(lin, (grid.tile_stage_xy_um - off).T).T
            # EPU stores whole atlas pixels (native / 4).
            origins = 4 * np.rint((centres - (np.array([th, tw]) - 1) / 2) / 4).astype(np.int64)
            tiles = [np.minimum(t, 32767).astype(np.int16) for t in grid.tiles]
            write_epu_atlas(
                tmp / "Atlas",
                tiles,
                origins,
                grid.tile_stage_xy_um,
                p,
                atlas_id_for(grid.grid_id),
                squares=_software_squares(grid),
            )
        elif layout == "serialem":
            write_serialem_montage(
                tmp / f"{grid.grid_id}.mrc",
                grid.tiles,
                grid.tile_nominal_rc,
                grid.tile_stage_xy_um,
                p,
                aligned_origins_rc=grid.tile_origins_rc,
            )
        else:
            stitched, _ = stitch_tiles(
                grid.tiles, grid.tile_origins_rc, refine=False, shape=grid.image.shape
            )
            write_mrc(tmp / f"{grid.grid_id}.mrc", stitched, p, mode=1)
    return final


def _software_squares(grid: SimulatedGrid) -> list[dict[str, Any]]:
    """EPU's own square list: the complete squares, as its finder would report them."""
    t = grid.truth
    if t.empty:
        return []
    rng = np.random.default_rng(zlib.crc32(grid.grid_id.encode()))
    done = t[t["complete"]]
    n = len(done)
    jit = rng.normal(0, 1.0, (n, 2))
    size_px = grid.spec.hole_um / grid.pixel_size_um
    return [
        {
            "id": int(sid),
            "row_px": float(r + jit[k, 0] / grid.pixel_size_um * 0.5),
            "col_px": float(c + jit[k, 1] / grid.pixel_size_um * 0.5),
            "size_px": float(size_px),
            "x_um": float(x + jit[k, 0]),
            "y_um": float(y + jit[k, 1]),
            "quality": round(float(q), 4),
        }
        for k, (sid, r, c, x, y, q) in enumerate(
            zip(
                done["square_id"],
                done["row_px"],
                done["col_px"],
                done["x_um"],
                done["y_um"],
                done["transmission"],
                strict=True,
            )
        )
    ]


# ------------------------------------------------------------------------------------------
# The demo dataset
# ------------------------------------------------------------------------------------------


def dataset_plan(cfg: SimulateConfig) -> list[tuple[GridSpec, str, int]]:
    """(spec, layout, seed) per grid: ids grid01.., layouts and meshes cycled out of phase
    (so every layout meets every mesh), random lattice rotations and per-grid ice."""
    rng = np.random.default_rng((cfg.seed, 100))
    plans = []
    n_lay = len(cfg.layouts)
    for k in range(cfg.n_grids):
        layout = cfg.layouts[k % n_lay]
        mesh = cfg.meshes[(k + k // n_lay) % len(cfg.meshes)]
        rotation = float(rng.uniform(0, 90))
        field = round(field_for_squares(mesh, cfg.squares_per_grid, rotation), 1)
        tile = tile_side_for(field / cfg.pixel_size_um, cfg.tile_px, cfg.overlap)
        spec = GridSpec(
            grid_id=f"grid{k + 1:02d}",
            mesh=mesh,
            rotation_deg=round(rotation, 3),
            pixel_size_um=cfg.pixel_size_um,
            field_um=field,
            field_offset_um=(
                round(float(rng.normal(0, 30)), 1),
                round(float(rng.normal(0, 30)), 1),
            ),
            tile_shape=(tile, tile),
            overlap=cfg.overlap,
            defect_fraction=cfg.defect_fraction,
            ice_nm=round(float(80 * math.exp(rng.normal(0, 0.45))), 1),
            stage_rotation_deg=round(float(-3.5 + rng.normal(0, 0.3)), 3),
            stage_centre_um=(
                round(float(rng.normal(0, 60)), 1),
                round(float(rng.normal(0, 60)), 1),
            ),
            stage_error_um=cfg.stage_error_um,
        )
        seed = int(np.random.SeedSequence((cfg.seed, k)).generate_state(1)[0])
        plans.append((spec, layout, seed))
    return plans


def truth_in_frame(truth: pd.DataFrame, affine: np.ndarray) -> pd.DataFrame:
    """Copy of ``truth`` with x_um, y_um recomputed from row_px, col_px by ``affine`` (2, 3)."""
    out = truth.copy()
    rc1 = np.column_stack([out["row_px"], out["col_px"], np.ones(len(out))])
    xy = rc1 @ np.asarray(affine, float).T
    out["x_um"], out["y_um"] = xy[:, 0], xy[:, 1]
    return out


def _simulate_and_write(spec: GridSpec, layout: str, seed: int, out_dir: Path) -> pd.DataFrame:
    """Worker: simulate one grid, write it, return its truth (the image stays in the worker).

    A single MRC carries no stage metadata, so readers place it in image axes centred on the
    image; its truth (and labels) are given in that frame, the only one its users can know.
    """
    from xcryonet.io.atlas import centred_affine

    grid = simulate_grid(spec, seed)
    write_grid(grid, out_dir, layout)
    if layout == "mrc":
        return truth_in_frame(grid.truth, centred_affine(grid.image.shape, grid.pixel_size_um))
    return grid.truth


def operator_labels(
    truth: pd.DataFrame, fraction: float, seed: int, *, click_um: float = 2.0, slip: float = 0.15
) -> pd.DataFrame:
    """Operator labels for a random ``fraction`` of the complete squares.

    Like a person: each score is the truth, but off by one (either way, clipped to 0..4) with
    probability ``slip``; a few cells are left blank (not judged); the click that records the
    square's stage position misses its centre by ``click_um`` (s.d. per axis).

    Returns:
        Columns grid_id, x_um, y_um, cracking, contamination, overall (nullable Int64).
    """
    rng = np.random.default_rng((seed, 200))
    done = truth[truth["complete"].astype(bool)]
    take = rng.random(len(done)) < fraction
    sel = done[take]
    n = len(sel)
    out = pd.DataFrame(
        {
            "grid_id": sel["grid_id"].to_numpy(),
            "x_um": sel["x_um"].to_numpy() + rng.normal(0, click_um, n),
            "y_um": sel["y_um"].to_numpy() + rng.normal(0, click_um, n),
        }
    )
    for col in ("cracking", "contamination", "overall"):
        val = sel[col].to_numpy().astype(np.int64)
        off = np.where(rng.random(n) < slip, rng.choice([-1, 1], n), 0)
        val = np.clip(val + off, 0, 4)
        blank = rng.random(n) < 0.03
        out[col] = pd.array(np.where(blank, 0, val), dtype="Int64")
        out.loc[blank, col] = pd.NA
    return out


def _to_csv(df: pd.DataFrame, decimals: dict[str, int]) -> str:
    """Deterministic CSV text: fixed decimals per float column, '\\n' line ends."""
    df = df.copy()
    for col, nd in decimals.items():
        if col in df:
            df[col] = df[col].map(lambda v, nd=nd: f"{v:.{nd}f}")
    return df.to_csv(index=False, lineterminator="\n")


_TRUTH_DECIMALS = {
    "row_px": 2,
    "col_px": 2,
    "x_um": 3,
    "y_um": 3,
    "size_um": 2,
    "open_fraction": 5,
    "crack_fraction": 5,
    "broken_fraction": 5,
    "contamination_fraction": 5,
    "ice_thickness_nm": 2,
    "transmission": 5,
    "fill_ratio": 5,
}


def simulate_dataset(cfg: SimulateConfig, root: str | Path = ".") -> dict[str, Any]:
    """Write the demo dataset under ``root``: grids, ground truth and operator labels.

    - ``cfg.out_dir/<grid_id>/``: each grid in its layout (see ``write_grid``);
    - ``cfg.truth_dir/<grid_id>.csv``: full truth per grid, and ``grids.csv`` (one row per grid:
      layout, mesh, rotation, pixel size, field, square counts);
    - ``cfg.labels_path``: operator labels (see ``operator_labels``).

    Output folders are replaced whole and files written atomically; the same config gives the
    same bytes. Grids run in ``cfg.workers`` processes.

    Returns:
        A small summary: grid count, squares, complete squares, labelled squares and paths.
    """
    from xcryonet.io.atomic import atomic_dir, atomic_write_text

    root = Path(root)
    plans = dataset_plan(cfg)
    truths: list[pd.DataFrame]
    with atomic_dir(root / cfg.out_dir) as tmp_out:
        if cfg.workers > 1 and len(plans) > 1:
            with ProcessPoolExecutor(max_workers=min(cfg.workers, len(plans))) as pool:
                futs = [
                    pool.submit(_simulate_and_write, s, lay, sd, tmp_out) for s, lay, sd in plans
                ]
                truths = [f.result() for f in futs]
        else:
            truths = [_simulate_and_write(s, lay, sd, tmp_out) for s, lay, sd in plans]
    grid_rows = []
    with atomic_dir(root / cfg.truth_dir) as tmp_truth:
        for (spec, layout, _), truth in zip(plans, truths, strict=True):
            atomic_write_text(tmp_truth / f"{spec.grid_id}.csv", _to_csv(truth, _TRUTH_DECIMALS))
            grid_rows.append(
                {
                    "grid_id": spec.grid_id,
                    "layout": layout,
                    "stage_frame": "image-centred" if layout == "mrc" else "stage",
                    "mesh": spec.mesh,
                    "rotation_deg": spec.rotation_deg,
                    "pixel_size_um": spec.pixel_size_um,
                    "field_um": spec.field_um,
                    "n_squares": len(truth),
                    "n_complete": int(truth["complete"].sum()),
                }
            )
        atomic_write_text(tmp_truth / "grids.csv", _to_csv(pd.DataFrame(grid_rows), {}))
    all_truth = pd.concat(truths, ignore_index=True)
    labels = operator_labels(all_truth, cfg.label_fraction, cfg.seed, click_um=cfg.label_click_um)
    atomic_write_text(root / cfg.labels_path, _to_csv(labels, {"x_um": 2, "y_um": 2}))
    complete = all_truth[all_truth["complete"].astype(bool)]
    return {
        "grids": len(plans),
        "squares": int(len(all_truth)),
        "complete_squares": int(len(complete)),
        "defective_fraction": round(float((complete["defects"] != "none").mean()), 4),
        "labelled": int(len(labels)),
        "out_dir": str(root / cfg.out_dir),
        "truth_dir": str(root / cfg.truth_dir),
        "labels": str(root / cfg.labels_path),
    }
