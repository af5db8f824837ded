"""``read_atlas``: one entry point for every atlas layout, detected from the path.

- EPU: a folder with ``Atlas/Atlas.dm`` or ``Atlas.dm``, or the ``Atlas.dm`` file.
- SerialEM montage: an ``.mrc`` with ``<name>.mrc.mdoc`` (or ``<stem>.mdoc``) beside it, the
  ``.mdoc`` itself, or a folder holding one such pair.
- Single stitched MRC: an ``.mrc`` alone, or a folder with exactly one ``.mrc``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from xcryonet.errors import InputError
from xcryonet.io.atlas import Atlas, SoftwareSquare, Tile, centred_affine, fit_stage_affine
from xcryonet.io.epu import EpuAtlasMeta, parse_atlas_dm, parse_microscope_image
from xcryonet.io.mrc import MrcHeader, read_mrc, read_mrc_header
from xcryonet.io.serialem import parse_mdoc
from xcryonet.io.stitch import estimate_flat_field, stitch_tiles

# A pair of tiles is re-aligned from its overlap only within this distance of the metadata: real
# stage errors are a few µm, and a larger "correction" is a false match.
MAX_STITCH_SHIFT_UM = 10.0
# A mosaic whose bounding box is this many times larger than its tiles' total area has corrupt
# placements (and would allocate a needlessly huge image).
_MAX_EXTENT_RATIO = 4.0
_MAX_PIXELS = 1 << 31
# Smallest image side (px) an atlas, tile or montage piece can have: thinner is a wrong file.
MIN_SIDE_PX = 8


def read_atlas(path: str | Path, *, load_image: bool = True, flat_field: bool = True) -> Atlas:
    """Read an atlas in any supported layout (see the module docstring).

    Args:
        path: the atlas file or folder.
        load_image: read and stitch the pixels; with False only metadata and MRC headers are
            read, and ``Atlas.image`` is None.
        flat_field: divide tiles (EPU tiles, SerialEM pieces) by their illumination profile,
            estimated from the tiles (``stitch.estimate_flat_field``), before blending; the
            result is noted in ``Atlas.affine_source``. A single MRC is used as it is.

    Returns:
        The ``Atlas``. Its image is at the tiles' native resolution (EPU tiles, SerialEM
        pieces) or the file's (single MRC, EPU ``Atlas_<id>.mrc`` when the tiles are absent).

    Raises:
        InputError: anything wrong with the input, one line naming the file.
    """
    path = Path(path)
    kind, target, mdoc = _detect(path)
    if kind == "epu":
        return _read_epu(target, load_image, flat_field)
    if kind == "serialem":
        assert mdoc is not None
        return _read_serialem(target, mdoc, load_image, flat_field)
    return _read_single(target, load_image)


def grid_id_for(path: str | Path) -> str:
    """The grid id of an atlas path: its folder name (skipping a folder named ``Atlas``), or the
    file stem of a single ``.mrc`` (``.mrc.mdoc`` counts as one suffix)."""
    path = Path(path)
    if path.is_dir():
        folder = path
    elif path.name.lower() == "atlas.dm" or path.suffix.lower() == ".dm":
        folder = path.parent
    else:
        name = path.name
        for suffix in (".mdoc", ".mrc"):
            if name.lower().endswith(suffix):
                name = name[: -len(suffix)]
        return name
    folder = folder.resolve()
    if folder.name == "Atlas" and folder.parent.name:
        return folder.parent.name
    return folder.name


def inspect_atlas(path: str | Path) -> dict[str, Any]:
    """JSON-able summary of an atlas's metadata (no pixels are read)."""
    atlas = read_atlas(path, load_image=False)
    return {
        "path": str(atlas.path),
        "grid_id": grid_id_for(path),
        "format": atlas.format,
        "n_tiles": len(atlas.tiles),
        "shape": [int(atlas.shape[0]), int(atlas.shape[1])],
        "pixel_size_um": float(atlas.pixel_size_um),
        "affine": [[float(v) for v in row] for row in atlas.affine],
        "affine_source": atlas.affine_source,
        "n_software_squares": len(atlas.software_squares),
    }


# ----------------------------------------------------------------------------- detection


def _mdoc_for(mrc: Path) -> Path | None:
    for cand in (mrc.with_name(mrc.name + ".mdoc"), mrc.with_suffix(".mdoc")):
        if cand.is_file():
            return cand
    return None


