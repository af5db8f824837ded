"""The platform's stages on a real MLflow SQLite store: the stable split, tracked training,
evaluation outputs, registry promotion on the same split, rollback, and registry model URIs."""

import json

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from servers import free_port, running
from test_train import TINY_MODEL, write_dataset

from xcryonet import tracking
from xcryonet.config import MlflowConfig, Params, TrainConfig
from xcryonet.dataset import make_split, read_split, rows_from_split
from xcryonet.errors import InputError
from xcryonet.stages import evaluate_model, make_dataset, register_model, train_model
from xcryonet.train import load_model, predict, read_table

TINY = Params(
    model=TINY_MODEL,
    train=TrainConfig(epochs=2, batch_size=6, seed=3, test_fraction=0.3, progress=False),
)


def test_stable_split_keeps_every_role_when_labels_grow(tmp_path):
    sq_a, lab_a = write_dataset(tmp_path / "a", labelled_every=3)
    sq_b, lab_b = write_dataset(tmp_path / "b", labelled_every=1)
    before = make_split(read_table(sq_a, lab_a), test_fraction=0.3, seed=5, unlabeled=None)
    after = make_split(read_table(sq_b, lab_b), test_fraction=0.3, seed=5, unlabeled=None)
    merged = before.merge(after, on=["grid_id", "square_id"], suffixes=("_a", "_b"))
    assert len(merged) == len(before) == 26
    was = merged["role_a"]
    # Labelled squares never change role; newly labelled ones go to train or test.
    assert (
        merged.loc[was.isin(["train", "test"]), "role_b"] == was[was.isin(["train", "test"])]
    ).all()
    assert set(merged.loc[was == "unlabelled", "role_b"]) <= {"train", "test"}
    assert 0 < (after["role"] == "test").sum() < (after["role"] == "train").sum()
    # Another seed gives another split.
    other = make_split(read_table(sq_b, lab_b), test_fraction=0.3, seed=6)
    assert not other["role"].equals(after["role"])


def test_split_counts_and_fs_has_no_unlabelled(tmp_path):
    squares, labels = write_dataset(tmp_path)
    table = read_table(squares, labels)
    split = make_split(table, test_fraction=0.3, seed=0, supervision="fs", labeled=5)
    assert (split["role"] == "train").sum() == 5
    assert (split["role"] == "unlabelled").sum() == 0
    with pytest.raises(InputError, match="labelled squares are left"):
        make_split(table, test_fraction=0.3, seed=0, labeled=999)


def test_split_file_errors_name_the_file(tmp_path):
    sq_a, lab_a = write_dataset(tmp_path / "a", labelled_every=3)
    sq_b, lab_b = write_dataset(tmp_path / "b", labelled_every=1)
    path = tmp_path / "split.csv"
    make_split(read_table(sq_b, lab_b), test_fraction=0.3, seed=0).to_csv(path, index=False)
    # A split made when more squares were labelled is stale for fewer labels.
    with pytest.raises(InputError, match="older than the labels") as err:
        rows_from_split(read_table(sq_a, lab_a), read_split(path), path)
    assert str(path) in str(err.value)
    bad = tmp_path / "bad.csv"
    bad.write_text("grid_id,square_id,role\ng0,0,maybe\n")
    with pytest.raises(InputError, match="unknown role 'maybe'"):
        read_split(bad)
    bad.write_text("grid_id,square_id\ng0,0\n")
    with pytest.raises(InputError, match="lacks the column"):
        read_split(bad)
    with pytest.raises(InputError, match="does not exist"):
        read_split(tmp_path / "missing.csv")


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """A dataset, its split and one tracked training run in this module's own MLflow store."""
    root = tmp_path_factory.mktemp("pipeline")
    squares, labels = write_dataset(root, n_per_grid=(24, 22), labelled_every=1)
    params = Params(
        model=TINY.model,
        train=TINY.train,
        mlflow=MlflowConfig(tracking_uri=f"sqlite:///{root / 'mlruns.db'}"),
    )
    make_dataset(squares, labels, root / "dataset", params)
    split = root / "dataset" / "split.csv"
    mp = pytest.MonkeyPatch()
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)  # params.mlflow decides, as in dvc repro
    result = train_model(squares, labels, root / "m1", params, split_csv=split, track=True)
    yield root, squares, labels, split, params, result
    mp.undo()


