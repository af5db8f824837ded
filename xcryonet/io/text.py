"""Reading small metadata text files (.mdoc, .nav) safely."""

from __future__ import annotations

from pathlib import Path

from xcryonet.errors import InputError


def read_text_file(path: Path, max_bytes: int, what: str) -> str:
    """The file's text (undecodable bytes replaced), refusing files over ``max_bytes``.

    Raises:
        InputError: unreadable, or implausibly large for a ``what`` file.
    """
    try:
        if path.stat().st_size > max_bytes:
            raise InputError(path, f"implausibly large {what} file")
        return path.read_bytes().decode("utf-8", errors="replace")
    except OSError as exc:
        raise InputError(path, f"cannot read file ({exc.strerror or exc})") from None
