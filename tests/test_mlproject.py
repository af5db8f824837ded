"""`mlflow run mlproject -e train|evaluate --env-manager local` on a tiny dataset."""

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml
from test_train import TINY_MODEL, write_dataset

from xcryonet.config import Params, TrainConfig, to_dict
from xcryonet.stages import make_dataset

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.integration]


def test_train_and_evaluate_entry_points(tmp_path):
    squares, labels = write_dataset(tmp_path, n_per_grid=(24, 22), labelled_every=1)
    params = Params(
        model=TINY_MODEL, train=TrainConfig(batch_size=6, seed=3, test_fraction=0.3, progress=False)
    )
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(to_dict(params)))
    make_dataset(squares, labels, tmp_path / "dataset", params)
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    # In-process MLflow calls of other tests leave MLFLOW_EXPERIMENT_ID set; a user's shell
    # would not have it.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_EXPERIMENT")}
    env["MLFLOW_TRACKING_URI"] = uri
    exe = str(Path(sys.executable).with_name("mlflow"))
    common = ["--env-manager", "local", "--experiment-name", "xcryonet"]
    split = tmp_path / "dataset" / "split.csv"
    data = ["-P", f"squares={squares}", "-P", f"labels={labels}",
            "-P", f"split={split}", "-P", f"params={params_file}"]  # fmt: skip
    out = subprocess.run(
        [exe, "run", str(ROOT / "mlproject"), "-e", "train", *common, *data,
         "-P", f"out={tmp_path / 'model'}", "-P", "epochs=2", "-P", "lr=0.002"],
        env=env, capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    info = json.loads((tmp_path / "model" / "mlflow.json").read_text())
    run = mlflow.MlflowClient(uri).get_run(info["run_id"])
    # The project's run is the training run: the entry point logs into it.
    assert run.data.tags.get("mlflow.project.entryPoint") == "train"
    assert run.data.params["train.lr"] == "0.002" and run.data.params["train.epochs"] == "2"
    assert "val_mae/overall" in run.data.metrics

    out = subprocess.run(
        [exe, "run", str(ROOT / "mlproject"), "-e", "evaluate", *common, *data,
         "-P", f"model={tmp_path / 'model'}", "-P", f"out={tmp_path / 'eval'}"],
        env=env, capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["n"] > 0
