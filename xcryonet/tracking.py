"""MLflow tracking and registry: runs, the served model, aliases, promotion and rollback.

Conventions:
- Tracking store: ``mlflow.tracking_uri`` in params.yaml (``sqlite:///mlruns.db`` in the project
  by default), overridden by ``MLFLOW_TRACKING_URI``. New experiments keep their artifacts in
  ``mlflow.artifact_root``.
- A training run logs the resolved params, the git commit, the ``data.dvc`` hash, per-phase and
  per-epoch losses and validation MAE (``loss/<phase>/<loss>``, ``val_mae/<score>``), and the
  model: an MLflow ``pt2`` model of :class:`ScoringModel` (raw crops of any size in, five
  scores out) with our weights-only checkpoint as ``extra_files/model.pt``.
- The registered model (``mlflow.registered_model``) uses aliases, never stages: ``challenger``
  is the newest version, ``champion`` the one in use. ``champion_history`` (a registered-model
  tag, JSON list of versions) lets ``rollback`` move ``champion`` back.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from xcryonet.config import MlflowConfig, Params, to_dict
from xcryonet.errors import InputError
from xcryonet.model import XCryoNet
from xcryonet.train import resample_images, view_mean_scores

MODEL_ARTIFACT = "model"
CHAMPION, CHALLENGER = "champion", "challenger"
HISTORY_TAG = "champion_history"
RUN_FILE = "mlflow.json"
# Written into the logged model's environment; inferring them takes seconds per log.
PIP_REQUIREMENTS = ["torch>=2.3,<2.14", "numpy", "mlflow==3.17.*"]


def tracking_uri(cfg: MlflowConfig) -> str:
    """The tracking URI in use: ``MLFLOW_TRACKING_URI`` or ``cfg.tracking_uri``; a relative
    ``sqlite:///`` path is made absolute from the current folder."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking_uri
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        uri = prefix + str(Path(uri[len(prefix) :]).resolve())
    return uri


def artifact_location(cfg: MlflowConfig) -> str | None:
    """Where a new experiment keeps its artifacts: ``cfg.artifact_root`` as given when it is a
    URI; a relative folder sits beside a SQLite store's file (else in the current folder).
    None for a tracking server (``http(s)://``): the server's ``--artifacts-destination``
    decides, and clients upload through it."""
    root = cfg.artifact_root
    if "://" in root:
        return root
    uri = tracking_uri(cfg)
    if uri.startswith(("http://", "https://")):
        return None
    base = Path(uri[len("sqlite:///") :]).parent if uri.startswith("sqlite:///") else Path(".")
    return (base / root).resolve().as_uri()


def setup(cfg: MlflowConfig) -> str:
    """Point MLflow at the store and make sure the experiment exists; returns its id."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(cfg))
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(cfg.experiment)
    if exp is not None:
        mlflow.set_experiment(cfg.experiment)
        return str(exp.experiment_id)
    location = artifact_location(cfg)
    exp_id = client.create_experiment(cfg.experiment, artifact_location=location)
    mlflow.set_experiment(cfg.experiment)
    return str(exp_id)


def git_commit(cwd: str | Path = ".") -> str:
    """The checked-out commit (``+dirty`` with uncommitted changes), or ``unknown``."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("+dirty" if dirty else "")


def data_version(dvc_file: str | Path = "data.dvc") -> str:
    """The md5 that ``data.dvc`` records for ``data/``, or ``untracked``."""
    import yaml

    try:
        outs = yaml.safe_load(Path(dvc_file).read_text(encoding="utf-8"))["outs"]
        return str(outs[0]["md5"])
    except (OSError, KeyError, IndexError, TypeError, yaml.YAMLError):
        return "untracked"


def flat_params(params: Params) -> dict[str, Any]:
    """``section.key -> value`` for the sections a training run depends on."""
    out: dict[str, Any] = {}
    for section in ("model", "train", "pipeline"):
        for k, v in to_dict(getattr(params, section)).items():
            out[f"{section}.{k}"] = v
    return out


def epoch_metrics(losses: dict[str, dict[str, float]], val_mae: dict[str, Any]) -> dict[str, float]:
    """MLflow metric names of one epoch: ``loss/<phase>/<loss>`` and ``val_mae/<score>``."""
    out = {f"loss/{ph}/{k}": float(v) for ph, parts in losses.items() for k, v in parts.items()}
    out.update({f"val_mae/{k}": float(v) for k, v in val_mae.items() if v is not None})
    return out


