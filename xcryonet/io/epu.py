"""Thermo Fisher EPU atlas metadata: read and write ``Atlas.dm`` and the per-tile
``MicroscopeImage`` XML, in the schema (element names and namespaces) of real EPU files.

Conventions. ``Atlas.dm`` positions are in continuous atlas-image coordinates: a pixel's left edge
is at its integer column and its centre half a pixel further. Our pixel indices sit at pixel
centres, so a continuous coordinate ``a`` in an atlas scaled by ``s`` (native px per atlas px) is
the pixel index ``a * s - 0.5``. A tile's centre, in indices, is ``origin + (shape - 1) / 2``.
Stage positions are stored in metres and returned in µm.
"""

from __future__ import annotations

import uuid
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import numpy as np

from xcryonet.errors import InputError
from xcryonet.io.atomic import atomic_dir, atomic_write_text
from xcryonet.io.mrc import write_mrc
from xcryonet.io.stitch import stitch_tiles

_XSI_NIL = "{http://www.w3.org/2001/XMLSchema-instance}nil"
# Coordinates beyond this (atlas px) cannot come from a real atlas: a corrupt file.
_MAX_COORD = 1e7
# Largest plausible pixel size (µm) in any tile metadata.
_MAX_PIXEL_UM = 1e3


@dataclass(frozen=True)
class EpuTile:
    """One ``TileXml`` entry of ``Atlas.dm``.

    Attributes:
        tile_id: EPU's id of the tile.
        base_name: ``TileImageReference/BaseFileName``; the tile files are
            ``<base_name>.mrc`` and ``<base_name>.xml``.
        atlas_xywh: ``AtlasPixelPosition`` (x, y, width, height) in atlas px (continuous).
        stage_xy_um: ``StagePosition`` (X, Y) in µm, or None when absent.
    """

    tile_id: str
    base_name: str
    atlas_xywh: tuple[float, float, float, float]
    stage_xy_um: tuple[float, float] | None


@dataclass(frozen=True)
class EpuSquare:
    """One grid square EPU found (a ``TileXml/Nodes`` entry).

    Attributes:
        square_id: the node key.
        center_xy: ``PositionOnTheAtlas/Center`` (x, y) in atlas px (continuous).
        size_wh: ``PositionOnTheAtlas/Size`` (width, height) in atlas px.
        physical_xy_um: centre of ``PositionOnTheAtlas/Physical`` (x + width/2, y + height/2), µm.
        aligned_xy_um: ``AlignedStagePosition`` (X, Y) in µm (re-aligned frame), or None.
        quality: ``PositionOnTheAtlas/Quality`` text, or None.
    """

    square_id: str
    center_xy: tuple[float, float]
    size_wh: tuple[float, float]
    physical_xy_um: tuple[float, float]
    aligned_xy_um: tuple[float, float] | None
    quality: str | None


@dataclass(frozen=True)
class EpuAtlasMeta:
    """Everything read from one ``Atlas.dm``.

    Attributes:
        path: the ``Atlas.dm`` file.
        atlas_id: the atlas' ``Id``, or None.
        image_base: ``AtlasImageReference/BaseFileName`` of the stitched atlas MRC, or None.
        tiles: the tiles, in file order.
        squares: the squares, in file order, each once.
    """

    path: Path
    atlas_id: str | None
    image_base: str | None
    tiles: tuple[EpuTile, ...]
    squares: tuple[EpuSquare, ...]


@dataclass(frozen=True)
class MicroscopeImageMeta:
    """What we use from an EPU ``MicroscopeImage`` XML.

    Attributes:
        pixel_size_um: ``SpatialScale/pixelSize/x/numericValue`` in µm.
        stage_xy_um: ``microscopeData/stage/Position`` (X, Y) in µm, or None.
    """

    pixel_size_um: float
    stage_xy_um: tuple[float, float] | None


# ----------------------------------------------------------------------------- XML helpers