def _detect(path: Path) -> tuple[str, Path, Path | None]:
    """(kind, main file, mdoc) for a path; kind is ``epu``, ``serialem`` or ``mrc``."""
    if not path.exists():
        raise InputError(path, "no such file or directory")
    if path.is_dir():
        for dm in (path / "Atlas" / "Atlas.dm", path / "Atlas.dm"):
            if dm.is_file():
                return "epu", dm, None
        mrcs = sorted(p for p in path.iterdir() if p.suffix.lower() == ".mrc" and p.is_file())
        pairs = [(m, d) for m in mrcs if (d := _mdoc_for(m)) is not None]
        if len(pairs) == 1:
            return "serialem", pairs[0][0], pairs[0][1]
        if len(pairs) > 1:
            names = ", ".join(m.name for m, _ in pairs[:3])
            raise InputError(path, f"{len(pairs)} montages (.mrc + .mdoc) here ({names}...)")
        if len(mrcs) == 1:
            return "mrc", mrcs[0], None
        if mrcs:
            raise InputError(path, f"{len(mrcs)} .mrc files and no .mdoc: which is the atlas?")
        raise InputError(path, "no atlas here (no Atlas.dm, .mrc + .mdoc, or .mrc)")
    name = path.name.lower()
    if name.endswith(".dm"):
        return "epu", path, None
    if name.endswith(".mdoc"):
        stack = path.with_name(path.name[: -len(".mdoc")])
        if not stack.suffix.lower() == ".mrc":
            stack = path.with_suffix(".mrc")
        if not stack.is_file():
            raise InputError(path, f"the montage stack {stack.name} is missing")
        return "serialem", stack, path
    if name.endswith(".mrc"):
        mdoc = _mdoc_for(path)
        return ("serialem", path, mdoc) if mdoc is not None else ("mrc", path, None)
    raise InputError(path, "not an atlas: expected Atlas.dm, .mrc (+ .mdoc) or a folder")


# ----------------------------------------------------------------------------- shared geometry


def _check_extent(path: Path, shape: tuple[int, int], tile_shapes: np.ndarray) -> None:
    """Reject placements whose bounding box is absurd for the tiles it holds."""
    rows, cols = shape
    area = float(rows) * float(cols)
    tiles_area = float(np.prod(tile_shapes.astype(np.float64), axis=1).sum())
    if rows <= 0 or cols <= 0:
        raise InputError(path, "tile placements give an empty mosaic")
    if area > _MAX_PIXELS or area > _MAX_EXTENT_RATIO * tiles_area + 1e6:
        raise InputError(
            path,
            f"tile placements span {rows} x {cols} px, implausible for {len(tile_shapes)} tiles "
            f"covering {tiles_area:.3g} px (corrupt positions?)",
        )


