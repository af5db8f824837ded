"""Fuzz the MRC, .mdoc and Atlas.dm/XML readers with mutated real and written files.

Every mutated input must give the clean one-line ``InputError`` or a correct read: no other
exception, no hang (a hard alarm per example), no memory blow-up (the address space is capped
while this module runs, so a huge allocation fails loudly). Hypothesis runs derandomized, so
the same inputs are tried on every run. In all: 420 MRC + 250 .mdoc + 250 written Atlas.dm +
80 real Atlas.dm + 100 MicroscopeImage XML = 1100 inputs.
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
import resource
import shutil
import signal
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xcryonet.errors import InputError
from xcryonet.io import (
    read_atlas,
    read_mrc,
    write_epu_atlas,
    write_mrc,
    write_serialem_montage,
)
from xcryonet.io.atlas import Atlas
from xcryonet.io.epu import parse_microscope_image

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "epu_real"
# Seconds one example may take before it counts as a hang.
HANG_S = 20
# Multiply the example counts for a deeper (slower) run, e.g. XCRYONET_FUZZ_SCALE=20.
SCALE = max(1, int(os.environ.get("XCRYONET_FUZZ_SCALE", "1")))


def fuzz_settings(n: int) -> settings:
    return settings(
        max_examples=n * SCALE,
        derandomize=True,
        database=None,
        deadline=None,  # the alarm below is the hang guard; wall time varies with machine load
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


@contextlib.contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    def on_alarm(signum: int, frame: object) -> None:
        raise TimeoutError(f"reader took over {seconds} s: a hang")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _vm_size() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize")


@pytest.fixture(scope="module", autouse=True)
def capped_memory() -> Iterator[None]:
    """Cap the address space 2 GB above what the process already uses: a reader that trusts a
    huge header and allocates for it raises MemoryError instead of swapping the machine."""
    if not sys.platform.startswith("linux"):
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = _vm_size() + (2 << 30)
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


# Outcomes per reader call, to show the fuzzing exercised both errors and successful reads.
OUTCOMES = {"error": 0, "read": 0}


def run_reader(fn, *args, **kwargs):
    """Call a reader under the hang guard; return its result, or None on InputError."""
    with time_limit(HANG_S):
        try:
            result = fn(*args, **kwargs)
        except InputError as err:
            msg = str(err)
            assert msg and "\n" not in msg
            OUTCOMES["error"] += 1
            return None
    OUTCOMES["read"] += 1
    return result


class Counter:
    """Counts the examples a nested Hypothesis test really ran."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self) -> None:
        self.n += 1


# ----------------------------------------------------------------------------- mutations

INTERESTING_INTS = [0, 1, -1, 2, 3, 4, 6, 12, 255, 1024, 65535, 2**31 - 1, -(2**31), 10**6]
BAD_NUMBERS = [
    "",
    "-1",
    "0",
    "1e308",
    "-1e308",
    "nan",
    "NaN",
    "inf",
    "-inf",
    "abc",
    "1e-300",
    "5e9",
    "-3",
    "0x10",
    "1,5",
]


@st.composite
def byte_mutation(draw: st.DrawFn, data: bytes) -> bytes:
    """Truncate, flip, overwrite, insert, delete or duplicate bytes of ``data``."""
    n = len(data)
    kind = draw(st.sampled_from(["truncate", "flip", "overwrite", "insert", "delete", "dup"]))
    buf = bytearray(data)
    if kind == "truncate":
        return bytes(buf[: draw(st.integers(0, max(0, n - 1)))])
    pos = draw(st.integers(0, max(0, n - 1)))
    if kind == "flip":
        for _ in range(draw(st.integers(1, 8))):
            p = draw(st.integers(0, n - 1))
            buf[p] ^= 1 << draw(st.integers(0, 7))
        return bytes(buf)
    if kind == "overwrite":
        chunk = draw(st.binary(min_size=1, max_size=16))
        buf[pos : pos + len(chunk)] = chunk
        return bytes(buf)
    if kind == "insert":
        return bytes(buf[:pos]) + draw(st.binary(min_size=1, max_size=64)) + bytes(buf[pos:])
    length = draw(st.integers(1, 256))
    if kind == "delete":
        return bytes(buf[:pos] + buf[pos + length :])
    return bytes(buf[: pos + length] + buf[pos : pos + length] + buf[pos + length :])