class ScoringModel(nn.Module):
    """The served model: raw crops (B, 1, H, W), relative transmission, any H and W ->
    (B, 5) scores in 0..4 (brightness, squareness, cracking, contamination, overall).

    Resampling and normalisation are inside, so ``mlflow models serve`` needs nothing else.
    """

    def __init__(self, model: XCryoNet):
        super().__init__()
        self.model = model
        cfg = model.cfg
        self.px, self.mean, self.std = int(cfg.data_px), float(cfg.norm_mean), float(cfg.norm_std)
        self.tta = bool(cfg.tta)
        self.extremes = bool(cfg.extremes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = resample_images(x.float(), self.px, self.extremes)
        # As xcryonet.train.predict_tensor: clipped after averaging over the views.
        return view_mean_scores(self.model, (x - self.mean) / self.std, self.tta).clamp(0, 4)


def signature() -> Any:
    """A float32 tensor of any batch, height and width in; (batch, 5) out."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 1, -1, -1))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 5))]),
    )


def log_model(model_dir: Path) -> str:
    """Log ``model_dir``'s model in the active run; returns its ``models:/`` URI."""
    import mlflow

    from xcryonet.train import MODEL_FILE, load_model

    model, cfg = load_model(model_dir)
    example = np.random.default_rng(0).random((2, 1, cfg.data_px + 8, cfg.data_px + 8))
    info = mlflow.pytorch.log_model(
        ScoringModel(model).eval(),
        name=MODEL_ARTIFACT,
        signature=signature(),
        input_example=example.astype(np.float32),
        serialization_format="pt2",
        pip_requirements=PIP_REQUIREMENTS,
        extra_files=[str(Path(model_dir) / MODEL_FILE)],
    )
    return str(info.model_uri)


@dataclass
class RunLogger:
    """The active training run; ``on_epoch`` is ``train``'s per-epoch callback."""

    run_id: str
    experiment_id: str

    def on_epoch(self, rec: Any) -> None:
        import mlflow

        mlflow.log_metrics(epoch_metrics(rec.losses, rec.val_mae), step=rec.epoch)


@contextmanager
def training_run(
    params: Params, *, run_name: str, tags: dict[str, str] | None = None, nested: bool = False
) -> Iterator[RunLogger]:
    """Start (or, when ``nested``, nest) an MLflow run that logs the resolved params, the git
    commit and the data version; yields a :class:`RunLogger`."""
    import mlflow

    exp_id = setup(params.mlflow)
    with mlflow.start_run(run_name=run_name, nested=nested) as run:
        mlflow.log_params(flat_params(params))
        mlflow.set_tags(
            {"git_commit": git_commit(), "data_dvc_md5": data_version(), **(tags or {})}
        )
        yield RunLogger(run.info.run_id, exp_id)


def write_run_file(model_dir: Path, info: dict[str, Any]) -> None:
    """Record the MLflow run of a model folder (``mlflow.json``) for later stages."""
    from xcryonet.io.atomic import atomic_write_text

    atomic_write_text(Path(model_dir) / RUN_FILE, json.dumps(info, indent=2) + "\n")


def read_run_file(model_dir: Path) -> dict[str, Any]:
    path = Path(model_dir) / RUN_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(path, "does not exist: the model was trained without MLflow") from None
    except json.JSONDecodeError as err:
        raise InputError(path, f"is not valid JSON ({err})") from None
    if not isinstance(data, dict) or "run_id" not in data or "model_uri" not in data:
        raise InputError(path, "lacks run_id or model_uri")
    return data


def is_registry_uri(ref: str | Path) -> bool:
    return str(ref).startswith(("models:/", "runs:/"))


@contextmanager
def model_folder(ref: str | Path, cfg: MlflowConfig) -> Iterator[Path]:
    """A folder holding ``model.pt`` for a model folder (itself) or a registry URI
    (``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``runs:/RUN_ID/model``), downloaded
    into a temporary folder that is removed afterwards. Only our weights-only checkpoint is
    ever loaded from it, never the pickled or exported MLflow model."""
    if not is_registry_uri(ref):
        yield Path(ref)
        return
    with tempfile.TemporaryDirectory(prefix="xcryonet-model-") as tmp:
        yield download_model(ref, cfg, Path(tmp))


def download_model(ref: str | Path, cfg: MlflowConfig, dst: Path) -> Path:
    """Download a registry model into ``dst``; returns the folder that holds ``model.pt``."""
    import mlflow
    from mlflow.exceptions import MlflowException

    mlflow.set_tracking_uri(tracking_uri(cfg))
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=str(ref), dst_path=str(dst)))
    except MlflowException as err:
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise InputError(str(ref), f"cannot be fetched from {tracking_uri(cfg)} ({msg})") from None
    found = sorted(local.rglob("extra_files/model.pt"))
    if not found:
        raise InputError(str(ref), "is not an xcryonet model (no extra_files/model.pt)")
    return found[0].parent


