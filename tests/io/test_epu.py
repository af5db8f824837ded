"""EPU metadata: the real fixture files, and our writer's schema against them."""

from __future__ import annotations

import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from xcryonet.errors import InputError
from xcryonet.io import inspect_atlas, read_atlas
from xcryonet.io.atlas import fit_affine
from xcryonet.io.epu import (
    EpuTile,
    atlas_dm_xml,
    microscope_image_xml,
    parse_atlas_dm,
    parse_microscope_image,
    parse_xml_bytes,
)


@pytest.fixture
def real_dm(fixtures_dir: Path) -> Path:
    return fixtures_dir / "epu_real" / "Atlas.dm"


def test_real_atlas_counts(real_dm: Path) -> None:
    meta = parse_atlas_dm(real_dm)
    assert len(meta.tiles) == 35
    assert len(meta.squares) == 222
    assert meta.image_base == "Atlas_4590151"
    assert all(
        t.base_name.startswith("Tile_") and t.base_name.endswith("_4590151") for t in meta.tiles
    )
    assert {t.atlas_xywh[2:] for t in meta.tiles} == {(833.0, 592.0)}
    assert all(t.stage_xy_um is not None for t in meta.tiles)
    assert all(s.aligned_xy_um is not None and s.quality for s in meta.squares)


def test_real_tile_affine_predicts_square_physical_centres(real_dm: Path) -> None:
    """The acceptance check: tile affine applied to square Centers vs their Physical centres."""
    meta = parse_atlas_dm(real_dm)
    # Atlas px: x = column, y = row. Fit [row, col, 1] -> stage, never assuming the axes.
    rc = np.array([(y + h / 2, x + w / 2) for x, y, w, h in (t.atlas_xywh for t in meta.tiles)])
    xy = np.array([t.stage_xy_um for t in meta.tiles])
    affine, tile_rms = fit_affine(rc, xy)
    assert tile_rms < 0.5
    centres = np.array([(s.center_xy[1], s.center_xy[0], 1.0) for s in meta.squares])
    physical = np.array([s.physical_xy_um for s in meta.squares])
    rms = float(np.sqrt(np.mean(np.sum((centres @ affine.T - physical) ** 2, axis=1))))
    print(f"real fixture: tile fit rms {tile_rms:.2f} µm, square Physical rms {rms:.2f} µm")
    assert rms < 2.0
    # EPU flips x and rotates slightly: the column coefficient of x is negative, ~0.47 µm/px.
    assert affine[0, 1] == pytest.approx(-0.467, abs=0.005)
    assert affine[1, 0] == pytest.approx(0.482, abs=0.005)


def test_real_atlas_through_read_atlas(real_dm: Path) -> None:
    for path in (real_dm, real_dm.parent):
        atlas = read_atlas(path)  # metadata only: no images exist, so no image either
        assert atlas.format == "epu"
        assert atlas.image is None
        assert len(atlas.tiles) == 35
        assert len(atlas.software_squares) == 222
        assert atlas.pixel_size_um == pytest.approx(0.475, abs=0.005)
        assert "pixel size from this affine" in atlas.affine_source
        sq = atlas.software_squares
        pred = atlas.pixel_to_stage(
            np.array([s.row_px for s in sq]), np.array([s.col_px for s in sq])
        )
        phys = np.array([(s.x_um, s.y_um) for s in sq])
        assert np.sqrt(np.mean(np.sum((pred - phys) ** 2, axis=1))) < 2.0


def test_real_atlas_inspect(real_dm: Path) -> None:
    info = inspect_atlas(real_dm.parent)
    assert info["format"] == "epu"
    assert info["n_tiles"] == 35
    assert info["n_software_squares"] == 222
    assert info["shape"] == [3966, 4000]
    assert np.array(info["affine"]).shape == (2, 3)


def test_real_microscope_image(fixtures_dir: Path) -> None:
    meta = parse_microscope_image(fixtures_dir / "epu_real" / "GridSquare_20240406_102420.xml")
    assert meta.pixel_size_um == pytest.approx(0.041562760344504568)
    assert meta.stage_xy_um == pytest.approx((-44.180175499999909, -557.23400800000006))


def _tag_paths(root: ET.Element) -> set[tuple[str, ...]]:
    """All element paths (namespaced tags from the root), ignoring repeats."""
    out: set[tuple[str, ...]] = set()

    def walk(elem: ET.Element, prefix: tuple[str, ...]) -> None:
        path = (*prefix, elem.tag)
        out.add(path)
        for child in elem:
            walk(child, path)

    walk(root, ())
    return out