def parse_xml_bytes(path: Path, data: bytes) -> ET.Element:
    """Parse untrusted XML, refusing what could make the parser misbehave.

    DTDs and entity declarations (billion-laughs, external entities) are refused outright; EPU
    never writes them. Only UTF-8 without NUL bytes is accepted, so a DTD cannot hide in another
    encoding.
    """
    if b"\x00" in data:
        raise InputError(path, "not an XML text file (contains NUL bytes)")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(path, f"not UTF-8 XML (bad byte at offset {exc.start})") from None
    if b"<!DOCTYPE" in data or b"<!ENTITY" in data:
        raise InputError(path, "XML with DOCTYPE or ENTITY declarations is refused")
    try:
        return ET.fromstring(data)
    except ET.ParseError as exc:
        raise InputError(path, f"malformed XML ({exc})") from None
    except (ValueError, LookupError) as exc:  # e.g. an unknown encoding in the declaration
        raise InputError(path, f"malformed XML ({exc})") from None


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InputError(path, f"cannot read file ({exc.strerror or exc})") from None


def _local(tag: Any) -> str:
    return tag.rsplit("}", 1)[-1] if isinstance(tag, str) else ""


def _is_nil(elem: ET.Element) -> bool:
    return elem.get(_XSI_NIL) == "true"


def _child(elem: ET.Element | None, *names: str) -> ET.Element | None:
    """First descendant along ``names`` (local names, namespaces ignored), or None."""
    for name in names:
        if elem is None:
            return None
        elem = next((c for c in elem if _local(c.tag) == name and not _is_nil(c)), None)
    return elem


def _children(elem: ET.Element | None, name: str) -> list[ET.Element]:
    if elem is None:
        return []
    return [c for c in elem if _local(c.tag) == name and not _is_nil(c)]


def _text(elem: ET.Element | None) -> str | None:
    if elem is None or elem.text is None:
        return None
    text = elem.text.strip()
    return text or None


def _num(path: Path, elem: ET.Element | None, name: str, where: str) -> float:
    """Required finite number in child ``name`` of ``elem``."""
    text = _text(_child(elem, name))
    if text is None:
        raise InputError(path, f"{where}: missing {name}")
    try:
        value = float(text)
    except ValueError:
        raise InputError(path, f"{where}: {name} is not a number ({text[:40]!r})") from None
    if not np.isfinite(value):
        raise InputError(path, f"{where}: {name} is not finite ({text[:40]!r})")
    return value


def _opt_xy_m(path: Path, elem: ET.Element | None, where: str) -> tuple[float, float] | None:
    """(X, Y) in metres from a stage-position element, returned in µm; None when absent."""
    if elem is None:
        return None
    x = _num(path, elem, "X", where) * 1e6
    y = _num(path, elem, "Y", where) * 1e6
    if abs(x) > 1e6 or abs(y) > 1e6:
        raise InputError(path, f"{where}: stage position ({x:g}, {y:g}) µm is absurd")
    return (x, y)


def _check_coord(path: Path, value: float, where: str) -> float:
    if abs(value) > _MAX_COORD:
        raise InputError(path, f"{where}: coordinate {value:g} px is absurd")
    return value


def _check_file_name(path: Path, name: str, where: str) -> str:
    # The name becomes a file beside Atlas.dm: never a path that leaves the folder.
    bad_char = any(ord(ch) < 32 or ord(ch) == 127 for ch in name)
    if bad_char or "/" in name or "\\" in name or name in (".", "..") or len(name) > 255:
        raise InputError(path, f"{where}: bad file name {name[:60]!r}")
    return name


# ----------------------------------------------------------------------------- readers


