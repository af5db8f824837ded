"""MRC images and stacks: a strict, memory-mapped reader and an atomic writer.

The header is parsed here (not with ``mrcfile``) so that every problem in a file, whatever its
bytes, becomes one ``InputError`` line, and so that absurd header values are rejected from the
file size before anything is allocated.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from xcryonet.errors import InputError
from xcryonet.io.atomic import atomic_path

HEADER_BYTES = 1024
# IMOD marks its files with this stamp; its flag bit 0 says whether mode-0 bytes are signed.
IMOD_STAMP = 1146047817
# Largest plausible image side and stack depth; anything bigger is a corrupt header.
MAX_SIDE = 1 << 18
MAX_SECTIONS = 1 << 20
# Rows per chunk when scanning or writing big arrays, to keep memory flat.
_CHUNK_BYTES = 64 << 20

_MODE_DTYPES = {0: "i1", 1: "i2", 2: "f4", 6: "u2", 12: "f2"}
_DTYPE_MODES = {"u1": 0, "i1": 0, "i2": 1, "f4": 2, "u2": 6, "f2": 12}

_HEADER_DTYPE = np.dtype(
    [
        ("nx", "i4"),
        ("ny", "i4"),
        ("nz", "i4"),
        ("mode", "i4"),
        ("nxstart", "i4"),
        ("nystart", "i4"),
        ("nzstart", "i4"),
        ("mx", "i4"),
        ("my", "i4"),
        ("mz", "i4"),
        ("cella", "f4", 3),
        ("cellb", "f4", 3),
        ("mapc", "i4"),
        ("mapr", "i4"),
        ("maps", "i4"),
        ("dmin", "f4"),
        ("dmax", "f4"),
        ("dmean", "f4"),
        ("ispg", "i4"),
        ("nsymbt", "i4"),
        ("extra1", "V8"),
        ("exttyp", "S4"),
        ("nversion", "i4"),
        ("extra2", "V40"),
        ("imod_stamp", "i4"),
        ("imod_flags", "i4"),
        ("extra3", "V36"),
        ("origin", "f4", 3),
        ("map", "S4"),
        ("machst", "u1", 4),
        ("rms", "f4"),
        ("nlabl", "i4"),
        ("label", "S80", 10),
    ]
)
assert _HEADER_DTYPE.itemsize == HEADER_BYTES


@dataclass(frozen=True)
class MrcHeader:
    """What the reader needs from a validated MRC header.

    Attributes:
        shape: (sections, rows, cols) of the data block.
        dtype: numpy dtype of the pixels, with the file's byte order.
        mode: MRC mode number.
        data_offset: byte offset of the first pixel.
        pixel_size_um: µm per pixel along columns (``cella.x / mx``); 0.0 when the header
            does not give one.
    """

    shape: tuple[int, int, int]
    dtype: np.dtype
    mode: int
    data_offset: int
    pixel_size_um: float


def read_mrc_header(path: str | Path) -> MrcHeader:
    """Read and validate an MRC header against the file size, without touching the pixels.

    Raises:
        InputError: unreadable file, not an MRC file, corrupt or unsupported header, or a file
            whose size does not match the header (truncated or with trailing bytes).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            raw = fh.read(HEADER_BYTES)
    except OSError as exc:
        raise InputError(path, f"cannot read MRC file ({exc.strerror or exc})") from None
    if size == 0:
        raise InputError(path, "empty file (0 bytes)")
    if len(raw) < HEADER_BYTES:
        raise InputError(path, f"truncated MRC file: {size} bytes, shorter than the header")
    if raw[208:212] != b"MAP ":
        raise InputError(path, "not an MRC file (no 'MAP ' tag at byte 208)")
    # Byte order from the machine stamp; files without a valid stamp are read little-endian.
    order: Literal["<", ">"] = ">" if raw[212] == 0x11 else "<"
    hdr = np.frombuffer(raw, dtype=_HEADER_DTYPE.newbyteorder(order), count=1)[0]
    nx, ny, nz, mode = int(hdr["nx"]), int(hdr["ny"]), int(hdr["nz"]), int(hdr["mode"])
    if nx == 0 or ny == 0 or nz == 0:
        raise InputError(path, f"empty image (nx={nx}, ny={ny}, nz={nz})")
    if nx < 0 or ny < 0 or nz < 0:
        raise InputError(path, f"corrupt MRC header: negative dimensions ({nx}, {ny}, {nz})")
    if nx > MAX_SIDE or ny > MAX_SIDE or nz > MAX_SECTIONS:
        raise InputError(path, f"corrupt MRC header: absurd dimensions ({nx}, {ny}, {nz})")
    if mode not in _MODE_DTYPES:
        raise InputError(path, f"unsupported MRC mode {mode} (supported: 0, 1, 2, 6, 12)")
    if 401 <= int(hdr["ispg"]) <= 630:
        raise InputError(path, "a volume stack (4D data, space group 401-630) is not supported")
    axes = (int(hdr["mapc"]), int(hdr["mapr"]), int(hdr["maps"]))
    if axes not in ((1, 2, 3), (0, 0, 0)):
        raise InputError(path, f"unsupported MRC axis order mapc/mapr/maps = {axes}")
    nsymbt = int(hdr["nsymbt"])
    if nsymbt < 0:
        raise InputError(path, f"corrupt MRC header: negative extended header size {nsymbt}")
    code = _MODE_DTYPES[mode]
    imod_unsigned = int(hdr["imod_stamp"]) == IMOD_STAMP and not int(hdr["imod_flags"]) & 1
    if mode == 0 and imod_unsigned:
        code = "u1"
    dtype = np.dtype(order + code)
    offset = HEADER_BYTES + nsymbt
    expected = offset + nx * ny * nz * dtype.itemsize
    if size < expected:
        raise InputError(
            path, f"truncated MRC file: {size} bytes, the header needs {expected} bytes"
        )
    if size > expected:
        raise InputError(
            path,
            f"corrupt MRC header: file has {size} bytes, the header describes {expected} bytes",
        )
    mx, cella_x = int(hdr["mx"]), float(hdr["cella"][0])
    if not np.isfinite(cella_x) or cella_x < 0 or mx < 0:
        raise InputError(path, f"corrupt MRC header: cell size {cella_x} Å over {mx} px")
    pixel_size_um = cella_x / mx * 1e-4 if mx > 0 and cella_x > 0 else 0.0
    return MrcHeader((nz, ny, nx), dtype, mode, offset, pixel_size_um)


