"""Uploaded atlases (the dashboard): safe names, safe zip extraction, size limits.

An upload is one of: a single ``.mrc`` (stitched atlas), a SerialEM montage ``.mrc`` with its
``.mdoc``, or a ``.zip`` of an EPU atlas folder (``Atlas.dm`` and its tiles). Names are reduced
to their last part with only ``[A-Za-z0-9._-]``; zip members with absolute paths, ``..``,
links or a total size over the limit are refused with a one-line error naming the upload.
"""

from __future__ import annotations

import re
import stat
import zipfile
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from xcryonet.errors import InputError

# Uncompressed size allowed for an uploaded zip (an EPU atlas is a few hundred MB).
MAX_UNPACKED_BYTES = 4 * 1024**3


def safe_name(name: str) -> str:
    """The last path part of ``name`` with unsafe characters replaced by ``_``."""
    base = re.split(r"[\\/]", name)[-1]
    clean = re.sub(r"[^A-Za-z0-9._-]", "_", base).lstrip(".")
    return clean or "upload"


def _members(zf: zipfile.ZipFile, upload: str, limit: int) -> list[tuple[zipfile.ZipInfo, Path]]:
    out, total = [], 0
    for info in zf.infolist():
        name = info.filename.replace("\\", "/")
        parts = PurePosixPath(name).parts
        if name.startswith("/") or re.match(r"^[A-Za-z]:", name) or ".." in parts:
            raise InputError(upload, f"holds an unsafe path {info.filename!r}")
        if stat.S_ISLNK(info.external_attr >> 16):
            raise InputError(upload, f"holds a link {info.filename!r}")
        total += info.file_size
        if total > limit:
            raise InputError(upload, f"unpacks to more than {limit / 1024**3:.1f} GB")
        if info.is_dir():
            continue
        out.append((info, Path(*[safe_name(p) for p in parts])))
    return out


def unpack_upload(
    files: Sequence[tuple[str, bytes]], dest: Path, *, max_unpacked: int = MAX_UNPACKED_BYTES
) -> Path:
    """Write uploaded ``(name, bytes)`` files into ``dest``; returns the atlas path to read
    (the folder holding ``Atlas.dm``, or the ``.mrc``)."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    if not files:
        raise InputError("upload", "no file was uploaded")
    zips = [f for f in files if f[0].lower().endswith(".zip")]
    if zips:
        if len(files) > 1:
            raise InputError(zips[0][0], "upload a zip on its own")
        name, data = zips[0]
        import io

        try:
            zf = zipfile.ZipFile(io.BytesIO(data))
        except zipfile.BadZipFile:
            raise InputError(name, "is not a readable zip file") from None
        with zf:
            for info, rel in _members(zf, name, max_unpacked):
                target = dest / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "wb") as out:
                    out.write(src.read())
        atlases = sorted(dest.rglob("Atlas.dm")) or sorted(dest.rglob("*.mrc"))
        if not atlases:
            raise InputError(name, "holds no Atlas.dm and no .mrc")
        return atlases[0].parent if atlases[0].name == "Atlas.dm" else atlases[0]
    mrcs = []
    for name, data in files:
        clean = safe_name(name)
        if not clean.lower().endswith((".mrc", ".mdoc", ".st", ".map")):
            raise InputError(name, "is not an atlas file (.mrc, .mdoc or a .zip of an EPU folder)")
        (dest / clean).write_bytes(data)
        if not clean.lower().endswith(".mdoc"):
            mrcs.append(dest / clean)
    if len(mrcs) != 1:
        raise InputError(files[0][0], "upload one .mrc (with its .mdoc for a SerialEM montage)")
    return mrcs[0]
