"""Operator labels: read and validate ``labels.csv``, and join labels to extracted squares.

``labels.csv`` columns: ``grid_id, x_um, y_um, cracking, contamination, overall`` and, optionally,
``brightness, squareness`` (these override the auto-labels). A blank cell means "not labelled".
Scores are integers 0..4. Labels are keyed by stage position, not by square id, so that
re-extracting with other settings keeps every label: each label joins the extracted square whose
stage position is nearest, within 0.3 mesh pitch.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

from xcryonet.errors import InputError

SCORE_NAMES = ("brightness", "squareness", "cracking", "contamination", "overall")
REQUIRED_COLUMNS = ("grid_id", "x_um", "y_um", "cracking", "contamination", "overall")
OPTIONAL_COLUMNS = ("brightness", "squareness")
JOIN_RADIUS_PITCH = 0.3


@dataclass(frozen=True)
class Label:
    """One row of labels.csv.

    Attributes:
        line: 1-based line number in the file (the header is line 1).
        grid_id: grid the square belongs to.
        x_um, y_um: stage position, µm.
        scores: score name -> int 0..4, only for the cells that are filled in.
    """

    line: int
    grid_id: str
    x_um: float
    y_um: float
    scores: dict[str, int]


def _parse_score(path: Path, line: int, name: str, cell: str) -> int | None:
    cell = cell.strip()
    if cell == "":
        return None
    try:
        value = float(cell)
    except ValueError:
        raise InputError(path, f"line {line}: {name} {cell!r} is not a number") from None
    if not value.is_integer() or not 0 <= value <= 4:
        raise InputError(path, f"line {line}: {name} {cell!r} is outside the scores 0..4")
    return int(value)


def parse_labels(text: str, path: str | Path = "labels.csv") -> list[Label]:
    """Parse and validate labels.csv content; every problem names its line number."""
    path = Path(path)
    reader = csv.reader(io.StringIO(text))
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        raise InputError(path, "is empty (expected a header line)") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise InputError(path, f"line 1: missing column(s) {', '.join(missing)}")
    unknown = [c for c in header if c not in REQUIRED_COLUMNS + OPTIONAL_COLUMNS]
    if unknown:
        raise InputError(path, f"line 1: unknown column(s) {', '.join(unknown)}")
    if len(set(header)) != len(header):
        raise InputError(path, "line 1: a column name is repeated")
    col = {name: i for i, name in enumerate(header)}
    labels: list[Label] = []
    seen: dict[tuple[str, float, float], int] = {}
    for row in reader:
        line = reader.line_num
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != len(header):
            raise InputError(path, f"line {line}: {len(row)} cells, expected {len(header)}")
        grid_id = row[col["grid_id"]].strip()
        if not grid_id:
            raise InputError(path, f"line {line}: grid_id is blank")
        try:
            x_um = float(row[col["x_um"]])
            y_um = float(row[col["y_um"]])
        except ValueError:
            raise InputError(path, f"line {line}: x_um/y_um must be numbers") from None
        if not (math.isfinite(x_um) and math.isfinite(y_um)):
            raise InputError(path, f"line {line}: x_um/y_um must be finite")
        scores = {}
        for name in SCORE_NAMES:
            if name in col:
                value = _parse_score(path, line, name, row[col[name]])
                if value is not None:
                    scores[name] = value
        key = (grid_id, round(x_um, 3), round(y_um, 3))
        if key in seen:
            raise InputError(
                path, f"line {line}: duplicate of line {seen[key]} ({grid_id} at {x_um}, {y_um})"
            )
        seen[key] = line
        labels.append(Label(line, grid_id, x_um, y_um, scores))
    return labels


def read_labels(path: str | Path) -> list[Label]:
    """Read and validate a labels.csv file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(path, "does not exist") from None
    except UnicodeDecodeError:
        raise InputError(path, "is not a UTF-8 text file") from None
    return parse_labels(text, path)


