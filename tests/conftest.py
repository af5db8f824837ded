"""Shared test setup: every test logs to its own session's MLflow store, never the project's."""

import os

import pytest


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
