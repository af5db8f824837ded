"""Optuna tuning: TPE over learning rate, loss weights, channel width and passes per phase,
pruned on the per-epoch validation MAE, every trial a nested MLflow run under one parent.

The study lives in RDB storage (SQLite by default, any database URL for many machines), so
several worker processes, here or elsewhere, share it: each calls :func:`run_worker` with the
same study name and storage. Trials never see the held-out test squares of ``split.csv``: they
validate on a stable fifth of the labelled training squares.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from xcryonet.config import Params, TuneConfig
from xcryonet.errors import InputError

# The search space: name -> (section, kind, low, high | choices).
SPACE: dict[str, tuple[str, str, Any]] = {
    "lr": ("train", "log", (3e-4, 1e-2)),
    "recon_weight": ("train", "log", (0.1, 3.0)),
    "attribute_weight": ("train", "log", (0.3, 3.0)),
    "autoencoder_passes": ("train", "int", (1, 3)),
    "fusion_squares": ("train", "int", (200, 1600)),
    "width": ("model", "cat", (4, 8, 16)),
}


def suggest(trial: Any, params: Params, space: dict[str, tuple[str, str, Any]] = SPACE) -> Params:
    """Params with the trial's choices from ``space`` applied."""
    chosen: dict[str, dict[str, Any]] = {"train": {}, "model": {}}
    for name, (section, kind, rng) in space.items():
        if kind == "log":
            chosen[section][name] = trial.suggest_float(name, *rng, log=True)
        elif kind == "int":
            chosen[section][name] = trial.suggest_int(name, *rng)
        else:
            chosen[section][name] = trial.suggest_categorical(name, list(rng))
    return dataclasses.replace(
        params,
        train=dataclasses.replace(params.train, **chosen["train"]),
        model=dataclasses.replace(params.model, **chosen["model"]),
    )


def validation_rows(
    lab: np.ndarray, keys: list[str], fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split labelled training rows into (fit, validation) by a stable hash of their keys."""
    import pandas as pd

    from xcryonet.dataset import stable_uniform

    grid, square = zip(*(k.split("/") for k in keys), strict=True) if keys else ((), ())
    u = stable_uniform(seed + 7919, pd.Series(grid), pd.Series([int(s) for s in square]))
    val = u < fraction
    if val.all() or not val.any():
        raise InputError("tune", f"{len(lab)} labelled squares are too few to validate on")
    return lab[~val], lab[val]


def trial_rows(
    squares_dir: Path, labels_csv: Path, split_csv: Path, params: Params
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fit, unlabelled, validation) rows of ``train.read_table`` for the trials: the split's
    training squares, with a stable ``tune.val_fraction`` of the labelled ones held out."""
    from xcryonet.dataset import read_split, rows_from_split
    from xcryonet.train import read_table

    table = read_table(squares_dir, labels_csv)
    lab, unl, _test = rows_from_split(table, read_split(split_csv), split_csv)
    ids = zip(table["grid_id"].iloc[lab], table["square_id"].iloc[lab], strict=True)
    fit, val = validation_rows(lab, [f"{g}/{s}" for g, s in ids], params.tune.val_fraction,
                               params.train.seed)  # fmt: skip
    return fit, unl, val


def study_storage(cfg: TuneConfig) -> str:
    """The RDB URL of the study; a relative ``sqlite:///`` path is made absolute."""
    prefix = "sqlite:///"
    if cfg.storage.startswith(prefix) and not cfg.storage.startswith(prefix + "/"):
        return prefix + str(Path(cfg.storage[len(prefix) :]).resolve())
    return cfg.storage


def create_study(cfg: TuneConfig) -> Any:
    """Create (or load) the study: TPE sampler, median pruner on the per-epoch MAE."""
    import optuna

    return optuna.create_study(
        study_name=cfg.study,
        storage=study_storage(cfg),
        direction="minimize",
        sampler=optuna.samplers.TPESampler(seed=cfg.seed),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=cfg.warmup_epochs),
        load_if_exists=True,
    )


