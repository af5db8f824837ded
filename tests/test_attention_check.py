"""Attention check: the simulator's defect map, the contrast metric, and the frame alignment."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from xcryonet.attention_check import (
    attention_contrast,
    contrast,
    crop_window,
    local_offsets,
    rank_auc,
    resample_nearest,
)
from xcryonet.config import Params, SimulateConfig
from xcryonet.simulate import (
    DEFECT_BROKEN,
    DEFECT_CLASSES,
    DEFECT_CONTAMINATION,
    DEFECT_CRACK,
    DEFECT_OCCLUDED,
    GridSpec,
    simulate_grid,
)

# Every square defective, so each class shows up on a small grid.
TINY = GridSpec(
    grid_id="g1",
    mesh=200,
    rotation_deg=17.0,
    pixel_size_um=0.8,
    field_um=600.0,
    tile_shape=(256, 256),
    defect_fraction=1.0,
    with_tiles=False,
)


@pytest.fixture(scope="module")
def grid():
    return simulate_grid(TINY, seed=5)


def test_defect_map_shape_and_classes(grid):
    d = grid.defects
    assert d.dtype == np.uint8 and d.shape == grid.image.shape
    assert len(DEFECT_CLASSES) == 5
    present = set(np.unique(d).tolist())
    assert {DEFECT_CRACK, DEFECT_BROKEN, DEFECT_CONTAMINATION, DEFECT_OCCLUDED} <= present
    assert present <= set(range(len(DEFECT_CLASSES)))


def test_defect_map_is_deterministic():
    a = simulate_grid(TINY, seed=5)
    b = simulate_grid(TINY, seed=5)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.defects, b.defects)


def test_defects_sit_where_the_image_shows_them(grid):
    img, d = grid.image / TINY.dose, grid.defects
    open_ice = (d == 0) & (img > 0.15)  # clean open film; bars are at 0.02
    ice = float(img[open_ice].mean())
    assert img[d == DEFECT_CRACK].mean() > ice + 0.05  # cracks: up to vacuum
    assert img[d == DEFECT_BROKEN].mean() > 0.95  # broken film is vacuum
    assert img[d == DEFECT_CONTAMINATION].mean() < ice - 0.1  # blobs darken
    assert img[d == DEFECT_OCCLUDED].mean() < 0.1  # covered like a bar


def test_defect_map_counts_give_the_truth_fractions(grid):
    """Per square, the labelled pixels in its pitch cell reproduce its truth fractions."""
    t = grid.truth
    pitch = TINY.pitch_um / TINY.pixel_size_um
    rr, cc = np.indices(grid.defects.shape)
    checked = 0
    for row in t[t["complete"] & (t["open_fraction"] > 0.99)].itertuples():
        cell = (np.abs(rr - row.row_px) < pitch / 2) & (np.abs(cc - row.col_px) < pitch / 2)
        lab = grid.defects[cell]
        crack = np.count_nonzero(lab == DEFECT_CRACK)
        contam = np.count_nonzero(lab == DEFECT_CONTAMINATION)
        if row.crack_fraction > 0:
            n_open = crack / row.crack_fraction
            assert contam / n_open == pytest.approx(row.contamination_fraction, abs=1e-6)
            checked += 1
    assert checked >= 1


def test_rank_auc_known_values():
    assert rank_auc(np.array([3.0, 4.0]), np.array([1.0, 2.0])) == 1.0
    assert rank_auc(np.array([1.0, 2.0]), np.array([3.0, 4.0])) == 0.0
    assert rank_auc(np.ones(3), np.ones(5)) == 0.5
    assert rank_auc(np.array([2.0]), np.array([1.0, 3.0])) == 0.5
    assert np.isnan(rank_auc(np.zeros(0), np.ones(2)))


def test_contrast_perfect_random_and_inverted_maps():
    rng = np.random.default_rng(0)
    defects = rng.random((6, 16, 16)) < 0.1
    open_ = np.ones((6, 16, 16), bool)
    open_[:, :2] = False  # bars
    perfect = contrast(defects.astype(float), defects, open_)
    assert perfect["n_squares"] == 6
    assert perfect["auc_mean"] == 1.0 and perfect["mean_in"] == 1.0 and perfect["mean_out"] == 0
    rand = contrast(rng.random((6, 16, 16)), defects, open_)
    assert 0.35 < rand["auc_mean"] < 0.65 and 0.8 < rand["ratio"] < 1.25
    inverted = contrast(1.0 - defects, defects, open_)
    assert inverted["auc_mean"] == 0.0
    # Squares without a defect pixel (or with nothing else open) do not count.
    none = contrast(np.ones((2, 4, 4)), np.zeros((2, 4, 4), bool), np.ones((2, 4, 4), bool))
    assert none["n_squares"] == 0 and np.isnan(none["auc_mean"]) and np.isnan(none["ratio"])
    # Defect pixels outside the open area (e.g. under a bar) are ignored.
    maps = np.zeros((1, 4, 4))
    d = np.zeros((1, 4, 4), bool)
    d[0, 0, 0] = d[0, 3, 3] = True
    maps[0, 3, 3] = 1.0
    o = np.ones((1, 4, 4), bool)
    o[0, 0, 0] = False
    assert contrast(maps, d, o)["auc_mean"] == 1.0


def test_crop_resample_and_offsets():
    img = np.arange(25, dtype=np.uint8).reshape(5, 5)
    w = crop_window(img, (-1, 3), 3)
    np.testing.assert_array_equal(w, [[0, 0, 0], [3, 4, 0], [8, 9, 0]])
    np.testing.assert_array_equal(resample_nearest(img, 5), img)
    np.testing.assert_array_equal(
        resample_nearest(np.eye(2), 4), np.kron(np.eye(2), np.ones((2, 2)))
    )
    pos = np.array([[0.0, 0], [0, 10], [10, 0], [10, 10], [50, 50]])
    off = np.array([[2.0, -1], [2.2, -0.8], [1.8, -1.2], [np.nan, np.nan], [9.0, 9.0]])
    got = local_offsets(pos, off, k=3)
    np.testing.assert_array_equal(got[:4], [[2, -1]] * 4)


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory) -> tuple[Path, SimulateConfig]:
    """Two small grids (EPU and single MRC), simulated and extracted."""
    from xcryonet.stages import extract, simulate

    root = tmp_path_factory.mktemp("demo")
    cfg = SimulateConfig(
        n_grids=3,
        layouts=("epu", "mrc", "serialem"),
        squares_per_grid=20,
        pixel_size_um=0.8,
        tile_px=256,
        defect_fraction=0.8,
        workers=1,
    )
    simulate(
        cfg,
        out_dir=str(root / "raw"),
        truth_dir=str(root / "truth"),
        labels_path=str(root / "labels.csv"),
    )
    grids = [root / "raw" / g for g in ("grid01", "grid02")]
    result = extract(grids, root / "squares", Params().extract)
    assert result["failed"] == []
    return root / "squares", cfg


def test_frames_line_up_and_an_image_oracle_scores_high(tiny_demo):
    """Bright pixels as 'cracking' and dark ones as 'contamination' attention: a map that looks
    at the right pixels, so high AUCs show that the defect crops sit on the extracted crops."""
    squares, cfg = tiny_demo

    def oracle(crops):
        x = resample_nearest(np.stack(crops).astype(np.float32), 32)
        return np.stack([x, 1 - x], axis=1)

    r = attention_contrast(oracle, squares, cfg)
    assert r["grids"] == ["grid01", "grid02"] and r["squares"] >= 30
    assert r["ncc_median"] > 0.95
    assert r["cracking"]["n_squares"] >= 3 and r["cracking"]["auc_mean"] > 0.8
    assert r["contamination"]["auc_mean"] > 0.8
    assert r["contamination"]["ratio"] > 1.2

    def shuffled(crops):
        return np.random.default_rng(1).random((len(crops), 2, 32, 32))

    rand = attention_contrast(shuffled, squares, cfg, max_squares=20)
    assert rand["squares"] <= 20
    assert 0.35 < rand["contamination"]["auc_mean"] < 0.65


def test_unknown_grid_is_a_clear_error(tiny_demo):
    from xcryonet.errors import InputError

    squares, cfg = tiny_demo
    with pytest.raises(InputError, match="not in the simulator"):
        attention_contrast(lambda c: np.zeros((len(c), 2, 8, 8)), squares, cfg, grids=["nope"])
