"""The dashboard's Score page under streamlit.testing, against a real MLflow SQLite store that a
tiny training run filled and two small simulated grids."""

import os
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "dashboards" / "app.py")
pytestmark = pytest.mark.slow


@pytest.fixture
def app(store, monkeypatch):
    monkeypatch.setenv("XCRYONET_GRIDS", str(store / "raw"))
    monkeypatch.setenv("XCRYONET_PARAMS", str(store / "params.yaml"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store_uri(store))
    at = AppTest.from_file(APP, default_timeout=180)
    return at.run()


def store_uri(root):
    """The tracking URI of the ``store`` fixture (tests/conftest.py)."""
    return f"sqlite:///{root / 'mlruns.db'}"


def test_score_page_scores_a_grid_and_shows_every_part(app):
    assert not app.exception, app.exception
    assert app.selectbox[0].value == "models:/xcryonet@champion"
    assert [Path(str(o)).name for o in app.selectbox[1].options] == ["grid01", "grid02"]
    app.button[0].click().run()
    assert not app.exception, app.exception
    table = app.dataframe[0].value
    assert len(table) > 10 and list(table["rank"][:3]) == [1, 2, 3]
    assert table["overall"].is_monotonic_decreasing
    images = app.get("image")  # the overview and the selected square's attention maps
    assert len(images) == 2
    assert "coloured by overall" in images[0].captions[0]
    assert "attention maps" in images[1].captions[0]
    # Filters narrow the table; picking another square redraws its maps from the cache.
    app.slider[0].set_value(3.0).run()
    assert not app.exception, app.exception
    assert len(app.dataframe[0].value) < len(table)
    assert (app.dataframe[0].value["overall"] >= 3.0).all()
    app.slider[0].set_value(4.5 - 0.5).run()  # maybe nothing passes: still no error
    assert not app.exception, app.exception
    app.slider[0].set_value(0.0).run()
    first_maps = app.get("image")[1].value
    last = int(app.selectbox[2].options[-1].lstrip("#"))
    app.selectbox[2].set_value(last).run()
    assert app.get("image")[1].value != first_maps
    assert not app.exception
    assert any("SerialEM navigator" in b.label for b in app.get("download_button"))


def test_a_corrupt_upload_shows_the_readers_one_line_error(app):
    app.radio(key="source").set_value("Upload").run()
    assert app.get("file_uploader")
    assert not app.exception
    # AppTest cannot attach files to st.file_uploader; the reader's message is checked here.
    from xcryonet.errors import InputError
    from xcryonet.uploads import unpack_upload

    with pytest.raises(InputError, match="not a readable zip"):
        unpack_upload([("atlas.zip", b"junk")], Path(os.environ.get("TMPDIR", "/tmp")) / "u")


def test_label_page_saves_labels_in_order_and_commits(store, monkeypatch, tmp_path):
    import shutil

    from xcryonet.labels import read_labels

    labels = tmp_path / "labels.csv"
    shutil.copy(store / "labels.csv", labels)
    monkeypatch.setenv("XCRYONET_SQUARES", str(store / "squares"))
    monkeypatch.setenv("XCRYONET_LABELS", str(labels))
    monkeypatch.setenv("XCRYONET_PARAMS", str(store / "params.yaml"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store_uri(store))
    at = AppTest.from_file(APP, default_timeout=180).run()
    at.sidebar.radio(key="page").set_value("Label squares").run()
    assert not at.exception, at.exception
    before = len(read_labels(labels))
    progress_before = at.get("progress")[0].proto.text
    # The first square in uncertainty order is an unlabelled one.
    assert any("not labelled yet" in m.value for m in at.markdown)
    first = at.get("image")[0].proto.imgs[0].caption
    sid = int(first.split("#")[1])
    at.radio(key=f"lab_cracking_{sid}").set_value(3)
    at.radio(key=f"lab_overall_{sid}").set_value(1)
    at.button(key="save_label").click().run()
    assert not at.exception, at.exception
    after = read_labels(labels)
    assert len(after) == before + 1
    assert after[-1].grid_id == "grid01" and after[-1].scores["cracking"] == 3
    assert after[-1].scores["overall"] == 1
    assert at.get("progress")[0].proto.text != progress_before
    # The next square is another one.
    assert at.get("image")[0].proto.imgs[0].caption != first


def test_compare_page_lists_runs_and_compares_them(store, monkeypatch):
    monkeypatch.setenv("XCRYONET_PARAMS", str(store / "params.yaml"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store_uri(store))
    at = AppTest.from_file(APP, default_timeout=180).run()
    at.sidebar.radio(key="page").set_value("Compare runs").run()
    assert not at.exception, at.exception
    runs = at.dataframe[0].value
    assert len(runs) >= 1
    assert len(runs) == 1 and "champion (v1)" in runs["alias"][0]
    assert {"variant", "supervision", "labeled", "cracking", "overall"} <= set(runs.columns)
    assert at.get("arrow_vega_lite_chart") or at.get("vega_lite_chart")
    assert at.get("image")[0].captions[0].startswith(str(runs["name"][0]))
    # The Optuna study: its three trials, their history and the parameter importances.
    trials = at.dataframe[1].value
    assert sorted(trials["number"]) == [0, 1, 2]
    assert "params_lr" in trials.columns
    assert not any("No study yet" in i.value for i in at.info)
