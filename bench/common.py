"""Shared by the bench scripts: allocator settings, peak-memory readout, the labelled crops,
one-line errors."""

from __future__ import annotations

import argparse
import os
import resource
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

# glibc's default thresholds make big-array and CPU training work spend most of its time in
# mmap/munmap; every benchmark process runs with these (README, Makefile).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "4294967296"}


def ensure_malloc_env() -> None:
    """Re-execute this script with ``MALLOC_ENV`` when it is missing (it must be set at start)."""
    if any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC_ENV})


def rss_gb() -> float:
    """Peak resident set size of this process so far, GB.

    Reads ``VmHWM`` from /proc/self/status: ``ru_maxrss`` would report the parent's peak when the
    parent was bigger (Linux keeps it across fork and exec).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def add_data_args(ap: argparse.ArgumentParser, root: Path) -> None:
    """``--squares`` and ``--labels``, defaulting to the demo's folders under ``root``."""
    ap.add_argument("--squares", default=str(root / "squares"), help="xcryonet extract output")
    ap.add_argument("--labels", default=str(root / "data" / "labels.csv"), help="labels.csv")


def labelled_crops(
    squares: str | Path, labels: str | Path
) -> tuple[pd.DataFrame, np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """The labelled squares' table, scores y (N, 5) in ``SCORE_NAMES`` order (NaN = no label),
    and their native-resolution crops and open-area masks, in table order."""
    from xcryonet.experiment import raw_crops
    from xcryonet.labels import SCORE_NAMES
    from xcryonet.train import read_table

    table = read_table(squares, labels)
    y = table[[f"label_{s}" for s in SCORE_NAMES]].to_numpy(float)
    crops, masks = raw_crops(Path(squares), table)
    return table, y, crops, masks


def finished_runs(experiment: str | Path) -> list[Path]:
    """The run folders under ``experiment/runs/`` that hold a saved model, sorted; an
    ``InputError`` naming the folder when there is none."""
    from xcryonet.errors import InputError
    from xcryonet.train import MODEL_FILE

    runs = sorted(p.parent for p in Path(experiment).glob(f"runs/*/{MODEL_FILE}"))
    if not runs:
        raise InputError(experiment, "no finished runs under runs/")
    return runs


def label_matrix(table: pd.DataFrame) -> np.ndarray:
    """The labels (N, 5) of ``read_table``'s rows in ``SCORE_NAMES`` order (NaN = no label)."""
    from xcryonet.labels import SCORE_NAMES

    return table[[f"label_{s}" for s in SCORE_NAMES]].to_numpy(float)


def fs_splits(
    table: pd.DataFrame, labeled: int, repeats: int, test_fraction: float, labels: str | Path
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(labelled training rows, test rows) of the experiment's fully supervised splits
    (``train.split_rows``, seeds 0..repeats-1)."""
    from xcryonet.train import split_rows

    splits = []
    for r in range(repeats):
        lab, _, test = split_rows(
            table,
            supervision="fs",
            labeled=labeled,
            unlabeled=0,
            test_fraction=test_fraction,
            seed=r,
            path=labels,
        )
        splits.append((lab, test))
    return splits


def monotone_fit_maes(
    stat: np.ndarray, y: np.ndarray, splits: list[tuple[np.ndarray, np.ndarray]]
) -> list[float]:
    """Rounded test MAE per split (``fs_splits``) of a monotone (isotonic) map from one
    statistic (N,) to one score (N,) (NaN = no label), fitted on the training rows."""
    from sklearn.isotonic import IsotonicRegression

    maes = []
    for lab, test in splits:
        ok = ~np.isnan(y[lab])
        fit = IsotonicRegression(out_of_bounds="clip").fit(stat[lab][ok], y[lab][ok])
        t_ok = ~np.isnan(y[test])
        pred = np.rint(fit.predict(stat[test][t_ok]))
        maes.append(float(np.abs(pred - y[test][t_ok]).mean()))
    return maes


def read_truth(truth_dir: str | Path) -> pd.DataFrame | None:
    """The simulator's per-square truth of every grid in ``truth_dir`` (one CSV per grid;
    ``grids.csv``, a row per grid, is skipped), or None with a one-line message on stderr when
    there is none."""
    tables = [pd.read_csv(f) for f in sorted(Path(truth_dir).glob("*.csv"))]
    tables = [t for t in tables if "square_id" in t.columns]
    if not tables:
        print(f"{truth_dir}: no per-square truth CSVs (run `make demo` first)", file=sys.stderr)
        return None
    return pd.concat(tables, ignore_index=True)


def report_or_one_line_error(
    script: str, report: Callable[[argparse.Namespace], int], args: argparse.Namespace
) -> int:
    """Run ``report(args)``; bad input (``InputError``) becomes one line on stderr naming the
    file and the problem, prefixed by ``script``, and exit status 2, as the CLI does."""
    from xcryonet.errors import InputError

    try:
        return report(args)
    except InputError as err:
        print(f"{script}: {err}", file=sys.stderr)
        return 2
