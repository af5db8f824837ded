import os

import pytest

from xcryonet.io.atomic import atomic_dir, atomic_path, atomic_write_text


def test_atomic_file_gets_normal_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "f").write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755


def test_failed_write_leaves_nothing_and_keeps_old(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_failed_dir_keeps_old(tmp_path):
    out = tmp_path / "d"
    out.mkdir()
    (out / "f").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:
        (tmp / "f").write_text("new")
        raise RuntimeError("boom")
    assert (out / "f").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["d"]