def parse_atlas_dm(path: str | Path) -> EpuAtlasMeta:
    """Parse an EPU ``Atlas.dm`` (AtlasSessionXml): tiles, squares and the atlas image name.

    Raises:
        InputError: unreadable or malformed file, or missing/invalid required elements.
    """
    path = Path(path)
    root = parse_xml_bytes(path, _read_bytes(path))
    if _local(root.tag) != "AtlasSessionXml":
        raise InputError(path, f"not an EPU Atlas.dm (root element is {_local(root.tag)!r})")
    atlas = _child(root, "Atlas")
    if atlas is None:
        raise InputError(path, "Atlas.dm has no Atlas element")
    atlas_id = _text(_child(atlas, "Id"))
    image_base = _text(_child(atlas, "AtlasImageReference", "BaseFileName"))
    if image_base is not None:
        image_base = _check_file_name(path, image_base, "AtlasImageReference")
    items = _child(atlas, "TilesEfficient", "_items")
    if items is None:
        raise InputError(path, "Atlas.dm has no TilesEfficient/_items tile list")
    tiles: list[EpuTile] = []
    squares: list[EpuSquare] = []
    seen_names: set[str] = set()
    seen_squares: set[str] = set()
    for k, tile_el in enumerate(_children(items, "TileXml")):
        if len(tile_el) == 0:
            continue
        tile_id = _text(_child(tile_el, "Id")) or str(k)
        where = f"tile {tile_id}"
        app = _child(tile_el, "AtlasPixelPosition")
        if app is None:
            raise InputError(path, f"{where}: missing AtlasPixelPosition")
        x, y = (_check_coord(path, _num(path, app, n, where), where) for n in ("x", "y"))
        w, h = (_check_coord(path, _num(path, app, n, where), where) for n in ("width", "height"))
        if w <= 0 or h <= 0:
            raise InputError(
                path, f"{where}: AtlasPixelPosition size {w:g} x {h:g} is not positive"
            )
        base = _text(_child(tile_el, "TileImageReference", "BaseFileName"))
        if base is None:
            raise InputError(path, f"{where}: missing TileImageReference/BaseFileName")
        base = _check_file_name(path, base, where)
        if base in seen_names:
            raise InputError(path, f"{where}: tile image {base} is listed twice")
        seen_names.add(base)
        stage = _opt_xy_m(path, _child(tile_el, "StagePosition"), f"{where} StagePosition")
        tiles.append(EpuTile(tile_id, base, (x, y, w, h), stage))
        pairs = _child(tile_el, "Nodes", "KeyValuePairs")
        for pair in [] if pairs is None else list(pairs):
            square = _parse_square(path, pair)
            if square is not None and square.square_id not in seen_squares:
                seen_squares.add(square.square_id)
                squares.append(square)
    if not tiles:
        raise InputError(path, "Atlas.dm lists no tiles")
    return EpuAtlasMeta(path, atlas_id, image_base, tuple(tiles), tuple(squares))


def _parse_square(path: Path, pair: ET.Element) -> EpuSquare | None:
    """One ``KeyValuePairOfintNodeXml...`` entry, or None for an empty (nil) slot."""
    key = _text(_child(pair, "key"))
    value = _child(pair, "value")
    if value is None or len(value) == 0:
        return None
    if key is None:
        raise InputError(path, "a square (Nodes entry) has no key")
    where = f"square {key[:40]}"
    pos = _child(value, "PositionOnTheAtlas")
    if pos is None:
        raise InputError(path, f"{where}: missing PositionOnTheAtlas")
    center = _child(pos, "Center")
    size = _child(pos, "Size")
    phys = _child(pos, "Physical")
    for name, el in (("Center", center), ("Size", size), ("Physical", phys)):
        if el is None:
            raise InputError(path, f"{where}: missing PositionOnTheAtlas/{name}")
    cx, cy = (_check_coord(path, _num(path, center, n, where), where) for n in ("x", "y"))
    sw, sh = (_check_coord(path, _num(path, size, n, where), where) for n in ("width", "height"))
    px, py, pw, ph = (_num(path, phys, n, where) * 1e6 for n in ("x", "y", "width", "height"))
    phys_xy = (px + pw / 2, py + ph / 2)
    if max(abs(phys_xy[0]), abs(phys_xy[1])) > 1e6:
        raise InputError(path, f"{where}: Physical position is absurd")
    aligned = _opt_xy_m(
        path, _child(value, "AlignedStagePosition"), f"{where} AlignedStagePosition"
    )
    quality = _text(_child(pos, "Quality"))
    return EpuSquare(key, (cx, cy), (sw, sh), phys_xy, aligned, quality)


