"""Shared by the bench scripts: allocator settings and peak-memory readout."""

from __future__ import annotations

import os
import resource
import sys
from pathlib import Path

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
