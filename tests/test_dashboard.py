"""The dashboard's Score page under streamlit.testing, against a real MLflow SQLite store that a
tiny training run filled and two small simulated grids."""

import os
from pathlib import Path

import pytest
from dashboard_session import app_env
from streamlit.testing.v1 import AppTest

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "dashboards" / "app.py")
pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _restore_main_module():
    """AppTest leaves ``sys.modules["__main__"]`` set to the app script, so a process spawned
    later in the session (Dask workers, Optuna workers, torch DDP) would run the app on start
    up. Put the real one back after each test."""
    import sys

    main = sys.modules["__main__"]
    yield
    sys.modules["__main__"] = main


def _use_store(monkeypatch, store: Path, labels: Path) -> None:
    """Point the app at the ``store`` fixture (tests/conftest.py) and at ``labels``."""
    for name, value in app_env(store, labels).items():
        monkeypatch.setenv(name, value)


def _copy_labels(store: Path, tmp_path: Path) -> Path:
    import shutil

    labels = tmp_path / "labels.csv"
    shutil.copy(store / "labels.csv", labels)
    return labels


@pytest.fixture
def app(store, monkeypatch, tmp_path):
    _use_store(monkeypatch, store, _copy_labels(store, tmp_path))
    at = AppTest.from_file(APP, default_timeout=180)
    return at.run()


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
    # The navigator: the top N preselected; the operator picks any squares instead.
    pick = app.multiselect[0]
    assert pick.value == [int(r) for r in table["square_id"][:20]]
    nav = [b for b in app.get("download_button") if "SerialEM navigator" in b.label]
    assert nav and "(20 selected squares)" in nav[0].label
    wanted = [int(table["square_id"].iloc[-1]), int(table["square_id"].iloc[0])]
    pick.set_value(wanted).run()
    nav = [b for b in app.get("download_button") if "SerialEM navigator" in b.label]
    assert "(2 selected squares)" in nav[0].label


def test_a_corrupt_upload_shows_the_readers_one_line_error(app):
    app.radio(key="source").set_value("Upload").run()
    assert app.get("file_uploader")
    assert not app.exception
    # AppTest cannot attach files to st.file_uploader; the reader's message is checked here.
    from xcryonet.errors import InputError
    from xcryonet.uploads import unpack_upload

    with pytest.raises(InputError, match="not a readable zip"):
        unpack_upload([("atlas.zip", b"junk")], Path(os.environ.get("TMPDIR", "/tmp")) / "u")


def test_a_missing_params_file_is_one_error_not_a_run_on_the_defaults(store, monkeypatch, tmp_path):
    _use_store(monkeypatch, store, _copy_labels(store, tmp_path))
    missing = tmp_path / "tuned.yml"
    monkeypatch.setenv("XCRYONET_PARAMS", str(missing))
    at = AppTest.from_file(APP, default_timeout=180).run()
    assert not at.exception, at.exception
    assert [e.value for e in at.error] == [f"{missing}: does not exist (XCRYONET_PARAMS)"]
    assert not at.button  # no page ran: nothing to click
    # The store's own params file makes it work again.
    monkeypatch.setenv("XCRYONET_PARAMS", str(store / "params.yaml"))
    at = AppTest.from_file(APP, default_timeout=180).run()
    assert not at.error and at.button


def test_label_page_saves_labels_in_uncertainty_order(store, monkeypatch, tmp_path):
    from xcryonet.labels import read_labels

    labels = _copy_labels(store, tmp_path)
    _use_store(monkeypatch, store, labels)
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


def test_compare_page_lists_runs_and_compares_them(store, monkeypatch, tmp_path):
    _use_store(monkeypatch, store, _copy_labels(store, tmp_path))
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


