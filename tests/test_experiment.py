"""The quick profile of the paper's experiment runs end to end (CI runs it)."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from xcryonet.config import Params
from xcryonet.experiment import QUICK, method_name, run_experiment
from xcryonet.labels import SCORE_NAMES
from xcryonet.stages import extract, simulate

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Three default-size demo grids (about 750 squares, 260 labelled), extracted."""
    root = tmp_path_factory.mktemp("exp")
    params = Params()
    simulate(
        params.simulate,
        out_dir=str(root / "raw"),
        labels_path=str(root / "labels.csv"),
        truth_dir=str(root / "truth"),
        n_grids=3,
    )
    result = extract(sorted((root / "raw").iterdir()), root / "squares", params.extract)
    assert result["failed"] == []
    return root


def test_quick_experiment(dataset):
    params = Params()
    out = dataset / "results"
    results = run_experiment(dataset / "squares", dataset / "labels.csv", out, params, QUICK)
    methods = set(QUICK.baselines) | {
        method_name(v, s) for v in QUICK.variants for s in QUICK.supervisions
    }
    assert set(results["method"]) == methods
    assert len(results) == QUICK.repeats * len(methods)
    maes = results[list(SCORE_NAMES)].to_numpy(float)
    assert np.isfinite(maes).all() and (maes >= 0).all() and (maes <= 4).all()
    # Every method of a repeat is scored on the same test squares.
    assert results.groupby("repeat")["n_test"].nunique().eq(1).all()
    # The hand-crafted features learn something real: they beat the mean predictor.
    mean = results[results["method"] == "mean"][["cracking", "overall"]].mean()
    gbm = results[results["method"] == "features_gbm"][["cracking", "overall"]].mean()
    assert (gbm < mean).all()
    text = (out / "results.md").read_text()
    assert "| XCryoNet-SS | 100 |" in text and "paper: XCryoNet-SS" in text
    summary = pd.read_csv(out / "summary.csv")
    assert set(summary["method"]) == methods
    # The claims, paired on the splits: 4 pairs of CNNs and 3 baselines, 3 scores each.
    checks = pd.read_csv(out / "claims.csv")
    assert len(checks) == (4 + len(QUICK.baselines)) * 3
    assert set(checks["claim"]) == {
        "SS beats FS",
        "XCryoNet beats primary",
        "XCryoNet beats baselines",
    }
    assert (checks["repeats"] == QUICK.repeats).all()
    assert "## Claims, paired on the same splits" in text

    # A second run finds every model finished and reproduces the table.
    again = run_experiment(dataset / "squares", dataset / "labels.csv", out, params, QUICK)
    models = again["method"].str.contains("-")
    pd.testing.assert_frame_equal(
        again[models].drop(columns="seconds").reset_index(drop=True),
        results[models].drop(columns="seconds").reset_index(drop=True),
    )


def test_too_many_labels_is_a_clear_error(dataset, tmp_path):
    from xcryonet.errors import InputError

    plan = replace(QUICK, label_counts=(5000,))
    with pytest.raises(InputError, match="labelled training squares wanted"):
        run_experiment(dataset / "squares", dataset / "labels.csv", tmp_path, Params(), plan)
    assert not Path(tmp_path / "results.csv").exists()


def test_parallel_workers_give_the_same_table(dataset, tmp_path):
    params = Params()
    params = replace(params, train=replace(params.train, threads=1))
    plan = replace(QUICK, repeats=1, epochs=1, variants=("primary",), baselines=("mean",))
    serial = run_experiment(
        dataset / "squares", dataset / "labels.csv", tmp_path / "a", params, plan
    )
    parallel = run_experiment(
        dataset / "squares", dataset / "labels.csv", tmp_path / "b", params, plan, workers=2
    )
    assert (tmp_path / "b" / "runs" / "primary-ss-100-r0" / "metrics.json").exists()
    pd.testing.assert_frame_equal(
        serial.drop(columns="seconds"), parallel.drop(columns="seconds"), check_exact=True
    )
    # The table scores rounded predictions; the raw MAE is kept beside it.
    raw = [f"{s}_raw" for s in SCORE_NAMES]
    assert set(raw) <= set(serial.columns)

    # model.tta changes only prediction: kept runs are scored again, not trained again.
    run = tmp_path / "a" / "runs" / "primary-ss-100-r0"
    stamp = (run / "checkpoint.pt").stat().st_mtime_ns
    plain = replace(params, model=replace(params.model, tta=not params.model.tta))
    again = run_experiment(dataset / "squares", dataset / "labels.csv", tmp_path / "a", plain, plan)
    assert (run / "checkpoint.pt").stat().st_mtime_ns == stamp
    assert json.loads((run / "metrics.json").read_text())["tta"] is (not params.model.tta)
    cnn = again["method"] == "Primary-SS"
    assert not np.allclose(again.loc[cnn, raw].to_numpy(), serial.loc[cnn, raw].to_numpy())