@st.composite
def mrc_mutation(draw: st.DrawFn, data: bytes) -> bytes:
    """Byte mutations, or absurd values in the header's int32/float32 words."""
    if draw(st.booleans()):
        return draw(byte_mutation(data))
    buf = bytearray(data)
    for _ in range(draw(st.integers(1, 3))):
        # Words 0-23 hold dims, mode, starts, grid, cell, axes, stats, ispg, nsymbt;
        # 38-39 IMOD stamp/flags; 52-54 MAP tag, machine stamp, rms.
        word = draw(st.one_of(st.integers(0, 23), st.sampled_from([38, 39, 52, 53, 54])))
        if draw(st.booleans()):
            value = draw(
                st.one_of(st.sampled_from(INTERESTING_INTS), st.integers(-(2**31), 2**31 - 1))
            )
            raw = np.int32(value).tobytes()
        else:
            value_f = draw(st.sampled_from([np.nan, np.inf, -np.inf, 0.0, -1.0, 1e38, 1e-38]))
            raw = np.float32(value_f).tobytes()
        buf[4 * word : 4 * word + 4] = raw
    return bytes(buf)


_LEAF = re.compile(rb">([^<>]*)</")


@st.composite
def xml_mutation(draw: st.DrawFn, data: bytes, structural: bool = True) -> bytes:
    """Bad leaf values, removed or duplicated elements (structure), or byte mutations."""
    kinds = ["leaf", "leaf", "bytes"] + (["remove", "duplicate"] if structural else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "bytes":
        return draw(byte_mutation(data))
    if kind == "leaf":
        spans = [m.span(1) for m in _LEAF.finditer(data)]
        a, b = spans[draw(st.integers(0, len(spans) - 1))]
        value = draw(st.one_of(st.sampled_from(BAD_NUMBERS), st.text(max_size=12).map(str)))
        value_b = value.replace("<", "").replace("&", "").encode()
        return data[:a] + value_b + data[b:]
    root = ET.fromstring(data)
    parents = [(p, c) for p in root.iter() for c in p]
    parent, child = parents[draw(st.integers(0, len(parents) - 1))]
    if kind == "remove":
        parent.remove(child)
    else:
        parent.insert(list(parent).index(child), copy.deepcopy(child))
    return ET.tostring(root)


def check_atlas(atlas: Atlas | None) -> None:
    """A successful read must be a coherent Atlas."""
    if atlas is None:
        return
    assert atlas.format in ("epu", "serialem", "mrc")
    assert np.isfinite(atlas.affine).all() and atlas.affine.shape == (2, 3)
    assert np.isfinite(atlas.pixel_size_um) and atlas.pixel_size_um > 0
    assert atlas.shape[0] > 0 and atlas.shape[1] > 0
    if atlas.image is not None:
        assert atlas.image.shape == atlas.shape and atlas.image.dtype == np.float32
        assert np.isfinite(atlas.image).all()


# ----------------------------------------------------------------------------- bases


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fuzz_base")
    rng = np.random.default_rng(0)
    out: dict[str, Path] = {}
    out["mrc_f32"] = write_mrc(root / "f32.mrc", rng.normal(size=(16, 20)).astype(np.float32), 1.5)
    out["mrc_i16"] = write_mrc(
        root / "i16.mrc", rng.integers(-300, 300, (3, 12, 10)).astype(np.int16), 2.0
    )
    out["mrc_u8"] = write_mrc(root / "u8.mrc", rng.integers(0, 255, (9, 14)).astype(np.uint8), 1.0)
    out["mrc_f16"] = write_mrc(root / "f16.mrc", rng.normal(size=(2, 8, 8)).astype(np.float16), 1.0)

    # A 2 x 2 montage / EPU atlas of structured 24 x 32 tiles.
    scene = np.add.outer(np.sin(np.arange(44) / 3.0), np.cos(np.arange(58) / 4.0)) * 50 + 100
    scene += rng.normal(0, 2, scene.shape)
    origins = np.array([[0, 0], [0, 26], [20, 0], [20, 26]], float)
    tiles = [scene[r : r + 24, c : c + 32].astype(np.float32) for r, c in origins.astype(int)]
    centres = origins + (np.array([24, 32]) - 1) / 2
    stage = np.column_stack([-centres[:, 1] * 0.5 + 10, centres[:, 0] * 0.5 - 5])
    out["montage"] = write_serialem_montage(
        root / "mont" / "mont.mrc", [t.astype(np.int16) for t in tiles], origins, stage, 0.5
    )
    sq = [{"id": 7, "row_px": 20, "col_px": 30, "size_px": 10, "x_um": 1, "y_um": 2, "quality": 1}]
    out["epu"] = write_epu_atlas(
        root / "epu" / "Atlas", tiles, origins, stage, 0.5, 300, downsample=2, squares=sq
    )
    return out


def _mutated_copy(src_dir: Path, dst_dir: Path) -> Path:
    if not dst_dir.exists():
        shutil.copytree(src_dir, dst_dir)
    return dst_dir


# ----------------------------------------------------------------------------- MRC


@pytest.mark.parametrize("name", ["mrc_f32", "mrc_i16", "mrc_u8", "mrc_f16"])
def test_fuzz_mrc(
    base: dict[str, Path], tmp_path_factory: pytest.TempPathFactory, name: str
) -> None:
    data = base[name].read_bytes()
    path = tmp_path_factory.mktemp("fuzz_mrc") / "x.mrc"

    n = 105
    ran = Counter()

    @fuzz_settings(n)
    @given(st.data())
    def check(draw: st.DataObject) -> None:
        ran()
        path.write_bytes(draw.draw(mrc_mutation(data)))
        mmap = draw.draw(st.booleans())
        got = run_reader(read_mrc, path, mmap=mmap)
        if got is not None:
            arr, pixel = got
            assert arr.ndim in (2, 3) and arr.size > 0
            assert np.isfinite(pixel) and pixel >= 0
            if arr.dtype.kind == "f":
                assert np.isfinite(arr).all()
        check_atlas(run_reader(read_atlas, path))

    check()
    assert ran.n >= n * SCALE, f"only {ran.n} of {n * SCALE} examples ran"


# ----------------------------------------------------------------------------- .mdoc


@st.composite
def mdoc_mutation(draw: st.DrawFn, text: str) -> bytes:
    lines = text.split("\n")
    kind = draw(st.sampled_from(["delete", "dup_line", "dup_section", "number", "bytes"]))
    if kind == "bytes":
        return draw(byte_mutation(text.encode()))
    i = draw(st.integers(0, len(lines) - 1))
    if kind == "delete":
        del lines[i]
    elif kind == "dup_line":
        lines.insert(i, lines[i])
    elif kind == "dup_section":
        starts = [k for k, line in enumerate(lines) if line.startswith("[ZValue")]
        k = starts[draw(st.integers(0, len(starts) - 1))]
        end = next((m for m in range(k + 1, len(lines)) if lines[m].startswith("[")), len(lines))
        lines[end:end] = lines[k:end]
    else:
        numbered = [k for k, line in enumerate(lines) if re.search(r"-?\d", line)]
        k = numbered[draw(st.integers(0, len(numbered) - 1))]
        tokens = re.findall(r"-?\d+(?:\.\d+)?", lines[k])
        tok = tokens[draw(st.integers(0, len(tokens) - 1))]
        new = draw(st.one_of(st.sampled_from(BAD_NUMBERS), st.integers(-(10**9), 10**9).map(str)))
        lines[k] = lines[k].replace(tok, new, 1)
    return "\n".join(lines).encode()


def test_fuzz_mdoc(base: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> None:
    folder = _mutated_copy(base["montage"].parent, tmp_path_factory.mktemp("fuzz_mdoc") / "m")
    mdoc = folder / "mont.mrc.mdoc"
    text = mdoc.read_text()

    n = 250
    ran = Counter()

    @fuzz_settings(n)
    @given(st.data())
    def check(draw: st.DataObject) -> None:
        ran()
        mdoc.write_bytes(draw.draw(mdoc_mutation(text)))
        check_atlas(
            run_reader(read_atlas, folder / "mont.mrc", load_image=draw.draw(st.booleans()))
        )

    check()
    assert ran.n >= n * SCALE, f"only {ran.n} of {n * SCALE} examples ran"


# ----------------------------------------------------------------------------- Atlas.dm / XML


def test_fuzz_written_atlas_dm(
    base: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> None:
    folder = _mutated_copy(base["epu"], tmp_path_factory.mktemp("fuzz_epu") / "Atlas")
    dm = folder / "Atlas.dm"
    data = dm.read_bytes()

    n = 250
    ran = Counter()

    @fuzz_settings(n)
    @given(st.data())
    def check(draw: st.DataObject) -> None:
        ran()
        dm.write_bytes(draw.draw(xml_mutation(data)))
        check_atlas(run_reader(read_atlas, folder, load_image=draw.draw(st.booleans())))

    check()
    assert ran.n >= n * SCALE, f"only {ran.n} of {n * SCALE} examples ran"


def test_fuzz_real_atlas_dm(tmp_path_factory: pytest.TempPathFactory) -> None:
    folder = tmp_path_factory.mktemp("fuzz_real")
    dm = folder / "Atlas.dm"
    data = (FIXTURES / "Atlas.dm").read_bytes()

    # Only leaf and byte mutations: re-serialising 800 kB per example would dominate the time.
    n = 80
    ran = Counter()

    @fuzz_settings(n)
    @given(st.data())
    def check(draw: st.DataObject) -> None:
        ran()
        dm.write_bytes(draw.draw(xml_mutation(data, structural=False)))
        check_atlas(run_reader(read_atlas, dm))

    check()
    assert ran.n >= n * SCALE, f"only {ran.n} of {n * SCALE} examples ran"


def test_fuzz_microscope_image_xml(
    base: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> None:
    path = tmp_path_factory.mktemp("fuzz_xml") / "tile.xml"
    sources = [
        (FIXTURES / "GridSquare_20240406_102420.xml").read_bytes(),
        next(base["epu"].glob("Tile_*.xml")).read_bytes(),
    ]

    n = 100
    ran = Counter()

    @fuzz_settings(n)
    @given(st.data())
    def check(draw: st.DataObject) -> None:
        ran()
        data = sources[draw.draw(st.integers(0, 1))]
        path.write_bytes(draw.draw(xml_mutation(data)))
        meta = run_reader(parse_microscope_image, path)
        if meta is not None:
            assert 0 < meta.pixel_size_um < 1e3
            assert meta.stage_xy_um is None or np.isfinite(meta.stage_xy_um).all()

    check()
    assert ran.n >= n * SCALE, f"only {ran.n} of {n * SCALE} examples ran"


def test_fuzz_outcomes_were_mixed() -> None:
    """Runs after the fuzz tests above (same module, file order): both outcomes occurred."""
    print(f"fuzz outcomes: {OUTCOMES}")
    assert OUTCOMES["error"] > 100 and OUTCOMES["read"] > 100
