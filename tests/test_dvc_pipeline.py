"""`dvc repro` of the project's own dvc.yaml on a small simulated dataset, in a scratch git repo:
every stage runs, metrics and plots show, `dvc exp run -S` makes an experiment, and data goes
to a real local remote and comes back with `dvc push` / `dvc pull`."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.integration]

SMALL = {
    "simulate": {"n_grids": 2, "squares_per_grid": 40, "workers": 1, "label_fraction": 0.9},
    "extract": {"workers": 1},
    "model": {"width": 4, "hidden": 8, "input_px": 16},
    "train": {"epochs": 2, "batch_size": 8, "progress": False, "test_fraction": 0.3},
    "pipeline": {"unlabeled": None, "gallery": 4},
}


def sh(*args, cwd, check=True):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)  # params.yaml decides, as in `make demo`
    out = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env)
    if check and out.returncode != 0:
        raise AssertionError(
            f"{args} exit {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
        )
    return out


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A scratch copy of the project (code, dvc.yaml, small params) with simulated data."""
    repo = tmp_path_factory.mktemp("repo")
    shutil.copytree(
        ROOT / "xcryonet", repo / "xcryonet", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copy(ROOT / "dvc.yaml", repo)
    shutil.copy(ROOT / ".gitignore", repo)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in SMALL.items():
        params[section].update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dvc = [sys.executable, "-m", "dvc"]
    sh("git", "init", "-q", cwd=repo)
    sh("git", "config", "user.email", "ci@example.org", cwd=repo)
    sh("git", "config", "user.name", "ci", cwd=repo)
    sh(*dvc, "init", "-q", cwd=repo)
    sh(*dvc, "config", "core.analytics", "false", cwd=repo)
    remote = tmp_path_factory.mktemp("remote")
    sh(*dvc, "remote", "add", "-d", "local", str(remote), cwd=repo)
    sh("xcryonet", "simulate", cwd=repo)
    sh(*dvc, "add", "-q", "data", cwd=repo)
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-qm", "data", cwd=repo)
    sh(*dvc, "repro", cwd=repo)
    return repo, dvc, remote


def test_repro_runs_every_stage_and_registers(repo):
    repo, dvc, _ = repo
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"extract", "dataset", "train", "evaluate", "register"}
    metrics = json.loads((repo / "eval" / "metrics.json").read_text())
    assert set(metrics["mae"]) == {
        "brightness",
        "squareness",
        "cracking",
        "contamination",
        "overall",
    }
    registry = json.loads((repo / "registry.json").read_text())
    assert registry["promoted"] and registry["version"] == "1"
    assert (repo / "mlruns.db").exists()
    # The training run in the project's own store holds the atlas overviews and the gallery.
    import mlflow

    run_id = json.loads((repo / "models" / "current" / "mlflow.json").read_text())["run_id"]
    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlruns.db'}")
    overviews = {a.path for a in client.list_artifacts(run_id, "overviews")}
    assert overviews == {"overviews/grid01", "overviews/grid02"}
    assert "figures/attention_gallery.png" in {
        a.path for a in client.list_artifacts(run_id, "figures")
    }
    # Nothing left to do, and the train stage lists only its own params.
    assert "up to date" in sh(*dvc, "status", cwd=repo).stdout
    train_params = lock["stages"]["train"]["params"]["params.yaml"]
    assert "extract" not in train_params and "simulate" not in train_params


def test_score_a_grid_with_the_champion_from_the_registry(repo):
    import pandas as pd

    repo, _, _ = repo
    out = sh("xcryonet", "score", "data/raw/grid01", "--model", "models:/xcryonet@champion",
             "--out", "targets.csv", "--nav", "targets.nav", "--top", "5", cwd=repo)  # fmt: skip
    targets = pd.read_csv(repo / "targets.csv")
    assert json.loads(out.stdout)["n_squares"] == len(targets) > 0
    assert targets["rank"].min() == 1
    assert (repo / "targets.nav").exists()


def test_metrics_and_plots_show(repo):
    repo, dvc, _ = repo
    shown = json.loads(sh(*dvc, "metrics", "show", "--json", cwd=repo).stdout)
    text = json.dumps(shown)
    assert "eval/metrics.json" in text and "overall" in text
    plots = sh(*dvc, "plots", "show", "--json", cwd=repo).stdout
    assert "learning_curve.csv" in plots and "pred_vs_true.csv" in plots


def test_exp_run_with_a_param_change(repo):
    repo, dvc, _ = repo
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-qm", "pipeline", cwd=repo)
    sh(*dvc, "exp", "run", "-S", "train.lr=0.001", "-n", "lr-1e-3", cwd=repo)
    exps = sh(*dvc, "exp", "show", "--json", cwd=repo).stdout
    assert "lr-1e-3" in exps and "0.001" in exps
    diff = sh(*dvc, "metrics", "diff", "--json", cwd=repo)
    assert diff.returncode == 0


def test_push_and_pull_through_the_local_remote(repo):
    repo, dvc, remote = repo
    sh(*dvc, "push", "-q", cwd=repo)
    assert any(remote.rglob("*")), "the remote is empty after push"
    shutil.rmtree(repo / "data")
    shutil.rmtree(repo / ".dvc" / "cache")
    sh(*dvc, "pull", "-q", cwd=repo)
    assert (repo / "data" / "labels.csv").exists()
    assert "data.dvc" not in sh(*dvc, "status", cwd=repo).stdout


def test_retrain_flow_retrains_on_corrected_labels_then_rests(repo, harness, monkeypatch):
    """The scheduled job: an operator corrects a label; the flow records the new data version,
    reproduces the pipeline and registers a challenger; run again, it has nothing to do."""
    from pipelines.flows import retrain_flow

    repo, dvc, _ = repo
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # the repo's params.yaml decides
    labels = repo / "data" / "labels.csv"
    lines = labels.read_text().splitlines()
    head, first = lines[0].split(","), lines[1].split(",")
    k = head.index("overall")
    first[k] = str((int(first[k]) + 2) % 5)  # the operator changes their mind
    labels.write_text("\n".join([lines[0], ",".join(first), *lines[2:]]) + "\n")
    before = json.loads((repo / "registry.json").read_text())["version"]
    summary = retrain_flow(str(repo))
    assert summary["changes"]["data"] == ["data.dvc"]
    assert summary["action"].startswith("retrained")
    assert int(summary["registry"]["version"]) == int(before) + 1
    assert "up to date" in sh(*dvc, "status", cwd=repo).stdout
    again = retrain_flow(str(repo))
    assert again["action"] == "nothing changed; no retraining"