def join_labels(
    squares: pd.DataFrame,
    labels: list[Label],
    *,
    path: str | Path = "labels.csv",
    strict_grids: bool = True,
) -> pd.DataFrame:
    """Attach labels to extracted squares by nearest stage position within 0.3 pitch.

    Args:
        squares: extracted squares with columns ``grid_id, square_id, x_um, y_um, pitch_um`` and
            the auto-labels ``brightness, squareness``.
        labels: rows from :func:`read_labels`.
        path: labels file name, for error messages.
        strict_grids: a label for a grid that was not extracted is an error (else it is skipped).

    Returns:
        A copy of ``squares`` with ``label_<score>`` columns (float, NaN = unlabelled) for the five
        scores (brightness/squareness labels fall back to the auto-labels) and ``label_line``.
        Labels that match no square (e.g. one on a bar) are dropped; two labels on the same
        square raise an error naming both lines.
    """
    out = squares.copy()
    for name in SCORE_NAMES:
        out[f"label_{name}"] = np.nan
    out["label_line"] = 0
    grids = set(out["grid_id"].astype(str))
    by_grid: dict[str, list[Label]] = {}
    for lab in labels:
        if lab.grid_id not in grids:
            if strict_grids:
                raise InputError(path, f"line {lab.line}: unknown grid {lab.grid_id!r}")
            continue
        by_grid.setdefault(lab.grid_id, []).append(lab)
    for grid_id, labs in by_grid.items():
        idx = np.flatnonzero(out["grid_id"].astype(str).to_numpy() == grid_id)
        xy = out.iloc[idx][["x_um", "y_um"]].to_numpy(float)
        radius = JOIN_RADIUS_PITCH * float(np.median(out.iloc[idx]["pitch_um"]))
        dist, nearest = cKDTree(xy).query([(lab.x_um, lab.y_um) for lab in labs])
        taken: dict[int, int] = {}
        for lab, d, k in zip(labs, dist, nearest, strict=True):
            if d > radius:
                continue
            row = int(idx[k])
            if row in taken:
                raise InputError(
                    path,
                    f"line {lab.line}: duplicate label for square "
                    f"{out.iloc[row]['square_id']} of {grid_id} (also line {taken[row]})",
                )
            taken[row] = lab.line
            out.iat[row, out.columns.get_loc("label_line")] = lab.line
            for name, value in lab.scores.items():
                out.iat[row, out.columns.get_loc(f"label_{name}")] = float(value)
    for name in ("brightness", "squareness"):
        if name in out:
            out[f"label_{name}"] = out[f"label_{name}"].fillna(out[name].astype(float))
    return out


def _format_labels(labels: list[Label], columns: list[str]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for lab in labels:
        row = []
        for c in columns:
            if c == "grid_id":
                row.append(lab.grid_id)
            elif c in ("x_um", "y_um"):
                row.append(f"{getattr(lab, c):.3f}".rstrip("0").rstrip("."))
            else:
                v = lab.scores.get(c)
                row.append("" if v is None else str(v))
        writer.writerow(row)
    return buf.getvalue()


def save_label(
    path: str | Path,
    grid_id: str,
    x_um: float,
    y_um: float,
    scores: dict[str, int],
    *,
    match_um: float = 5.0,
    lock_timeout_s: float = 30.0,
) -> str:
    """Add or update one square's label in ``labels.csv`` at once, safely.

    Under an exclusive lock on ``labels.csv.lock``: read the file, update the label of the same
    grid within ``match_um`` of (x_um, y_um) (only the given ``scores``) or append a new row,
    write a temporary file beside it and rename it over ``labels.csv``. So concurrent sessions
    lose nothing, and a crash leaves the old file whole. Returns ``"added"`` or ``"updated"``.
    """
    import fcntl
    import time

    from xcryonet.io.atomic import atomic_write_text

    path = Path(path)
    for name, value in scores.items():
        if name not in SCORE_NAMES:
            raise InputError(path, f"unknown score {name!r}")
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 4:
            raise InputError(path, f"{name} {value!r} is outside the scores 0..4")
    if not (math.isfinite(x_um) and math.isfinite(y_um)):
        raise InputError(path, "x_um/y_um must be finite")
    lock_path = path.with_name(path.name + ".lock")
    with open(lock_path, "a+") as lock:
        deadline = time.monotonic() + lock_timeout_s
        while True:
            try:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise InputError(
                        path, f"is locked by another writer for {lock_timeout_s} s"
                    ) from None
                time.sleep(0.01)
        try:
            if path.exists():
                text = path.read_text(encoding="utf-8")
                labels = parse_labels(text, path)
                header = [h.strip() for h in next(csv.reader(io.StringIO(text)))]
            else:
                labels, header = [], list(REQUIRED_COLUMNS)
            for name in scores:
                if name not in header:
                    header.append(name)
            action = "added"
            for k, lab in enumerate(labels):
                near = math.hypot(lab.x_um - x_um, lab.y_um - y_um) <= match_um
                if lab.grid_id == grid_id and near:
                    merged = {**lab.scores, **scores}
                    labels[k] = Label(lab.line, grid_id, lab.x_um, lab.y_um, merged)
                    action = "updated"
                    break
            else:
                labels.append(Label(len(labels) + 2, grid_id, x_um, y_um, dict(scores)))
            atomic_write_text(path, _format_labels(labels, header))
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
    return action
