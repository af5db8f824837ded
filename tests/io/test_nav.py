import numpy as np
import pandas as pd
import pytest

from xcryonet.errors import InputError
from xcryonet.io.nav import read_navigator, write_navigator
from xcryonet.targets import rank_targets, select_top

REQUIRED = ("Color", "StageXYZ", "NumPts", "Regis", "Type", "PtsX", "PtsY", "Acquire", "Note")


def make_targets(n: int = 6, grid: str = "grid01", seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    squares = pd.DataFrame(
        {
            "grid_id": grid,
            "square_id": np.arange(n),
            "x_um": rng.uniform(-900, 900, n),
            "y_um": rng.uniform(-900, 900, n),
            "complete": [True] * (n - 1) + [False],
        }
    )
    return rank_targets(squares, rng.uniform(0, 4, (n, 5)))


def assert_nothing_written(folder, name):
    assert sorted(p.name for p in folder.iterdir() if name in p.name) == []


def test_round_trip(tmp_path):
    top = select_top(make_targets(8), 5)
    path = write_navigator(tmp_path / "top.nav", top, label_prefix="G1-", stage_z_um=-12.5)
    items = read_navigator(path)
    assert len(items) == 5
    assert [it["label"] for it in items] == [f"G1-{r}" for r in top["rank"]]
    for it, row in zip(items, top.itertuples(), strict=True):
        assert it["StageXYZ"] == pytest.approx((row.x_um, row.y_um, -12.5), abs=1e-3)
        assert it["PtsX"] == pytest.approx([row.x_um], abs=1e-3)
        assert it["PtsY"] == pytest.approx([row.y_um], abs=1e-3)
        assert it["Acquire"] == 1
        assert (it["Type"], it["NumPts"], it["Regis"], it["Color"]) == (0, 1, 1, 0)
        assert f"square {row.square_id} rank {row.rank}" in it["Note"]
        assert f"overall {row.overall:.2f}" in it["Note"]


def test_file_layout(tmp_path):
    path = write_navigator(tmp_path / "t.nav", select_top(make_targets(), 3))
    text = path.read_text()
    assert text.startswith("AdocVersion = 2.00\n")
    sections = text.split("\n\n")[1:]
    assert len([s for s in sections if s.strip()]) == 3
    for section in filter(str.strip, sections):
        lines = section.strip().splitlines()
        assert lines[0].startswith("[Item = ") and lines[0].endswith("]")
        keys = [line.split("=")[0].strip() for line in lines[1:]]
        assert set(REQUIRED) <= set(keys)
        assert len(keys) == len(set(keys))
    assert [it["label"] for it in read_navigator(path)] == ["1", "2", "3"]


def test_acquire_off_and_grid_filter(tmp_path):
    targets = pd.concat([make_targets(4, "a"), make_targets(3, "b", seed=1)], ignore_index=True)
    path = write_navigator(tmp_path / "b.nav", targets.dropna(), grid_id="b", acquire=False)
    items = read_navigator(path)
    assert len(items) == 2 and all(it["Acquire"] == 0 for it in items)
    assert all("grid b " in it["Note"] for it in items)


def test_ranks_read_back_from_csv(tmp_path):
    # A targets.csv read back has float ranks and blank cells; ranked rows still write.
    make_targets().to_csv(tmp_path / "t.csv", index=False)
    back = pd.read_csv(tmp_path / "t.csv")
    items = read_navigator(write_navigator(tmp_path / "t.nav", select_top(back, 2)))
    assert [it["label"] for it in items] == ["1", "2"]


def bad_targets():
    good = select_top(make_targets(), 3)
    nan_pos = good.copy()
    nan_pos.loc[1, "x_um"] = np.nan
    inf_pos = good.copy()
    inf_pos.loc[0, "y_um"] = np.inf
    far = good.copy()
    far.loc[0, "x_um"] = 2e6  # nm, not µm
    two_grids = pd.concat([good, good.assign(grid_id="other")], ignore_index=True)
    unranked = make_targets()  # includes the incomplete square
    repeated = good.copy()
    repeated["rank"] = 1
    return {
        "empty": (good.iloc[:0], "empty"),
        "nan stage": (nan_pos, "not finite"),
        "inf stage": (inf_pos, "not finite"),
        "far stage": (far, "outside"),
        "two grids": (two_grids, "2 grids"),
        "no rank": (unranked, "no rank"),
        "repeated": (repeated, "repeated"),
        "no columns": (good.drop(columns=["x_um"]), "x_um"),
    }


@pytest.mark.parametrize("case", list(bad_targets()))
def test_bad_targets(tmp_path, case):
    targets, match = bad_targets()[case]
    with pytest.raises(InputError, match=match) as err:
        write_navigator(tmp_path / "bad.nav", targets)
    assert "\n" not in str(err.value) and "bad.nav" in str(err.value)
    assert_nothing_written(tmp_path, "bad.nav")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"stage_z_um": float("nan")}, "stage Z"),
        ({"label_prefix": "grid 1"}, "label prefix"),
        ({"label_prefix": "a]"}, "label prefix"),
        ({"grid_id": "nope"}, "no targets for grid"),
    ],
)
def test_bad_options(tmp_path, kwargs, match):
    with pytest.raises(InputError, match=match):
        write_navigator(tmp_path / "bad.nav", select_top(make_targets(), 2), **kwargs)
    assert_nothing_written(tmp_path, "bad.nav")


