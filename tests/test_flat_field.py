"""Flat-field (vignetting) correction of tiled atlases, checked on the simulator's truth."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from xcryonet.io import read_atlas
from xcryonet.io.stitch import estimate_flat_field, stitch_tiles
from xcryonet.simulate import GridSpec, simulate_grid, write_grid

# About 30 tiles of 256 px, each seeing 2-3 squares of 300 mesh across.
SPEC = GridSpec(
    grid_id="ff",
    mesh=300,
    rotation_deg=21.0,
    pixel_size_um=1.0,
    field_um=1250.0,
    tile_shape=(256, 256),
)


@pytest.fixture(scope="module")
def grid():
    return simulate_grid(SPEC, seed=3)


def _nominal_profile(shape: tuple[int, int], a: float) -> np.ndarray:
    """The simulator's vignetting without its per-tile jitter, 1 at the centre."""
    y = np.linspace(-1, 1, shape[0])
    x = np.linspace(-1, 1, shape[1])
    return np.multiply.outer(1 - a * y**2, 1 - a * x**2)


def _square_ratios(grid, image: np.ndarray) -> np.ndarray:
    """Per clean, complete square: mean of ``image`` over its central box / the same box in the
    noise-free, unvignetted truth image."""
    t = grid.truth
    clean = t[
        t["complete"]
        & (t["crack_fraction"] < 0.01)
        & (t["broken_fraction"] < 0.01)
        & (t["contamination_fraction"] < 0.02)
        & (t["open_fraction"] > 0.5)
    ]
    out = []
    for r in clean.itertuples():
        h = int(r.size_um / grid.pixel_size_um * 0.3)
        r0, c0 = int(r.row_px), int(r.col_px)
        box = (slice(r0 - h, r0 + h), slice(c0 - h, c0 + h))
        out.append(image[box].mean() / grid.image[box].mean())
    return np.array(out)


def test_estimate_recovers_the_simulated_vignetting(grid) -> None:
    assert len(grid.tiles) >= 20
    flat = estimate_flat_field(grid.tiles)
    assert flat is not None and flat.shape == grid.tiles[0].shape
    assert flat.max() == pytest.approx(1.0)
    truth = _nominal_profile(flat.shape, SPEC.vignetting)
    # The simulated tiles' profiles jitter (centre offset s.d. 5 %); the fit is their average.
    assert np.abs(flat - truth).max() < 0.04
    assert float(flat.min()) == pytest.approx(float(truth.min()), abs=0.03)


def test_correction_makes_square_brightness_independent_of_tile_position(grid) -> None:
    raw, _ = stitch_tiles(grid.tiles, grid.tile_origins_rc, refine=False, shape=grid.image.shape)
    flat = estimate_flat_field(grid.tiles)
    fixed, _ = stitch_tiles(
        grid.tiles, grid.tile_origins_rc, refine=False, shape=grid.image.shape, flat=flat
    )
    before = _square_ratios(grid, raw)
    after = _square_ratios(grid, fixed)
    assert len(before) >= 30
    # Vignetting darkens squares by where they lay in a tile (s.d. about 4 %); what is left is
    # the simulated per-tile gain drift (2 %) and noise.
    assert after.std() < 0.6 * before.std()
    assert abs(after.mean() - 1) < 0.02 < abs(before.mean() - 1)


def test_no_false_profile_without_vignetting(grid) -> None:
    """Tiles cut from the unvignetted truth image: ice differs from square to square and
    cracks and contamination add texture, but nothing varies with the position in a tile."""
    h, w = grid.tiles[0].shape
    clean = [grid.image[r : r + h, c : c + w] for r, c in grid.tile_origins_rc.astype(int)]
    clean = [t for t in clean if t.shape == (h, w)]
    assert len(clean) >= 16
    flat = estimate_flat_field(clean)
    assert flat is None or flat.min() > 0.97


def test_no_estimate_from_too_little(grid) -> None:
    assert estimate_flat_field(grid.tiles[:5]) is None
    mixed = [*grid.tiles[:10], grid.tiles[10][:-8]]
    assert estimate_flat_field(mixed) is None
    blank = [np.full((256, 256), 100, np.uint16)] * 12
    assert estimate_flat_field(blank) is None


def test_stitch_refuses_a_flat_of_another_shape(grid) -> None:
    with pytest.raises(ValueError, match="flat field"):
        stitch_tiles(grid.tiles, grid.tile_origins_rc, flat=np.ones((10, 10), np.float32))


@pytest.mark.parametrize("layout", ["epu", "serialem"])
def test_reader_corrects_tiled_atlases_and_says_so(grid, tmp_path, layout) -> None:
    folder = write_grid(dataclasses.replace(grid, grid_id=f"ff_{layout}"), tmp_path, layout)
    fixed = read_atlas(folder)
    raw = read_atlas(folder, flat_field=False)
    assert "flat-field corrected" in fixed.affine_source
    assert "flat-field" not in raw.affine_source
    assert fixed.image is not None and raw.image is not None
    # Corrected: brighter towards tile edges, nowhere darker than the raw stitch.
    assert fixed.image.mean() > 1.05 * raw.image.mean()
    assert (fixed.image >= raw.image - 1e-3).all()