def test_cli_runs_a_subset_of_the_protocol(dataset, tmp_path, capsys):
    from xcryonet.cli import main

    out = tmp_path / "fs"
    argv = ["experiment", "--squares", str(dataset / "squares"), "--labels"]
    argv += [str(dataset / "labels.csv"), "--out", str(out), "--quick", "--repeats", "1"]
    assert main([*argv, "--variants", "primary", "--supervisions", "fs"]) == 0
    results = pd.read_csv(out / "results.csv")
    assert set(results["method"]) == {"Primary-FS", *QUICK.baselines}
    assert [p.name for p in (out / "runs").iterdir()] == ["primary-fs-100-r0"]
    assert "| Primary-FS | 100 |" in capsys.readouterr().out


def _results(diffs: dict[str, list[float]]) -> pd.DataFrame:
    """A results table: XCryoNet-SS at MAE 1 on every score and repeat; each other method
    at 1 + its per-repeat difference (> 0: XCryoNet-SS is better)."""
    rows = []
    for method, ds in {"XCryoNet-SS": [0.0] * 4, **diffs}.items():
        for r, d in enumerate(ds):
            rows.append(
                {"method": method, "labeled": 100, "repeat": r, **dict.fromkeys(SCORE_NAMES, 1 + d)}
            )
    return pd.DataFrame(rows)


def test_claims_are_paired_on_the_splits_and_give_a_verdict():
    from xcryonet.experiment import claims, claims_markdown

    results = _results(
        {
            "Primary-SS": [0.10, 0.12, 0.08, 0.11],  # XCryoNet wins every split by about 0.1
            "XCryoNet-FS": [-0.2, -0.25, -0.15, -0.22],  # FS wins every split
            "features_gbm": [0.3, -0.3, 0.2, -0.25],  # split decides
            "mean": [0.5],  # one repeat only
        }
    )
    checks = claims(results).set_index(["winner", "loser", "score"]).sort_index()
    assert set(checks.index.get_level_values("loser")) == {
        "Primary-SS",
        "XCryoNet-FS",
        "features_gbm",
        "mean",
    }
    primary = checks.loc[("XCryoNet-SS", "Primary-SS", "overall")]
    assert primary["claim"] == "XCryoNet beats primary" and primary["verdict"] == "holds"
    assert primary["mean_diff"] == pytest.approx(0.1025)
    assert (primary["won"], primary["lost"], primary["repeats"]) == (4, 0, 4)
    assert primary["ci_low"] > 0
    fs = checks.loc[("XCryoNet-SS", "XCryoNet-FS", "cracking")]
    assert fs["claim"] == "SS beats FS" and fs["verdict"] == "fails" and fs["ci_high"] < 0
    gbm = checks.loc[("XCryoNet-SS", "features_gbm", "contamination")]
    assert gbm["verdict"] == "not separable" and (gbm["won"], gbm["lost"]) == (2, 2)
    assert checks.loc[("XCryoNet-SS", "mean", "overall")]["verdict"] == "one repeat"
    # One split lost: the counts show it, and the interval now spans 0.
    flipped = _results({"Primary-SS": [0.10, 0.12, 0.08, -0.11]})
    row = claims(flipped).set_index("score").loc["overall"]
    assert (row["won"], row["lost"]) == (3, 1) and row["verdict"] == "not separable"
    text = claims_markdown(claims(results))
    assert "| XCryoNet beats primary | XCryoNet-SS vs Primary-SS | 100 | overall | +0.103" in text
    assert claims_markdown(claims(_results({}))) == ""
    # Only the splits both methods ran are compared; none in common, no row.
    apart = _results({"Primary-SS": [0.1] * 6})
    apart = apart[(apart["method"] != "Primary-SS") | (apart["repeat"] >= 4)]
    assert claims(apart).empty