def test_unwritable_path(tmp_path):
    targets = select_top(make_targets(), 2)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(InputError, match="cannot write"):
        write_navigator(blocker / "t.nav", targets)  # parent is a file
    folder = tmp_path / "taken.nav"
    folder.mkdir()
    with pytest.raises(InputError, match="cannot write"):
        write_navigator(folder, targets)  # the path is a directory
    assert list(folder.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "taken.nav"]


def test_failed_write_keeps_old_file(tmp_path):
    path = write_navigator(tmp_path / "t.nav", select_top(make_targets(), 2))
    before = path.read_text()
    with pytest.raises(InputError):
        write_navigator(path, select_top(make_targets(), 2).iloc[:0])
    assert path.read_text() == before


VALID_ITEM = "[Item = 1]\nColor = 0\nStageXYZ = 1 2 0\nNumPts = 1\nRegis = 1\nType = 0\n"
PTS = "PtsX = 1\nPtsY = 2\n"


def nav(body: str, old: str = "", new: str = "") -> bytes:
    """A navigator file: the header, then ``body`` with ``old`` replaced by ``new``."""
    return ("AdocVersion = 2.00\n" + (body.replace(old, new) if old else body)).encode()


@pytest.mark.parametrize(
    "content, match",
    [
        (b"", "AdocVersion"),
        (b"\x00\xff\xfe garbage \x89PNG\r\n", "AdocVersion"),
        (b"hello world\n[Item = 1]\n", "AdocVersion"),
        (b"AdocVersion = two\n", "AdocVersion"),
        (b'<?xml version="1.0"?>\n<navigator/>', "XML"),
        (nav(VALID_ITEM + PTS, "Regis = 1\n"), "Regis"),
        (nav(VALID_ITEM + PTS, "StageXYZ = 1 2 0\n"), "StageXYZ"),
        (nav(VALID_ITEM), "PtsX"),
        (nav(VALID_ITEM + PTS, "1 2 0", "1 2"), "3 number"),
        (nav(VALID_ITEM + PTS, "1 2 0", "1 x 0"), "numeric"),
        (nav(VALID_ITEM + PTS, "Type = 0", "Type = pt"), "integer"),
        (nav(VALID_ITEM + "PtsX = 1 3\nPtsY = 2\n"), "PtsX needs 1"),
        (nav(VALID_ITEM + PTS + "garbage line\n"), "key = value"),
        (nav("[Item = 1\nColor = 0\n"), "unclosed"),
        (nav(VALID_ITEM + PTS, "[Item = 1]", "[Item = ]"), "without a label"),
    ],
)
def test_read_rejects_garbage(tmp_path, content, match):
    path = tmp_path / "x.nav"
    path.write_bytes(content)
    with pytest.raises(InputError, match=match) as err:
        read_navigator(path)
    assert "\n" not in str(err.value)


def test_read_missing_file(tmp_path):
    with pytest.raises(InputError, match="cannot read"):
        read_navigator(tmp_path / "missing.nav")


def test_read_serialem_style_file(tmp_path):
    # As SerialEM writes it: global keys, a map item, other section types, comments, CRLF.
    text = (
        "AdocVersion = 2.00\r\nLastSavedAs = C:\\data\\grid.nav\r\n\r\n"
        "[Item = 1]\r\nColor = 2\r\nStageXYZ = 0 0 -5.2\r\nNumPts = 5\r\nRegis = 1\r\n"
        "Type = 2\r\nNote = Sec 0 - grid.mrc\r\nMapFile = C:\\data\\grid.mrc\r\nMapID = 101\r\n"
        "MapScaleMat = 0.1 0 0 0.1\r\n"
        "PtsX = -1 1 1 -1 -1\r\nPtsY = -1 -1 1 1 -1\r\n\r\n"
        "# a comment\r\n[MontParam = 0]\r\nXFrame = 100\r\n\r\n"
        "[Item = 2]\r\nColor = 0\r\nStageXYZ = 10.5 -20.25 -5.2\r\nNumPts = 1\r\nRegis = 1\r\n"
        "Type = 0\r\nDrawnID = 101\r\nPtsX = 10.5\r\nPtsY = -20.25\r\n"
    )
    path = tmp_path / "s.nav"
    path.write_bytes(text.encode())
    items = read_navigator(path)
    assert [it["label"] for it in items] == ["1", "2"]
    assert items[0]["MapFile"] == "C:\\data\\grid.mrc" and items[0]["MapID"] == 101
    assert len(items[0]["PtsX"]) == 5
    assert items[1]["StageXYZ"] == (10.5, -20.25, -5.2) and "Acquire" not in items[1]


def test_read_empty_navigator(tmp_path):
    path = tmp_path / "e.nav"
    path.write_text("AdocVersion = 2.00\nLastSavedAs = e.nav\n")
    assert read_navigator(path) == []