def run_worker(
    squares_dir: Path,
    labels_csv: Path,
    split_csv: Path,
    out_dir: Path,
    params: Params,
    n_trials: int,
    parent_run_id: str | None = None,
) -> dict[str, Any]:
    """Run ``n_trials`` trials of the shared study in this process; returns their states."""
    import mlflow
    import optuna

    from xcryonet import tracking
    from xcryonet.train import train

    cfg = params.tune
    metric = params.mlflow.metric
    fit, unl, val = trial_rows(squares_dir, labels_csv, split_csv, params)
    tracking.setup(params.mlflow)
    study = create_study(cfg)
    base = dataclasses.replace(params, train=dataclasses.replace(params.train, epochs=cfg.epochs))

    def objective(trial: optuna.Trial) -> float:
        p = suggest(trial, base)
        run_dir = Path(out_dir) / "trials" / f"{trial.number:04d}"
        with mlflow.start_run(
            run_name=f"trial-{trial.number}", parent_run_id=parent_run_id, nested=True
        ):
            mlflow.log_params({**tracking.flat_params(p), "trial": trial.number})
            mlflow.set_tag("optuna_study", cfg.study)

            def report(rec: Any) -> None:
                mlflow.log_metrics(tracking.epoch_metrics(rec.losses, rec.val_mae), step=rec.epoch)
                value = rec.val_mae.get(metric)
                if value is None:
                    return
                trial.report(float(value), rec.epoch)
                if trial.should_prune():
                    mlflow.set_tag("pruned", "true")
                    raise optuna.TrialPruned(f"epoch {rec.epoch}: {metric} MAE {value:.3f}")

            result = train(
                squares_dir,
                labels_csv,
                run_dir,
                p.train,
                model_cfg=p.model,
                variant=params.pipeline.variant,
                supervision=params.pipeline.supervision,
                rows=(fit, unl, val),
                on_epoch=report,
            )
            value = float(result["test_mae"][metric])
            mlflow.log_metric(f"val_mae_final/{metric}", value)
            return value

    study.optimize(objective, n_trials=n_trials, catch=())
    return {"trials": len(study.trials), "best_value": study.best_value}


def best_overrides(study: Any) -> dict[str, dict[str, Any]]:
    """The best trial's choices as params.yaml sections."""
    out: dict[str, dict[str, Any]] = {}
    for name, value in study.best_params.items():
        section = SPACE[name][0]
        out.setdefault(section, {})[name] = value
    return out


def write_best(study: Any, out_dir: Path) -> dict[str, Any]:
    """Write ``best_params.yaml`` (params sections) and ``best.json``; returns the summary."""
    import optuna
    import yaml

    from xcryonet.io.atomic import atomic_write_text

    overrides = best_overrides(study)
    states = [t.state for t in study.trials]
    summary = {
        "study": study.study_name,
        "trials": len(study.trials),
        "complete": states.count(optuna.trial.TrialState.COMPLETE),
        "pruned": states.count(optuna.trial.TrialState.PRUNED),
        "best_trial": study.best_trial.number,
        "best_value": study.best_value,
        "best_params": overrides,
        "dvc_exp_run": "dvc exp run "
        + " ".join(f"-S {s}.{k}={v}" for s, kv in overrides.items() for k, v in kv.items()),
    }
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(out_dir) / "best_params.yaml", yaml.safe_dump(overrides, sort_keys=True))
    atomic_write_text(Path(out_dir) / "best.json", json.dumps(summary, indent=2) + "\n")
    return summary


def _worker_entry(args: tuple[Any, ...]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    return run_worker(*args)


def tune(
    squares_dir: Path,
    labels_csv: Path,
    split_csv: Path,
    out_dir: Path,
    params: Params,
    *,
    n_trials: int | None = None,
    workers: int = 1,
) -> dict[str, Any]:
    """Run a study with ``workers`` processes sharing it (``n_trials`` in all), under one
    parent MLflow run; write the best params. Returns the summary."""
    import mlflow

    from xcryonet import tracking

    cfg = params.tune
    n_trials = n_trials or cfg.trials
    if n_trials < 1 or workers < 1:
        raise InputError("tune", f"--trials and --workers must be >= 1, got {n_trials}, {workers}")
    trial_rows(squares_dir, labels_csv, split_csv, params)  # bad input: no study, no run
    tracking.setup(params.mlflow)
    study = create_study(cfg)
    with mlflow.start_run(run_name=f"tune-{cfg.study}") as parent:
        mlflow.log_params({"study": cfg.study, "trials": n_trials, "workers": workers})
        mlflow.set_tag("optuna_storage", study_storage(cfg))
        per = [n_trials // workers + (k < n_trials % workers) for k in range(workers)]
        jobs = [
            (squares_dir, labels_csv, split_csv, out_dir, params, n, parent.info.run_id)
            for n in per
            if n
        ]
        if len(jobs) == 1:
            run_worker(*jobs[0])
        else:
            import multiprocessing as mp

            with mp.get_context("spawn").Pool(len(jobs)) as pool:
                pool.map(_worker_entry, jobs)
        study = create_study(cfg)
        summary = write_best(study, out_dir)
        mlflow.log_metric(f"best_val_mae/{params.mlflow.metric}", summary["best_value"])
        mlflow.log_dict(summary, "best.json")
    return {**summary, "parent_run_id": parent.info.run_id}


def study_tables(cfg: TuneConfig) -> tuple[Any, dict[str, float]]:
    """The study's trials (number, state, value, params) and the parameter importances
    (empty with fewer than 2 complete trials); raises InputError without a study."""
    import optuna

    try:
        study = optuna.load_study(study_name=cfg.study, storage=study_storage(cfg))
    except (KeyError, ValueError) as err:
        raise InputError(cfg.storage, f"holds no study {cfg.study!r} ({err})") from None
    trials = study.trials_dataframe(attrs=("number", "state", "value", "params"))
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    importance: dict[str, float] = {}
    if len(done) >= 2:
        try:
            importance = dict(optuna.importance.get_param_importances(study))
        except (RuntimeError, ValueError):
            importance = {}
    return trials, importance
