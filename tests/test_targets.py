import numpy as np
import pandas as pd
import pytest

from xcryonet.labels import SCORE_NAMES
from xcryonet.targets import TARGET_COLUMNS, rank_targets, select_top


def make_squares(n: int, grid: str = "g1", complete=None) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame(
        {
            "grid_id": grid,
            "square_id": np.arange(n),
            "row_px": rng.uniform(0, 100, n),
            "col_px": rng.uniform(0, 100, n),
            "x_um": rng.uniform(-900, 900, n),
            "y_um": rng.uniform(-900, 900, n),
            "complete": [True] * n if complete is None else complete,
        }
    )


def scores_with_overall(overall, cracking=None, contamination=None) -> np.ndarray:
    n = len(overall)
    s = np.full((n, len(SCORE_NAMES)), 2.0)
    s[:, 4] = overall
    if cracking is not None:
        s[:, 2] = cracking
    if contamination is not None:
        s[:, 3] = contamination
    return s


def test_columns_rounding_and_order():
    squares = make_squares(4)
    scores = scores_with_overall([1.234, 3.456, 2.0, 3.9])
    scores[:, 0] = [0.111, 0.115, 4.0, 0.0]
    out = rank_targets(squares, scores)
    assert tuple(out.columns) == TARGET_COLUMNS
    assert list(out["square_id"]) == [3, 1, 2, 0]
    assert list(out["rank"]) == [1, 2, 3, 4]
    assert str(out["rank"].dtype) == "Int64"
    assert list(out["overall"]) == [3.9, 3.46, 2.0, 1.23]
    row = out.set_index("square_id").loc[0]
    assert row["brightness"] == 0.11
    assert row["x_um"] == squares.loc[0, "x_um"] and row["y_um"] == squares.loc[0, "y_um"]
    assert list(out.index) == [0, 1, 2, 3]


def test_ties_broken_by_damage_then_square_id():
    squares = make_squares(5)
    # Equal overall after rounding (3.001 -> 3.0); damage decides, then square_id.
    scores = scores_with_overall(
        [3.0, 3.001, 3.0, 3.0, 2.0],
        cracking=[1.0, 0.0, 0.5, 0.5, 0.0],
        contamination=[1.0, 0.5, 0.0, 0.0, 0.0],
    )
    out = rank_targets(squares, scores)
    # damage: sq0 2.0, sq1 0.5, sq2 0.5, sq3 0.5 -> sq1, sq2, sq3 (by id), sq0, then sq4
    assert list(out["square_id"]) == [1, 2, 3, 0, 4]
    assert list(out["rank"]) == [1, 2, 3, 4, 5]


def test_incomplete_squares_unranked_and_last():
    squares = make_squares(4, complete=[True, False, True, False])
    scores = scores_with_overall([1.0, 4.0, 2.0, 3.0])
    out = rank_targets(squares, scores)
    assert list(out["square_id"]) == [2, 0, 1, 3]
    assert list(out["rank"][:2]) == [1, 2]
    assert out["rank"][2:].isna().all()
    dropped = rank_targets(squares, scores, include_incomplete=False)
    assert list(dropped["square_id"]) == [2, 0]
    assert list(dropped["rank"]) == [1, 2]


def test_complete_column_as_text():
    squares = make_squares(3, complete=["True", "false", "1"])
    out = rank_targets(squares, scores_with_overall([1.0, 2.0, 3.0]))
    assert list(out["square_id"]) == [2, 0, 1]
    assert out["rank"].isna().sum() == 1
    with pytest.raises(ValueError, match="complete"):
        rank_targets(make_squares(1, complete=["maybe"]), scores_with_overall([1.0]))


def test_ranks_restart_per_grid():
    squares = pd.concat([make_squares(3, "b"), make_squares(2, "a")], ignore_index=True)
    out = rank_targets(squares, scores_with_overall([1, 3, 2, 0, 4]))
    assert list(out["grid_id"]) == ["a", "a", "b", "b", "b"]
    assert list(out["square_id"]) == [1, 0, 1, 2, 0]
    assert list(out["rank"]) == [1, 2, 1, 2, 3]


def test_blank_rank_in_csv(tmp_path):
    squares = make_squares(2, complete=[True, False])
    out = rank_targets(squares, scores_with_overall([1.0, 2.0]))
    path = tmp_path / "targets.csv"
    out.to_csv(path, index=False)
    lines = path.read_text().splitlines()
    assert lines[0] == ",".join(TARGET_COLUMNS)
    assert lines[1].endswith(",1") and lines[2].endswith(",")


@pytest.mark.parametrize(
    "scores, match",
    [
        (np.zeros((3, 4)), "shape"),
        (np.zeros((2, 5)), "shape"),
        (np.full((3, 5), np.nan), "NaN"),
    ],
)
def test_bad_scores(scores, match):
    with pytest.raises(ValueError, match=match):
        rank_targets(make_squares(3), scores)


def test_bad_squares():
    with pytest.raises(ValueError, match="complete"):
        rank_targets(make_squares(2).drop(columns="complete"), np.zeros((2, 5)))
    squares = make_squares(2)
    squares.loc[0, "x_um"] = np.nan
    with pytest.raises(ValueError, match="x_um"):
        rank_targets(squares, np.zeros((2, 5)))


def test_select_top():
    squares = pd.concat(
        [make_squares(4, "a", complete=[True, True, True, False]), make_squares(2, "b")],
        ignore_index=True,
    )
    targets = rank_targets(squares, scores_with_overall([1, 3, 2, 4, 0.5, 2.5]))
    top = select_top(targets, 2)
    assert list(zip(top["grid_id"], top["square_id"], strict=True)) == [
        ("a", 1),
        ("a", 2),
        ("b", 1),
        ("b", 0),
    ]
    assert list(top["rank"]) == [1, 2, 1, 2]
    top = select_top(targets, 10, min_overall=2.0)
    assert list(zip(top["grid_id"], top["square_id"], strict=True)) == [
        ("a", 1),
        ("a", 2),
        ("b", 1),
    ]
    assert len(select_top(targets, 0)) == 0
    assert tuple(select_top(targets, 0).columns) == TARGET_COLUMNS
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="non-negative integer"):
            select_top(targets, bad)


def test_select_top_from_csv(tmp_path):
    targets = rank_targets(make_squares(3, complete=[True, False, True]), np.ones((3, 5)))
    targets.to_csv(tmp_path / "t.csv", index=False)
    back = pd.read_csv(tmp_path / "t.csv")
    top = select_top(back, 5)
    assert list(top["square_id"]) == [0, 2]
