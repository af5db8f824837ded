"""Prefect flows: extraction, training, tuning and the scheduled retraining.

Every task is a thin wrapper around one function of :mod:`xcryonet.stages` (or ``dvc``), with
retries for the transient failures a facility sees (a busy disk, a locked database); bad input
(:class:`~xcryonet.errors.InputError`) is never retried, it fails at once with its one line.

- ``extract_flow(grids)``: one task per grid, run concurrently.
- ``train_flow()``: dataset -> train (tracked in MLflow) -> evaluate -> register.
- ``tune_flow(trials)``: an Optuna study, then the best params.
- ``retrain_flow()``: the nightly job. Asks DVC whether data, labels, params or code changed;
  if so records the new data version and runs ``dvc repro`` (whose ``register`` stage compares
  the challenger with the champion on the same held-out squares and promotes only a better
  one); always ends with a summary (a Prefect artifact and the flow's return value).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from xcryonet import stages
from xcryonet.config import Params, load_params
from xcryonet.errors import InputError


def _retry_unless_bad_input(task: Any, task_run: Any, state: Any) -> bool:
    """Retry transient failures only: bad input fails the same way every time."""
    try:
        state.result()
    except InputError:
        return False
    except Exception:
        return True
    return False


def retrying_task(**kwargs: Any) -> Any:
    """``@task`` with two retries, 5 s apart, that never retries bad input."""
    return task(
        retries=2, retry_delay_seconds=5, retry_condition_fn=_retry_unless_bad_input, **kwargs
    )


def _params(params_path: str, overrides: list[str] | None) -> Params:
    return load_params(params_path, list(overrides or []))


@retrying_task(task_run_name="extract {atlas}")
def extract_grid_task(atlas: str, out_root: str, params_path: str = "params.yaml") -> dict:
    """One grid: ``stages.extract_grid``; ``pid`` says which process ran it."""
    result = stages.extract_grid(Path(atlas), Path(out_root), _params(params_path, None).extract)
    return {**result, "pid": os.getpid()}


@retrying_task()
def dataset_task(squares: str, labels: str, out: str, params: Params) -> dict:
    return stages.make_dataset(Path(squares), Path(labels), Path(out), params)


@retrying_task()
def train_task(squares: str, labels: str, split: str, out: str, params: Params) -> dict:
    pc = params.pipeline
    result = stages.train_model(
        Path(squares),
        Path(labels),
        Path(out),
        params,
        variant=pc.variant,
        supervision=pc.supervision,
        split_csv=Path(split),
        track=True,
        run_name=f"prefect-{pc.variant}-{pc.supervision}",
    )
    result.pop("curve", None)
    return result


@retrying_task()
def evaluate_task(
    model: str, squares: str, labels: str, split: str, out: str, params: Params
) -> dict:
    return stages.evaluate_model(
        model, Path(squares), Path(labels), split_csv=Path(split), out_dir=Path(out), params=params
    )


@retrying_task()
def register_task(model: str, squares: str, labels: str, split: str, params: Params) -> dict:
    return stages.register_model(
        Path(model), Path(squares), Path(labels), Path(split), params, Path(model) / "registry.json"
    )


@retrying_task()
def tune_task(
    squares: str, labels: str, split: str, out: str, params: Params, trials: int, workers: int
) -> dict:
    from xcryonet.tune import tune

    return tune(
        Path(squares),
        Path(labels),
        Path(split),
        Path(out),
        params,
        n_trials=trials,
        workers=workers,
    )


def _dvc(repo: str, *args: str) -> subprocess.CompletedProcess[str]:
    # The pipeline's own params.yaml picks the MLflow experiment, not whatever run or
    # experiment this process had active.
    env = {
        k: v for k, v in os.environ.items() if k not in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID")
    }
    return subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=repo, capture_output=True, text=True, env=env
    )


@task(retries=2, retry_delay_seconds=5)
def changes_task(repo: str = ".") -> dict[str, list[str]]:
    """What DVC sees changed: ``{"data": [...], "stages": [...]}`` (empty lists: nothing)."""
    out = _dvc(repo, "status", "--json")
    if out.returncode != 0:
        raise RuntimeError(f"dvc status failed in {repo}: {out.stderr.strip()[-500:]}")
    status = json.loads(out.stdout or "{}")
    data = sorted(k for k in status if k.endswith(".dvc"))
    pipeline = sorted(k.split(":")[-1] for k in status if not k.endswith(".dvc"))
    return {"data": data, "stages": pipeline}


@task(retries=1, retry_delay_seconds=10)
def repro_task(repo: str, data: list[str]) -> dict[str, Any]:
    """Record the new data version (``dvc commit``), then ``dvc repro``; returns registry.json."""
    logger = get_run_logger()
    for target in data:
        done = _dvc(repo, "commit", "-f", "-q", target)
        if done.returncode != 0:
            raise RuntimeError(f"dvc commit {target} failed: {done.stderr.strip()[-500:]}")
    out = _dvc(repo, "repro")
    logger.info(out.stdout[-2000:])
    if out.returncode != 0:
        raise RuntimeError(f"dvc repro failed in {repo}: {out.stderr.strip()[-1000:]}")
    registry = Path(repo) / "registry.json"
    return json.loads(registry.read_text()) if registry.exists() else {}


@flow(name="extract")
def extract_flow(grids: list[str], out: str = "squares", params_path: str = "params.yaml") -> dict:
    """Extract grids in parallel (one task each); a bad grid fails alone."""
    futures = [extract_grid_task.submit(g, out, params_path) for g in grids]
    done, failed = [], []
    for g, fut in zip(grids, futures, strict=True):
        fut.wait()
        if fut.state.is_completed():
            done.append(fut.result())
        else:
            failed.append(f"{g}: {fut.state.message}")
    return {"grids": done, "failed": failed}


def extract_flow_on_dask(address: str | None = None, n_workers: int = 2) -> Any:
    """``extract_flow`` on a Dask cluster: the scheduler at ``address`` (workers on many
    machines, each with the project installed), or a local cluster of ``n_workers`` processes.
    Call the result like ``extract_flow``."""
    from prefect_dask import DaskTaskRunner

    if address:
        runner = DaskTaskRunner(address=address)
    else:
        runner = DaskTaskRunner(
            cluster_kwargs={"n_workers": n_workers, "threads_per_worker": 1, "processes": True}
        )
    return extract_flow.with_options(task_runner=runner)  # type: ignore[arg-type]


@flow(name="train")
def train_flow(
    squares: str = "squares",
    labels: str = "data/labels.csv",
    out: str = "models/prefect",
    params_path: str = "params.yaml",
    overrides: list[str] | None = None,
) -> dict:
    """dataset -> train -> evaluate -> register, the same stages as ``dvc repro``."""
    params = _params(params_path, overrides)
    split_dir = str(Path(out) / "dataset")
    dataset_task(squares, labels, split_dir, params)
    split = str(Path(split_dir) / "split.csv")
    model = str(Path(out) / "model")
    metrics = train_task(squares, labels, split, model, params)
    evaluation = evaluate_task(model, squares, labels, split, str(Path(out) / "eval"), params)
    registry = register_task(model, squares, labels, split, params)
    return {"test_mae": metrics["test_mae"], "eval": evaluation["mae"], "registry": registry}


@flow(name="tune")
def tune_flow(
    squares: str = "squares",
    labels: str = "data/labels.csv",
    split: str = "dataset/split.csv",
    out: str = "tune",
    trials: int = 8,
    workers: int = 1,
    params_path: str = "params.yaml",
    overrides: list[str] | None = None,
) -> dict:
    """An Optuna study over the split's training squares; writes ``out/best_params.yaml``."""
    params = _params(params_path, overrides)
    return tune_task(squares, labels, split, out, params, trials, workers)


