"""The demo dataset end to end: simulate the default 12 grids, extract them all, check each.

Covers every layout (EPU, SerialEM, single MRC) at every mesh (200, 300, 400): recall and
precision of the complete squares >= 0.99 and stage positions within 3 µm of the truth. Also
checks that the committed data.dvc matches the demo data that `make demo` generates.
"""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from xcryonet.config import Params
from xcryonet.extract import match_squares
from xcryonet.stages import extract, load_squares

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from xcryonet.stages import simulate

    root = tmp_path_factory.mktemp("demo")
    params = Params()
    cfg = params.simulate
    out = {k: str(root / getattr(cfg, k)) for k in ("out_dir", "labels_path", "truth_dir")}
    simulate(
        cfg, out_dir=out["out_dir"], labels_path=out["labels_path"], truth_dir=out["truth_dir"]
    )
    grids = sorted(Path(out["out_dir"]).iterdir())
    result = extract(grids, root / "squares", params.extract)
    assert result["failed"] == []
    return root


def test_every_layout_and_mesh_meets_targets(demo):
    plan = pd.read_csv(demo / "data" / "truth" / "grids.csv")
    assert set(zip(plan["layout"], plan["mesh"], strict=True)) == {
        (lay, mesh) for lay in ("epu", "serialem", "mrc") for mesh in (200, 300, 400)
    }
    squares = load_squares(demo / "squares")
    worst = []
    for row in plan.itertuples():
        truth = pd.read_csv(demo / "data" / "truth" / f"{row.grid_id}.csv")
        found = squares[squares["grid_id"] == row.grid_id]
        pitch = float(found["pitch_um"].iloc[0])
        assert abs(pitch / {200: 127.0, 300: 84.7, 400: 63.5}[row.mesh] - 1) < 0.01
        m = match_squares(
            found[["x_um", "y_um"]].to_numpy(),
            truth[["x_um", "y_um"]].to_numpy(),
            truth["complete"].to_numpy(bool),
            0.3 * pitch,
            found["complete"].to_numpy(bool),
        )
        worst.append((row.grid_id, row.layout, row.mesh, m.recall, m.precision, m.error_px.max()))
        assert m.recall >= 0.99, worst[-1]
        assert m.precision >= 0.99, worst[-1]
        assert m.error_px.max() <= 3.0, worst[-1]  # match_squares' distances are in input units
    assert len(worst) == 12


def test_auto_labels_track_truth(demo):
    """Auto brightness/squareness agree with the simulator's scores within one on ~all squares."""
    squares = load_squares(demo / "squares")
    agree_b, agree_s, n = 0, 0, 0
    for grid_id, found in squares.groupby("grid_id"):
        truth = pd.read_csv(demo / "data" / "truth" / f"{grid_id}.csv")
        truth = truth[truth["complete"].astype(bool)]
        from scipy.spatial import cKDTree

        d, k = cKDTree(found[["x_um", "y_um"]].to_numpy()).query(truth[["x_um", "y_um"]])
        f = found.iloc[k]
        agree_b += int((np.abs(f["brightness"].to_numpy() - truth["brightness"]) <= 1).sum())
        agree_s += int((np.abs(f["squareness"].to_numpy() - truth["squareness"]) <= 1).sum())
        n += len(truth)
    assert agree_b / n >= 0.97
    assert agree_s / n >= 0.95


def test_labels_join_every_row(demo):
    from xcryonet.stages import check_labels

    info = check_labels(demo / "data" / "labels.csv", demo / "squares")
    assert info["labels"] > 900
    assert info["joined"] == info["labels"]


def test_committed_data_dvc_matches_demo(demo, tmp_path):
    """`dvc add` of freshly simulated demo data gives the hash committed in data.dvc."""
    committed = yaml.safe_load((ROOT / "data.dvc").read_text())["outs"][0]
    dvc = [sys.executable, "-m", "dvc"]
    repo = demo
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run([*dvc, "init", "-q"], cwd=repo, check=True)
    subprocess.run([*dvc, "config", "core.analytics", "false"], cwd=repo, check=True)
    subprocess.run([*dvc, "add", "-q", "data"], cwd=repo, check=True)
    fresh = yaml.safe_load((repo / "data.dvc").read_text())["outs"][0]
    assert (fresh["md5"], fresh["size"], fresh["nfiles"]) == (
        committed["md5"],
        committed["size"],
        committed["nfiles"],
    )