def read_mrc(path: str | Path, *, mmap: bool = True) -> tuple[np.ndarray, float]:
    """Read an MRC image or stack, validating it fully.

    Args:
        path: the ``.mrc`` file.
        mmap: memory-map the pixels (read-only) instead of reading them into memory.

    Returns:
        ``(data, pixel_size_um)``: data is (row, col) for a single image and (z, row, col) for a
        stack, in the file's dtype (modes 0, 1, 2, 6, 12; mode 0 is uint8 for IMOD-flagged
        unsigned files, else int8). It may be a read-only memory map. The pixel size is in µm
        (0.0 when the header gives none).

    Raises:
        InputError: truncated or corrupt file, unsupported mode or dimensions, NaN/Inf pixels,
            or an empty image (no pixels, or all pixels equal).
    """
    path = Path(path)
    hdr = read_mrc_header(path)
    try:
        if mmap:
            data: np.ndarray = np.memmap(
                path, dtype=hdr.dtype, mode="r", offset=hdr.data_offset, shape=hdr.shape
            )
        else:
            with open(path, "rb") as fh:
                fh.seek(hdr.data_offset)
                data = np.fromfile(fh, dtype=hdr.dtype, count=int(np.prod(hdr.shape)))
            data = data.reshape(hdr.shape)
    except (OSError, ValueError) as exc:
        raise InputError(path, f"cannot read MRC pixels ({exc})") from None
    if data.size != int(np.prod(hdr.shape)):
        raise InputError(path, "truncated MRC file: fewer pixels than the header says")
    _check_pixels(path, data)
    if hdr.shape[0] == 1:
        data = data[0]
    return data, hdr.pixel_size_um


