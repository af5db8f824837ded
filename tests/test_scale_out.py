"""When one machine is not enough: the pieces exercised on this machine.

MLflow as a tracking server with a database backend and remote artifacts: clients speak HTTP
only, and the run's artifacts land in the server's --artifacts-destination.
(Optuna workers sharing one RDB study: tests/test_tune.py; a Prefect work pool with a process
worker: tests/test_flows.py.)"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from servers import free_port, running
from test_train import TINY_MODEL, write_dataset

from xcryonet import tracking
from xcryonet.config import MlflowConfig, Params, TrainConfig
from xcryonet.stages import evaluate_model, make_dataset, register_model, train_model

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def test_tracking_server_with_database_backend_and_remote_artifacts(tmp_path, monkeypatch):
    squares, labels = write_dataset(tmp_path, n_per_grid=(24, 22), labelled_every=1)
    store, artifacts = tmp_path / "server" / "mlflow.db", tmp_path / "server" / "artifacts"
    store.parent.mkdir()
    port = free_port()
    exe = Path(sys.executable).with_name("mlflow")
    uri = f"http://127.0.0.1:{port}"
    cmd = [str(exe), "server", "--backend-store-uri", f"sqlite:///{store}",
           "--artifacts-destination", str(artifacts), "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]  # fmt: skip
    with running(cmd, f"{uri}/health", tmp_path / "server.log"):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        params = Params(
            model=TINY_MODEL,
            train=TrainConfig(epochs=2, batch_size=6, seed=3, test_fraction=0.3, progress=False),
            mlflow=MlflowConfig(),
        )
        assert tracking.artifact_location(params.mlflow) is None  # the server decides
        make_dataset(squares, labels, tmp_path / "dataset", params)
        split = tmp_path / "dataset" / "split.csv"
        result = train_model(squares, labels, tmp_path / "m", params, split_csv=split, track=True)
        assert result["mlflow"]["tracking_uri"] == uri
        # The client wrote nothing locally; the server holds the artifacts.
        assert not (tmp_path / "mlartifacts").exists()
        stored = {p.name for p in artifacts.rglob("*") if p.is_file()}
        assert {"model.pt", "params.json", "attention_gallery.png"} <= stored
        # Registry and registry URIs work through the server too.
        reg = register_model(tmp_path / "m", squares, labels, split, params)
        assert reg["promoted"]
        via = evaluate_model("models:/xcryonet@champion", squares, labels, split_csv=split,
                             params=params)  # fmt: skip
        assert via["mae"] == json.loads(json.dumps(result["test_mae"]))


def _one_and_two_processes(tmp_path, squares, labels, test_fraction):
    """The same xcryonet-SS run in one process and in two (torch DDP, gloo on CPU)."""
    from xcryonet.distributed import train_distributed
    from xcryonet.train import load_model, train

    cfg = TrainConfig(epochs=2, batch_size=8, seed=3, test_fraction=test_fraction, progress=False,
                      augment=True, threads=1)  # fmt: skip
    kw = dict(variant="xcryonet", supervision="ss")
    one = train(squares, labels, tmp_path / "one", cfg, model_cfg=TINY_MODEL, **kw)
    two = train_distributed(
        squares, labels, tmp_path / "two", cfg, model_cfg=TINY_MODEL, world_size=2, **kw
    )
    assert one["world_size"] == 1 and two["world_size"] == 2
    assert two["test"] == one["test"] and two["labeled"] == one["labeled"]
    a, _ = load_model(tmp_path / "one")
    b, _ = load_model(tmp_path / "two")
    diffs = {
        n: float((p - q).abs().max())
        for (n, p), q in zip(a.named_parameters(), b.parameters(), strict=True)
    }
    return one, two, diffs


def test_distributed_data_parallel_equals_one_process_when_shares_hold_as_many_labels(tmp_path):
    """Every square fully labelled and every batch even: each rank's half holds as many labels,
    so the averaged gradients are the single process's, and the models agree to float error."""
    squares, labels = write_dataset(tmp_path, n_per_grid=(24, 24), labelled_every=1,
                                    blank_cell=False)  # fmt: skip
    _, _, diffs = _one_and_two_processes(tmp_path, squares, labels, test_fraction=0.25)
    assert max(diffs.values()) < 1e-4, max(diffs.items(), key=lambda kv: kv[1])


def test_distributed_data_parallel_two_processes_matches_one(tmp_path):
    """Unlabelled squares and a blank label: the halves of a batch need not hold as many labels,
    and each rank's masked loss is the mean over its own labels, so two processes are not
    bit-equal to one. They must still score the same (test MAE within 0.02), and every
    parameter outside the fusion head must stay within 0.02. The fusion head is left out: fitted
    to these noise crops, it drifts up to 0.04 while the rest stays within 0.005."""
    import torch

    squares, labels = write_dataset(tmp_path, n_per_grid=(24, 22), labelled_every=2)
    one, two, diffs = _one_and_two_processes(tmp_path, squares, labels, test_fraction=0.3)
    assert max(v for n, v in diffs.items() if not n.startswith("fusion.")) < 0.02
    for k, v in one["test_mae"].items():
        assert abs(two["test_mae"][k] - v) < 0.02, k
    assert (tmp_path / "two" / "checkpoint.pt").exists()
    assert torch.load(tmp_path / "two" / "model.pt", weights_only=True)["variant"] == "xcryonet"


def test_dvc_remote_on_an_s3_compatible_server(tmp_path):
    """`dvc push` / `dvc pull` through DVC's S3 remote (dvc-s3), against moto's S3 server on
    127.0.0.1: no cloud is reachable from here, and the protocol is the same."""
    import os

    import boto3

    port = free_port()
    exe = Path(sys.executable).with_name("moto_server")
    endpoint = f"http://127.0.0.1:{port}"
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip
    repo = tmp_path / "repo"
    repo.mkdir()

    def sh(*args):
        out = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True)
        assert out.returncode == 0, f"{args}\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}"
        return out

    dvc = [sys.executable, "-m", "dvc"]
    cmd = [str(exe), "-H", "127.0.0.1", "-p", str(port)]
    with running(cmd, endpoint, tmp_path / "s3.log", timeout=60):
        s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")  # fmt: skip
        s3.create_bucket(Bucket="facility")
        sh("git", "init", "-q")
        sh(*dvc, "init", "-q")
        sh(*dvc, "remote", "add", "-d", "s3", "s3://facility/xcryonet")
        sh(*dvc, "remote", "modify", "s3", "endpointurl", endpoint)
        (repo / "data").mkdir()
        labels = "grid_id,x_um,y_um,cracking,contamination,overall\ngrid01,1.0,2.0,0,1,3\n"
        (repo / "data" / "labels.csv").write_text(labels)
        sh(*dvc, "add", "-q", "data")
        sh(*dvc, "push", "-q")
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket="facility").get("Contents", [])]
        assert keys and all(k.startswith("xcryonet/") for k in keys)
        shutil.rmtree(repo / "data")
        shutil.rmtree(repo / ".dvc" / "cache")
        sh(*dvc, "pull", "-q")
        assert (repo / "data" / "labels.csv").read_text() == labels
