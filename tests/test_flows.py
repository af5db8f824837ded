"""Prefect flows: tasks through .fn(), flows under one session-scoped test harness, and one
integration test against a real `prefect server` with a cron-scheduled deployment."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dashboard_session import app_env
from servers import free_port, stop, wait_http
from test_train import TINY_MODEL, write_dataset

from pipelines import flows
from xcryonet.config import Params, TrainConfig, to_dict

ROOT = Path(__file__).resolve().parents[1]


def _params_file(path: Path, tracking_uri: str) -> Path:
    import yaml

    params = to_dict(
        Params(
            model=TINY_MODEL,
            train=TrainConfig(epochs=2, batch_size=6, seed=3, test_fraction=0.3, progress=False),
        )
    )
    params["mlflow"]["tracking_uri"] = tracking_uri
    path.write_text(yaml.safe_dump(params))
    return path


def test_changes_task_reads_dvc_status(tmp_path):
    sh = lambda *a: subprocess.run(a, cwd=tmp_path, check=True, capture_output=True)  # noqa: E731
    sh("git", "init", "-q")
    sh(sys.executable, "-m", "dvc", "init", "-q")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "labels.csv").write_text("grid_id,x_um,y_um\n")
    sh(sys.executable, "-m", "dvc", "add", "-q", "data")
    assert flows.changes_task.fn(str(tmp_path)) == {"data": [], "stages": []}
    (tmp_path / "data" / "labels.csv").write_text("grid_id,x_um,y_um\ng,1,2\n")
    assert flows.changes_task.fn(str(tmp_path))["data"] == ["data.dvc"]


def test_retry_condition_skips_bad_input():
    from prefect.states import Failed

    from xcryonet.errors import InputError

    bad = Failed(data=InputError("labels.csv", "line 3: bad score"))
    flaky = Failed(data=OSError("disk busy"))
    assert flows._retry_unless_bad_input(None, None, bad) is False
    assert flows._retry_unless_bad_input(None, None, flaky) is True


def test_train_flow_runs_every_stage_and_registers(harness, tmp_path):
    squares, labels = write_dataset(tmp_path, n_per_grid=(20, 18), labelled_every=1)
    params = _params_file(tmp_path / "params.yaml", f"sqlite:///{tmp_path / 'mlruns.db'}")
    env_uri = os.environ.pop("MLFLOW_TRACKING_URI")
    try:
        result = flows.train_flow(
            str(squares), str(labels), str(tmp_path / "run"), params_path=str(params)
        )
    finally:
        os.environ["MLFLOW_TRACKING_URI"] = env_uri
    assert result["registry"]["promoted"] and result["registry"]["version"] == "1"
    assert (tmp_path / "run" / "eval" / "metrics.json").exists()
    assert (tmp_path / "mlruns.db").exists()


def test_tune_flow_runs_a_study(harness, tmp_path, monkeypatch):
    from xcryonet.config import load_params
    from xcryonet.stages import make_dataset

    squares, labels = write_dataset(tmp_path, n_per_grid=(24, 22), labelled_every=1)
    params = _params_file(tmp_path / "params.yaml", f"sqlite:///{tmp_path / 'mlruns.db'}")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    sets = [f"tune.storage=sqlite:///{tmp_path / 'optuna.db'}", "tune.epochs=2"]
    make_dataset(squares, labels, tmp_path / "dataset", load_params(params, sets))
    result = flows.tune_flow(
        str(squares), str(labels), str(tmp_path / "dataset" / "split.csv"),
        str(tmp_path / "tune"), trials=2, params_path=str(params), overrides=sets,
    )  # fmt: skip
    assert result["trials"] == 2 and (tmp_path / "tune" / "best_params.yaml").exists()


def test_extract_flow_extracts_in_parallel_and_isolates_a_bad_grid(harness, tmp_path):
    from xcryonet.config import SimulateConfig
    from xcryonet.stages import simulate

    cfg = SimulateConfig(n_grids=2, squares_per_grid=30, workers=1)
    simulate(cfg, out_dir=str(tmp_path / "raw"), labels_path=str(tmp_path / "l.csv"),
             truth_dir=str(tmp_path / "truth"))  # fmt: skip
    grids = sorted(str(p) for p in (tmp_path / "raw").iterdir())
    bad = tmp_path / "raw" / "broken.mrc"
    bad.write_bytes(b"not an mrc")
    result = flows.extract_flow([*grids, str(bad)], out=str(tmp_path / "squares"))
    assert sorted(g["grid_id"] for g in result["grids"]) == ["grid01", "grid02"]
    assert len(result["failed"]) == 1 and "broken.mrc" in result["failed"][0]
    assert not (tmp_path / "squares" / "broken").exists()


@pytest.mark.slow
def test_extract_flow_on_a_local_dask_cluster(harness, tmp_path):
    """The Dask task runner (prefect-dask): grids extracted in two worker processes."""
    from xcryonet.config import SimulateConfig
    from xcryonet.stages import simulate

    cfg = SimulateConfig(n_grids=2, squares_per_grid=30, workers=1)
    simulate(cfg, out_dir=str(tmp_path / "raw"), labels_path=str(tmp_path / "l.csv"),
             truth_dir=str(tmp_path / "truth"))  # fmt: skip
    grids = sorted(str(p) for p in (tmp_path / "raw").iterdir())
    result = flows.extract_flow_on_dask(n_workers=2)(grids, out=str(tmp_path / "squares"))
    assert sorted(g["grid_id"] for g in result["grids"]) == ["grid01", "grid02"]
    assert os.getpid() not in {g["pid"] for g in result["grids"]}
    assert all((tmp_path / "squares" / g / "crops.npz").exists() for g in ("grid01", "grid02"))


@pytest.mark.slow
@pytest.mark.integration
def test_scheduled_retrain_deployment_on_a_real_server(tmp_path, store):
    """`prefect server start` on 127.0.0.1, `python -m pipelines.serve` with a cron schedule,
    a triggered run of the deployment completes (nothing changed: it says so), and so does the
    run that the dashboard's "Retrain now" button starts."""
    repo = tmp_path / "repo"
    repo.mkdir()
    sh = lambda *a: subprocess.run(a, cwd=repo, check=True, capture_output=True)  # noqa: E731
    sh("git", "init", "-q")
    sh(sys.executable, "-m", "dvc", "init", "-q")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_API_URL": api,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PYTHONPATH": str(ROOT),
    }
    prefect = str(Path(sys.executable).with_name("prefect"))
    logs = tmp_path / "server.log", tmp_path / "serve.log", tmp_path / "worker.log"
    handles = [open(log, "w") for log in logs]  # noqa: SIM115
    server = subprocess.Popen(
        [prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=handles[0], stderr=subprocess.STDOUT,
    )  # fmt: skip
    served = worker = None
    try:
        wait_http(f"{api}/health", server, logs[0], timeout=120)
        served = subprocess.Popen(
            [sys.executable, "-m", "pipelines.serve", "--cron", "0 2 * * *", "--repo", str(repo)],
            env=env, cwd=ROOT, stdout=handles[1], stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.time() + 90
        while True:  # the served deployment registers itself a few seconds after start
            inspect = subprocess.run(
                [prefect, "deployment", "inspect", "retrain/nightly"],
                env=env, capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            if inspect.returncode == 0 or time.time() > deadline:
                break
            assert served.poll() is None, Path(logs[1]).read_text()[-3000:]
            time.sleep(1)
        assert "0 2 * * *" in inspect.stdout, inspect.stdout + inspect.stderr
        run = subprocess.run(
            [prefect, "deployment", "run", "retrain/nightly", "--watch", "--watch-timeout", "150"],
            env=env, capture_output=True, text=True, timeout=200,
        )  # fmt: skip
        assert run.returncode == 0, run.stdout + run.stderr + Path(logs[1]).read_text()[-3000:]
        assert "Completed" in run.stdout, run.stdout
        assert "nothing changed" in Path(logs[1]).read_text()

        # The dashboard's "Retrain now" (its own process, as a browser session would be).
        dashboard_env = {**env, **app_env(store, tmp_path / "labels.csv")}
        pressed = subprocess.run(
            [sys.executable, str(ROOT / "tests" / "dashboard_session.py"), "retrain"],
            env=dashboard_env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert pressed.returncode == 0, pressed.stderr[-3000:]
        result = json.loads(pressed.stdout.strip().splitlines()[-1])
        assert result["error"] == [] and len(result["success"]) == 1, result
        run_id = result["success"][0].rsplit(" ", 1)[-1]
        deadline = time.time() + 150
        while True:
            state = subprocess.run(
                [prefect, "flow-run", "inspect", run_id],
                env=env, capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert state.returncode == 0, state.stdout + state.stderr
            if "COMPLETED" in state.stdout or time.time() > deadline:
                break
            time.sleep(2)
        assert "COMPLETED" in state.stdout, state.stdout[-2000:]

        # The same flow through a work pool: the server holds the deployment, a process
        # worker (one per machine, in production) picks up its run.
        def cli(*args, **kw):
            return subprocess.run(args, env=env, capture_output=True, text=True, timeout=120, **kw)

        made = cli(prefect, "work-pool", "create", "cpu", "--type", "process")
        assert made.returncode == 0, made.stdout + made.stderr
        deployed = cli(sys.executable, "-m", "pipelines.deploy", "--pool", "cpu",
                       "--repo", str(repo), cwd=ROOT)  # fmt: skip
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        worker = subprocess.Popen(
            [prefect, "worker", "start", "--pool", "cpu"],
            env=env, cwd=ROOT, stdout=handles[2], stderr=subprocess.STDOUT,
        )  # fmt: skip
        run = cli(prefect, "deployment", "run", "retrain/nightly-pool", "--watch",
                  "--watch-timeout", "150")  # fmt: skip
        assert run.returncode == 0, run.stdout + run.stderr + Path(logs[2]).read_text()[-3000:]
        assert "Completed" in run.stdout, run.stdout
    finally:
        for proc in (worker, served, server):
            if proc is not None:
                stop(proc)
        for handle in handles:
            handle.close()
