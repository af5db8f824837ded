"""Uploaded atlases: sanitized names, zip members that could escape refused, size limits."""

import io
import stat
import zipfile

import pytest

from xcryonet.errors import InputError
from xcryonet.uploads import safe_name, unpack_upload


def _zip(members):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members:
            if isinstance(data, zipfile.ZipInfo):
                zf.writestr(data, b"target")
            else:
                zf.writestr(name, data)
    return buf.getvalue()


def test_safe_names():
    assert safe_name("../../etc/passwd") == "passwd"
    assert safe_name("C:\\atlas\\Atlas 1.mrc") == "Atlas_1.mrc"
    assert safe_name(".bashrc") == "bashrc"
    assert safe_name("..") == "upload"


def test_epu_zip_unpacks_to_its_atlas_folder(tmp_path):
    data = _zip([("session/Atlas/Atlas.dm", b"x"), ("session/Atlas/Tile_1.mrc", b"y")])
    got = unpack_upload([("epu.zip", data)], tmp_path / "u")
    assert got == tmp_path / "u" / "session" / "Atlas"
    assert (got / "Tile_1.mrc").read_bytes() == b"y"


@pytest.mark.parametrize(
    "member, problem",
    [("../escape.mrc", "unsafe path"), ("/etc/cron.d/x", "unsafe path"), ("a/../../b", "unsafe")],
)
def test_zip_members_that_could_escape_are_refused(tmp_path, member, problem):
    data = _zip([(member, b"x")])
    with pytest.raises(InputError, match=problem) as err:
        unpack_upload([("evil.zip", data)], tmp_path / "u")
    assert "evil.zip" in str(err.value)
    assert not any((tmp_path / "u").rglob("*.mrc"))
    assert not (tmp_path / "escape.mrc").exists()


def test_links_and_zip_bombs_are_refused(tmp_path):
    link = zipfile.ZipInfo("Atlas/link")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    with pytest.raises(InputError, match="link"):
        unpack_upload([("l.zip", _zip([("Atlas/link", link)]))], tmp_path / "a")
    big = _zip([("Atlas/Atlas.dm", b"0" * 5000)])
    with pytest.raises(InputError, match="unpacks to more than"):
        unpack_upload([("big.zip", big)], tmp_path / "b", max_unpacked=1000)


def test_single_files(tmp_path):
    got = unpack_upload([("../grid 1.mrc", b"m"), ("grid 1.mdoc", b"d")], tmp_path / "s")
    assert got == tmp_path / "s" / "grid_1.mrc" and (tmp_path / "s" / "grid_1.mdoc").exists()
    with pytest.raises(InputError, match="not an atlas file"):
        unpack_upload([("notes.txt", b"x")], tmp_path / "t")
    with pytest.raises(InputError, match="upload one .mrc"):
        unpack_upload([("a.mrc", b"x"), ("b.mrc", b"y")], tmp_path / "v")
    with pytest.raises(InputError, match="not a readable zip"):
        unpack_upload([("x.zip", b"junk")], tmp_path / "w")
