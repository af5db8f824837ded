"""read_atlas on every layout: writer -> reader round trips, detection, and every bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from xcryonet.errors import InputError
from xcryonet.io import (
    grid_id_for,
    inspect_atlas,
    read_atlas,
    read_mrc,
    write_epu_atlas,
    write_mrc,
    write_serialem_montage,
)
from xcryonet.io.atlas import Atlas


def _lin_rel_err(fitted: np.ndarray, true: np.ndarray) -> float:
    return float(np.linalg.norm(fitted[:, :2] - true[:, :2]) / np.linalg.norm(true[:, :2]))


def _placed(atlas: Atlas) -> np.ndarray:
    return np.array([t.origin_rc for t in atlas.tiles])


def _check_consistent_placement(atlas: Atlas, true_origins: np.ndarray) -> np.ndarray:
    """Every tile is placed at its true origin plus one common shift; return that shift."""
    shift = _placed(atlas) - true_origins
    assert np.ptp(shift, axis=0).max() == 0, shift
    return shift[0].astype(int)


def _check_image(atlas: Atlas, scene: np.ndarray, shift: np.ndarray, tol: float) -> None:
    assert atlas.image is not None and atlas.image.dtype == np.float32
    dr, dc = shift
    m = 8  # interior: away from the mosaic border, where a shifted frame crops or pads
    sub = atlas.image[m + dr : scene.shape[0] - m + dr, m + dc : scene.shape[1] - m + dc]
    np.testing.assert_allclose(sub, scene[m:-m, m:-m], atol=tol)


# ----------------------------------------------------------------------------- EPU


def test_epu_round_trip_exact(tmp_path: Path, synth) -> None:
    ts = synth.make_tiled(dtype=np.float32)
    sq = {
        "id": 5,
        "row_px": 100.0,
        "col_px": 120.0,
        "size_px": 40.0,
        "x_um": 1.0,
        "y_um": -2.0,
        "quality": 2,
    }
    out = write_epu_atlas(
        tmp_path / "grid7" / "Atlas",
        ts.tiles,
        ts.origins,
        ts.stage(),
        ts.pixel_size_um,
        4000,
        downsample=4,
        squares=[sq],
    )
    assert out == tmp_path / "grid7" / "Atlas"
    for path in (tmp_path / "grid7", out, out / "Atlas.dm"):
        atlas = read_atlas(path)
        assert atlas.format == "epu"
        assert atlas.shape == ts.scene.shape
        assert atlas.pixel_size_um == pytest.approx(ts.pixel_size_um)
        np.testing.assert_allclose(atlas.affine, ts.affine, rtol=1e-9, atol=1e-6)
        assert _check_consistent_placement(atlas, ts.origins).tolist() == [0, 0]
        _check_image(atlas, ts.scene, np.zeros(2, int), tol=1e-3)
        assert len(atlas.tiles) == len(ts.tiles)
        assert atlas.tiles[0].path is not None and atlas.tiles[0].path.is_file()
        (s,) = atlas.software_squares
        assert (s.row_px, s.col_px, s.x_um, s.y_um) == pytest.approx((100, 120, 1, -2))
        assert s.size_px == pytest.approx((40, 40))
        assert grid_id_for(path) == "grid7"
    info = inspect_atlas(tmp_path / "grid7")
    assert info["grid_id"] == "grid7" and info["n_tiles"] == 12 and info["n_software_squares"] == 1


def test_epu_round_trip_with_stage_error_and_placement_offsets(tmp_path: Path, synth) -> None:
    """A realistic 5 x 7 atlas (about 2.5 mm across), noisy uint16 tiles, a stage error of 2 µm
    and tile placements off by up to 2 px: refinement restores the placement and the affine is
    recovered within 1e-3."""
    ts = synth.make_tiled(grid=(5, 7), pixel_size_um=2.0, noise=True, dtype=np.uint16)
    rng = np.random.default_rng(3)
    placement_error = rng.integers(-2, 3, size=ts.origins.shape)
    stage = ts.stage() + rng.normal(0.0, 2.0, size=ts.origins.shape)
    write_epu_atlas(
        tmp_path / "g" / "Atlas",
        ts.tiles,
        ts.origins + placement_error,
        stage,
        ts.pixel_size_um,
        4000,
        downsample=2,
    )
    atlas = read_atlas(tmp_path / "g")
    shift = _check_consistent_placement(atlas, ts.origins)
    assert np.abs(shift).max() <= 3
    # Poisson noise of the tiles (sqrt(200) ~ 14) averaged by the blend; no seams.
    _check_image(atlas, ts.scene, shift, tol=80)
    resid = (
        atlas.image[
            8 + shift[0] : ts.scene.shape[0] - 8 + shift[0],
            8 + shift[1] : ts.scene.shape[1] - 8 + shift[1],
        ]
        - ts.scene[8:-8, 8:-8]
    )
    assert float(np.abs(resid).mean()) < 12
    assert _lin_rel_err(atlas.affine, ts.affine) < 1e-3
    # Stage positions of image points agree with the truth within the stage error.
    rows = np.array([50.0, 300.0, 600.0])
    cols = np.array([60.0, 500.0, 1100.0])
    true_xy = (ts.affine @ np.vstack([rows, cols, np.ones(3)])).T
    got_xy = atlas.pixel_to_stage(rows + shift[0], cols + shift[1])
    assert np.abs(got_xy - true_xy).max() < 2.0


def test_epu_without_refinement_would_be_wrong(tmp_path: Path, synth) -> None:
    """Guard that the previous test measures refinement: metadata placement alone is off."""
    from xcryonet.io.stitch import stitch_tiles

    ts = synth.make_tiled(grid=(3, 3))
    err = np.array([[0, 0], [3, -2], [0, 2], [-2, 0], [2, 2], [0, -3], [1, 1], [-3, 0], [2, -1]])
    image, placed = stitch_tiles(ts.tiles, ts.origins + err, refine=False)
    assert np.ptp(placed - ts.origins, axis=0).max() > 0
    image, placed = stitch_tiles(ts.tiles, ts.origins + err)
    assert np.ptp(placed - ts.origins, axis=0).max() == 0


def test_epu_falls_back_to_atlas_mrc(tmp_path: Path, synth) -> None:
    ts = synth.make_tiled()
    write_epu_atlas(
        tmp_path / "Atlas",
        ts.tiles,
        ts.origins,
        ts.stage(),
        ts.pixel_size_um,
        9,
        downsample=4,
        write_tiles=False,
    )
    assert sorted(p.name for p in (tmp_path / "Atlas").iterdir()) == ["Atlas.dm", "Atlas_9.mrc"]
    atlas = read_atlas(tmp_path / "Atlas")
    assert atlas.image is not None
    assert atlas.shape == (ts.scene.shape[0] // 4, ts.scene.shape[1] // 4)
    assert atlas.pixel_size_um == pytest.approx(4 * ts.pixel_size_um)
    # Atlas px are 4 native px: the affine is the native one at 4x the scale.
    expected = ts.affine.copy()
    expected[:, :2] *= 4
    expected[:, 2] += ts.affine[:, :2] @ [1.5, 1.5]
    np.testing.assert_allclose(atlas.affine, expected, rtol=1e-9, atol=1e-6)
    block = ts.scene[:4, :4].mean()
    assert atlas.image[0, 0] == pytest.approx(block, rel=1e-5)
    assert "Atlas_9.mrc" in atlas.affine_source


def test_epu_metadata_only(tmp_path: Path, synth) -> None:
    ts = synth.make_tiled()
    write_epu_atlas(
        tmp_path / "Atlas",
        ts.tiles,
        ts.origins,
        ts.stage(),
        ts.pixel_size_um,
        9,
        write_tiles=False,
        write_stitched=False,
    )
    atlas = read_atlas(tmp_path / "Atlas")
    assert atlas.image is None
    assert atlas.pixel_size_um == pytest.approx(4 * ts.pixel_size_um)


def test_epu_load_image_false_reads_no_pixels(tmp_path: Path, synth) -> None:
    ts = synth.make_tiled()
    write_epu_atlas(tmp_path / "Atlas", ts.tiles, ts.origins, ts.stage(), ts.pixel_size_um, 9)
    atlas = read_atlas(tmp_path / "Atlas", load_image=False)
    assert atlas.image is None and atlas.shape == ts.scene.shape
    np.testing.assert_allclose(atlas.affine, ts.affine, rtol=1e-9, atol=1e-6)


def test_epu_missing_tile(tmp_path: Path, synth) -> None:
    ts = synth.make_tiled()
    folder = write_epu_atlas(
        tmp_path / "Atlas", ts.tiles, ts.origins, ts.stage(), ts.pixel_size_um, 9
    )
    (folder / "Tile_14_0_9.mrc").unlink()
    for load in (True, False):
        with pytest.raises(InputError) as err:
            read_atlas(folder, load_image=load)
        assert "Tile_14_0_9.mrc" in str(err.value) and "missing" in str(err.value)


def test_epu_bad_tile_is_named(tmp_path: Path, synth) -> None:
    ts = synth.make_tiled()
    folder = write_epu_atlas(
        tmp_path / "Atlas", ts.tiles, ts.origins, ts.stage(), ts.pixel_size_um, 9
    )
    bad = folder / "Tile_12_0_9.mrc"
    raw = bytearray(bad.read_bytes())
    raw[1024:1028] = np.float32(np.nan).tobytes()
    bad.write_bytes(bytes(raw))
    with pytest.raises(InputError, match="Tile_12_0_9.mrc.*NaN"):
        read_atlas(folder)
    write_mrc(bad, np.ones((3, 160, 200), np.float32) + np.arange(3)[:, None, None], 1.0)
    with pytest.raises(InputError, match="Tile_12_0_9.mrc.*stack of 3"):
        read_atlas(folder)
    write_mrc(bad, ts.tiles[0][:100], 1.0)
    with pytest.raises(InputError, match="Tile_12_0_9.mrc.*atlas px"):
        read_atlas(folder)


def test_epu_writer_is_atomic(tmp_path: Path, synth) -> None:
    ts = synth.make_tiled()
    tiles = [t.copy() for t in ts.tiles]
    tiles[-1][5, 5] = np.nan  # the last tile fails to write, after the others were written
    with pytest.raises(ValueError):
        write_epu_atlas(tmp_path / "g" / "Atlas", tiles, ts.origins, ts.stage(), 1.0, 9)
    assert list((tmp_path / "g").iterdir()) == []
    # An earlier complete atlas survives a failed rewrite untouched.
    good = write_epu_atlas(tmp_path / "g" / "Atlas", ts.tiles, ts.origins, ts.stage(), 1.0, 9)
    before = {p.name: p.read_bytes() for p in good.iterdir()}
    with pytest.raises(ValueError):
        write_epu_atlas(good, tiles, ts.origins, ts.stage(), 1.0, 9)
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before
    assert [p.name for p in (tmp_path / "g").iterdir()] == ["Atlas"]


def test_epu_writer_is_deterministic(tmp_path: Path, synth) -> None:
    ts = synth.make_tiled()
    a = write_epu_atlas(tmp_path / "a", ts.tiles, ts.origins, ts.stage(), 1.0, 9)
    b = write_epu_atlas(tmp_path / "b", ts.tiles, ts.origins, ts.stage(), 1.0, 9)
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    for p in a.iterdir():
        assert p.read_bytes() == (b / p.name).read_bytes()


# ----------------------------------------------------------------------------- SerialEM


def test_serialem_round_trip(tmp_path: Path, synth) -> None:
    ts = synth.make_tiled(dtype=np.int16)
    mrc = write_serialem_montage(
        tmp_path / "sq1" / "sq1.mrc", ts.tiles, ts.origins, ts.stage(), ts.pixel_size_um
    )
    assert (tmp_path / "sq1" / "sq1.mrc.mdoc").is_file()
    for path in (mrc, tmp_path / "sq1", tmp_path / "sq1" / "sq1.mrc.mdoc"):
        atlas = read_atlas(path)
        assert atlas.format == "serialem"
        assert atlas.shape == ts.scene.shape
        assert atlas.pixel_size_um == pytest.approx(ts.pixel_size_um)
        np.testing.assert_allclose(atlas.affine, ts.affine, rtol=1e-6, atol=1e-3)
        assert _check_consistent_placement(atlas, ts.origins).tolist() == [0, 0]
        _check_image(atlas, np.rint(ts.scene), np.zeros(2, int), tol=1.0)
        assert grid_id_for(path) == "sq1"
    assert inspect_atlas(mrc)["n_tiles"] == 12


def test_serialem_prefers_aligned_coords(tmp_path: Path, synth) -> None:
    ts = synth.make_tiled(dtype=np.int16)
    rough = ts.origins + np.random.default_rng(0).integers(-3, 4, ts.origins.shape)
    mrc = write_serialem_montage(
        tmp_path / "m.mrc",
        ts.tiles,
        rough,
        ts.stage(),
        ts.pixel_size_um,
        aligned_origins_rc=ts.origins,
    )
    atlas = read_atlas(mrc)
    assert "AlignedPieceCoords" in atlas.affine_source
    assert _check_consistent_placement(atlas, ts.origins).tolist() == [0, 0]


def test_serialem_with_stage_error_and_rough_coords(tmp_path: Path, synth) -> None:
    ts = synth.make_tiled(grid=(5, 7), pixel_size_um=2.0, noise=True, dtype=np.uint16)
    rng = np.random.default_rng(4)
    rough = ts.origins + rng.integers(-2, 3, ts.origins.shape)
    stage = ts.stage() + rng.normal(0.0, 2.0, ts.origins.shape)
    atlas = read_atlas(write_serialem_montage(tmp_path / "m.mrc", ts.tiles, rough, stage, 2.0))
    shift = _check_consistent_placement(atlas, ts.origins)
    _check_image(atlas, ts.scene, shift, tol=80)
    assert _lin_rel_err(atlas.affine, ts.affine) < 1e-3


def test_serialem_sections_do_not_match_stack(tmp_path: Path, synth) -> None:
    ts = synth.make_tiled(dtype=np.int16)
    mrc = write_serialem_montage(tmp_path / "m.mrc", ts.tiles, ts.origins, ts.stage(), 1.0)
    mdoc = tmp_path / "m.mrc.mdoc"
    text = mdoc.read_text()
    start = text.index("[ZValue = 11]")
    mdoc.write_text(text[:start] + text[text.index("[MontSection") :])
    with pytest.raises(InputError, match=r"m\.mrc\.mdoc.*11 \[ZValue\] sections.*12 images"):
        read_atlas(mrc)
    mdoc.write_text(text.replace("[ZValue = 3]", "[ZValue = 2]"))
    with pytest.raises(InputError, match=r"m\.mrc\.mdoc.*repeated"):
        read_atlas(mrc)
    mdoc.write_text(text.replace("StagePosition = ", "StagePosition = x", 1))
    with pytest.raises(InputError, match=r"m\.mrc\.mdoc.*StagePosition"):
        read_atlas(mrc)


def test_serialem_montsection_is_skipped(tmp_path: Path, synth) -> None:
    ts = synth.make_tiled(dtype=np.int16)
    mrc = write_serialem_montage(tmp_path / "m.mrc", ts.tiles, ts.origins, ts.stage(), 1.0)
    assert "[MontSection = 0]" in (tmp_path / "m.mrc.mdoc").read_text()
    assert len(read_atlas(mrc, load_image=False).tiles) == 12


def test_serialem_writer_is_atomic(tmp_path: Path, synth) -> None:
    ts = synth.make_tiled()
    tiles = [t.copy() for t in ts.tiles]
    tiles[-1][0, 0] = np.inf
    with pytest.raises(ValueError):
        write_serialem_montage(tmp_path / "m.mrc", tiles, ts.origins, ts.stage(), 1.0)
    assert list(tmp_path.iterdir()) == []


def test_serialem_implausible_coordinates(tmp_path: Path, synth) -> None:
    ts = synth.make_tiled(dtype=np.int16)
    origins = ts.origins.copy()
    origins[3] = (900000, 900000)
    mrc = write_serialem_montage(tmp_path / "m.mrc", ts.tiles, origins, ts.stage(), 1.0)
    with pytest.raises(InputError, match="implausible"):
        read_atlas(mrc)


# ----------------------------------------------------------------------------- single MRC


def test_single_mrc(tmp_path: Path, synth) -> None:
    scene = synth.make_scene((120, 150), 0)
    path = write_mrc(tmp_path / "grid3.mrc", scene.astype(np.uint16), 0.8)
    for p in (path, tmp_path):
        atlas = read_atlas(p)
        assert atlas.format == "mrc" and atlas.tiles == ()
        np.testing.assert_array_equal(atlas.image, scene.astype(np.uint16).astype(np.float32))
        assert atlas.pixel_size_um == pytest.approx(0.8)
        assert "no stage metadata" in atlas.affine_source
        # Centred image axes: the image centre is at stage (0, 0).
        assert atlas.pixel_to_stage(np.array([59.5]), np.array([74.5])) == pytest.approx(
            np.zeros((1, 2))
        )
    assert grid_id_for(path) == "grid3"
    assert grid_id_for(tmp_path) == tmp_path.name


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.float32, np.uint16, np.float16])
def test_single_mrc_modes(tmp_path: Path, synth, dtype: type) -> None:
    scene = synth.make_scene((40, 50), 1)
    path = write_mrc(tmp_path / "a.mrc", scene.astype(dtype), 1.0)
    atlas = read_atlas(path)
    np.testing.assert_array_equal(atlas.image, read_mrc(path)[0].astype(np.float32))


def test_single_mrc_bad_inputs(tmp_path: Path) -> None:
    stack = write_mrc(
        tmp_path / "stack.mrc", np.arange(2 * 16 * 16, dtype=np.float32).reshape(2, 16, 16), 1.0
    )
    with pytest.raises(InputError, match=r"stack\.mrc.*stack of 2"):
        read_atlas(stack)
    thin = write_mrc(tmp_path / "thin.mrc", np.arange(100, dtype=np.float32).reshape(1, 100), 1.0)
    with pytest.raises(InputError, match=r"thin\.mrc.*too small"):
        read_atlas(thin)
    nopix = write_mrc(tmp_path / "nopix.mrc", np.arange(256, dtype=np.float32).reshape(16, 16), 0.0)
    with pytest.raises(InputError, match=r"nopix\.mrc.*pixel size"):
        read_atlas(nopix)
    flat = write_mrc(tmp_path / "flat.mrc", np.full((16, 16), 7, np.int16), 1.0)
    with pytest.raises(InputError, match=r"flat\.mrc.*empty image"):
        read_atlas(flat)
    trunc = write_mrc(tmp_path / "trunc.mrc", np.arange(256, dtype=np.float32).reshape(16, 16), 1.0)
    trunc.write_bytes(trunc.read_bytes()[:-4])
    with pytest.raises(InputError, match=r"trunc\.mrc.*truncated"):
        read_atlas(trunc)


# ----------------------------------------------------------------------------- detection


def test_detection_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file"):
        read_atlas(tmp_path / "nothing")
    with pytest.raises(InputError, match="no atlas here"):
        read_atlas(tmp_path)
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(InputError, match=r"notes\.txt.*not an atlas"):
        read_atlas(tmp_path / "notes.txt")
    for name in ("a.mrc", "b.mrc"):
        write_mrc(tmp_path / name, np.arange(256, dtype=np.float32).reshape(16, 16), 1.0)
    with pytest.raises(InputError, match="2 .mrc files"):
        read_atlas(tmp_path)


def test_grid_id_for(tmp_path: Path) -> None:
    (tmp_path / "G1" / "Atlas").mkdir(parents=True)
    assert grid_id_for(tmp_path / "G1") == "G1"
    assert grid_id_for(tmp_path / "G1" / "Atlas") == "G1"
    assert grid_id_for(tmp_path / "G1" / "Atlas" / "Atlas.dm") == "G1"
    assert grid_id_for(tmp_path / "x" / "grid_5.mrc") == "grid_5"
    assert grid_id_for(tmp_path / "x" / "grid_5.mrc.mdoc") == "grid_5"


def test_f2_critical_is_the_f_distributions_upper_quantile():
    from scipy import stats

    from xcryonet.io.atlas import f2_critical

    for d2 in (1, 2, 5, 30, 64, 500):
        for alpha in (1e-3, 0.05):
            want = stats.f.isf(alpha, 2, d2)
            assert f2_critical(d2, alpha) == pytest.approx(want, rel=1e-9), (d2, alpha)