def test_two_labelling_sessions_at_once_lose_nothing(store, tmp_path):
    """Two dashboard sessions, each its own process, save 100 labels each into one labels.csv
    at the same time (one grid each, several passes over its squares)."""
    import json
    import subprocess
    import sys

    from xcryonet.labels import read_labels
    from xcryonet.stages import label_table

    labels = _copy_labels(store, tmp_path)
    squares = store / "squares"
    grids = sorted(p.name for p in squares.iterdir() if (p / "squares.csv").is_file())
    assert len(grids) == 2
    before = label_table(squares, labels).set_index(["grid_id", "square_id"])
    session = str(Path(__file__).with_name("dashboard_session.py"))
    procs = [
        subprocess.Popen(
            [sys.executable, session, "label", grid, "100"],
            env={**os.environ, **app_env(store, labels)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for grid in grids
    ]
    outs = [p.communicate(timeout=1200) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    saved = {
        (grid, int(sid)): scores
        for grid, (out, _) in zip(grids, outs, strict=True)
        for sid, scores in json.loads(out.strip().splitlines()[-1]).items()
    }
    after = label_table(squares, labels).set_index(["grid_id", "square_id"])
    assert len(saved) > 60  # both sessions went round their grid's squares
    for key, row in after.iterrows():
        want = saved.get(key)
        if want is None:  # untouched: as before
            assert row["labelled"] == before.loc[key, "labelled"]
            continue
        assert row["labelled"], key
        got = {name: int(row[f"label_{name}"]) for name in want}
        assert got == want, (key, got, want)
    # One row per labelled square: nothing duplicated, nothing dropped.
    assert len(read_labels(labels)) == int(after["labelled"].sum())


def test_label_page_commits_the_labels_to_dvc(store, monkeypatch, tmp_path):
    """Label a square with the overall quick button (key 2), then "Commit labels to DVC" in a
    real DVC repo: data.dvc gets the new md5, and a second commit changes nothing."""
    import shutil
    import subprocess
    import sys

    import yaml

    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    labels = repo / "data" / "labels.csv"
    shutil.copy(store / "labels.csv", labels)
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"],
                [sys.executable, "-m", "dvc", "add", "-q", "data"]):  # fmt: skip
        subprocess.run(cmd, cwd=repo, check=True, capture_output=True)
    md5 = lambda: yaml.safe_load((repo / "data.dvc").read_text())["outs"][0]["md5"]  # noqa: E731
    first = md5()
    _use_store(monkeypatch, store, labels)
    monkeypatch.setenv("XCRYONET_REPO", str(repo))
    at = AppTest.from_file(APP, default_timeout=180).run()
    at.sidebar.radio(key="page").set_value("Label squares").run()
    rows = labels.read_text().count("\n")
    at.button(key="quick_overall_2").click().run()
    assert not at.exception, at.exception
    assert labels.read_text().count("\n") == rows + 1
    assert labels.read_text().splitlines()[-1].endswith(",2")
    at.button(key="commit_labels").click().run()
    assert [m.value for m in at.success if "data.dvc" in m.value] == [f"data.dvc updated: {md5()}"]
    assert md5() != first
    status = subprocess.run([sys.executable, "-m", "dvc", "status", "data.dvc"], cwd=repo,
                            capture_output=True, text=True, check=True)  # fmt: skip
    assert "up to date" in status.stdout
    at.button(key="commit_labels").click().run()
    assert any(m.value.startswith("data.dvc unchanged") for m in at.success)


def test_retrain_button_without_a_server_says_what_to_start(store, tmp_path):
    """In its own process: this session's Prefect test harness must not answer instead."""
    import json
    import subprocess
    import sys

    from servers import free_port

    env = {
        **os.environ,
        **app_env(store, _copy_labels(store, tmp_path)),
        # Nothing listens there; a one-line message, not a traceback.
        "PREFECT_API_URL": f"http://127.0.0.1:{free_port()}/api",
    }
    session = Path(__file__).with_name("dashboard_session.py")
    out = subprocess.run([sys.executable, str(session), "retrain"], capture_output=True,
                         text=True, timeout=600, env=env)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["success"] == []
    assert len(result["error"]) == 1 and "make prefect-server" in result["error"][0]