def _mosaic_frame(origins: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
    """Shift origins so none is negative; the (rows, cols) shape that holds every tile."""
    shift = np.minimum(origins.min(axis=0), 0.0)
    origins = origins - shift
    ext = np.ceil((origins + sizes).max(axis=0) - 1e-6)
    return origins, (int(ext[0]), int(ext[1]))


def _stage_affine(
    path: Path,
    centres_rc: np.ndarray,
    stage_xy: Sequence[tuple[float, float] | None],
    shape: tuple[int, int],
    pixel_size_um: float | None,
    what: str,
) -> tuple[np.ndarray, str, float]:
    """Fit the pixel -> stage affine from tile centres; returns (affine, source, pixel size).

    Falls back to image axes centred on the image when fewer than 3 non-collinear tiles have a
    stage position. A pixel size not known from the metadata is taken from the fitted affine.
    """
    have = [k for k, xy in enumerate(stage_xy) if xy is not None]
    rc = centres_rc[have]
    xy = np.array([stage_xy[k] for k in have], dtype=np.float64).reshape(-1, 2)
    design = np.column_stack([rc, np.ones(len(rc))]) if len(rc) else np.zeros((0, 3))
    if len(have) >= 3 and np.linalg.matrix_rank(design, tol=1e-6 * max(1.0, np.abs(rc).max())) == 3:
        affine, rms, model = fit_stage_affine(rc, xy)
        det = float(np.linalg.det(affine[:, :2]))
        if not np.isfinite(affine).all() or not 1e-10 < abs(det) < 1e8:
            raise InputError(path, f"{what} stage positions do not determine a pixel -> stage map")
        source = f"{model} fit to {len(have)} {what} centres vs stage positions (rms {rms:.2f} µm)"
        if pixel_size_um is None:
            pixel_size_um = math.sqrt(abs(det))
            source += "; pixel size from this affine (sqrt |det|): no image metadata"
        return affine, source, pixel_size_um
    if pixel_size_um is None:
        raise InputError(path, f"no pixel size, and too few {what} stage positions to fit one")
    source = (
        f"no stage metadata ({len(have)} {what}s with stage positions, need 3): "
        "image axes centred on the image"
    )
    return centred_affine(shape, pixel_size_um), source, pixel_size_um


def _check_min_size(path: Path, rows: int, cols: int, what: str) -> None:
    if rows < MIN_SIDE_PX or cols < MIN_SIDE_PX:
        raise InputError(path, f"{what} is {rows} x {cols} px: too small for an atlas image")


def _single_image_header(path: Path, what: str) -> MrcHeader:
    hdr = read_mrc_header(path)
    if hdr.shape[0] != 1:
        raise InputError(path, f"{what} is a stack of {hdr.shape[0]} images, expected one")
    _check_min_size(path, hdr.shape[1], hdr.shape[2], what)
    return hdr


def _as_float_image(data: np.ndarray) -> np.ndarray:
    """A float32 in-memory copy (row, col), converted in row chunks."""
    out = np.empty(data.shape, dtype=np.float32)
    step = max(1, (64 << 20) // max(1, data.shape[1] * 4))
    for r in range(0, data.shape[0], step):
        out[r : r + step] = data[r : r + step]
    return out


# ----------------------------------------------------------------------------- single MRC


def _read_single(path: Path, load_image: bool) -> Atlas:
    hdr = _single_image_header(path, "the atlas MRC")
    if hdr.pixel_size_um <= 0:
        raise InputError(path, "the MRC header gives no pixel size (cell size is 0)")
    shape = (hdr.shape[1], hdr.shape[2])
    image = None
    if load_image:
        data, _ = read_mrc(path, mmap=False)
        image = (
            _as_float_image(data) if data.dtype != np.float32 or not data.dtype.isnative else data
        )
    return Atlas(
        path=path,
        format="mrc",
        image=image,
        shape=shape,
        pixel_size_um=hdr.pixel_size_um,
        affine=centred_affine(shape, hdr.pixel_size_um),
        affine_source="no stage metadata: x along columns, y along rows, 0 at the image centre",
    )


# ----------------------------------------------------------------------------- SerialEM


def _stitch(
    tiles: list[np.ndarray],
    origins: np.ndarray,
    shape: tuple[int, int],
    max_shift_px: float,
    flat_field: bool,
) -> tuple[np.ndarray, np.ndarray, str]:
    """Stitch (see ``stitch_tiles``), flat-field corrected when asked and possible.

    Returns:
        image, placed origins (N, 2) px, and a note for ``Atlas.affine_source``.
    """
    flat = estimate_flat_field(tiles) if flat_field else None
    image, placed = stitch_tiles(tiles, origins, shape=shape, max_shift_px=max_shift_px, flat=flat)
    if flat is not None:
        depth = float(flat.min())
        note = f"; flat-field corrected (tile corners down to {depth:.2f} of the centre)"
    elif flat_field:
        note = "; no flat-field correction (too few tiles or open areas to estimate one)"
    else:
        note = ""
    return image, placed, note


def _read_serialem(
    mrc_path: Path, mdoc_path: Path, load_image: bool, flat_field: bool = True
) -> Atlas:
    mdoc = parse_mdoc(mdoc_path)
    hdr = read_mrc_header(mrc_path)
    nz, ny, nx = hdr.shape
    _check_min_size(mrc_path, ny, nx, "each montage piece")
    zs = [p.z for p in mdoc.pieces]
    if zs != list(range(nz)):
        raise InputError(
            mdoc_path,
            f"{len(zs)} [ZValue] sections (z {min(zs)}..{max(zs)}) do not match the "
            f"{nz} images in {mrc_path.name}",
        )
    use_aligned = all(p.aligned_xy is not None for p in mdoc.pieces)
    coords = []
    for p in mdoc.pieces:
        xy = p.aligned_xy if use_aligned else p.piece_xy
        if xy is None:
            raise InputError(mdoc_path, f"[ZValue = {p.z}] has no PieceCoordinates")
        coords.append((xy[1], xy[0]))
    sizes = np.tile(np.array([ny, nx], float), (nz, 1))
    origins, shape = _mosaic_frame(np.array(coords, float), sizes)
    _check_extent(mdoc_path, shape, sizes)
    pixel_size = mdoc.pixel_size_um
    if pixel_size is None and hdr.pixel_size_um > 0:
        pixel_size = hdr.pixel_size_um
    image = None
    placed = np.rint(origins)
    flat_note = ""
    if load_image:
        data, _ = read_mrc(mrc_path)
        stack = data if data.ndim == 3 else data[None]
        max_shift = _max_shift_px(pixel_size, 1.0)
        image, placed, flat_note = _stitch(
            [stack[k] for k in range(nz)], origins, shape, max_shift, flat_field
        )
    centres = placed + (sizes - 1) / 2
    stage = [p.stage_xy_um for p in mdoc.pieces]
    affine, source, pixel_size = _stage_affine(
        mdoc_path, centres, stage, shape, pixel_size, "piece"
    )
    tiles = tuple(
        Tile(
            name=f"piece {k}",
            path=None,
            origin_rc=(float(placed[k, 0]), float(placed[k, 1])),
            shape=(ny, nx),
            stage_xy_um=stage[k],
        )
        for k in range(nz)
    )
    coord_name = "AlignedPieceCoords" if use_aligned else "PieceCoordinates"
    return Atlas(
        path=mrc_path,
        format="serialem",
        image=image,
        shape=shape,
        pixel_size_um=pixel_size,
        affine=affine,
        affine_source=f"{source}; placement from {coord_name}{flat_note}",
        tiles=tiles,
    )


def _max_shift_px(pixel_size_um: float | None, quantum_px: float) -> float:
    """Largest stitch correction accepted, px: a few µm, and at least the placement rounding."""
    base = MAX_STITCH_SHIFT_UM / pixel_size_um if pixel_size_um else 32.0
    return max(base, 2.0 * quantum_px + 2.0, 4.0)


# ----------------------------------------------------------------------------- EPU


def _read_epu(dm_path: Path, load_image: bool, flat_field: bool = True) -> Atlas:
    meta = parse_atlas_dm(dm_path)
    folder = dm_path.parent
    tile_paths = [folder / f"{t.base_name}.mrc" for t in meta.tiles]
    present = [p.is_file() for p in tile_paths]
    if any(present) and not all(present):
        missing = tile_paths[present.index(False)]
        raise InputError(
            missing,
            f"tile named in {dm_path.name} is missing ({sum(present)} of {len(present)} "
            "tiles present)",
        )
    if all(present):
        return _read_epu_tiles(meta, tile_paths, load_image, flat_field)
    return _read_epu_without_tiles(meta, load_image)


def _software_squares(
    meta: EpuAtlasMeta, scale: float, shift_rc: np.ndarray
) -> tuple[SoftwareSquare, ...]:
    return tuple(
        SoftwareSquare(
            square_id=s.square_id,
            row_px=s.center_xy[1] * scale - 0.5 - float(shift_rc[0]),
            col_px=s.center_xy[0] * scale - 0.5 - float(shift_rc[1]),
            x_um=s.physical_xy_um[0],
            y_um=s.physical_xy_um[1],
            size_px=(s.size_wh[1] * scale, s.size_wh[0] * scale),
            quality=s.quality,
        )
        for s in meta.squares
    )


def _read_epu_tiles(
    meta: EpuAtlasMeta, tile_paths: list[Path], load_image: bool, flat_field: bool = True
) -> Atlas:
    """EPU with its tile MRCs: stitch at native resolution."""
    headers = [_single_image_header(p, "the tile") for p in tile_paths]
    tile_shapes = np.array([(h.shape[1], h.shape[2]) for h in headers], dtype=np.float64)
    atlas_sizes = np.array([(t.atlas_xywh[3], t.atlas_xywh[2]) for t in meta.tiles])
    ratios = tile_shapes / atlas_sizes
    scale = float(np.median(ratios))
    # Every tile must map to Atlas.dm with the same native/atlas scale; a tile that does not is
    # the wrong image (or Atlas.dm is corrupt).
    bad = np.flatnonzero(np.abs(ratios / scale - 1).max(axis=1) > 0.02)
    if len(bad):
        k = int(bad[0])
        raise InputError(
            tile_paths[k],
            f"tile is {int(tile_shapes[k, 0])} x {int(tile_shapes[k, 1])} px but {meta.path.name} "
            f"gives it {atlas_sizes[k, 0]:g} x {atlas_sizes[k, 1]:g} atlas px, unlike the other "
            f"tiles ({scale:.4g} px per atlas px)",
        )
    raw_origins = np.array([(t.atlas_xywh[1], t.atlas_xywh[0]) for t in meta.tiles]) * scale
    frame_origins, shape = _mosaic_frame(raw_origins, tile_shapes)
    shift_rc = raw_origins[0] - frame_origins[0]
    _check_extent(meta.path, shape, tile_shapes)

    # Stage from Atlas.dm, else from each tile's XML; pixel size from the tile XMLs.
    xml_meta = []
    for p in tile_paths:
        xml = p.with_suffix(".xml")
        xml_meta.append(parse_microscope_image(xml) if xml.is_file() else None)
    stage = [
        t.stage_xy_um if t.stage_xy_um is not None else (m.stage_xy_um if m else None)
        for t, m in zip(meta.tiles, xml_meta, strict=True)
    ]
    sizes = [m.pixel_size_um for m in xml_meta if m is not None]
    header_sizes = [h.pixel_size_um for h in headers if h.pixel_size_um > 0]
    pixel_size: float | None = None
    size_note = ""
    if sizes:
        pixel_size = float(np.median(sizes))
        size_note = "; pixel size from the tile XML SpatialScale"
    elif header_sizes:
        pixel_size = float(np.median(header_sizes))
        size_note = "; pixel size from the tile MRC headers"

    image = None
    placed = np.rint(frame_origins)
    flat_note = ""
    if load_image:
        tiles = [read_mrc(p)[0] for p in tile_paths]
        image, placed, flat_note = _stitch(
            tiles, frame_origins, shape, _max_shift_px(pixel_size, scale), flat_field
        )
    centres = placed + (tile_shapes - 1) / 2
    affine, source, pixel_size = _stage_affine(meta.path, centres, stage, shape, pixel_size, "tile")
    tiles_out = tuple(
        Tile(
            name=t.base_name,
            path=p,
            origin_rc=(float(placed[k, 0]), float(placed[k, 1])),
            shape=(int(tile_shapes[k, 0]), int(tile_shapes[k, 1])),
            stage_xy_um=stage[k],
        )
        for k, (t, p) in enumerate(zip(meta.tiles, tile_paths, strict=True))
    )
    return Atlas(
        path=meta.path,
        format="epu",
        image=image,
        shape=shape,
        pixel_size_um=pixel_size,
        affine=affine,
        affine_source=f"{source}{size_note}; stitched from {len(tile_paths)} tiles{flat_note}",
        tiles=tiles_out,
        software_squares=_software_squares(meta, scale, shift_rc),
    )


def _read_epu_without_tiles(meta: EpuAtlasMeta, load_image: bool) -> Atlas:
    """EPU without tile images: the stitched ``Atlas_<id>.mrc`` if present, else metadata only."""
    folder = meta.path.parent
    atlas_mrc = folder / f"{meta.image_base}.mrc" if meta.image_base else None
    raw_origins = np.array([(t.atlas_xywh[1], t.atlas_xywh[0]) for t in meta.tiles])
    sizes = np.array([(t.atlas_xywh[3], t.atlas_xywh[2]) for t in meta.tiles])
    pixel_size: float | None = None
    image = None
    if atlas_mrc is not None and atlas_mrc.is_file():
        hdr = _single_image_header(atlas_mrc, "the atlas MRC")
        shape = (hdr.shape[1], hdr.shape[2])
        frame_origins = raw_origins
        pixel_size = hdr.pixel_size_um if hdr.pixel_size_um > 0 else None
        note = f"; image from {atlas_mrc.name} (no tile images)"
        if load_image:
            data, _ = read_mrc(atlas_mrc, mmap=False)
            image = _as_float_image(data)
    else:
        frame_origins, shape = _mosaic_frame(raw_origins, sizes)
        _check_extent(meta.path, shape, sizes)
        note = "; metadata only (no tile or atlas images)"
    shift_rc = raw_origins[0] - frame_origins[0]
    centres = frame_origins + sizes / 2 - 0.5
    stage = [t.stage_xy_um for t in meta.tiles]
    affine, source, pixel_size = _stage_affine(meta.path, centres, stage, shape, pixel_size, "tile")
    tiles_out = tuple(
        Tile(
            name=t.base_name,
            path=None,
            origin_rc=(float(frame_origins[k, 0]), float(frame_origins[k, 1])),
            shape=(int(round(sizes[k, 0])), int(round(sizes[k, 1]))),
            stage_xy_um=stage[k],
        )
        for k, t in enumerate(meta.tiles)
    )
    return Atlas(
        path=meta.path,
        format="epu",
        image=image,
        shape=shape,
        pixel_size_um=pixel_size,
        affine=affine,
        affine_source=source + note,
        tiles=tiles_out,
        software_squares=_software_squares(meta, 1.0, shift_rc),
    )
