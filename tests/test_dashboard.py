"""The dashboard's Score page under streamlit.testing, against a real MLflow SQLite store that a
tiny training run filled and two small simulated grids."""

import os
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from xcryonet.config import ExtractConfig, Params, SimulateConfig, TrainConfig
from xcryonet.model import ModelConfig

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "dashboards" / "app.py")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Two simulated grids, extracted, a tiny tracked model registered as champion."""
    from xcryonet.stages import extract, make_dataset, register_model, simulate, train_model

    root = tmp_path_factory.mktemp("dash")
    sim = SimulateConfig(n_grids=2, squares_per_grid=40, workers=1)
    simulate(sim, out_dir=str(root / "raw"), labels_path=str(root / "labels.csv"),
             truth_dir=str(root / "truth"))  # fmt: skip
    extract(sorted((root / "raw").iterdir()), root / "squares", ExtractConfig(workers=1))
    params = Params(
        model=ModelConfig(width=4, hidden=8, input_px=16),
        train=TrainConfig(epochs=1, batch_size=8, progress=False),
    )
    make_dataset(root / "squares", root / "labels.csv", root / "dataset", params)
    split = root / "dataset" / "split.csv"
    train_model(root / "squares", root / "labels.csv", root / "m", params, split_csv=split,
                track=True)  # fmt: skip
    register_model(root / "m", root / "squares", root / "labels.csv", split, params)
    return root


@pytest.fixture
def app(store, monkeypatch):
    monkeypatch.setenv("XCRYONET_GRIDS", str(store / "raw"))
    monkeypatch.setenv("XCRYONET_PARAMS", str(store / "none.yaml"))
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