def test_tracked_run_logs_params_curves_and_a_servable_model(tracked):
    root, squares, labels, split, params, result = tracked
    info = json.loads((root / "m1" / "mlflow.json").read_text())
    assert info["run_id"] == result["mlflow"]["run_id"]
    assert (root / "mlruns.db").exists() and (root / "mlartifacts").is_dir()
    client = mlflow.MlflowClient(tracking.tracking_uri(params.mlflow))
    run = client.get_run(info["run_id"])
    assert run.data.params["model.width"] == "4"
    assert run.data.params["train.seed"] == "3"
    assert run.data.tags["git_commit"] and "data_dvc_md5" in run.data.tags
    history = client.get_metric_history(info["run_id"], "val_mae/overall")
    assert [m.step for m in history] == [1, 2]
    assert client.get_metric_history(info["run_id"], "loss/fusion/fusion_supervised")
    # The split's test squares are the ones held out, and the model folder records its split.
    table = read_table(squares, labels)
    _, _, test = rows_from_split(table, read_split(split), split)
    assert result["test"] == len(test)
    mine = read_split(root / "m1" / "split.csv")
    theirs = read_split(split)
    for role in ("train", "test", "unlabelled"):
        pick = lambda s, r=role: set(map(tuple, s[s["role"] == r][["grid_id", "square_id"]].values))  # noqa: E731
        assert pick(mine) == pick(theirs), role
    # The run's artifacts: the resolved params, the model and the pictures.
    top = {a.path for a in client.list_artifacts(info["run_id"])}
    assert "params.json" in top
    figures = {a.path for a in client.list_artifacts(info["run_id"], "figures")}
    assert {"figures/attention_gallery.png", "figures/pred_vs_true.png"} <= figures
    # The logged pt2 model takes crops of any size and agrees with our own predictor.
    served = mlflow.pyfunc.load_model(info["model_uri"])
    model, _ = load_model(root / "m1")
    rng = np.random.default_rng(1)
    for side in (18, 31):
        crops = rng.random((3, side, side)).astype(np.float32)
        got = served.predict(crops[:, None])
        assert got.shape == (3, 5)
        assert np.allclose(got, predict(model, crops), atol=1e-4)


def test_evaluate_writes_metrics_plots_figures_and_logs_them(tracked):
    root, squares, labels, split, params, _ = tracked
    out = root / "eval"
    result = evaluate_model(
        root / "m1", squares, labels, split_csv=split, out_dir=out, params=params
    )
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(result))
    curve = pd.read_csv(out / "plots" / "learning_curve.csv")
    assert curve["epoch"].tolist() == [1, 2] and "val_mae_overall" in curve
    pvt = pd.read_csv(out / "plots" / "pred_vs_true.csv")
    assert set(pvt["score"]) == {"brightness", "squareness", "cracking", "contamination", "overall"}
    overall = pvt[pvt["score"] == "overall"]
    assert np.isclose(
        (overall["predicted"] - overall["true"]).abs().mean(), result["mae"]["overall"], atol=1e-3
    )
    for name in ("pred_vs_true.png", "learning_curve.png", "attention_gallery.png"):
        assert (out / "figures" / name).stat().st_size > 1000
    run_id = json.loads((root / "m1" / "mlflow.json").read_text())["run_id"]
    client = mlflow.MlflowClient(tracking.tracking_uri(params.mlflow))
    logged = {a.path for a in client.list_artifacts(run_id, "figures")}
    assert "figures/attention_gallery.png" in logged
    assert client.get_run(run_id).data.metrics["eval_mae/overall"] == pytest.approx(
        result["mae"]["overall"]
    )


def test_register_promotes_only_a_better_challenger_and_rolls_back(tracked):
    root, squares, labels, split, params, _ = tracked
    cfg = params.mlflow
    first = register_model(root / "m1", squares, labels, split, params, root / "reg.json")
    assert first["promoted"] and first["reason"] == "no champion yet"
    assert json.loads((root / "reg.json").read_text())["version"] == first["version"]
    # The same model again is not better than itself on the same split: champion stays.
    again = register_model(root / "m1", squares, labels, split, params)
    assert not again["promoted"]
    assert again["champion_mae"] == pytest.approx(again["challenger_mae"])
    assert tracking.alias_version(cfg, "champion") == first["version"]
    assert tracking.alias_version(cfg, "challenger") == again["version"]
    # A challenger that is better on the champion's split takes over.
    uri = json.loads((root / "m1" / "mlflow.json").read_text())["model_uri"]
    better = tracking.register(
        cfg, uri, {"overall": 0.0}, lambda _uri: {"overall": 1.0}, split_id="s"
    )
    assert better["promoted"] and tracking.alias_version(cfg, "champion") == better["version"]
    back = tracking.rollback(cfg)
    assert back == {
        "model": "xcryonet", "champion": first["version"], "rolled_back_from": better["version"]
    }  # fmt: skip
    assert tracking.alias_version(cfg, "champion") == first["version"]
    with pytest.raises(InputError, match="no earlier champion"):
        tracking.rollback(cfg)
    # The registry URI scores like the folder it came from.
    via_registry = evaluate_model(
        "models:/xcryonet@champion", squares, labels, split_csv=split, params=params
    )
    direct = evaluate_model(root / "m1", squares, labels, split_csv=split, params=params)
    assert via_registry["mae"] == direct["mae"]
    summary = tracking.registry_summary(cfg)
    assert [v["version"] for v in summary["versions"]] == ["1", "2", "3"]
    assert summary["versions"][0]["aliases"] == ["champion"]


