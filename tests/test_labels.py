import numpy as np
import pandas as pd
import pytest

from xcryonet.errors import InputError
from xcryonet.labels import join_labels, parse_labels

HEADER = "grid_id,x_um,y_um,cracking,contamination,overall\n"


def _squares(pitch=100.0):
    xs, ys = np.meshgrid(np.arange(3) * pitch, np.arange(3) * pitch)
    n = xs.size
    return pd.DataFrame(
        {
            "grid_id": ["g1"] * n,
            "square_id": np.arange(n),
            "x_um": xs.ravel(),
            "y_um": ys.ravel(),
            "pitch_um": pitch,
            "brightness": 2,
            "squareness": 3,
        }
    )


def test_parse_blank_means_unlabelled():
    labels = parse_labels(HEADER + "g1,0,0,1,,4\n")
    assert labels[0].scores == {"cracking": 1, "overall": 4}
    assert labels[0].line == 2


@pytest.mark.parametrize(
    "row, message",
    [
        ("g1,0,0,5,1,1", "line 3: cracking '5' is outside the scores 0..4"),
        ("g1,0,0,-1,1,1", "line 3: cracking '-1' is outside"),
        ("g1,0,0,1.5,1,1", "line 3: cracking '1.5' is outside"),
        ("g1,0,0,x,1,1", "line 3: cracking 'x' is not a number"),
        ("g1,zero,0,1,1,1", "line 3: x_um/y_um must be numbers"),
        ("g1,0,0,1,1", "line 3: 5 cells, expected 6"),
        (",0,0,1,1,1", "line 3: grid_id is blank"),
        ("g1,10,10,1,1,1", "line 3: duplicate of line 2"),
    ],
)
def test_bad_rows_report_line_numbers(row, message):
    with pytest.raises(InputError, match=message):
        parse_labels(HEADER + "g1,10,10,1,1,1\n" + row + "\n", "labels.csv")


def test_bad_header():
    with pytest.raises(InputError, match="missing column"):
        parse_labels("grid_id,x_um,y_um,overall\n")
    with pytest.raises(InputError, match="unknown column"):
        parse_labels(HEADER.strip() + ",sharpness\n")
    with pytest.raises(InputError, match="empty"):
        parse_labels("")


def test_join_nearest_within_radius():
    labels = parse_labels(
        HEADER
        + "g1,3,-4,1,2,3\n"  # 5 µm from square 0: joins
        + "g1,150,0,0,0,0\n"  # half a pitch from two squares (on a bar): no square
        + "g1,200,229,4,4,0\n"  # 29 µm from square 8 (< 0.3 pitch): joins
    )
    out = join_labels(_squares(), labels)
    assert out.loc[0, "label_cracking"] == 1 and out.loc[0, "label_overall"] == 3
    assert out.loc[8, "label_contamination"] == 4
    assert out["label_line"].tolist().count(0) == 7
    # brightness/squareness fall back to the auto-labels when not labelled
    assert (out["label_brightness"] == 2).all()


def test_join_overrides_auto_labels():
    labels = parse_labels(
        "grid_id,x_um,y_um,cracking,contamination,overall,brightness\ng1,0,0,1,1,1,0\n"
    )
    out = join_labels(_squares(), labels)
    assert out.loc[0, "label_brightness"] == 0 and out.loc[1, "label_brightness"] == 2


def test_join_unknown_grid_and_duplicates():
    with pytest.raises(InputError, match="line 2: unknown grid 'g9'"):
        join_labels(_squares(), parse_labels(HEADER + "g9,0,0,1,1,1\n"))
    two = parse_labels(HEADER + "g1,0,0,1,1,1\ng1,5,5,1,1,1\n")
    with pytest.raises(InputError, match="line 3: duplicate label for square 0 of g1 .also line 2"):
        join_labels(_squares(), two)


def test_rejoin_after_reextraction_keeps_labels():
    """Square ids change with other settings; stage positions within 0.3 pitch still join."""
    rng = np.random.default_rng(0)
    first = _squares()
    labels = parse_labels(
        HEADER + "".join(f"g1,{x},{y},1,1,1\n" for x, y in first[["x_um", "y_um"]].to_numpy())
    )
    second = first.sample(frac=1.0, random_state=1).reset_index(drop=True)
    second["square_id"] = np.arange(len(second)) + 100
    second[["x_um", "y_um"]] += rng.normal(0, 3, size=(len(second), 2))
    out = join_labels(second, labels)
    assert (out["label_line"] > 0).all()


def _label_many(args):
    path, worker, n = args
    from xcryonet.labels import save_label

    for i in range(n):
        save_label(path, f"g{worker}", 100.0 * i, 7.0, {"cracking": i % 5, "contamination": 0,
                                                         "overall": 4 - i % 5})  # fmt: skip


def test_two_concurrent_labelling_sessions_lose_nothing(tmp_path):
    import multiprocessing as mp

    from xcryonet.labels import read_labels

    path = tmp_path / "labels.csv"
    path.write_text("grid_id,x_um,y_um,cracking,contamination,overall\ng9,0,0,1,1,1\n")
    with mp.get_context("spawn").Pool(2) as pool:
        pool.map(_label_many, [(path, 0, 100), (path, 1, 100)])
    labels = read_labels(path)
    assert len(labels) == 201
    for worker in (0, 1):
        mine = sorted((lab for lab in labels if lab.grid_id == f"g{worker}"), key=lambda x: x.x_um)
        assert [lab.scores["cracking"] for lab in mine] == [i % 5 for i in range(100)]
    assert not list(tmp_path.glob("*.tmp"))


def test_save_label_updates_in_place_and_refuses_bad_scores(tmp_path):
    from xcryonet.labels import read_labels, save_label

    path = tmp_path / "labels.csv"
    path.write_text("grid_id,x_um,y_um,cracking,contamination,overall\ng1,10.5,20,1,,3\n")
    assert save_label(path, "g1", 12.0, 21.0, {"contamination": 2}, match_um=3) == "updated"
    (lab,) = read_labels(path)
    assert (lab.x_um, lab.y_um, lab.scores) == (10.5, 20.0, {"cracking": 1, "contamination": 2,
                                                             "overall": 3})  # fmt: skip
    assert save_label(path, "g1", 50.0, 21.0, {"brightness": 4}) == "added"
    assert read_labels(path)[1].scores == {"brightness": 4}
    before = path.read_text()
    with pytest.raises(InputError, match="outside the scores"):
        save_label(path, "g1", 0.0, 0.0, {"overall": 5})
    with pytest.raises(InputError, match="unknown score"):
        save_label(path, "g1", 0.0, 0.0, {"ice": 1})
    assert path.read_text() == before
