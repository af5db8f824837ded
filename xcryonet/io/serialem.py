"""SerialEM montages: the ``.mdoc`` autodoc beside an MRC stack of pieces.

The ``.mdoc`` gives the global ``PixelSpacing`` (Å) and, per ``[ZValue = n]`` section, the
piece's ``PieceCoordinates`` (x y z: column, row, section of its top-left pixel in the montage,
px), optionally ``AlignedPieceCoords`` (same, after SerialEM/IMOD aligned the pieces) and its
``StagePosition`` (x y, µm, of the piece centre). ``[MontSection = n]`` blocks describe the montage
as a whole and are skipped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xcryonet.errors import InputError
from xcryonet.io.atomic import atomic_path
from xcryonet.io.mrc import write_mrc
from xcryonet.io.text import read_text_file

# Largest .mdoc we read: real ones are kilobytes to a few MB.
_MAX_MDOC_BYTES = 64 << 20
_MAX_COORD = 1e7


@dataclass(frozen=True)
class MdocPiece:
    """One ``[ZValue = n]`` section.

    Attributes:
        z: the section index in the stack.
        piece_xy: ``PieceCoordinates`` (x, y) = (col, row) px, or None.
        aligned_xy: ``AlignedPieceCoords`` (x, y) = (col, row) px, or None.
        stage_xy_um: ``StagePosition`` (x, y) µm, or None.
    """

    z: int
    piece_xy: tuple[float, float] | None
    aligned_xy: tuple[float, float] | None
    stage_xy_um: tuple[float, float] | None


@dataclass(frozen=True)
class MdocMontage:
    """A parsed ``.mdoc``.

    Attributes:
        path: the ``.mdoc`` file.
        pixel_size_um: global ``PixelSpacing`` in µm, or None when absent.
        pieces: the ``[ZValue]`` sections, sorted by z.
    """

    path: Path
    pixel_size_um: float | None
    pieces: tuple[MdocPiece, ...]


def _numbers(path: Path, where: str, key: str, text: str, count: int) -> list[float]:
    parts = text.split()
    if len(parts) < count:
        raise InputError(path, f"{where}: {key} needs {count} numbers, got {text[:60]!r}")
    try:
        values = [float(p) for p in parts[:count]]
    except ValueError:
        raise InputError(path, f"{where}: {key} is not numeric ({text[:60]!r})") from None
    if not all(np.isfinite(v) and abs(v) <= _MAX_COORD for v in values):
        raise InputError(path, f"{where}: {key} has absurd values ({text[:60]!r})")
    return values


def parse_mdoc(path: str | Path) -> MdocMontage:
    """Parse a SerialEM ``.mdoc``.

    Lines that are not ``key = value`` or ``[section]`` headers are ignored, as SerialEM does.

    Raises:
        InputError: unreadable file, no ``[ZValue]`` sections, duplicate or bad z values, or
            malformed numbers in the keys we use.
    """
    path = Path(path)
    text = read_text_file(path, _MAX_MDOC_BYTES, ".mdoc")
    global_keys: dict[str, str] = {}
    sections: list[tuple[str, dict[str, str]]] = []
    current: dict[str, str] | None = global_keys
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("[") and line.endswith("]"):
            name, _, value = line[1:-1].partition("=")
            kind = name.strip()
            if kind == "ZValue":
                current = {"__z__": value.strip()}
                sections.append((kind, current))
            else:
                current = None  # [MontSection], [T = ...] titles and others: skipped
            continue
        key, eq, value = line.partition("=")
        if eq and current is not None:
            current.setdefault(key.strip(), value.strip())

    pixel_size_um = None
    if "PixelSpacing" in global_keys:
        angstrom = _numbers(path, "header", "PixelSpacing", global_keys["PixelSpacing"], 1)[0]
        if not 0 < angstrom < 1e7:
            raise InputError(path, f"PixelSpacing {angstrom:g} Å is not plausible")
        pixel_size_um = angstrom * 1e-4
    pieces: list[MdocPiece] = []
    seen: set[int] = set()
    for _, keys in sections:
        z_text = keys["__z__"]
        try:
            z = int(z_text)
        except ValueError:
            raise InputError(path, f"bad section header [ZValue = {z_text[:20]}]") from None
        if z < 0 or z in seen:
            raise InputError(path, f"[ZValue = {z}] is negative or repeated")
        seen.add(z)
        where = f"[ZValue = {z}]"

        def xy(
            key: str, keys: dict[str, str] = keys, where: str = where
        ) -> tuple[float, float] | None:
            if key not in keys:
                return None
            x, y = _numbers(path, where, key, keys[key], 2)
            return (x, y)

        pieces.append(
            MdocPiece(z, xy("PieceCoordinates"), xy("AlignedPieceCoords"), xy("StagePosition"))
        )
    if not pieces:
        raise InputError(path, "no [ZValue = n] sections: not a SerialEM montage .mdoc")
    pieces.sort(key=lambda p: p.z)
    return MdocMontage(path, pixel_size_um, tuple(pieces))


def mdoc_text(
    image_name: str,
    shape: tuple[int, int],
    piece_origins_rc: np.ndarray,
    piece_stage_xy_um: np.ndarray,
    pixel_size_um: float,
    aligned_origins_rc: np.ndarray | None = None,
) -> str:
    """Text of a SerialEM montage ``.mdoc`` (see ``write_serialem_montage``)."""
    angstrom = f"{pixel_size_um * 1e4:.6g}"
    lines = [
        f"PixelSpacing = {angstrom}",
        f"ImageFile = {image_name}",
        f"ImageSize = {shape[1]} {shape[0]}",
        "Montage = 1",
        "DataMode = 1",
        "",
        "[T = SerialEM: Written by xcryonet]",
        "",
    ]
    for z, (origin, stage) in enumerate(zip(piece_origins_rc, piece_stage_xy_um, strict=True)):
        lines += [
            f"[ZValue = {z}]",
            f"PieceCoordinates = {int(round(origin[1]))} {int(round(origin[0]))} 0",
            "TiltAngle = 0",
            f"StagePosition = {float(stage[0]):.4f} {float(stage[1]):.4f}",
            "StageZ = 0",
            "Magnification = 135",
            f"PixelSpacing = {angstrom}",
            "Binning = 1",
            "DateTime = 01-Jan-24  00:00:00",
        ]
        if aligned_origins_rc is not None:
            a = aligned_origins_rc[z]
            lines.append(f"AlignedPieceCoords = {int(round(a[1]))} {int(round(a[0]))} 0")
        lines.append("")
    stage = np.asarray(piece_stage_xy_um, float)
    centre = stage.mean(axis=0) if len(stage) else np.zeros(2)
    lines += [
        "[MontSection = 0]",
        "TiltAngle = 0",
        f"StagePosition = {centre[0]:.4f} {centre[1]:.4f}",
        "StageZ = 0",
        "Magnification = 135",
        f"PixelSpacing = {angstrom}",
        "",
    ]
    return "\n".join(lines)


def write_serialem_montage(
    mrc_path: str | Path,
    pieces: Sequence[np.ndarray],
    piece_origins_rc: np.ndarray,
    piece_stage_xy_um: np.ndarray,
    pixel_size_um: float,
    *,
    aligned_origins_rc: np.ndarray | None = None,
) -> Path:
    """Write a SerialEM montage: the MRC stack of pieces and ``<mrc_path>.mdoc`` beside it.

    Both files appear together or not at all.

    Args:
        mrc_path: the stack to write; the ``.mdoc`` is ``mrc_path`` + ``".mdoc"``.
        pieces: N pieces, all the same (rows, cols) shape and dtype.
        piece_origins_rc: (N, 2) top-left (row, col) of each piece in the montage, px (written
            rounded, as ``PieceCoordinates = col row 0``).
        piece_stage_xy_um: (N, 2) stage (x, y) of each piece centre (pixel index
            ``origin + (shape - 1) / 2``), µm.
        pixel_size_um: µm per px (written as ``PixelSpacing`` in Å).
        aligned_origins_rc: optional (N, 2) aligned origins, written as ``AlignedPieceCoords``.

    Returns:
        ``mrc_path``.
    """
    mrc_path = Path(mrc_path)
    n = len(pieces)
    if n == 0:
        raise ValueError("a montage needs at least one piece")
    shapes = {p.shape for p in pieces}
    if len(shapes) != 1 or len(pieces[0].shape) != 2:
        raise ValueError(f"all pieces must be 2D with one shape, got {sorted(shapes)}")
    origins = np.asarray(piece_origins_rc, float).reshape(n, 2)
    stage = np.asarray(piece_stage_xy_um, float).reshape(n, 2)
    aligned = None
    if aligned_origins_rc is not None:
        aligned = np.asarray(aligned_origins_rc, float).reshape(n, 2)
    text = mdoc_text(mrc_path.name, pieces[0].shape, origins, stage, pixel_size_um, aligned)
    mdoc_path = mrc_path.with_name(mrc_path.name + ".mdoc")
    stack = np.stack([np.asarray(p) for p in pieces])
    # The mdoc's temporary file is renamed first, the stack's last: on any failure before
    # that, both temporary files are removed and nothing is left behind.
    with atomic_path(mrc_path) as tmp_mrc:
        write_mrc(tmp_mrc, stack, pixel_size_um)
        with atomic_path(mdoc_path) as tmp_mdoc:
            tmp_mdoc.write_text(text, encoding="utf-8")
    return mrc_path