def test_registry_errors_are_one_line(tracked):
    root, squares, labels, split, params, _ = tracked
    with pytest.raises(InputError, match="cannot be fetched"):
        evaluate_model("models:/no-such-model@champion", squares, labels, params=params)
    with pytest.raises(InputError, match="trained without MLflow"):
        register_model(root, squares, labels, split, params)
    other = MlflowConfig(
        tracking_uri=params.mlflow.tracking_uri, registered_model="never-registered"
    )
    with pytest.raises(InputError, match="is not a registered model"):
        tracking.rollback(other)


@pytest.mark.parametrize(
    ("tta", "extremes", "fine"),
    [(True, False, False), (False, False, False), (True, True, False), (True, True, True)],
)
def test_scoring_model_matches_predict_at_any_size(tta, extremes, fine):
    torch.manual_seed(0)
    from dataclasses import replace

    from xcryonet.model import build_model

    # fine: the crack profile read at twice the network's side (model.stat_px).
    cracks = {"crack_stat": True, "crack_profile": True, "stat_px": 2 * TINY_MODEL.input_px}
    cfg = replace(TINY_MODEL, tta=tta, extremes=extremes, **(cracks if fine else {}))
    model = build_model("xcryonet", cfg).eval()
    wrapped = tracking.ScoringModel(model).eval()
    crops = np.random.default_rng(0).random((2, 23, 23)).astype(np.float32)
    with torch.no_grad():
        got = wrapped(torch.from_numpy(crops[:, None])).numpy()
    assert np.allclose(got, predict(model, crops), atol=1e-5)


@pytest.mark.slow
@pytest.mark.integration
def test_mlflow_models_serve_answers_a_rest_request(tracked):
    """`mlflow models serve -m models:/xcryonet@champion` on 127.0.0.1 scores raw crops."""
    import os
    import sys
    import urllib.request
    from pathlib import Path

    root, _, _, _, params, _ = tracked
    uri = tracking.tracking_uri(params.mlflow)
    assert tracking.alias_version(params.mlflow, "champion") is not None
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    exe = Path(sys.executable).with_name("mlflow")
    cmd = [str(exe), "models", "serve", "-m", "models:/xcryonet@champion", "--env-manager",
           "local", "-h", "127.0.0.1", "-p", str(port)]  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    with running(cmd, f"{base}/ping", root / "serve.log", env=env):
        crops = np.random.default_rng(2).random((2, 1, 27, 27)).astype(np.float32)
        body = json.dumps({"inputs": crops.tolist()}).encode()
        req = urllib.request.Request(
            f"{base}/invocations", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            answer = json.loads(r.read())
    got = np.asarray(answer["predictions"], np.float32)
    champion = tracking.alias_version(params.mlflow, "champion")
    with tracking.model_folder(f"models:/xcryonet/{champion}", params.mlflow) as folder:
        model, _ = load_model(folder)
    assert got.shape == (2, 5)
    assert np.allclose(got, predict(model, crops[:, 0]), atol=1e-4)


@pytest.mark.slow
@pytest.mark.integration
def test_mlflow_server_on_localhost_browses_the_same_store(tracked):
    """The README's `mlflow server` (SQLite backend, 127.0.0.1) lists the tracked run and
    serves its artifacts, as the UI shows them."""
    import sys
    import urllib.request
    from pathlib import Path

    root, _, _, _, params, _ = tracked
    port = free_port()
    exe = Path(sys.executable).with_name("mlflow")
    cmd = [str(exe), "server", "--backend-store-uri", tracking.tracking_uri(params.mlflow),
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    with running(cmd, f"{base}/health", root / "ui.log"):
        run_id = json.loads((root / "m1" / "mlflow.json").read_text())["run_id"]
        with urllib.request.urlopen(f"{base}/api/2.0/mlflow/runs/get?run_id={run_id}") as r:
            run = json.loads(r.read())["run"]
        assert run["info"]["run_id"] == run_id
        url = f"{base}/get-artifact?path=params.json&run_uuid={run_id}"
        with urllib.request.urlopen(url) as r:
            assert json.loads(r.read())["model"]["width"] == 4
        with urllib.request.urlopen(base + "/") as r:
            assert r.status == 200 and b"<html" in r.read().lower()