def parse_microscope_image(path: str | Path) -> MicroscopeImageMeta:
    """Parse an EPU ``MicroscopeImage`` XML: pixel size and stage position.

    Raises:
        InputError: unreadable or malformed file, or a missing/invalid pixel size.
    """
    path = Path(path)
    root = parse_xml_bytes(path, _read_bytes(path))
    if _local(root.tag) != "MicroscopeImage":
        raise InputError(path, f"not an EPU MicroscopeImage XML (root is {_local(root.tag)!r})")
    size_el = _child(root, "SpatialScale", "pixelSize", "x")
    if size_el is None:
        raise InputError(path, "missing SpatialScale/pixelSize/x")
    pixel_um = _num(path, size_el, "numericValue", "SpatialScale/pixelSize/x") * 1e6
    if not 0 < pixel_um < _MAX_PIXEL_UM:
        raise InputError(path, f"pixel size {pixel_um:g} µm is not plausible")
    stage = _opt_xy_m(
        path, _child(root, "microscopeData", "stage", "Position"), "microscopeData/stage/Position"
    )
    return MicroscopeImageMeta(pixel_um, stage)


# ----------------------------------------------------------------------------- writers

_NS_ROOT = (
    "http://schemas.datacontract.org/2004/07/Applications.SciencesAppsShared.GridAtlas.Persistence"
)
_NS_TYPES = "http://schemas.datacontract.org/2004/07/Fei.Applications.Common.Types"
_NS_DRAWING = "http://schemas.datacontract.org/2004/07/System.Drawing"
_NS_SHARED = "http://schemas.datacontract.org/2004/07/Fei.SharedObjects"
_NS_ARRAYS = "http://schemas.microsoft.com/2003/10/Serialization/Arrays"
_NS_GENERIC = "http://schemas.datacontract.org/2004/07/System.Collections.Generic"
_NS_DATAMODEL = (
    "http://schemas.datacontract.org/2004/07/Applications.SciencesAppsShared.GridAtlas.Datamodel"
)
_NS_COMMON = "http://schemas.datacontract.org/2004/07/Fei.Common.Types"
_ASSEMBLY = (
    "Applications.SciencesAppsShared.GridAtlas.Persistence, Version=1.34.0.6930, "
    "Culture=neutral, PublicKeyToken=null"
)
_MSCORLIB = "mscorlib, Version=4.0.0.0, Culture=neutral, PublicKeyToken=b77a5c561934e089"
_NODES_TYPE = (
    f"System.Collections.Generic.Dictionary`2[[System.Int32, {_MSCORLIB}],"
    f"[Applications.SciencesAppsShared.GridAtlas.Persistence.NodeXml, {_ASSEMBLY}]]"
)
_PAIRS_TYPE = (
    f"System.Collections.Generic.KeyValuePair`2[[System.Int32, {_MSCORLIB}],"
    f"[Applications.SciencesAppsShared.GridAtlas.Persistence.NodeXml, {_ASSEMBLY}]][]"
)
_COMPARER_TYPE = (
    f"System.Collections.Generic.GenericEqualityComparer`1[[System.Int32, {_MSCORLIB}]]"
)
# A fixed date keeps written files identical for identical input.
_FIXED_DATE = "2024-01-01T00:00:00+00:00"


