"""Grid simulator: determinism, truth geometry, defect rates, scores, and each written layout."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from xcryonet.config import SimulateConfig
from xcryonet.simulate import (
    DEFECT_KINDS,
    MESH_GEOMETRY,
    TRUTH_COLUMNS,
    GridSpec,
    brightness_score,
    contamination_score,
    cracking_score,
    field_for_squares,
    ice_score,
    overall_score,
    score_squares,
    simulate_dataset,
    simulate_grid,
    squareness_score,
    tile_side_for,
    truth_in_frame,
    write_grid,
)

SMALL = GridSpec(
    grid_id="g1",
    mesh=300,
    rotation_deg=23.0,
    pixel_size_um=1.0,
    field_um=500.0,
    tile_shape=(256, 256),
)
SMALL_CFG = SimulateConfig(
    n_grids=3, squares_per_grid=12, pixel_size_um=1.0, tile_px=200, workers=1
)


@pytest.fixture(scope="module")
def grid():
    return simulate_grid(SMALL, seed=11)


def _hash_tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# --- determinism -----------------------------------------------------------------------------


def test_dataset_is_byte_for_byte_deterministic(tmp_path):
    """Same config -> same files, whatever the number of worker processes."""
    a = simulate_dataset(SMALL_CFG, tmp_path / "a")
    simulate_dataset(dataclasses.replace(SMALL_CFG, workers=2), tmp_path / "b")
    ha, hb = _hash_tree(tmp_path / "a"), _hash_tree(tmp_path / "b")
    assert ha == hb
    names = set(ha)
    assert {"data/labels.csv", "data/truth/grids.csv", "data/truth/grid01.csv"} <= names
    # One grid per layout, in the folder named by its grid id.
    assert "data/raw/grid01/Atlas/Atlas.dm" in names
    assert {"data/raw/grid02/grid02.mrc", "data/raw/grid02/grid02.mrc.mdoc"} <= names
    assert "data/raw/grid03/grid03.mrc" in names
    assert a["grids"] == 3 and a["complete_squares"] > 0


def test_other_seed_differs(tmp_path):
    simulate_dataset(dataclasses.replace(SMALL_CFG, n_grids=1), tmp_path / "a")
    simulate_dataset(dataclasses.replace(SMALL_CFG, n_grids=1, seed=1), tmp_path / "b")
    assert _hash_tree(tmp_path / "a") != _hash_tree(tmp_path / "b")


def test_simulate_grid_is_deterministic(grid):
    again = simulate_grid(SMALL, seed=11)
    assert np.array_equal(grid.image, again.image)
    assert all(np.array_equal(a, b) for a, b in zip(grid.tiles, again.tiles, strict=True))
    pd.testing.assert_frame_equal(grid.truth, again.truth)


# --- truth geometry --------------------------------------------------------------------------


def test_truth_columns_and_types(grid):
    t = grid.truth
    assert tuple(t.columns) == TRUTH_COLUMNS
    assert (t["grid_id"] == "g1").all()
    assert list(t["square_id"]) == list(range(1, len(t) + 1))
    for col in ("brightness", "squareness", "cracking", "contamination", "overall"):
        assert t[col].between(0, 4).all()
    for col in ("open_fraction", "crack_fraction", "broken_fraction", "contamination_fraction"):
        assert t[col].between(0, 1).all()
    assert t["complete"].dtype == bool
    assert (t.loc[t["complete"], "open_fraction"] > 0).all()


def test_affine_maps_truth_pixels_to_stage(grid):
    t = grid.truth
    rc1 = np.column_stack([t["row_px"], t["col_px"], np.ones(len(t))])
    np.testing.assert_allclose(rc1 @ grid.affine.T, t[["x_um", "y_um"]].to_numpy(), atol=1e-9)


def test_affine_has_flipped_axis_and_small_rotation(grid):
    lin = grid.affine[:, :2]
    # In image axes (x_px = col, y_px = row) real EPU mirrors x: the map reverses orientation.
    # (In the contract's (row, col) order that reads det > 0, since row/col is itself a swap.)
    assert np.linalg.det(lin[:, [1, 0]]) < 0
    np.testing.assert_allclose(abs(np.linalg.det(lin)), SMALL.pixel_size_um**2, rtol=1e-9)
    # x decreases along columns, y increases along rows, with a few degrees of rotation.
    assert lin[0, 1] < 0 < lin[1, 0]
    angle = np.degrees(np.arctan2(lin[0, 0], -lin[0, 1]))
    assert 1 < abs(angle) < 10


def test_complete_squares_are_bright_open_regions_centred_on_truth(grid):
    """Each clean complete square is a bright region whose centroid is the truth (row, col)."""
    img, t = grid.image, grid.truth
    pitch_px = SMALL.pitch_um / SMALL.pixel_size_um
    hole_px = SMALL.hole_um / SMALL.pixel_size_um
    bar = SMALL.dose * 0.02
    rr, cc = np.mgrid[: img.shape[0], : img.shape[1]]
    clean = t[t["complete"] & (t["defects"] == "none")]
    assert len(clean) >= 10
    for _, sq in clean.iterrows():
        r, c = sq["row_px"], sq["col_px"]
        r0, r1 = int(r - pitch_px / 2), int(r + pitch_px / 2) + 1
        c0, c1 = int(c - pitch_px / 2), int(c + pitch_px / 2) + 1
        win = img[r0:r1, c0:c1]
        near = np.hypot(rr[r0:r1, c0:c1] - r, cc[r0:r1, c0:c1] - c) < pitch_px / 2
        level = np.median(win[np.hypot(rr[r0:r1, c0:c1] - r, cc[r0:r1, c0:c1] - c) < hole_px / 4])
        assert level > 5 * bar
        bright = near & (win > bar + 0.5 * (level - bar))
        area = bright.sum()
        assert area == pytest.approx(hole_px**2, rel=0.06)
        assert rr[r0:r1, c0:c1][bright].mean() == pytest.approx(r, abs=0.5)
        assert cc[r0:r1, c0:c1][bright].mean() == pytest.approx(c, abs=0.5)


def test_tiles_are_noisy_views_of_the_image(grid):
    th, tw = SMALL.tile_shape
    assert len(grid.tiles) == len(grid.tile_origins_rc) == len(grid.tile_stage_xy_um)
    for tile, (r, c) in zip(grid.tiles, grid.tile_origins_rc, strict=True):
        assert tile.shape == (th, tw) and tile.dtype == np.uint16
        patch = grid.image[r : r + th, c : c + tw]
        assert np.corrcoef(patch.ravel(), tile.ravel().astype(float))[0, 1] > 0.9
        # Vignetting: tile corners are darker relative to the truth than the tile centre.
        ratio = tile.astype(float).sum() / patch.sum()
        assert 0.8 < ratio < 1.02
    # Overlap between neighbours, and a mosaic the tiles cover.
    step = np.diff(np.unique(grid.tile_nominal_rc[:, 0]))
    assert np.allclose(step / th, 1 - SMALL.overlap, atol=0.01)
    assert (grid.tile_origins_rc + [th, tw]).max(axis=0).tolist() == list(grid.image.shape)


def test_image_is_blank_exactly_where_no_tile_looked():
    spec = dataclasses.replace(SMALL, tile_jitter_um=6.0)
    g = simulate_grid(spec, 4)
    covered = np.zeros(g.image.shape, bool)
    th, tw = spec.tile_shape
    for r, c in g.tile_origins_rc:
        covered[r : r + th, c : c + tw] = True
    assert not covered.all()  # the jitter leaves slivers at the edges
    assert np.array_equal(covered, g.image > 0)


def test_reported_stage_positions_carry_a_few_um_of_error(grid):
    th, tw = SMALL.tile_shape
    centres = grid.tile_origins_rc + (np.array([th, tw]) - 1) / 2
    true_xy = np.column_stack([centres, np.ones(len(centres))]) @ grid.affine.T
    err = np.hypot(*(grid.tile_stage_xy_um - true_xy).T)
    assert 0 < err.mean() < 4 * SMALL.stage_error_um
    assert err.max() < 6 * SMALL.stage_error_um


def test_field_for_squares_gives_about_that_many_complete_squares():
    field = field_for_squares(300, 40, 23.0)
    tile = tile_side_for(field / SMALL.pixel_size_um, 256, SMALL.overlap)
    spec = dataclasses.replace(SMALL, field_um=field, tile_shape=(tile, tile), with_tiles=False)
    g = simulate_grid(spec, 5)
    assert g.image.shape[0] == pytest.approx(field / SMALL.pixel_size_um, rel=0.03)
    assert 30 <= int(g.truth["complete"].sum()) <= 50


def test_rim_and_outside_are_dark():
    """A field larger than the grid shows the dark rim and clip ring around the meshed disk."""
    spec = GridSpec(mesh=200, pixel_size_um=4.0, field_um=3300.0, tile_shape=(256, 256))
    g = simulate_grid(spec, 2)
    rows, cols = g.image.shape
    corner = g.image[: rows // 12, : cols // 12]
    assert corner.max() < 0.02 * spec.dose
    t = g.truth
    assert (~t["complete"]).sum() > 0
    # Squares cut by the rim are incomplete, and lie near the rim.
    gc = np.array([(rows - 1) / 2, (cols - 1) / 2])
    dist = np.hypot(t["row_px"] - gc[0], t["col_px"] - gc[1]) * spec.pixel_size_um
    assert dist[t["complete"]].max() < spec.mesh_diameter_um / 2


# --- defects -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def big_truth():
    """About 600 complete 400-mesh squares at a coarse pixel size."""
    spec = GridSpec(mesh=400, pixel_size_um=1.0, field_um=1650.0, tile_shape=(512, 512))
    return simulate_grid(dataclasses.replace(spec, with_tiles=False), 9).truth


def test_defect_fraction_roughly_as_configured(big_truth):
    done = big_truth[big_truth["complete"]]
    assert len(done) > 500
    frac = (done["defects"] != "none").mean()
    assert frac == pytest.approx(0.33, abs=0.06)
    kinds = done.loc[done["defects"] != "none", "defects"].str.split("+").explode()
    shares = kinds.value_counts(normalize=True)
    weights = np.asarray(GridSpec().defect_weights) / sum(GridSpec().defect_weights)
    for kind, w in zip(DEFECT_KINDS, weights, strict=True):
        assert shares.get(kind, 0.0) == pytest.approx(w, abs=0.08)


def test_defects_show_in_the_fractions(big_truth):
    done = big_truth[big_truth["complete"]]
    has = {k: done["defects"].str.contains(k) for k in DEFECT_KINDS}
    clean = done[done["defects"] == "none"]
    assert (clean[["crack_fraction", "broken_fraction"]] == 0).all().all()
    assert (clean["open_fraction"] == 1).all()
    assert clean["contamination_fraction"].max() < 0.02  # only specks
    assert (done.loc[has["crack"], "crack_fraction"] > 0).mean() > 0.9
    assert (done.loc[has["broken"], "broken_fraction"] > 0.02).mean() > 0.9
    assert done.loc[has["contamination"], "contamination_fraction"].median() > 0.03
    assert done.loc[has["occluded"], "open_fraction"].max() < 0.95
    # Scores follow: clean squares are never cracked nor partly covered.
    assert (clean["cracking"] == 0).all() and (clean["squareness"] == 4).all()


def test_zero_defect_fraction_gives_clean_squares():
    spec = dataclasses.replace(SMALL, defect_fraction=0.0, with_tiles=False)
    t = simulate_grid(spec, 3).truth
    assert (t["defects"] == "none").all()
    assert (t["cracking"] == 0).all()


# --- scores ------------------------------------------------------------------------------------


def test_scores_are_monotone_in_their_inputs():
    x = np.linspace(0, 1, 201)
    for f in (brightness_score, contamination_score):
        s = f(x)
        assert s.min() == 0 and s.max() == 4 and (np.diff(s) >= 0).all()
    for other in (0.0, 0.005, 0.05):
        assert (np.diff(cracking_score(x, other)) >= 0).all()
        assert (np.diff(cracking_score(other, x)) >= 0).all()
        assert (np.diff(squareness_score(x, 1.0 - other)) >= 0).all()
    # Ice: rises from empty to the usable window, then falls as the ice thickens.
    t = np.linspace(0, 800, 1601)
    ice = ice_score(t)
    peak = int(np.argmax(ice))
    assert ice[peak] == 4 and ice[0] == 0 and ice[-1] == 0
    assert (np.diff(ice[: peak + 1]) >= 0).all() and (np.diff(ice[peak:]) <= 0).all()
    # Overall: better with better ice/squareness, worse with more cracking/contamination.
    levels = range(5)
    for ic, sq, cr, co in itertools.product(levels, levels, levels, levels):
        o = int(overall_score(ic, sq, cr, co))
        assert 0 <= o <= min(ic, sq)
        if cr < 4:
            assert int(overall_score(ic, sq, cr + 1, co)) <= o
        if co < 4:
            assert int(overall_score(ic, sq, cr, co + 1)) <= o
        if ic < 4:
            assert int(overall_score(ic + 1, sq, cr, co)) >= o
        if sq < 4:
            assert int(overall_score(ic, sq + 1, cr, co)) >= o
    assert int(overall_score(4, 4, 0, 0)) == 4
    # Every visible defect costs: a hairline crack or a few specks a point, a clear crack two.
    assert int(overall_score(4, 4, 1, 0)) == 3
    assert int(overall_score(4, 4, 0, 1)) == 3
    assert int(overall_score(4, 4, 2, 0)) == 2
    assert int(overall_score(4, 4, 4, 0)) == 0
    assert int(overall_score(4, 4, 2, 2)) == 1  # clearly cracked and contaminated: one more


def test_truth_scores_follow_from_truth_fractions(big_truth):
    again = score_squares(big_truth)
    for col in again:
        assert (again[col].to_numpy() == big_truth[col].to_numpy()).all(), col
    # ...and track what they measure.
    r = big_truth[big_truth["complete"]]
    assert np.corrcoef(r["brightness"], r["transmission"])[0, 1] > 0.8
    damaged = r["crack_fraction"] + r["broken_fraction"]
    assert np.corrcoef(r["cracking"], np.log10(damaged + 1e-4))[0, 1] > 0.8


# --- files -------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["epu", "serialem", "mrc"])
def test_layout_writes_and_reads_back(grid, tmp_path, layout):
    from xcryonet.io import grid_id_for, read_atlas

    folder = write_grid(grid, tmp_path, layout)
    assert folder == tmp_path / "g1"
    atlas = read_atlas(folder)
    assert atlas.format == layout
    assert grid_id_for(folder) == "g1"
    assert atlas.image is not None
    assert atlas.pixel_size_um == pytest.approx(SMALL.pixel_size_um, rel=1e-4)
    if layout == "epu":
        # Placement comes from the reported stage positions: within a few px of the truth frame.
        assert np.abs(np.subtract(atlas.image.shape, grid.image.shape)).max() <= 12
    else:
        assert atlas.image.shape == grid.image.shape
        corr = np.corrcoef(atlas.image.ravel(), grid.image.ravel())[0, 1]
        assert corr > 0.9
    if layout == "mrc":
        truth = truth_in_frame(grid.truth, atlas.affine)
        expect = grid.truth[["row_px", "col_px"]].to_numpy() - (np.array(grid.image.shape) - 1) / 2
        np.testing.assert_allclose(truth[["y_um", "x_um"]].to_numpy(), expect * SMALL.pixel_size_um)
        return
    # The reader's stage frame agrees with the true one at the squares, within a few µm.
    offset = np.median(np.array([t.origin_rc for t in atlas.tiles]) - grid.tile_origins_rc, axis=0)
    rc = grid.truth[["row_px", "col_px"]].to_numpy() + offset
    xy = atlas.pixel_to_stage(rc[:, 0], rc[:, 1])
    err = np.hypot(*(xy - grid.truth[["x_um", "y_um"]].to_numpy()).T)
    assert np.sqrt(np.mean(err**2)) < 4.0


def test_write_grid_replaces_the_grid_folder(grid, tmp_path):
    write_grid(grid, tmp_path, "serialem")
    write_grid(grid, tmp_path, "mrc")
    assert sorted(p.name for p in (tmp_path / "g1").iterdir()) == ["g1.mrc"]


def test_bad_arguments_are_rejected(grid, tmp_path):
    with pytest.raises(ValueError, match="layout"):
        write_grid(grid, tmp_path, "tiff")
    with pytest.raises(ValueError, match="mesh"):
        simulate_grid(dataclasses.replace(SMALL, mesh=250), 1)


def test_labels_look_like_an_operators(tmp_path):
    cfg = dataclasses.replace(SMALL_CFG, n_grids=2, squares_per_grid=60, label_fraction=0.5)
    simulate_dataset(cfg, tmp_path)
    labels = pd.read_csv(tmp_path / cfg.labels_path)
    assert list(labels.columns) == [
        "grid_id",
        "x_um",
        "y_um",
        "cracking",
        "contamination",
        "overall",
    ]
    truth = pd.concat(
        [pd.read_csv(tmp_path / cfg.truth_dir / f"grid0{k}.csv") for k in (1, 2)],
        ignore_index=True,
    )
    done = truth[truth["complete"]]
    assert 0.3 * len(done) < len(labels) < 0.7 * len(done)
    agree = []
    for _, lab in labels.iterrows():
        same = done[done["grid_id"] == lab["grid_id"]]
        d = np.hypot(same["x_um"] - lab["x_um"], same["y_um"] - lab["y_um"])
        k = int(np.argmin(d))
        assert d.iloc[k] < 10  # a click near the centre of a complete square
        for col in ("cracking", "contamination", "overall"):
            if not pd.isna(lab[col]):
                assert 0 <= lab[col] <= 4
                assert abs(lab[col] - same[col].iloc[k]) <= 1
                agree.append(lab[col] == same[col].iloc[k])
    assert 0.75 < np.mean(agree) < 0.98


@pytest.mark.slow
def test_paper_scale_atlas_fits_in_memory():
    """A ~14k x 14k atlas with ~900 px squares is made within 4 GB (peak RSS of a child)."""
    code = (
        "import resource\n"
        "from xcryonet.simulate import paper_scale_spec, simulate_grid\n"
        "g = simulate_grid(paper_scale_spec(), 1)\n"
        "print(g.image.shape[0], g.image.shape[1], g.image.dtype, len(g.truth),\n"
        "      resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    rows, cols, dtype, n, rss_kb = out.stdout.split()
    assert 13000 <= int(rows) <= 15000 and 13000 <= int(cols) <= 15000
    assert dtype == "float32" and int(n) > 100
    assert MESH_GEOMETRY[200][1] / 0.1 == pytest.approx(900)
    assert int(rss_kb) < 4_000_000