@flow(name="retrain")
def retrain_flow(repo: str = ".") -> dict:
    """The scheduled job: retrain when DVC sees new data, labels, params or code; promote only
    a better challenger (the ``register`` stage); always log what happened."""
    logger = get_run_logger()
    changes = changes_task(repo)
    summary: dict[str, Any] = {"repo": str(Path(repo).resolve()), "changes": changes}
    if not changes["data"] and not changes["stages"]:
        summary["action"] = "nothing changed; no retraining"
    else:
        registry = repro_task(repo, changes["data"])
        summary["registry"] = registry
        if registry.get("promoted"):
            summary["action"] = f"retrained; v{registry['version']} promoted: {registry['reason']}"
        elif registry:
            summary["action"] = (
                f"retrained; v{registry['version']} kept as challenger: {registry['reason']}"
            )
        else:
            summary["action"] = "retrained; no registry.json"
    logger.info(summary["action"])
    lines = [f"**{summary['action']}**", "", f"- data changed: {changes['data'] or 'none'}"]
    lines.append(f"- stages to rerun: {changes['stages'] or 'none'}")
    create_markdown_artifact("\n".join(lines), key="retrain-summary", description="nightly retrain")
    return summary


def trigger_retrain(deployment: str = "retrain/nightly") -> str:
    """Start a run of the served retraining deployment now; returns the flow run id.
    Needs ``PREFECT_API_URL`` pointing at the server that holds the deployment."""
    from prefect.deployments import run_deployment

    flow_run = run_deployment(name=deployment, timeout=0)  # sync call: a FlowRun, not a coroutine
    return str(flow_run.id)  # type: ignore[union-attr]