def _fmt(value: float) -> str:
    """Number text: an integer when the value is whole (as EPU writes pixel positions)."""
    value = float(value)
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


class _Ids:
    """Serial ``z:Id`` numbers, as .NET's DataContractSerializer writes them."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self) -> str:
        self.n += 1
        return f'z:Id="{self.n}"'


def _stage_xml(tag: str, prefix: str, xy_um: tuple[float, float]) -> str:
    x, y = (_fmt(v * 1e-6) for v in xy_um)
    p = prefix
    return (
        f'<{tag} xmlns:{p}="{_NS_SHARED}"><{p}:A>0</{p}:A><{p}:B>0</{p}:B>'
        f"<{p}:X>{x}</{p}:X><{p}:Y>{y}</{p}:Y><{p}:Z>0</{p}:Z></{tag}>"
    )


def _square_xml(ids: _Ids, sq: dict[str, Any], downsample: float, pixel_size_um: float) -> str:
    sid = int(sq["id"])
    cx = (float(sq["col_px"]) + 0.5) / downsample
    cy = (float(sq["row_px"]) + 0.5) / downsample
    size_atlas = float(sq["size_px"]) / downsample
    size_m = float(sq["size_px"]) * pixel_size_um * 1e-6
    x_m, y_m = float(sq["x_um"]) * 1e-6, float(sq["y_um"]) * 1e-6
    quality = escape(str(sq.get("quality", 0)))
    xy = (float(sq["x_um"]), float(sq["y_um"]))
    return (
        f'<KeyValuePairOfintNodeXml30oatNZW xmlns="{_NS_GENERIC}"><key>{sid}</key>'
        f'<value {ids()} xmlns:b="{_NS_ROOT}"><Id xmlns="{_NS_TYPES}">{sid}</Id>'
        + _stage_xml("b:AlignedStagePosition", "c", xy)
        + "<b:Category>1</b:Category>"
        f'<b:PositionOnTheAtlas xmlns:c="{_NS_DATAMODEL}">'
        f'<c:Center xmlns:d="{_NS_DRAWING}"><d:x>{_fmt(cx)}</d:x><d:y>{_fmt(cy)}</d:y></c:Center>'
        f'<c:Physical xmlns:d="{_NS_DRAWING}"><d:height>{_fmt(size_m)}</d:height>'
        f"<d:width>{_fmt(size_m)}</d:width><d:x>{_fmt(x_m - size_m / 2)}</d:x>"
        f"<d:y>{_fmt(y_m - size_m / 2)}</d:y></c:Physical>"
        f"<c:Quality>{quality}</c:Quality><c:Rotation>0</c:Rotation><c:Shear>0</c:Shear>"
        f'<c:Size xmlns:d="{_NS_DRAWING}"><d:height>{_fmt(size_atlas)}</d:height>'
        f"<d:width>{_fmt(size_atlas)}</d:width></c:Size></b:PositionOnTheAtlas>"
        + _stage_xml("b:StagePosition", "c", xy)
        + "</value></KeyValuePairOfintNodeXml30oatNZW>"
    )


def atlas_dm_xml(
    tiles: Sequence[EpuTile],
    atlas_id: int,
    *,
    squares_by_tile: Sequence[Sequence[dict[str, Any]]] | None = None,
    downsample: float = 1.0,
    pixel_size_um: float = 1.0,
) -> str:
    """Text of an ``Atlas.dm`` (AtlasSessionXml) for these tiles and squares.

    Args:
        tiles: tile entries (positions in atlas px, stage in µm).
        atlas_id: the atlas id; the stitched image is named ``Atlas_<atlas_id>``.
        squares_by_tile: for each tile, the square dicts (native px, see ``write_epu_atlas``)
            stored in that tile's ``Nodes``.
        downsample: native px per atlas px, to convert the squares' native px.
        pixel_size_um: native µm per px, for the squares' ``Physical`` size.
    """
    ids = _Ids()
    out = [
        f'<AtlasSessionXml {ids()} z:Type="Applications.SciencesAppsShared.GridAtlas.Persistence.'
        f'AtlasSessionXml" z:Assembly="{_ASSEMBLY}" xmlns="{_NS_ROOT}" '
        'xmlns:i="http://www.w3.org/2001/XMLSchema-instance" '
        'xmlns:z="http://schemas.microsoft.com/2003/10/Serialization/">'
        f'<Id xmlns="{_NS_TYPES}">{atlas_id - 1}</Id><Atlas {ids()}>'
        f'<Id xmlns="{_NS_TYPES}">{atlas_id}</Id>'
        "<AcquiredWithImageBeamShift>false</AcquiredWithImageBeamShift>"
        f"<AcquisitionDateTime>{_FIXED_DATE}</AcquisitionDateTime>"
        f'<AtlasImageReference {ids()} xmlns:a="{_NS_TYPES}">'
        f"<a:BaseFileName {ids()}>Atlas_{atlas_id}</a:BaseFileName>"
        "<a:FileFormat>Mrc</a:FileFormat></AtlasImageReference>"
        "<IsStem>false</IsStem>"
        f'<TilesEfficient {ids()}><_items {ids()} z:Size="{max(4, len(tiles))}">'
    ]
    for k, tile in enumerate(tiles):
        x, y, w, h = tile.atlas_xywh
        out.append(
            f'<TileXml {ids()}><Id xmlns="{_NS_TYPES}">{escape(tile.tile_id)}</Id>'
            f'<AtlasPixelPosition xmlns:a="{_NS_DRAWING}"><a:height>{_fmt(h)}</a:height>'
            f"<a:width>{_fmt(w)}</a:width><a:x>{_fmt(x)}</a:x><a:y>{_fmt(y)}</a:y>"
            "</AtlasPixelPosition>"
        )
        squares = list(squares_by_tile[k]) if squares_by_tile is not None else []
        out.append(
            f'<Nodes {ids()} z:Type="{_NODES_TYPE}" z:Assembly="0" xmlns:a="{_NS_ARRAYS}">'
            f'<Version {ids()} z:Type="System.Int32" z:Assembly="0" xmlns="">{len(squares)}'
            f'</Version><Comparer {ids()} z:Type="{_COMPARER_TYPE}" z:Assembly="0" xmlns=""/>'
            f'<HashSize {ids()} z:Type="System.Int32" z:Assembly="0" xmlns="">17</HashSize>'
            f'<KeyValuePairs {ids()} z:Type="{_PAIRS_TYPE}" z:Assembly="0" '
            f'z:Size="{len(squares)}" xmlns="">'
        )
        out.extend(_square_xml(ids, sq, downsample, pixel_size_um) for sq in squares)
        out.append("</KeyValuePairs></Nodes>")
        if tile.stage_xy_um is not None:
            out.append(_stage_xml("StagePosition", "a", tile.stage_xy_um))
        out.append(
            f'<TileImageReference {ids()} xmlns:a="{_NS_TYPES}">'
            f"<a:BaseFileName {ids()}>{escape(tile.base_name)}</a:BaseFileName>"
            "<a:FileFormat>Mrc</a:FileFormat></TileImageReference></TileXml>"
        )
    out.extend('<TileXml i:nil="true"/>' for _ in range(max(4, len(tiles)) - len(tiles)))
    out.append(
        f"</_items><_size>{len(tiles)}</_size><_version>{len(tiles)}</_version></TilesEfficient>"
        f"</Atlas><Description {ids()}>Atlas written by xcryonet</Description>"
        f"<ImageFileFormat>Mrc</ImageFileFormat><Name {ids()}>Atlas</Name>"
        f"<StartDateTime>{_FIXED_DATE}</StartDateTime></AtlasSessionXml>"
    )
    return "".join(out)


def microscope_image_xml(
    name: str, pixel_size_um: float, stage_xy_um: tuple[float, float], shape: tuple[int, int]
) -> str:
    """Text of an EPU ``MicroscopeImage`` XML for one image of ``shape`` (rows, cols)."""
    uid = uuid.uuid5(uuid.NAMESPACE_URL, f"xcryonet:{name}")
    px = _fmt(pixel_size_um * 1e-6)
    x, y = (_fmt(v * 1e-6) for v in stage_xy_um)
    unit = (
        f'<unit xmlns:a="{_NS_COMMON}"><a:_x003C_PrefixExponent_x003E_k__BackingField>1'
        "</a:_x003C_PrefixExponent_x003E_k__BackingField><a:_x003C_Symbol_x003E_k__BackingField>m"
        "</a:_x003C_Symbol_x003E_k__BackingField></unit>"
    )
    return (
        f'<MicroscopeImage xmlns="{_NS_SHARED}" '
        'xmlns:i="http://www.w3.org/2001/XMLSchema-instance">'
        f"<name>{escape(name)}</name><uniqueID>{uid}</uniqueID>"
        "<SpatialScale><offset>"
        f"<x><numericValue>0</numericValue>{unit}</x><y><numericValue>0</numericValue>{unit}</y>"
        "</offset><pixelSize>"
        f"<x><numericValue>{px}</numericValue>{unit}</x>"
        f"<y><numericValue>{px}</numericValue>{unit}</y>"
        "</pixelSize></SpatialScale>"
        "<microscopeData><acquisition>"
        f"<acquisitionDateTime>{_FIXED_DATE}</acquisitionDateTime><camera>"
        f'<Binning xmlns:a="{_NS_DRAWING}"><a:x>1</a:x><a:y>1</a:y></Binning>'
        f'<ReadoutArea xmlns:a="{_NS_DRAWING}"><a:height>{shape[0]}</a:height>'
        f"<a:width>{shape[1]}</a:width><a:x>0</a:x><a:y>0</a:y></ReadoutArea>"
        "</camera></acquisition><core><ApplicationSoftware>EPU</ApplicationSoftware></core>"
        "<optics><TemMagnification><NominalMagnification>135</NominalMagnification>"
        "</TemMagnification></optics>"
        f"<stage><Position><A>0</A><B>0</B><X>{x}</X><Y>{y}</Y><Z>0</Z></Position></stage>"
        "</microscopeData></MicroscopeImage>"
    )


def downsample_mean(image: np.ndarray, factor: int) -> np.ndarray:
    """Block-mean downsampling (rows, cols) -> (ceil(rows/f), ceil(cols/f)) float32.

    Partial blocks at the bottom/right edges average only the pixels they contain.
    """
    rows, cols = image.shape
    if factor == 1:
        return np.asarray(image, dtype=np.float32).copy()
    out_r, out_c = -(-rows // factor), -(-cols // factor)
    out = np.empty((out_r, out_c), dtype=np.float32)
    col_idx = np.arange(0, cols, factor)
    col_counts = np.diff(np.append(col_idx, cols)).astype(np.float32)
    for i in range(out_r):
        block = np.asarray(image[i * factor : (i + 1) * factor], dtype=np.float32)
        sums = np.add.reduceat(block.sum(axis=0), col_idx)
        out[i] = sums / (col_counts * block.shape[0])
    return out


def write_epu_atlas(
    atlas_dir: str | Path,
    tiles: Sequence[np.ndarray],
    tile_origins_rc: np.ndarray,
    tile_stage_xy_um: np.ndarray,
    pixel_size_um: float,
    atlas_id: int,
    *,
    downsample: int = 4,
    squares: Sequence[dict[str, Any]] | None = None,
    write_stitched: bool = True,
    write_tiles: bool = True,
) -> Path:
    """Write an EPU atlas folder: ``Atlas.dm``, tile MRCs with their XML, the stitched atlas MRC.

    The folder is written whole, atomically: it replaces ``atlas_dir`` only once complete.

    Args:
        atlas_dir: the folder to write (EPU's ``Atlas`` folder).
        tiles: N tile images (rows, cols); int16/uint16/uint8/float32 keep their MRC mode.
        tile_origins_rc: (N, 2) top-left (row, col) of each tile in the native-resolution frame,
            px. Stored in ``AtlasPixelPosition`` as atlas px (native / ``downsample``); whole
            numbers are written as integers like EPU does, so choose origins that are multiples
            of ``downsample`` for EPU-like files.
        tile_stage_xy_um: (N, 2) stage (x, y) of each tile's centre (pixel index
            ``origin + (shape - 1) / 2``), µm, as the microscope reported it.
        pixel_size_um: native µm per px of the tiles.
        atlas_id: EPU atlas id; tiles are named ``Tile_<atlas_id + 1 + k>_0_<atlas_id>``.
        downsample: native px per atlas px (for ``AtlasPixelPosition`` and the stitched MRC).
        squares: squares to list as EPU's own, dicts with ``id`` (int), ``row_px``, ``col_px``,
            ``size_px`` (native px, centre indices), ``x_um``, ``y_um`` and ``quality``.
        write_stitched: also write ``Atlas_<atlas_id>.mrc``, the tiles stitched at their
            metadata positions and block-averaged by ``downsample``.
        write_tiles: write the tile MRC and XML files (else ``Atlas.dm`` names absent tiles).

    Returns:
        ``atlas_dir``.
    """
    atlas_dir = Path(atlas_dir)
    n = len(tiles)
    origins = np.asarray(tile_origins_rc, dtype=np.float64).reshape(n, 2)
    stage = np.asarray(tile_stage_xy_um, dtype=np.float64).reshape(n, 2)
    if downsample < 1:
        raise ValueError("downsample must be >= 1")
    entries = []
    for k, tile in enumerate(tiles):
        tile_id = atlas_id + 1 + k
        h, w = tile.shape
        entries.append(
            EpuTile(
                str(tile_id),
                f"Tile_{tile_id}_0_{atlas_id}",
                (
                    origins[k, 1] / downsample,
                    origins[k, 0] / downsample,
                    w / downsample,
                    h / downsample,
                ),
                (float(stage[k, 0]), float(stage[k, 1])),
            )
        )
    # Each square goes into the Nodes of the tile whose centre is nearest, as EPU does.
    by_tile: list[list[dict[str, Any]]] = [[] for _ in range(n)]
    if squares and n:
        centres = origins + (np.array([t.shape for t in tiles], float) - 1) / 2
        for sq in squares:
            d = np.hypot(centres[:, 0] - float(sq["row_px"]), centres[:, 1] - float(sq["col_px"]))
            by_tile[int(np.argmin(d))].append(sq)
    text = atlas_dm_xml(
        entries,
        atlas_id,
        squares_by_tile=by_tile,
        downsample=downsample,
        pixel_size_um=pixel_size_um,
    )
    with atomic_dir(atlas_dir) as tmp:
        atomic_write_text(tmp / "Atlas.dm", text)
        if write_tiles:
            for entry, tile in zip(entries, tiles, strict=True):
                write_mrc(tmp / f"{entry.base_name}.mrc", tile, pixel_size_um)
                stage_xy = entry.stage_xy_um or (0.0, 0.0)
                xml = microscope_image_xml(entry.base_name, pixel_size_um, stage_xy, tile.shape)
                atomic_write_text(tmp / f"{entry.base_name}.xml", xml)
        if write_stitched and n:
            image, _ = stitch_tiles(tiles, origins, refine=False)
            small = downsample_mean(image, downsample)
            del image
            write_mrc(tmp / f"Atlas_{atlas_id}.mrc", small, pixel_size_um * downsample)
    return atlas_dir