def _client(cfg: MlflowConfig) -> Any:
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(cfg))
    return mlflow.MlflowClient()


def _history(client: Any, name: str) -> list[str]:
    tags = client.get_registered_model(name).tags
    try:
        hist = json.loads(tags.get(HISTORY_TAG, "[]"))
    except json.JSONDecodeError:
        hist = []
    return [str(v) for v in hist]


def alias_version(cfg: MlflowConfig, alias: str) -> str | None:
    """The version that holds ``alias``, or None."""
    from mlflow.exceptions import MlflowException

    client = _client(cfg)
    try:
        return str(client.get_model_version_by_alias(cfg.registered_model, alias).version)
    except MlflowException:
        return None


def set_champion(cfg: MlflowConfig, version: str) -> None:
    """Give ``version`` the champion alias and append it to the champion history."""
    client = _client(cfg)
    name = cfg.registered_model
    hist = _history(client, name)
    client.set_registered_model_alias(name, CHAMPION, version)
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps([*hist, version]))


def register(
    cfg: MlflowConfig,
    model_uri: str,
    challenger_mae: dict[str, float | None],
    champion_mae: Callable[[str], dict[str, float | None]],
    *,
    split_id: str,
    run_id: str | None = None,
) -> dict[str, Any]:
    """Register ``model_uri`` as a new version with the ``challenger`` alias; move ``champion``
    to it when there is none, or when its held-out MAE on ``cfg.metric`` is lower than the
    champion's on the same split (``champion_mae(models:/NAME/VERSION)`` evaluates it there).
    Returns what happened."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = _client(cfg)
    name = cfg.registered_model
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="XCryoNet grid-square scorer")
    mv = mlflow.register_model(model_uri, name, tags={"split": split_id})
    version = str(mv.version)
    for k, v in challenger_mae.items():
        if v is not None:
            client.set_model_version_tag(name, version, f"test_mae_{k}", f"{v:.4f}")
    if run_id:
        client.set_model_version_tag(name, version, "run_id", run_id)
    client.set_registered_model_alias(name, CHALLENGER, version)
    current = alias_version(cfg, CHAMPION)
    metric = cfg.metric
    new = challenger_mae.get(metric)
    if new is None:
        raise InputError(metric, "the challenger has no held-out MAE on this score")
    old: float | None = None
    if current is None:
        promoted, reason = True, "no champion yet"
    else:
        old = champion_mae(f"models:/{name}/{current}").get(metric)
        promoted = old is None or new < old
        reason = (
            f"{metric} MAE {new:.4f} < champion v{current}'s {old:.4f}"
            if promoted and old is not None
            else f"{metric} MAE {new:.4f} is not better than champion v{current}'s {old:.4f}"
        )
    if promoted:
        set_champion(cfg, version)
    client.set_model_version_tag(name, version, "promoted", str(promoted).lower())
    return {
        "model": name,
        "version": version,
        "champion": version if promoted else current,
        "previous_champion": current,
        "promoted": promoted,
        "reason": reason,
        "metric": metric,
        "challenger_mae": new,
        "champion_mae": old,
        "split": split_id,
    }


def rollback(cfg: MlflowConfig) -> dict[str, Any]:
    """Move ``champion`` back to the version that held it before the current one."""
    client = _client(cfg)
    name = cfg.registered_model
    from mlflow.exceptions import MlflowException

    try:
        hist = _history(client, name)
    except MlflowException:
        raise InputError(name, f"is not a registered model in {tracking_uri(cfg)}") from None
    current = alias_version(cfg, CHAMPION)
    while hist and hist[-1] == current:
        hist.pop()
    if not hist:
        raise InputError(name, f"has no earlier champion than v{current} to roll back to")
    previous = hist[-1]
    client.set_registered_model_alias(name, CHAMPION, previous)
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(hist))
    return {"model": name, "champion": previous, "rolled_back_from": current}


def registry_summary(cfg: MlflowConfig) -> dict[str, Any]:
    """Versions of the registered model with their aliases, held-out MAE tags and runs."""
    from mlflow.exceptions import MlflowException

    client = _client(cfg)
    name = cfg.registered_model
    try:
        model = client.get_registered_model(name)
    except MlflowException:
        raise InputError(name, f"is not a registered model in {tracking_uri(cfg)}") from None
    versions = client.search_model_versions(f"name='{name}'")
    aliases: dict[str, list[str]] = {}
    for alias, version in (model.aliases or {}).items():
        aliases.setdefault(str(version), []).append(alias)
    return {
        "model": name,
        "tracking_uri": tracking_uri(cfg),
        "champion_history": _history(client, name),
        "versions": [
            {
                "version": str(v.version),
                "aliases": sorted(aliases.get(str(v.version), [])),
                "run_id": v.run_id,
                "tags": dict(v.tags),
            }
            for v in sorted(versions, key=lambda v: int(v.version))
        ],
    }


def runs_table(cfg: MlflowConfig, max_runs: int = 200) -> Any:
    """Training runs of the experiment, newest first: run id and name, variant, supervision,
    labelled squares, held-out MAE per score, and the registry aliases of their models."""
    import pandas as pd
    from mlflow.exceptions import MlflowException

    client = _client(cfg)
    exp = client.get_experiment_by_name(cfg.experiment)
    if exp is None:
        return pd.DataFrame()
    runs = client.search_runs(
        [exp.experiment_id], "", max_results=max_runs, order_by=["attributes.start_time DESC"]
    )
    aliases: dict[str, list[str]] = {}
    try:
        model = client.get_registered_model(cfg.registered_model)
        for v in client.search_model_versions(f"name='{cfg.registered_model}'"):
            for alias, version in (model.aliases or {}).items():
                if str(version) == str(v.version) and v.run_id:
                    aliases.setdefault(v.run_id, []).append(f"{alias} (v{v.version})")
    except MlflowException:
        pass
    rows = []
    for r in runs:
        m, tags = r.data.metrics, r.data.tags
        if "test_mae/overall" not in m:
            continue  # tuning parents, unfinished runs
        row: dict[str, Any] = {
            "run_id": r.info.run_id,
            "name": r.info.run_name,
            "started": pd.to_datetime(r.info.start_time, unit="ms"),
            "variant": tags.get("variant", ""),
            "supervision": tags.get("supervision", ""),
            "labeled": int(m.get("labeled", 0)),
            "alias": ", ".join(sorted(aliases.get(r.info.run_id, []))),
        }
        for score in ("brightness", "squareness", "cracking", "contamination", "overall"):
            row[score] = m.get(f"test_mae/{score}")
        rows.append(row)
    return pd.DataFrame(rows)


def run_curves(cfg: MlflowConfig, run_ids: list[str]) -> Any:
    """Long table ``run_id, metric, epoch, value`` of the per-epoch losses and validation MAE."""
    import pandas as pd

    client = _client(cfg)
    rows = []
    for run_id in run_ids:
        for key in client.get_run(run_id).data.metrics:
            if key.startswith(("loss/", "val_mae/")):
                for h in client.get_metric_history(run_id, key):
                    rows.append((run_id, key, h.step, h.value))
    return pd.DataFrame(rows, columns=["run_id", "metric", "epoch", "value"])


def run_figure(cfg: MlflowConfig, run_id: str, name: str, dst: Path) -> Path | None:
    """Download ``figures/<name>`` of a run into ``dst``; None when the run has none."""
    import mlflow
    from mlflow.exceptions import MlflowException

    mlflow.set_tracking_uri(tracking_uri(cfg))
    try:
        return Path(
            mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=f"figures/{name}", dst_path=str(dst)
            )
        )
    except (MlflowException, OSError):
        return None
