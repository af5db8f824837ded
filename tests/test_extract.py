"""Square finding: lattice estimate, NCC matching, lattice fit and refinement, crops, scoring.

Most tests run on a small synthetic atlas made here (a rotated lattice of bright squares on dark
bars inside a circular rim, with dark, opaque and broken squares, an ice gradient, blur and
noise), whose true centres are exact. The last ones run the grid simulator through every
file layout and the atlas reader, as the acceptance asks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import pytest
from scipy import ndimage as ndi

from xcryonet.config import ExtractConfig
from xcryonet.extract import (
    FoundSquare,
    NoLatticeError,
    block_mean,
    crop_square,
    estimate_lattice,
    find_squares,
    match_squares,
    squares_array,
)

CFG = ExtractConfig()


@dataclass
class SyntheticAtlas:
    image: np.ndarray  # (rows, cols) float32
    centres: np.ndarray  # (N, 2) true square centres (row, col), px
    complete: np.ndarray  # (N,) bool: the whole opening is inside the image and the rim
    kind: np.ndarray  # (N,) "ok", "dark", "opaque", "broken"
    pitch: float
    square: float
    angle_deg: float


def lattice_atlas(
    shape: tuple[int, int] = (900, 1000),
    pitch: float = 60.0,
    square: float = 42.0,
    angle_deg: float = 7.0,
    *,
    rim_radius: float | None = 430.0,
    noise: float = 6.0,
    n_dark: int = 4,
    n_opaque: int = 2,
    n_broken: int = 3,
    seed: int = 0,
) -> SyntheticAtlas:
    """Render a synthetic atlas (see the module docstring). Lengths px, angle degrees."""
    rng = np.random.default_rng(seed)
    h, w = shape
    th = math.radians(angle_deg)
    u1, u2 = np.array([math.sin(th), math.cos(th)]), np.array([math.cos(th), -math.sin(th)])
    basis = np.column_stack([u1, u2]) * pitch
    origin = np.array([h / 2, w / 2]) + rng.uniform(-0.5, 0.5, 2) * pitch
    rim_c = np.array([h / 2, w / 2])
    corners = np.array([[0, 0], [0, w], [h, 0], [h, w]], float)
    ij = np.linalg.solve(basis, (corners - origin).T).T
    i0, j0 = int(ij[:, 0].min()) - 2, int(ij[:, 1].min()) - 2
    ni, nj = int(ij[:, 0].max()) + 3 - i0, int(ij[:, 1].max()) + 3 - j0
    sites = np.array([(i0 + a, j0 + b) for a in range(ni) for b in range(nj)])
    centres = origin + sites @ basis.T
    half = square / 2
    corner_off = np.array([s * half * u1 + t * half * u2 for s in (-1, 1) for t in (-1, 1)])
    cpts = centres[:, None, :] + corner_off[None]
    in_img = ((cpts >= 0) & (cpts[..., :1] <= h - 1) & (cpts[..., 1:] <= w - 1)).all(axis=(1, 2))
    dist = np.linalg.norm(cpts - rim_c, axis=2)
    in_rim = np.ones(len(sites), bool) if rim_radius is None else (dist <= rim_radius).all(1)
    # A square exists in the truth when part of its opening shows.
    shows = (np.abs(centres - np.array([h / 2, w / 2])) < np.array([h, w]) / 2 + half).all(1)
    if rim_radius is not None:
        shows &= (dist < rim_radius).any(1) | (np.linalg.norm(centres - rim_c, axis=1) < rim_radius)
    complete = in_img & in_rim
    kind = np.full(len(sites), "ok", dtype=object)
    inner = np.nonzero(complete & shows)[0]
    pick = rng.choice(inner, size=n_dark + n_opaque + n_broken, replace=False)
    kind[pick[:n_dark]] = "dark"
    kind[pick[n_dark : n_dark + n_opaque]] = "opaque"
    kind[pick[n_dark + n_opaque :]] = "broken"
    level = 100.0 * rng.uniform(0.75, 1.0, len(sites))
    level[kind == "dark"] = 40.0
    level[kind == "opaque"] = 8.0
    level[kind == "broken"] = 140.0
    lut = np.full((ni, nj), 8.0)
    lut[sites[:, 0] - i0, sites[:, 1] - j0] = level

    rr, cc = np.mgrid[0:h, 0:w].astype(np.float64)
    uu = ((rr - origin[0]) * u1[0] + (cc - origin[1]) * u1[1]) / pitch
    vv = ((rr - origin[0]) * u2[0] + (cc - origin[1]) * u2[1]) / pitch
    iu, iv = np.rint(uu), np.rint(vv)
    inside = (np.abs(uu - iu) * pitch <= half) & (np.abs(vv - iv) * pitch <= half)
    img = np.where(inside, lut[iu.astype(int) - i0, iv.astype(int) - j0], 8.0)
    img *= 1.0 - 0.25 * rr / h  # ice gradient
    if rim_radius is not None:
        img[np.hypot(rr - rim_c[0], cc - rim_c[1]) > rim_radius] = 8.0
    img = ndi.gaussian_filter(img, 1.0) + rng.normal(0, noise, shape)
    keep = shows
    return SyntheticAtlas(
        img.astype(np.float32),
        centres[keep],
        complete[keep],
        kind[keep].astype(str),
        pitch,
        square,
        angle_deg,
    )


def _score(atlas: SyntheticAtlas, squares: list[FoundSquare]):
    flags = np.array([s.complete for s in squares])
    return match_squares(
        squares_array(squares), atlas.centres, atlas.complete, 0.3 * atlas.pitch, flags
    )


# ---------------------------------------------------------------------------------------------


def test_block_mean_matches_reshape_mean():
    rng = np.random.default_rng(1)
    img = rng.integers(-300, 3000, size=(203, 317)).astype(np.int16)
    out = block_mean(img, 4, workers=2)
    ref = img[:200, :316].astype(np.float64).reshape(50, 4, 79, 4).mean(axis=(1, 3))
    assert out.dtype == np.float32 and out.shape == (50, 79)
    np.testing.assert_allclose(out, ref, rtol=1e-6)
    np.testing.assert_array_equal(out, block_mean(img, 4, workers=1))
    np.testing.assert_array_equal(block_mean(img, 1), img.astype(np.float32))


@pytest.mark.parametrize(
    ("angle", "pitch", "square"),
    [
        (-44.0, 60.0, 42.0),
        (-17.0, 48.0, 30.0),
        (0.0, 60.0, 44.0),
        (8.0, 72.0, 40.0),
        (44.5, 60.0, 42.0),
    ],
)
def test_estimate_lattice_recovers_pitch_angle_and_square(angle, pitch, square):
    atlas = lattice_atlas(pitch=pitch, square=square, angle_deg=angle, seed=3)
    lat = estimate_lattice(atlas.image, 1.0)
    assert lat.pitch_px == pytest.approx(pitch, rel=0.01)
    # Orientation is defined modulo 90 degrees, in [-45, 45).
    diff = (lat.angle_deg - angle + 45) % 90 - 45
    assert abs(diff) < 0.5
    assert lat.square_px == pytest.approx(square, rel=0.06)


@pytest.mark.parametrize(("angle", "seed"), [(7.0, 0), (-30.0, 1), (44.0, 2), (0.0, 3), (-12.5, 4)])
def test_find_squares_on_synthetic_lattice(angle, seed):
    atlas = lattice_atlas(angle_deg=angle, seed=seed)
    res = find_squares(atlas.image, 1.0, CFG)
    m = _score(atlas, res.squares)
    assert m.recall == 1.0 and m.precision == 1.0
    assert m.error_px.max() < 1.0  # pixelation of the synthetic squares is +-0.5 px
    assert m.complete_agreement >= 0.97
    assert m.partial_agreement >= 0.85
    assert res.lattice.pitch_px == pytest.approx(atlas.pitch, rel=0.003)
    # Dark and opaque squares are squares too (found by contrast or by the lattice hull).
    hit = m.truth_index[m.truth_index >= 0]
    for kind in ("dark", "opaque", "broken"):
        assert np.isin(np.nonzero(atlas.kind == kind)[0], hit).all(), kind


def test_follows_a_stitching_seam():
    """A tile placed 4 px off moves its squares together; each is found where it really is."""
    atlas = lattice_atlas(shape=(1200, 1200), angle_deg=9.0, seed=11, rim_radius=None)
    img = atlas.image.copy()
    img[600:, 600:] = np.roll(atlas.image, (4, -3), axis=(0, 1))[600:, 600:]
    centres = atlas.centres.copy()
    moved = (centres[:, 0] >= 600 + 25) & (centres[:, 1] >= 600 + 25)
    centres[moved] += [4, -3]
    # Squares cut by the seam itself are torn in two: leave them out of the score.
    away = (np.abs(centres - 600) > 30).all(axis=1)
    res = find_squares(img, 1.0, CFG)
    m = match_squares(squares_array(res.squares), centres, atlas.complete & away, 18.0)
    assert m.recall == 1.0 and m.precision == 1.0
    assert m.error_px.max() < 1.0


def test_follows_a_bent_mesh():
    """A smoothly bent mesh (+-6 px) is followed by the local drift and the refinement."""
    atlas = lattice_atlas(shape=(1200, 1200), angle_deg=-21.0, seed=12, rim_radius=None)
    h, w = atlas.image.shape
    amp = 6.0

    def disp(r, c):
        return amp * np.sin(2 * np.pi * r / 1500.0), amp * np.cos(2 * np.pi * c / 1300.0)

    rr, cc = np.mgrid[0:h, 0:w].astype(float)
    dr, dc = disp(rr, cc)
    img = ndi.map_coordinates(atlas.image, [rr - dr, cc - dc], order=1, mode="nearest")
    centres = atlas.centres.copy()
    for _ in range(5):  # where each square went: x = x0 + d(x)
        centres = atlas.centres + np.stack(disp(centres[:, 0], centres[:, 1]), axis=1)
    res = find_squares(img.astype(np.float32), 1.0, CFG)
    m = match_squares(squares_array(res.squares), centres, atlas.complete, 18.0)
    assert m.recall == 1.0 and m.precision == 1.0
    assert m.error_px.max() < 2.0 and np.median(m.error_px) < 0.3


@pytest.mark.parametrize("fourier_px", [128, 256])
def test_coarse_fourier_image_falls_back_to_a_finer_scale(fourier_px):
    """With few Fourier pixels per pitch, the estimate is redone on a finer central crop."""
    atlas = lattice_atlas(angle_deg=12.0, seed=9)
    res = find_squares(atlas.image, 1.0, replace(CFG, fourier_px=fourier_px))
    m = _score(atlas, res.squares)
    assert m.recall == 1.0 and m.precision == 1.0 and m.error_px.max() < 1.0


def test_squares_cut_by_the_image_are_not_complete():
    atlas = lattice_atlas(angle_deg=20.0, rim_radius=None, seed=5)
    res = find_squares(atlas.image, 1.0, CFG)
    h, w = atlas.image.shape
    for s in res.squares:
        half = (
            s.size_px
            / 2
            * (abs(math.cos(math.radians(s.angle_deg))) + abs(math.sin(math.radians(s.angle_deg))))
        )
        if (
            s.row_px - half < -1
            or s.col_px - half < -1
            or s.row_px + half > h
            or s.col_px + half > w
        ):
            assert not s.complete
    m = _score(atlas, res.squares)
    assert m.recall == 1.0 and m.precision == 1.0
    assert m.partial_agreement >= 0.9


def test_off_lattice_matches_are_rejected():
    """Bright square-like debris on the rim, between lattice sites, is not a square."""
    atlas = lattice_atlas(seed=6, rim_radius=380.0)
    img = atlas.image.copy()
    res0 = find_squares(img, 1.0, CFG)
    lat = res0.lattice
    e1, e2 = np.array(lat.e1_rc), np.array(lat.e2_rc)
    # Half-way between sites, out on the rim, at the corners of the image.
    placed = []
    for corner in ([60.0, 60.0], [60.0, 900.0], [830.0, 60.0]):
        ij = np.linalg.solve(np.column_stack([e1, e2]), np.array(corner) - np.array(lat.origin_rc))
        pos = np.array(lat.origin_rc) + (np.floor(ij) + 0.5) @ np.column_stack([e1, e2]).T
        r, c = np.rint(pos).astype(int)
        img[r - 20 : r + 21, c - 20 : c + 21] = 95.0
        placed.append(pos)
    res = find_squares(img, 1.0, CFG)
    found = squares_array(res.squares)
    for pos in placed:
        assert np.linalg.norm(found - pos, axis=1).min() > 0.3 * atlas.pitch
    assert _score(atlas, res.squares).precision == 1.0


@pytest.mark.parametrize(
    "image",
    [
        np.random.default_rng(0).normal(100, 10, (600, 600)).astype(np.float32),
        np.full((600, 600), 7.0, np.float32),
        np.zeros((8, 8), np.float32),
    ],
    ids=["noise", "constant", "tiny"],
)
def test_no_lattice_raises(image):
    with pytest.raises(NoLatticeError):
        find_squares(image, 1.0, CFG)


def test_crop_square_pads_outside_and_masks_the_open_area():
    atlas = lattice_atlas(angle_deg=0.0, rim_radius=None, n_dark=0, n_opaque=0, n_broken=0, seed=7)
    res = find_squares(atlas.image, 1.0, CFG)
    sides = {s.crop_px for s in res.squares}
    assert len(sides) == 1  # crops of one grid stack
    side = sides.pop()
    assert side >= CFG.crop_margin * res.lattice.square_px
    inner = [s for s in res.squares if s.complete]
    crop, mask = crop_square(atlas.image, inner[len(inner) // 2], CFG)
    assert crop.shape == mask.shape == (side, side) and crop.dtype == np.float32
    assert mask.sum() / res.lattice.square_px**2 == pytest.approx(1.0, abs=0.08)
    # The open area is the bright square in the middle, not the bars around it.
    assert crop[mask].mean() > 3 * crop[~mask].mean()
    # A square hanging over the top-left corner: padded with 0, nothing masked there.
    corner = min(res.squares, key=lambda s: s.row_px + s.col_px)
    crop, mask = crop_square(atlas.image, corner, CFG)
    r0 = int(round(corner.row_px)) - side // 2
    if r0 < 0:
        assert (crop[:-r0] == 0).all() and not mask[:-r0].any()
    fixed = replace(CFG, crop_px=64)
    sq = replace(inner[0], crop_px=64)
    assert crop_square(atlas.image, sq, fixed)[0].shape == (64, 64)


def test_crop_holds_the_whole_turned_square():
    atlas = lattice_atlas(angle_deg=40.0, rim_radius=None, n_dark=0, n_opaque=0, n_broken=0)
    res = find_squares(atlas.image, 1.0, CFG)
    sq = min(res.squares, key=lambda s: np.hypot(s.row_px - 450, s.col_px - 500))
    crop, mask = crop_square(atlas.image, sq, CFG)
    assert mask.sum() / res.lattice.square_px**2 == pytest.approx(1.0, abs=0.08)
    assert not mask[0].any() and not mask[-1].any() and not mask[:, 0].any()


def test_match_squares_counts():
    truth = np.array([[0.0, 0.0], [0.0, 100.0], [0.0, 200.0], [0.0, 300.0]])
    complete = np.array([True, True, True, False])
    found = np.array([[1.0, 1.0], [2.0, -1.0], [0.0, 205.0], [0.0, 299.0], [50.0, 50.0]])
    m = match_squares(found, truth, complete, 30.0, np.array([True, True, True, False, True]))
    # (1,1) matches truth 0; (2,-1) is a duplicate of truth 0 -> FP; truth 1 missed -> FN;
    # (0,205) -> truth 2; (0,299) matches the partial truth 3 -> ignored; (50,50) -> FP.
    assert (m.tp, m.fn, m.fp, m.ignored) == (2, 1, 2, 1)
    assert m.recall == pytest.approx(2 / 3) and m.precision == pytest.approx(0.5)
    assert m.truth_index.tolist() == [0, -1, 2, 3, -1]
    np.testing.assert_allclose(sorted(m.error_px), [math.sqrt(2), 5.0])
    assert m.partial_agreement == 1.0


# ---------------------------------------------------------------------------------------------
# The simulator, through each file layout and the atlas reader (the acceptance)


def _simulated_run(k: int, tmp_path):
    """Simulate demo grid ``k``, write it in its layout, read it back and find its squares."""
    from xcryonet.config import SimulateConfig
    from xcryonet.io import read_atlas
    from xcryonet.simulate import dataset_plan, simulate_grid, write_grid

    spec, layout, seed = dataset_plan(SimulateConfig())[k]
    grid = simulate_grid(spec, seed)
    atlas = read_atlas(write_grid(grid, tmp_path, layout))
    assert atlas.image is not None
    res = find_squares(atlas.image, atlas.pixel_size_um, CFG)
    return spec, layout, grid, atlas, res


def _check_simulated(spec, layout, grid, atlas, res):
    truth = grid.truth
    rc = squares_array(res.squares)
    flags = np.array([s.complete for s in res.squares])
    complete = truth["complete"].to_numpy(bool)
    if layout == "mrc":  # no stage metadata: the image frame is the simulator's
        found_um, truth_um = rc * atlas.pixel_size_um, truth[["row_px", "col_px"]].to_numpy()
        truth_um = truth_um * grid.pixel_size_um
    else:
        found_um = atlas.pixel_to_stage(rc[:, 0], rc[:, 1])
        truth_um = truth[["x_um", "y_um"]].to_numpy()
    m = match_squares(found_um, truth_um, complete, 0.3 * spec.pitch_um, flags)
    assert m.recall >= 0.99 and m.precision >= 0.99, (m.recall, m.precision)
    assert m.complete_agreement >= 0.95
    # Pixel accuracy of the finder: the reader's stitched frame is shifted against the
    # simulator's mosaic, so remove the median offset first.
    sel = m.truth_index >= 0
    d = rc[sel] - truth[["row_px", "col_px"]].to_numpy()[m.truth_index[sel]]
    d_c = d[complete[m.truth_index[sel]]]
    err_um = np.linalg.norm(d_c - np.median(d_c, axis=0), axis=1) * atlas.pixel_size_um
    assert err_um.max() <= 3.0, err_um.max()
    assert res.lattice.pitch_px * atlas.pixel_size_um == pytest.approx(spec.pitch_um, rel=0.002)
    return m


@pytest.mark.parametrize(
    ("k", "mesh", "layout"), [(0, 200, "epu"), (1, 300, "serialem"), (2, 400, "mrc")]
)
def test_simulated_grid_each_mesh_and_layout(k, mesh, layout, tmp_path):
    spec, lay, grid, atlas, res = _simulated_run(k, tmp_path)
    assert (spec.mesh, lay) == (mesh, layout)
    _check_simulated(spec, lay, grid, atlas, res)


@pytest.mark.slow
@pytest.mark.parametrize("k", range(3, 12))
def test_simulated_demo_grids(k, tmp_path):
    _check_simulated(*_simulated_run(k, tmp_path))


def test_ncc_match_is_the_correlation_coefficient_at_every_pixel():
    from skimage.feature import match_template

    from xcryonet.extract import ncc_match

    rng = np.random.default_rng(5)
    image = rng.random((23, 19))
    image[:6, :8] = 0.5  # a flat patch: no correlation there
    template = rng.random((5, 7))
    got = ncc_match(image, template)
    assert got.shape == image.shape and got.dtype == np.float64
    # Brute force: the Pearson coefficient of the template with the reflect-padded window
    # centred on each pixel.
    padded = np.pad(image, ((2, 2), (3, 3)), mode="reflect")
    t = template - template.mean()
    for r in range(image.shape[0]):
        for c in range(image.shape[1]):
            w = padded[r : r + 5, c : c + 7]
            w = w - w.mean()
            norm = np.sqrt((w**2).sum() * (t**2).sum())
            want = (w * t).sum() / norm if norm > 1e-9 else 0.0
            assert abs(got[r, c] - want) < 1e-9, (r, c)
    # And scikit-image's matcher, which it replaces, at the extractor's settings and float32.
    big, tmpl = rng.random((240, 260), np.float32), rng.random((31, 30), np.float32)
    ref = match_template(big, tmpl, pad_input=True, mode="reflect")
    np.testing.assert_allclose(ncc_match(big, tmpl), ref, atol=1e-6)
    assert ncc_match(big, tmpl).dtype == np.float32
