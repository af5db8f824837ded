"""The pipeline's dataset: a stable train/test split written as ``split.csv``.

The Table 1 experiment draws fresh random splits (``train.split_rows``); a platform that retrains
every night needs the opposite. Each square's role comes from a hash of (seed, grid id, square
id), so a square keeps its role when labels are added, removed or corrected: yesterday's
champion and today's challenger are compared on the same held-out squares, and no square a
model trained on ever moves into the test set.

``split.csv`` columns: ``grid_id, square_id, role`` with role ``train`` (labelled, trains),
``test`` (labelled, held out), ``unlabelled`` (trains the reconstruction losses of ``ss``) or
``unused``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd

from xcryonet.errors import InputError

ROLES = ("train", "test", "unlabelled", "unused")
SPLIT_COLUMNS = ("grid_id", "square_id", "role")


def stable_uniform(seed: int, grid_ids: pd.Series, square_ids: pd.Series) -> np.ndarray:
    """A number in [0, 1) per square, fixed by (seed, grid id, square id) alone. (N,) float64."""
    out = np.empty(len(grid_ids), np.float64)
    for k, (g, s) in enumerate(zip(grid_ids, square_ids, strict=True)):
        digest = hashlib.blake2b(f"{seed}/{g}/{int(s)}".encode(), digest_size=8).digest()
        out[k] = int.from_bytes(digest, "little") / 2.0**64
    return out


def make_split(
    table: pd.DataFrame,
    *,
    test_fraction: float,
    seed: int,
    supervision: str = "ss",
    labeled: int | None = None,
    unlabeled: int | None = None,
    path: str | Path = "labels.csv",
) -> pd.DataFrame:
    """Roles of the squares of ``train.read_table``'s table (columns grid_id, square_id,
    labelled). A labelled square is ``test`` when its hash is below ``test_fraction``; of the
    rest, the ``labeled`` with the smallest hashes train (None = all); for ``ss``, at most
    ``unlabeled`` unlabelled squares with the smallest hashes join (None = all).
    """
    if not 0 <= test_fraction < 1:
        raise InputError("test_fraction", f"must be in [0, 1), got {test_fraction}")
    if supervision not in ("ss", "fs"):
        raise InputError("supervision", f"must be ss or fs, got {supervision!r}")
    u = stable_uniform(seed, table["grid_id"], table["square_id"])
    labelled = table["labelled"].to_numpy(bool)
    if not labelled.any():
        raise InputError(
            path, "no label matches an extracted square (check grid ids and x_um/y_um)"
        )
    role = np.full(len(table), "unused", dtype=object)
    test = labelled & (u < test_fraction)
    role[test] = "test"
    pool = np.flatnonzero(labelled & ~test)
    pool = pool[np.argsort(u[pool], kind="stable")]
    n_lab = len(pool) if labeled is None else labeled
    if not 1 <= n_lab <= len(pool):
        raise InputError(path, f"labeled {n_lab}: {len(pool)} labelled squares are left to train")
    role[pool[:n_lab]] = "train"
    if supervision == "ss":
        unl = np.flatnonzero(~labelled)
        unl = unl[np.argsort(u[unl], kind="stable")]
        if unlabeled is not None and unlabeled < 0:
            raise InputError(path, f"unlabeled must be >= 0, got {unlabeled}")
        # At most ``unlabeled``: a facility with fewer unlabelled squares still trains.
        n_unl = len(unl) if unlabeled is None else min(unlabeled, len(unl))
        role[unl[:n_unl]] = "unlabelled"
    return pd.DataFrame(
        {"grid_id": table["grid_id"].to_numpy(), "square_id": table["square_id"], "role": role}
    )


def read_split(path: str | Path) -> pd.DataFrame:
    """Read and check ``split.csv``."""
    path = Path(path)
    try:
        split = pd.read_csv(path, dtype={"grid_id": str})
    except FileNotFoundError:
        raise InputError(path, "does not exist (run `xcryonet dataset` first)") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise InputError(path, f"is not a readable split CSV ({err})") from None
    missing = [c for c in SPLIT_COLUMNS if c not in split.columns]
    if missing:
        raise InputError(path, f"lacks the column(s) {', '.join(missing)}")
    bad = sorted(set(split["role"].astype(str)) - set(ROLES))
    if bad:
        raise InputError(path, f"unknown role {bad[0]!r} (roles: {', '.join(ROLES)})")
    return split


def rows_from_split(
    table: pd.DataFrame, split: pd.DataFrame, path: str | Path = "split.csv"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train labelled, train unlabelled, test) row numbers of ``table`` named by ``split``.

    A labelled role on a square that has no label now (labels removed since) is an error:
    the split is stale, so ``dvc repro`` must remake it.
    """
    key = pd.MultiIndex.from_arrays([table["grid_id"].astype(str), table["square_id"].astype(int)])
    role_of = pd.Series(
        split["role"].to_numpy(),
        index=pd.MultiIndex.from_arrays(
            [split["grid_id"].astype(str), split["square_id"].astype(int)]
        ),
    )
    if role_of.index.has_duplicates:
        raise InputError(path, "names a square twice")
    roles = role_of.reindex(key).fillna("unused").to_numpy()
    labelled = table["labelled"].to_numpy(bool)
    stale = np.isin(roles, ("train", "test")) & ~labelled
    if stale.any():
        k = int(np.flatnonzero(stale)[0])
        raise InputError(
            path,
            f"square {table['grid_id'].iat[k]}/{table['square_id'].iat[k]} is {roles[k]} but has "
            "no label: the split is older than the labels (run `xcryonet dataset` again)",
        )
    lab, unl, test = (np.flatnonzero(roles == r) for r in ("train", "unlabelled", "test"))
    if len(lab) == 0:
        raise InputError(path, "has no labelled training square")
    return lab, unl, test