def test_written_atlas_dm_uses_the_real_schema(real_dm: Path) -> None:
    tiles = [
        EpuTile(str(10 + k), f"Tile_{10 + k}_0_9", (k * 90.0, 5.0, 100.0, 80.0), (k, -k))
        for k in range(3)
    ]
    square = {
        "id": 77,
        "row_px": 40.0,
        "col_px": 50.0,
        "size_px": 30.0,
        "x_um": 1.0,
        "y_um": 2.0,
        "quality": 0.5,
    }
    ours = ET.fromstring(atlas_dm_xml(tiles, 9, squares_by_tile=[[square], [], []]))
    real = ET.parse(real_dm).getroot()
    # Every element we write sits where EPU puts it, with EPU's namespaces.
    assert _tag_paths(ours) <= _tag_paths(real)


def test_written_microscope_image_uses_the_real_schema(fixtures_dir: Path) -> None:
    ours = ET.fromstring(microscope_image_xml("Tile_1_0_2", 0.25, (10.0, -20.0), (64, 80)))
    real = ET.parse(fixtures_dir / "epu_real" / "GridSquare_20240406_102420.xml").getroot()
    assert _tag_paths(ours) <= _tag_paths(real)


def test_written_atlas_dm_round_trips(tmp_path: Path) -> None:
    tiles = [
        EpuTile(
            str(10 + k), f"Tile_{10 + k}_0_9", (k * 90.0, 5.5, 100.0, 80.0), (k * 1.5, -k * 2.25)
        )
        for k in range(3)
    ]
    square = {
        "id": 77,
        "row_px": 40.0,
        "col_px": 50.0,
        "size_px": 30.0,
        "x_um": 1.0,
        "y_um": 2.0,
        "quality": 3,
    }
    path = tmp_path / "Atlas.dm"
    path.write_text(
        atlas_dm_xml(
            tiles, 9, squares_by_tile=[[], [square], []], downsample=2.0, pixel_size_um=0.5
        )
    )
    meta = parse_atlas_dm(path)
    assert meta.tiles == tuple(tiles)
    assert meta.image_base == "Atlas_9"
    (sq,) = meta.squares
    assert sq.square_id == "77"
    assert sq.center_xy == pytest.approx(((50 + 0.5) / 2, (40 + 0.5) / 2))
    assert sq.size_wh == pytest.approx((15.0, 15.0))
    assert sq.physical_xy_um == pytest.approx((1.0, 2.0))
    assert sq.quality == "3"


# ----------------------------------------------------------------------------- bad metadata


def _expect(path: Path, *words: str) -> None:
    with pytest.raises(InputError) as err:
        parse_atlas_dm(path)
    msg = str(err.value)
    assert path.name in msg and "\n" not in msg
    for word in words:
        assert word in msg


def test_billion_laughs_refused(tmp_path: Path) -> None:
    path = tmp_path / "Atlas.dm"
    path.write_text(
        '<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
        '<!ENTITY lol2 "&lol;&lol;&lol;&lol;">]><AtlasSessionXml>&lol2;</AtlasSessionXml>'
    )
    _expect(path, "DOCTYPE")


def test_utf16_xml_refused(tmp_path: Path) -> None:
    path = tmp_path / "Atlas.dm"
    path.write_bytes("<AtlasSessionXml/>".encode("utf-16"))
    with pytest.raises(InputError):
        parse_xml_bytes(path, path.read_bytes())


def test_malformed_xml(tmp_path: Path, real_dm: Path) -> None:
    path = tmp_path / "Atlas.dm"
    path.write_bytes(real_dm.read_bytes()[:5000])
    _expect(path, "malformed XML")


def test_wrong_root(tmp_path: Path) -> None:
    path = tmp_path / "Atlas.dm"
    path.write_text("<Something/>")
    _expect(path, "not an EPU Atlas.dm")


def test_missing_tile_position(tmp_path: Path, real_dm: Path) -> None:
    text = real_dm.read_text()
    start = text.index("<AtlasPixelPosition")
    end = text.index("</AtlasPixelPosition>") + len("</AtlasPixelPosition>")
    path = tmp_path / "Atlas.dm"
    path.write_text(text[:start] + text[end:])
    _expect(path, "missing AtlasPixelPosition")


def test_bad_number(tmp_path: Path, real_dm: Path) -> None:
    path = tmp_path / "Atlas.dm"
    path.write_text(
        real_dm.read_text().replace("<a:width>833</a:width>", "<a:width>wide</a:width>", 1)
    )
    _expect(path, "width is not a number")


def test_path_traversal_in_tile_name_refused(tmp_path: Path, real_dm: Path) -> None:
    path = tmp_path / "Atlas.dm"
    path.write_text(real_dm.read_text().replace("Tile_4590157_0_4590151", "../../etc/passwd", 1))
    _expect(path, "bad file name")


def test_fixture_copy_is_unmodified(fixtures_dir: Path, tmp_path: Path) -> None:
    # Copies of the fixture parse the same as the original (no hidden path dependence).
    shutil.copy(fixtures_dir / "epu_real" / "Atlas.dm", tmp_path / "Atlas.dm")
    assert (
        parse_atlas_dm(tmp_path / "Atlas.dm").squares
        == parse_atlas_dm(fixtures_dir / "epu_real" / "Atlas.dm").squares
    )
