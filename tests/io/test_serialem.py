"""SerialEM .mdoc parsing, on a file laid out as SerialEM writes montage autodocs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from xcryonet.errors import InputError
from xcryonet.io import parse_mdoc, read_atlas, write_mrc
from xcryonet.io.serialem import mdoc_text

# The shape of a real SerialEM montage .mdoc (values made up): global keys, a title, per-piece
# [ZValue] sections with many keys we ignore, and a [MontSection] block to skip.
SERIALEM_MDOC = """PixelSpacing = 1012.5
ImageFile = LMM.mrc
ImageSize = 32 24
Montage = 1
DataMode = 1

[T = SerialEM: Digitized on Krios                       04-Apr-24  09:41:17    ]

[T =     Tilt axis angle = 84.9, binning = 4  spot = 9  camera = 0]

[ZValue = 0]
PieceCoordinates = 0 0 0
MinMaxMean = 12 4011 1734.1
TiltAngle = 0.00175447
StagePosition = -120.5 310.25
StageZ = 12.2
Magnification = 62
Intensity = 0.200391
ExposureDose = 0
PixelSpacing = 1012.5
SpotSize = 9
Defocus = 0
ImageShift = 0 0
RotationAngle = -95.1
ExposureTime = 1
Binning = 4
CameraIndex = 0
DividedBy2 = 0
MagIndex = 2
CountsPerElectron = 30.1
TargetDefocus = -2
DateTime = 04-Apr-24  09:41:20
AlignedPieceCoords = 1 -2 0
XedgeDxy = 0.5 1.2

[ZValue = 1]
PieceCoordinates = 26 0 0
StagePosition = -133.5 310.0
AlignedPieceCoords = 27 0 0

[ZValue = 2]
PieceCoordinates = 0 20 0
StagePosition = -120.25 320.5
AlignedPieceCoords = 0 20 0

[MontSection = 0]
TiltAngle = 0.00175447
StagePosition = -126 315
PieceCoordinates = 999 999 0
"""


def test_parse_serialem_layout(tmp_path: Path) -> None:
    path = tmp_path / "LMM.mrc.mdoc"
    path.write_text(SERIALEM_MDOC)
    mdoc = parse_mdoc(path)
    assert mdoc.pixel_size_um == pytest.approx(0.10125)
    assert [p.z for p in mdoc.pieces] == [0, 1, 2]
    assert mdoc.pieces[0].piece_xy == (0, 0)
    assert mdoc.pieces[0].aligned_xy == (1, -2)
    assert mdoc.pieces[1].stage_xy_um == (-133.5, 310.0)
    # Keys in [MontSection] never leak into a piece.
    assert all(p.piece_xy != (999, 999) for p in mdoc.pieces)


def test_read_montage_uses_aligned_coords(tmp_path: Path) -> None:
    path = tmp_path / "LMM.mrc.mdoc"
    path.write_text(SERIALEM_MDOC)
    rng = np.random.default_rng(0)
    write_mrc(tmp_path / "LMM.mrc", rng.integers(0, 4000, (3, 24, 32)).astype(np.int16), 0.1)
    atlas = read_atlas(tmp_path / "LMM.mrc", load_image=False)
    # Aligned coords (x, y) -> origins (row, col), shifted so that none is negative.
    origins = [t.origin_rc for t in atlas.tiles]
    assert origins == [(0.0, 1.0), (2.0, 27.0), (22.0, 0.0)]
    assert atlas.pixel_size_um == pytest.approx(0.10125)  # the .mdoc wins over the header
    assert "AlignedPieceCoords" in atlas.affine_source


def test_stem_mdoc_is_found(tmp_path: Path) -> None:
    (tmp_path / "LMM.mdoc").write_text(SERIALEM_MDOC)
    write_mrc(tmp_path / "LMM.mrc", np.arange(3 * 24 * 32, dtype=np.int16).reshape(3, 24, 32), 0.1)
    assert read_atlas(tmp_path, load_image=False).format == "serialem"


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (lambda t: t.replace("[ZValue = 0]", "[ZValue = zero]"), "ZValue = zero"),
        (lambda t: t.replace("[ZValue = 2]", "[ZValue = 1]"), "repeated"),
        (lambda t: t.replace("PixelSpacing = 1012.5\n", "PixelSpacing = -3\n", 1), "PixelSpacing"),
        (
            lambda t: t.replace("PieceCoordinates = 26 0 0", "PieceCoordinates = 26"),
            "PieceCoordinates",
        ),
        (
            lambda t: t.replace("StagePosition = -133.5 310.0", "StagePosition = 1e400 0"),
            "StagePosition",
        ),
        (lambda t: "PixelSpacing = 10\n", "no [ZValue"),
    ],
)
def test_bad_mdoc(tmp_path: Path, edit, words: str) -> None:
    path = tmp_path / "bad.mrc.mdoc"
    path.write_text(edit(SERIALEM_MDOC))
    with pytest.raises(InputError) as err:
        parse_mdoc(path)
    assert "bad.mrc.mdoc" in str(err.value) and words in str(err.value)


def test_written_mdoc_parses_back() -> None:
    origins = np.array([[0, 0], [0, 90], [80, 0]])
    stage = np.array([[1.25, -2.5], [3.0, 4.0], [5.5, 6.75]])
    text = mdoc_text("m.mrc", (100, 120), origins, stage, 0.25, aligned_origins_rc=origins + 1)
    assert "[MontSection = 0]" in text
    lines = text.splitlines()
    assert lines[0] == "PixelSpacing = 2500"
    assert "PieceCoordinates = 90 0 0" in lines  # x = col, y = row
    assert "AlignedPieceCoords = 91 1 0" in lines
