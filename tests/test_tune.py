"""Optuna tuning: two worker processes share one SQLite study, every trial is a nested MLflow
run under one parent, trials never touch the held-out squares, the best params are written."""

import dataclasses

import mlflow
import numpy as np
import optuna
import pytest
import yaml
from test_train import TINY_MODEL, write_dataset

from xcryonet import tracking
from xcryonet.config import MlflowConfig, Params, TrainConfig, TuneConfig
from xcryonet.dataset import read_split, rows_from_split
from xcryonet.errors import InputError
from xcryonet.stages import make_dataset
from xcryonet.train import read_table
from xcryonet.tune import SPACE, suggest, tune, validation_rows


def test_suggest_covers_the_search_space():
    trial = optuna.trial.FixedTrial(
        {"lr": 1e-3, "recon_weight": 0.5, "attribute_weight": 2.0, "autoencoder_passes": 2,
         "fusion_squares": 300, "width": 16}
    )  # fmt: skip
    p = suggest(trial, Params())
    assert (p.train.lr, p.train.recon_weight, p.train.attribute_weight) == (1e-3, 0.5, 2.0)
    assert (p.train.autoencoder_passes, p.train.fusion_squares, p.model.width) == (2, 300, 16)
    assert set(SPACE) == {"lr", "recon_weight", "attribute_weight", "autoencoder_passes",
                          "fusion_squares", "width"}  # fmt: skip


def test_validation_rows_are_stable_and_disjoint():
    lab = np.arange(40)
    keys = [f"g{k % 2}/{k}" for k in lab]
    fit, val = validation_rows(lab, keys, 0.25, seed=0)
    again = validation_rows(lab[::-1], keys[::-1], 0.25, seed=0)
    assert set(fit) | set(val) == set(lab) and not set(fit) & set(val)
    assert set(again[1]) == set(val)
    with pytest.raises(InputError, match="too few"):
        validation_rows(lab[:1], keys[:1], 0.25, seed=0)


@pytest.mark.slow
def test_two_workers_share_one_study_under_one_parent_run(tmp_path, monkeypatch):
    squares, labels = write_dataset(tmp_path, n_per_grid=(24, 22), labelled_every=1)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    params = Params(
        model=TINY_MODEL,
        train=TrainConfig(batch_size=6, seed=3, test_fraction=0.3, progress=False),
        mlflow=MlflowConfig(tracking_uri=f"sqlite:///{tmp_path / 'mlruns.db'}"),
        tune=TuneConfig(storage=f"sqlite:///{tmp_path / 'optuna.db'}", epochs=3, warmup_epochs=1),
    )
    make_dataset(squares, labels, tmp_path / "dataset", params)
    split = tmp_path / "dataset" / "split.csv"
    result = tune(squares, labels, split, tmp_path / "tune", params, n_trials=4, workers=2)

    study = optuna.load_study(study_name="xcryonet", storage=params.tune.storage)
    assert len(study.trials) == 4
    assert sorted(t.number for t in study.trials) == [0, 1, 2, 3]
    assert result["best_value"] == study.best_value
    best = yaml.safe_load((tmp_path / "tune" / "best_params.yaml").read_text())
    assert best["train"]["lr"] == study.best_params["lr"]
    assert best["model"]["width"] == study.best_params["width"]
    assert "-S train.lr=" in result["dvc_exp_run"]
    # Every trial is a child of the one parent run, logged from two processes.
    client = mlflow.MlflowClient(tracking.tracking_uri(params.mlflow))
    exp = client.get_experiment_by_name("xcryonet")
    children = client.search_runs(
        [exp.experiment_id], f"tags.mlflow.parentRunId = '{result['parent_run_id']}'"
    )
    assert len(children) == 4
    assert {r.data.params["trial"] for r in children} == {"0", "1", "2", "3"}
    assert all(client.get_metric_history(r.info.run_id, "val_mae/overall") for r in children)
    # Trials validate on training squares only: never on the held-out test squares.
    table = read_table(squares, labels)
    _, _, test = rows_from_split(table, read_split(split), split)
    trial_dirs = sorted((tmp_path / "tune" / "trials").iterdir())
    assert len(trial_dirs) == 4
    import torch

    ckpt = torch.load(trial_dirs[0] / "checkpoint.pt", weights_only=True)
    test_keys = {
        f"{g}/{s}"
        for g, s in zip(table["grid_id"].iloc[test], table["square_id"].iloc[test], strict=True)
    }
    assert not test_keys & set(ckpt["run"]["test_keys"])
    assert not test_keys & set(ckpt["run"]["train_keys"])
    # A second run of the same study adds trials to it.
    more = dataclasses.replace(params, tune=dataclasses.replace(params.tune, trials=1))
    tune(squares, labels, split, tmp_path / "tune", more)
    assert len(optuna.load_study(study_name="xcryonet", storage=params.tune.storage).trials) == 5
