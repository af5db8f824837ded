"""Shared test setup: every test logs to its own session's MLflow store, never the project's."""

import os

import pytest
from dashboard_session import store_uri


@pytest.fixture(scope="session", autouse=True)
def mlflow_store(tmp_path_factory):
    """A real SQLite tracking store (and artifacts beside it) for the whole session."""
    root = tmp_path_factory.mktemp("mlflow")
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlruns.db'}"
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    yield root
    if old is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = old


@pytest.fixture(scope="session")
def harness():
    """One Prefect test harness (a temporary local API) for every flow test of the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness():
        yield


@pytest.fixture(scope="session")
def store(tmp_path_factory):
    """Two simulated grids, extracted, and a tiny tracked model registered as champion in the
    fixture's own MLflow store (``root/mlruns.db``; set MLFLOW_TRACKING_URI to ``store_uri``)."""
    from xcryonet.config import ExtractConfig, Params, SimulateConfig, TrainConfig
    from xcryonet.model import ModelConfig
    from xcryonet.stages import extract, make_dataset, register_model, simulate, train_model

    root = tmp_path_factory.mktemp("dash")
    old = os.environ["MLFLOW_TRACKING_URI"]
    os.environ["MLFLOW_TRACKING_URI"] = store_uri(root)
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
    # A small Optuna study, and the params file the dashboard reads (it names the study).
    import dataclasses

    import yaml

    from xcryonet.config import TuneConfig, to_dict
    from xcryonet.tune import tune

    tuned = dataclasses.replace(
        params, tune=TuneConfig(storage=f"sqlite:///{root / 'optuna.db'}", epochs=1)
    )
    tune(root / "squares", root / "labels.csv", split, root / "tune", tuned, n_trials=3)
    (root / "params.yaml").write_text(yaml.safe_dump(to_dict(tuned)))
    os.environ["MLFLOW_TRACKING_URI"] = old
    return root
