"""SerialEM Navigator files (``.nav``): write the chosen squares as points to acquire, read back.

The writer produces the autodoc (text) form of a Navigator file, the one SerialEM writes itself
unless "save as XML" is on. Format, as SerialEM's own code defines it (mastcu/SerialEM):

* ``NavigatorDlg.cpp``, ``CNavigatorDlg::OpenAndWriteFile``: the file starts with the global
  ``AdocVersion = 2.00`` (``NAV_FILE_VERSION``), then, after a blank line, one
  ``[Item = <label>]`` section per item.
* ``NavAdocPuts.h`` (the per-item writer): keys in the order ``Color``, ``StageXYZ`` (x y z, µm),
  ``NumPts``, ``Regis``, ``Type``, ``Note``, ..., ``Acquire``, ..., ``PtsX``, ``PtsY``;
  ``Acquire = 1`` is written only for items marked for acquisition; ``MapID`` is written for a
  non-map item only when it has one.
* ``CNavigatorDlg::LoadNavFile``: the first line must begin with ``AdocVersion`` (or ``<?xml``);
  an ``Item`` needs ``Color``, ``StageXYZ`` (or one of the ``CoordsIn...`` keys of an imported
  item), ``NumPts``, ``Regis`` and ``Type``, and ``PtsX``/``PtsY`` with ``NumPts`` values each;
  any other key is optional (``Acquire`` and ``MapID`` default to 0). An item that lacks a
  required key is dropped. Item types: 0 point, 1 polygon, 2 map (``typeString``); color 0 is
  red (``colorNames``). A point's ``PtsX``/``PtsY`` hold its stage X/Y (for an imported point
  the loader itself sets them with ``AppendPoint(mStageX, mStageY)``).
* SerialEM help, "File Formats" (bio3d.colorado.edu/SerialEM/hlp/html/about_formats.htm): the
  autodoc syntax, ``[sectionType = name]`` headers and ``key = value`` lines.

What we write, per target (one point item each): ``Color = 0`` (red), ``StageXYZ = x y z``,
``NumPts = 1``, ``Regis = 1``, ``Type = 0``, ``Note`` (grid, square, rank and the five scores),
``Acquire = 1``, ``PtsX = x``, ``PtsY = y``. No ``MapID`` is written on purpose: when a file is
merged into an open Navigator (``LoadNavFile`` with ``mergeFile``), SerialEM skips an incoming
item whose nonzero ``MapID`` is already present, and treats ID-less points as duplicates only at
the same stage position; repeated labels are renamed ``label-1`` and so on.

Items are written in registration 1, SerialEM's first. If the atlas in the open Navigator is in
another registration, or the grid was reloaded after the atlas was taken, shift or transform the
items in SerialEM before acquiring. The stage Z of every point is ``stage_z_um``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from xcryonet.errors import InputError
from xcryonet.io.atomic import atomic_write_text
from xcryonet.io.text import read_text_file

NAV_VERSION = "2.00"
REQUIRED_COLUMNS = ("grid_id", "square_id", "x_um", "y_um", "rank")
SCORE_COLUMNS = ("brightness", "squareness", "cracking", "contamination", "overall")
REQUIRED_ITEM_KEYS = ("Color", "NumPts", "Regis", "Type")
_INT_KEYS = frozenset(
    {"Color", "NumPts", "Regis", "Type", "Acquire", "MapID", "GroupID", "DrawnID", "Draw"}
)
_EXTERNAL_KEYS = ("CoordsInMap", "CoordsInAliMont", "CoordsInAliMontVS", "CoordsInPiece")
# SerialEM's stage travel is about ±1 mm; anything far beyond is a unit mistake (nm, m, px).
_MAX_STAGE_UM = 1e5
_MAX_NAV_BYTES = 64 << 20
_BAD_LABEL_CHARS = frozenset("[]=#")


def _one_line(text: str) -> str:
    return " ".join("".join(ch if ch.isprintable() else " " for ch in text).split())


def _check_label_part(path: Path, what: str, text: str) -> None:
    if any(ch.isspace() or not ch.isprintable() or ch in _BAD_LABEL_CHARS for ch in text):
        raise InputError(path, f"{what} {text!r} may not contain spaces, [, ], = or #")


def _format_float(value: float) -> str:
    # 1 nm resolution; SerialEM keeps stage positions as 32-bit floats anyway.
    text = f"{value:.3f}"
    return "0.000" if text == "-0.000" else text


def navigator_text(
    targets: pd.DataFrame,
    *,
    label_prefix: str = "",
    stage_z_um: float = 0.0,
    acquire: bool = True,
    path: str | Path = "navigator.nav",
) -> str:
    """The text of a Navigator file with one point item per row of ``targets``, in row order.

    Args:
        targets: rows of one grid with ``grid_id, square_id, x_um, y_um, rank`` (stage position in
            µm) and optionally the five score columns, e.g. from
            :func:`xcryonet.targets.select_top`.
        label_prefix: prepended to the rank to form each item's label (``"G1-"`` gives ``G1-1``,
            ``G1-2``...); no spaces or ``[]=#``.
        stage_z_um: stage Z written for every item, µm.
        acquire: mark every item for "Acquire at Items".
        path: the file name, for error messages.

    Raises:
        InputError: no rows, missing columns, several grids, a missing rank, a repeated label, or
            a stage position that is not a finite number within ±100 mm.
    """
    path = Path(path)
    if len(targets) == 0:
        raise InputError(path, "no targets to write (the targets table is empty)")
    missing = [c for c in REQUIRED_COLUMNS if c not in targets.columns]
    if missing:
        raise InputError(path, f"targets lack column(s) {', '.join(missing)}")
    grids = sorted({str(g) for g in targets["grid_id"]})
    if len(grids) != 1:
        raise InputError(
            path,
            f"targets hold {len(grids)} grids ({', '.join(grids[:3])}...); stage positions of "
            "different grids do not mix: write one navigator file per grid",
        )
    _check_label_part(path, "label prefix", label_prefix)
    try:
        stage_z_um = float(stage_z_um)
    except (TypeError, ValueError):
        raise InputError(path, f"stage Z {stage_z_um!r} is not a number") from None
    if not math.isfinite(stage_z_um):
        raise InputError(path, f"stage Z {stage_z_um!r} is not a finite number")
    if abs(stage_z_um) > _MAX_STAGE_UM:
        raise InputError(path, f"stage Z {stage_z_um:g} µm is outside ±100 mm")

    scores = [c for c in SCORE_COLUMNS if c in targets.columns]
    lines = [f"AdocVersion = {NAV_VERSION}", ""]
    seen: set[str] = set()
    for rec in targets.to_dict("records"):
        square = _one_line(str(rec["square_id"]))
        try:
            x = float(rec["x_um"])
            y = float(rec["y_um"])
        except (TypeError, ValueError):
            raise InputError(path, f"square {square}: x_um/y_um are not numbers") from None
        if not (math.isfinite(x) and math.isfinite(y)):
            raise InputError(path, f"square {square}: stage position ({x}, {y}) is not finite")
        if max(abs(x), abs(y)) > _MAX_STAGE_UM:
            raise InputError(
                path, f"square {square}: stage position ({x:g}, {y:g}) µm is outside ±100 mm"
            )
        rank = rec["rank"]
        if rank is None or pd.isna(rank):
            raise InputError(
                path, f"square {square} has no rank (an incomplete square); pick ranked targets"
            )
        rank_f = float(rank)
        if not rank_f.is_integer() or rank_f < 1:
            raise InputError(path, f"square {square}: rank {rank!r} is not a positive integer")
        label = f"{label_prefix}{int(rank_f)}"
        if label in seen:
            raise InputError(path, f"item label {label} is repeated (repeated rank)")
        seen.add(label)
        note_parts = [f"xcryonet grid {_one_line(grids[0])} square {square} rank {int(rank_f)}"]
        for name in scores:
            value = float(rec[name])
            note_parts.append(f"{name} {value:.2f}" if math.isfinite(value) else f"{name} NA")
        xs, ys = _format_float(x), _format_float(y)
        lines += [
            f"[Item = {label}]",
            "Color = 0",
            f"StageXYZ = {xs} {ys} {_format_float(stage_z_um)}",
            "NumPts = 1",
            "Regis = 1",
            "Type = 0",
            f"Note = {' '.join(note_parts)}",
            f"Acquire = {1 if acquire else 0}",
            f"PtsX = {xs}",
            f"PtsY = {ys}",
            "",
        ]
    return "\n".join(lines)


def write_navigator(
    path: str | Path,
    targets: pd.DataFrame,
    *,
    grid_id: str | None = None,
    label_prefix: str = "",
    stage_z_um: float = 0.0,
    acquire: bool = True,
) -> Path:
    """Write a SerialEM Navigator file of ``targets`` (one point per row) atomically.

    Load it in SerialEM (Navigator > Open, or Merge File into an open one); every item is marked
    Acquire, so "Acquire at Items" visits them, in file order (best first for ranked targets).

    Args:
        path: the ``.nav`` file to write; its folder is created if needed.
        targets: see :func:`navigator_text`; typically ``select_top(rank_targets(...), n)``.
        grid_id: write only this grid's rows (needed when ``targets`` holds several grids).
        label_prefix, stage_z_um, acquire: see :func:`navigator_text`.

    Returns:
        ``path``.

    Raises:
        InputError: bad targets (see :func:`navigator_text`), no rows for ``grid_id``, or the
            file cannot be written. Nothing is left at ``path`` (or beside it) on error.
    """
    path = Path(path)
    if grid_id is not None:
        if "grid_id" not in targets.columns:
            raise InputError(path, "targets lack column grid_id")
        targets = targets[targets["grid_id"].astype(str) == str(grid_id)]
        if len(targets) == 0:
            raise InputError(path, f"no targets for grid {grid_id!r}")
    text = navigator_text(
        targets, label_prefix=label_prefix, stage_z_um=stage_z_um, acquire=acquire, path=path
    )
    try:
        atomic_write_text(path, text)
    except OSError as exc:
        raise InputError(path, f"cannot write file ({exc.strerror or exc})") from None
    return path


def _numbers(path: Path, where: str, key: str, value: str, count: int | None) -> list[float]:
    parts = value.split()
    if count is not None and len(parts) != count:
        raise InputError(path, f"{where}: {key} needs {count} number(s), got {value[:60]!r}")
    try:
        numbers = [float(p) for p in parts]
    except ValueError:
        raise InputError(path, f"{where}: {key} is not numeric ({value[:60]!r})") from None
    if not all(math.isfinite(v) for v in numbers):
        raise InputError(path, f"{where}: {key} is not finite ({value[:60]!r})")
    return numbers


def _integer(path: Path, where: str, key: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise InputError(path, f"{where}: {key} {value[:30]!r} is not an integer") from None


def _sections(
    path: Path, lines: Iterable[str], start: int
) -> list[tuple[int, str, dict[str, str]]]:
    """The ``[Item = label]`` sections: (header line number, label, key -> raw value)."""
    items: list[tuple[int, str, dict[str, str]]] = []
    current: dict[str, str] | None = None
    for number, raw in enumerate(lines, start=start):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            if not line.endswith("]"):
                raise InputError(path, f"line {number}: unclosed section header {line[:40]!r}")
            kind, eq, name = line[1:-1].partition("=")
            if not eq:
                raise InputError(path, f"line {number}: bad section header {line[:40]!r}")
            if kind.strip() == "Item":
                label = name.strip()
                if not label:
                    raise InputError(path, f"line {number}: [Item] section without a label")
                current = {}
                items.append((number, label, current))
            else:
                current = None  # TSParam, MontParam, StateParam, ...: not items
            continue
        key, eq, value = line.partition("=")
        if not eq or not key.strip():
            raise InputError(path, f"line {number}: not a 'key = value' line: {line[:40]!r}")
        if current is not None:
            current.setdefault(key.strip(), value.strip())
    return items


def read_navigator(path: str | Path) -> list[dict[str, Any]]:
    """Read the items of a SerialEM Navigator file (autodoc form) and check the keys SerialEM
    requires.

    Returns:
        One dict per ``[Item]``, in file order: ``label`` (str) and every key of the section.
        ``StageXYZ`` is a tuple of 3 floats (µm; absent for imported ``CoordsIn...`` items),
        ``PtsX``/``PtsY`` lists of ``NumPts`` floats, the integer keys (``Color, NumPts, Regis,
        Type, Acquire, MapID, GroupID, DrawnID, Draw``) ints, and any other value the raw
        string (``Note`` included).

    Raises:
        InputError: unreadable file, no ``AdocVersion`` first line, an XML navigator, malformed
            lines, or an item that lacks a key SerialEM requires or has malformed numbers.
    """
    path = Path(path)
    text = read_text_file(path, _MAX_NAV_BYTES, "navigator")
    lines = text.lstrip("\ufeff").splitlines()
    first = lines[0].strip() if lines else ""
    if first.startswith("<?xml"):
        raise InputError(path, "XML navigator files are not supported; save it as an autodoc")
    key, eq, version = first.partition("=")
    if key.strip() != "AdocVersion" or not eq:
        raise InputError(path, "first line is not 'AdocVersion = ...': not a navigator file")
    _numbers(path, "line 1", "AdocVersion", version.strip(), 1)

    items: list[dict[str, Any]] = []
    for number, label, keys in _sections(path, lines[1:], start=2):
        where = f"line {number} [Item = {label[:30]}]"
        lacking = [k for k in REQUIRED_ITEM_KEYS if k not in keys]
        if "StageXYZ" not in keys and not any(k in keys for k in _EXTERNAL_KEYS):
            lacking.append("StageXYZ")
        if lacking:
            raise InputError(path, f"{where} lacks required key(s) {', '.join(lacking)}")
        item: dict[str, Any] = {"label": label}
        for k, v in keys.items():
            if k in _INT_KEYS:
                item[k] = _integer(path, where, k, v)
            elif k == "StageXYZ":
                x, y, z = _numbers(path, where, k, v, 3)
                item[k] = (x, y, z)
            elif k in ("PtsX", "PtsY"):
                item[k] = _numbers(path, where, k, v, None)
            else:
                item[k] = v
        n_pts = item["NumPts"]
        if n_pts < 0:
            raise InputError(path, f"{where}: NumPts {n_pts} is negative")
        for k in ("PtsX", "PtsY"):
            if n_pts > 0 and len(item.get(k, ())) != n_pts:
                raise InputError(path, f"{where}: {k} needs {n_pts} value(s) (NumPts)")
        items.append(item)
    return items