def _row_chunks(data: np.ndarray) -> list[slice]:
    """Slices over the flattened pixels in chunks of about ``_CHUNK_BYTES``."""
    n = data.size
    step = max(1, _CHUNK_BYTES // max(1, data.dtype.itemsize))
    return [slice(i, min(n, i + step)) for i in range(0, n, step)]


def _check_pixels(path: Path, data: np.ndarray) -> None:
    """Reject NaN/Inf pixels and images whose pixels are all equal, one chunk at a time."""
    flat = data.reshape(-1)
    is_float = data.dtype.kind == "f"
    lo, hi = np.inf, -np.inf
    for sl in _row_chunks(flat):
        chunk = flat[sl]
        if is_float and not np.isfinite(chunk).all():
            bad = int(np.count_nonzero(~np.isfinite(chunk)))
            raise InputError(path, f"image contains NaN or Inf pixels ({bad}+ bad pixels)")
        lo = min(lo, float(chunk.min()))
        hi = max(hi, float(chunk.max()))
    if lo == hi:
        raise InputError(path, f"empty image: all {data.size} pixels equal {lo:g}")


def mode_for_dtype(dtype: np.dtype) -> int:
    """MRC mode used for a numpy dtype: uint8 -> 0, int16 -> 1, float32 -> 2, uint16 -> 6,
    float16 -> 12 (int8 -> 0, and float64 is written as float32)."""
    dtype = np.dtype(dtype)
    if dtype == np.float64:
        return 2
    code = f"{dtype.kind}{dtype.itemsize}"
    if code not in _DTYPE_MODES:
        raise ValueError(f"no MRC mode for dtype {dtype}")
    return _DTYPE_MODES[code]


def write_mrc(
    path: str | Path, data: np.ndarray, pixel_size_um: float, *, mode: int | None = None
) -> Path:
    """Write an image (row, col) or stack (z, row, col) as a little-endian MRC2014 file, atomically.

    Args:
        path: the ``.mrc`` file to write.
        data: pixels; the dtype picks the mode unless ``mode`` is given (see ``mode_for_dtype``).
        pixel_size_um: µm per pixel, stored as the cell size in Å.
        mode: force an MRC mode (0, 1, 2, 6, 12); values are rounded and clipped to it for
            integer modes. Mode 0 is written as unsigned bytes with IMOD's flag.

    Returns:
        ``path``.
    """
    path = Path(path)
    arr = np.asarray(data)
    if arr.ndim not in (2, 3) or arr.size == 0:
        raise ValueError(f"write_mrc needs a non-empty 2D or 3D array, got shape {arr.shape}")
    if mode is None:
        mode = mode_for_dtype(arr.dtype)
    if mode not in _MODE_DTYPES:
        raise ValueError(f"unsupported MRC mode {mode}")
    out_dtype = np.dtype("<" + ("u1" if mode == 0 and arr.dtype != np.int8 else _MODE_DTYPES[mode]))
    if not np.isfinite(pixel_size_um) or pixel_size_um < 0:
        raise ValueError(f"pixel size must be finite and >= 0, got {pixel_size_um}")
    stack = arr if arr.ndim == 3 else arr[None]
    nz, ny, nx = stack.shape

    def converted(chunk: np.ndarray) -> np.ndarray:
        if out_dtype.kind in "iu" and chunk.dtype.kind == "f":
            info = np.iinfo(out_dtype)
            chunk = np.clip(np.rint(chunk), info.min, info.max)
        return chunk.astype(out_dtype, copy=False)

    rows_per_chunk = max(1, _CHUNK_BYTES // max(1, nx * 8))
    chunks = [
        (z, r, min(ny, r + rows_per_chunk)) for z in range(nz) for r in range(0, ny, rows_per_chunk)
    ]
    hdr = np.zeros(1, dtype=_HEADER_DTYPE.newbyteorder("<"))[0]
    hdr["nx"], hdr["ny"], hdr["nz"], hdr["mode"] = nx, ny, nz, mode
    hdr["mx"], hdr["my"], hdr["mz"] = nx, ny, 1
    angstrom = pixel_size_um * 1e4
    hdr["cella"] = (nx * angstrom, ny * angstrom, angstrom)
    hdr["cellb"] = (90.0, 90.0, 90.0)
    hdr["mapc"], hdr["mapr"], hdr["maps"] = 1, 2, 3
    hdr["ispg"] = 0  # an image or an image stack, never a volume
    hdr["nversion"] = 20140
    if mode == 0:
        hdr["imod_stamp"] = IMOD_STAMP
        hdr["imod_flags"] = 1 if out_dtype == np.int8 else 0
    hdr["map"] = b"MAP "
    hdr["machst"] = (0x44, 0x44, 0, 0)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(hdr.tobytes())
        # One pass: write the pixels chunk by chunk while accumulating the header statistics,
        # then rewrite the header.
        total = total_sq = 0.0
        dmin, dmax = np.inf, -np.inf
        for z, r0, r1 in chunks:
            c = converted(stack[z, r0:r1])
            c64 = c.astype(np.float64)
            if not np.isfinite(c64).all():
                raise ValueError("write_mrc refuses NaN or Inf pixels")
            total += float(c64.sum())
            total_sq += float(np.square(c64).sum())
            dmin, dmax = min(dmin, float(c64.min())), max(dmax, float(c64.max()))
            fh.write(c.tobytes())
        n = float(stack.size)
        mean = total / n
        hdr["dmin"], hdr["dmax"], hdr["dmean"] = dmin, dmax, mean
        hdr["rms"] = float(np.sqrt(max(0.0, total_sq / n - mean * mean)))
        fh.seek(0)
        fh.write(hdr.tobytes())
    return path
