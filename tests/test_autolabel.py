"""Auto-labels: brightness and squareness scores of square crops."""

from __future__ import annotations

import math

import numpy as np
import pytest

from xcryonet.autolabel import (
    _min_bounding_square,
    auto_brightness,
    auto_squareness,
    brightness_fraction,
    squareness_ratio,
)
from xcryonet.extract import Levels

LEVELS = Levels(bar=10.0, open=80.0, vacuum=110.0, threshold=45.0)


def square_crop(
    side: int = 120,
    square: float = 90.0,
    angle_deg: float = 0.0,
    *,
    inside: float = 90.0,
    bar: float = 10.0,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """A crop with one open square of side ``square`` at ``angle_deg`` on bars, and its mask."""
    rng = np.random.default_rng(seed)
    t = math.radians(angle_deg)
    rr, cc = np.mgrid[0:side, 0:side] - (side - 1) / 2
    u = rr * math.sin(t) + cc * math.cos(t)
    v = rr * math.cos(t) - cc * math.sin(t)
    mask = (np.abs(u) <= square / 2) & (np.abs(v) <= square / 2)
    crop = np.where(mask, inside, bar) + rng.normal(0, 2.0, (side, side))
    return crop.astype(np.float32), mask


@pytest.mark.parametrize(
    ("fraction", "score"), [(0.0, 0), (0.1, 0), (0.3, 1), (0.5, 2), (0.7, 3), (0.9, 4), (1.3, 4)]
)
def test_brightness_bins(fraction, score):
    crop, mask = square_crop(inside=LEVELS.bar + fraction * (LEVELS.vacuum - LEVELS.bar))
    crop[mask] = LEVELS.bar + fraction * (LEVELS.vacuum - LEVELS.bar)  # exact, no noise
    assert auto_brightness(crop, mask, LEVELS) == score


def test_brightness_ignores_gain_and_offset_and_bars():
    crop, mask = square_crop(inside=76.0)
    base = brightness_fraction(crop, mask, LEVELS)
    assert base == pytest.approx((76.0 - 10.0) / 100.0, abs=0.01)
    gain, off = 3.7, -250.0
    levels2 = Levels(*(gain * x + off for x in (LEVELS.bar, LEVELS.open, LEVELS.vacuum)), 0.0)
    assert brightness_fraction(gain * crop + off, mask, levels2) == pytest.approx(base)
    # Only the open area counts: brighter bars change nothing.
    crop2 = np.where(mask, crop, 60.0).astype(np.float32)
    assert brightness_fraction(crop2, mask, LEVELS) == pytest.approx(base)
    assert auto_brightness(crop, np.zeros_like(mask), LEVELS) == 0


def test_min_bounding_square_of_turned_squares():
    for angle in (0.0, 17.0, 45.0, 71.0):
        crop, mask = square_crop(side=200, square=120.0, angle_deg=angle)
        side = _min_bounding_square(np.argwhere(mask).astype(float))
        assert side == pytest.approx(120.0, abs=2.0)


@pytest.mark.parametrize("angle", [0.0, 12.0, 30.0, 44.0])
def test_intact_square_scores_4(angle):
    crop, mask = square_crop(angle_deg=angle, side=140)
    assert squareness_ratio(crop, mask) > 0.95
    assert auto_squareness(crop, mask) == 4
    assert auto_squareness(crop, mask, nominal_px=90.0) == 4


def test_damaged_squares_score_lower():
    crop, mask = square_crop(side=140)
    rr = np.arange(140)[:, None] - 69.5
    cc = np.arange(140)[None, :] - 69.5
    # A quarter occluded from one side (dark, as opaque as the bars).
    occluded = mask & (rr > 45 - 0.25 * 90)
    c1 = np.where(occluded, 10.0, crop).astype(np.float32)
    m1 = mask & ~occluded
    assert squareness_ratio(c1, m1) == pytest.approx(0.75, abs=0.04)
    assert auto_squareness(c1, m1) == 2
    # A missing corner quadrant (L shape): 3/4 of the area.
    corner = mask & (rr > 0) & (cc > 0)
    c2 = np.where(corner, 10.0, crop).astype(np.float32)
    assert auto_squareness(c2, mask & ~corner) == 2
    # Contamination inside the square does not make it less square (holes are filled).
    blob = (rr - 10) ** 2 + (cc + 5) ** 2 < 15**2
    c3 = np.where(blob, 12.0, crop).astype(np.float32)
    assert auto_squareness(c3, mask & ~blob) == 4
    # A square shrunk by two occluded sides is still square by the paper's definition, but
    # not against the grid's nominal square side.
    small, small_mask = square_crop(side=140, square=72.0)
    assert auto_squareness(small, small_mask) == 4
    assert auto_squareness(small, small_mask, nominal_px=90.0) == 1
    assert auto_squareness(crop, np.zeros_like(mask)) == 0


def test_big_crops_are_downsampled_and_agree():
    small_crop, small_mask = square_crop(side=140, square=100.0, angle_deg=20.0)
    big_crop, big_mask = square_crop(side=1120, square=800.0, angle_deg=20.0)
    r_small = squareness_ratio(small_crop, small_mask)
    r_big = squareness_ratio(big_crop, big_mask)
    assert r_big == pytest.approx(r_small, abs=0.02)


def test_auto_labels_agree_with_simulated_truth():
    """On a simulated grid, auto-labels are within one of the truth's scores for almost all."""
    from xcryonet.config import ExtractConfig, SimulateConfig
    from xcryonet.extract import crop_square, find_squares, match_squares, squares_array
    from xcryonet.io.stitch import stitch_tiles
    from xcryonet.simulate import dataset_plan, simulate_grid

    spec, _layout, seed = dataset_plan(SimulateConfig())[2]
    grid = simulate_grid(spec, seed)
    image, _ = stitch_tiles(grid.tiles, grid.tile_origins_rc, refine=False, shape=grid.image.shape)
    cfg = ExtractConfig()
    res = find_squares(image, grid.pixel_size_um, cfg)
    truth = grid.truth
    m = match_squares(
        squares_array(res.squares),
        truth[["row_px", "col_px"]].to_numpy(),
        truth["complete"].to_numpy(bool),
        0.3 * res.lattice.pitch_px,
    )
    b_diff, s_diff = [], []
    for sq, t in zip(res.squares, m.truth_index, strict=True):
        if t < 0 or not truth["complete"].iloc[t]:
            continue
        crop, mask = crop_square(image, sq, cfg)
        b_diff.append(auto_brightness(crop, mask, res.levels) - truth["brightness"].iloc[t])
        s = auto_squareness(crop, mask, nominal_px=res.lattice.square_px)
        s_diff.append(s - truth["squareness"].iloc[t])
    b_diff, s_diff = np.array(b_diff), np.array(s_diff)
    assert len(b_diff) > 200
    assert (np.abs(b_diff) <= 1).mean() >= 0.97
    assert (np.abs(s_diff) <= 1).mean() >= 0.95
    assert (s_diff == 0).mean() >= 0.85
