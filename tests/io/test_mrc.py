"""MRC reader/writer: every supported mode, memory mapping, and every bad file."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import mrcfile
import numpy as np
import pytest

from xcryonet.errors import InputError
from xcryonet.io.mrc import read_mrc, read_mrc_header, write_mrc


def _data(dtype: type, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.random(shape) * 100 + 1).astype(dtype)


@pytest.mark.parametrize(
    ("dtype", "mode"),
    [(np.int8, 0), (np.int16, 1), (np.float32, 2), (np.uint16, 6), (np.float16, 12)],
)
def test_modes_written_by_mrcfile_load(tmp_path: Path, dtype: type, mode: int) -> None:
    data = _data(dtype, (3, 20, 30))
    path = tmp_path / "stack.mrc"
    with mrcfile.new(path) as mrc:
        mrc.set_data(data)
        mrc.voxel_size = 12.5  # Å
    assert read_mrc_header(path).mode == mode
    for mmap in (True, False):
        out, pixel_um = read_mrc(path, mmap=mmap)
        assert out.dtype == data.dtype
        np.testing.assert_array_equal(out, data)
        assert pixel_um == pytest.approx(12.5e-4)


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.uint16, np.float32, np.float16])
def test_write_read_round_trip(tmp_path: Path, dtype: type) -> None:
    data = _data(dtype, (24, 40), seed=1)
    path = write_mrc(tmp_path / "img.mrc", data, 0.5)
    out, pixel_um = read_mrc(path)
    assert out.shape == (24, 40)  # a single image comes back 2D
    assert out.dtype == data.dtype
    np.testing.assert_array_equal(out, data)
    assert pixel_um == pytest.approx(0.5)


def test_written_files_are_valid_mrc2014(tmp_path: Path) -> None:
    for dtype in (np.int16, np.uint16, np.float32):
        path = write_mrc(tmp_path / f"{np.dtype(dtype).name}.mrc", _data(dtype, (2, 8, 9)), 1.0)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with mrcfile.open(path, permissive=False) as mrc:
                np.testing.assert_array_equal(mrc.data, _data(dtype, (2, 8, 9)))
                assert float(mrc.voxel_size.x) == pytest.approx(1e4)


def test_forced_integer_mode_rounds_and_clips(tmp_path: Path) -> None:
    data = np.array([[-5.4, 0.6], [70000.0, 12.5]], dtype=np.float32)
    out, _ = read_mrc(write_mrc(tmp_path / "a.mrc", data, 1.0, mode=6))
    np.testing.assert_array_equal(out, [[0, 1], [65535, 12]])


def test_big_file_is_memory_mapped(tmp_path: Path) -> None:
    data = _data(np.int16, (2, 256, 256))
    path = write_mrc(tmp_path / "big.mrc", data, 1.0)
    out, _ = read_mrc(path)
    assert isinstance(out, np.memmap) or isinstance(out.base, np.memmap)
    assert not out.flags.writeable


def test_byte_swapped_file_loads(tmp_path: Path) -> None:
    data = _data(np.float32, (10, 12))
    path = tmp_path / "be.mrc"
    with mrcfile.new(path) as mrc:
        mrc.set_data(data.astype(">f4"))
    out, _ = read_mrc(path)
    np.testing.assert_array_equal(out, data)


# ----------------------------------------------------------------------------- bad files


def _good(tmp_path: Path, name: str = "good.mrc") -> Path:
    return write_mrc(tmp_path / name, _data(np.float32, (16, 16)), 1.0)


def _patch(path: Path, offset: int, value: bytes) -> Path:
    raw = bytearray(path.read_bytes())
    raw[offset : offset + len(value)] = value
    path.write_bytes(bytes(raw))
    return path


def _expect(path: Path, *words: str) -> None:
    with pytest.raises(InputError) as err:
        read_mrc(path)
    msg = str(err.value)
    assert path.name in msg
    assert "\n" not in msg
    for word in words:
        assert word in msg


def test_truncated(tmp_path: Path) -> None:
    path = _good(tmp_path, "trunc.mrc")
    path.write_bytes(path.read_bytes()[:-10])
    _expect(path, "truncated")
    path.write_bytes(path.read_bytes()[:500])
    _expect(path, "truncated")


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "zero.mrc"
    path.write_bytes(b"")
    _expect(path, "empty")


def test_not_an_mrc(tmp_path: Path) -> None:
    path = tmp_path / "text.mrc"
    path.write_bytes(b"hello" * 400)
    _expect(path, "not an MRC")


def test_corrupt_header_mode(tmp_path: Path) -> None:
    _expect(_patch(_good(tmp_path, "mode.mrc"), 12, np.int32(5).tobytes()), "mode 5")


def test_corrupt_header_negative_dims(tmp_path: Path) -> None:
    _expect(_patch(_good(tmp_path, "neg.mrc"), 0, np.int32(-16).tobytes()), "negative")


def test_corrupt_header_huge_dims_rejected_before_allocation(tmp_path: Path) -> None:
    path = _patch(_good(tmp_path, "huge.mrc"), 0, np.array([300000, 300000, 1000], "<i4").tobytes())
    _expect(path, "absurd")
    path = _patch(_good(tmp_path, "huge2.mrc"), 0, np.array([60000, 60000, 900], "<i4").tobytes())
    _expect(path, "truncated")


def test_trailing_bytes(tmp_path: Path) -> None:
    path = _good(tmp_path, "long.mrc")
    path.write_bytes(path.read_bytes() + b"\0" * 8)
    _expect(path, "corrupt")


def test_empty_image_zero_size(tmp_path: Path) -> None:
    _expect(_patch(_good(tmp_path, "nx0.mrc"), 0, np.int32(0).tobytes()), "empty image")


def test_empty_image_constant(tmp_path: Path) -> None:
    _expect(write_mrc(tmp_path / "flat.mrc", np.zeros((8, 8), np.float32), 1.0), "empty image")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_inf_pixels(tmp_path: Path, bad: float) -> None:
    path = _good(tmp_path, "nan.mrc")
    # Patch a pixel in place: the writer itself refuses non-finite data.
    _patch(path, 1024 + 4 * 37, np.float32(bad).tobytes())
    _expect(path, "NaN or Inf")


def test_nan_found_in_a_later_chunk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("xcryonet.io.mrc._CHUNK_BYTES", 64)
    path = write_mrc(tmp_path / "chunks.mrc", _data(np.float32, (3, 16, 16)), 1.0)
    _patch(path, os.path.getsize(path) - 8, np.float32(np.nan).tobytes())
    _expect(path, "NaN or Inf")


def test_4d_volume_stack_rejected(tmp_path: Path) -> None:
    path = write_mrc(tmp_path / "vs.mrc", _data(np.float32, (4, 8, 8)), 1.0)
    _expect(_patch(path, 88, np.int32(401).tobytes()), "4D")


def test_unsupported_axis_order(tmp_path: Path) -> None:
    _expect(_patch(_good(tmp_path, "axes.mrc"), 64, np.array([2, 1, 3], "<i4").tobytes()), "axis")


def test_missing_file(tmp_path: Path) -> None:
    _expect(tmp_path / "absent.mrc", "cannot read")


def test_writer_refuses_nan_and_leaves_nothing(tmp_path: Path) -> None:
    data = _data(np.float32, (8, 8))
    data[-1, -1] = np.nan
    with pytest.raises(ValueError):
        write_mrc(tmp_path / "out.mrc", data, 1.0)
    assert list(tmp_path.iterdir()) == []


def test_writer_replaces_atomically(tmp_path: Path) -> None:
    path = write_mrc(tmp_path / "out.mrc", _data(np.float32, (8, 8)), 1.0)
    before = path.read_bytes()
    bad = _data(np.float32, (8, 8))
    bad[3, 3] = np.inf
    with pytest.raises(ValueError):
        write_mrc(path, bad, 1.0)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["out.mrc"]
