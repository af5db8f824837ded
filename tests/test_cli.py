"""The `xcryonet` console script as a user runs it: simulate, extract, labels, and bad input."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

FIXTURE = Path(__file__).parent / "fixtures" / "epu_real"
SMALL = [
    "--set", "simulate.squares_per_grid=40",
    "--set", "simulate.tile_px=512",
    "--set", "simulate.workers=1",
]  # fmt: skip


def run(*args, cwd=None, check=True):
    """Run the installed console script; returns the CompletedProcess."""
    exe = Path(sys.executable).with_name("xcryonet")
    out = subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, cwd=cwd)
    if check and out.returncode != 0:
        raise AssertionError(f"exit {out.returncode}\n{out.stdout}\n{out.stderr}")
    return out


def assert_one_line_error(out, *needles):
    assert out.returncode == 2, (out.stdout, out.stderr)
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, out.stderr
    assert "Traceback" not in out.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Three small simulated grids (one per layout), extracted through the CLI."""
    root = tmp_path_factory.mktemp("cli")
    (root / "defaults.yaml").write_text("")  # an empty params file: every default
    run("simulate", "--params", root / "defaults.yaml", *SMALL, "--grids", 3, cwd=root)
    grids = sorted((root / "data" / "raw").iterdir())
    run("extract", *grids, "--out", root / "squares", "--params", root / "defaults.yaml", cwd=root)
    return root


def test_help_lists_subcommands():
    out = run("--help")
    for cmd in ("simulate", "extract", "inspect", "labels"):
        assert cmd in out.stdout


def test_inspect_real_fixture():
    info = json.loads(run("inspect", FIXTURE).stdout)
    assert info["format"] == "epu"
    assert info["n_tiles"] == 35
    assert info["n_software_squares"] == 222


def test_simulate_extract_outputs(demo):
    grids = sorted(p.name for p in (demo / "squares").iterdir())
    assert grids == ["grid01", "grid02", "grid03"]
    for grid in grids:
        out = demo / "squares" / grid
        table = pd.read_csv(out / "squares.csv")
        for col in ("grid_id", "square_id", "row_px", "col_px", "x_um", "y_um", "size_um"):
            assert col in table
        assert table["brightness"].between(0, 4).all()
        assert table["squareness"].between(0, 4).all()
        with np.load(out / "crops.npz") as npz:
            assert npz["crops"].shape[0] == len(table) == npz["masks"].shape[0]
            assert npz["crops"].dtype == np.float16
        assert (out / "overview.png").stat().st_size > 1000
        truth = pd.read_csv(demo / "data" / "truth" / f"{grid}.csv")
        assert len(table) >= 0.9 * truth["complete"].sum()


def test_scoring_extraction_leaves_out_only_the_auto_labels(demo):
    """``score`` extracts without the auto-labels: the same squares, crops and masks, the same
    table less its brightness and squareness columns, and those match squares.csv."""
    from xcryonet.config import ExtractConfig
    from xcryonet.stages import extract_atlas

    atlas = demo / "data" / "raw" / "grid01"
    full = extract_atlas(atlas, ExtractConfig())
    bare = extract_atlas(atlas, ExtractConfig(), auto_labels=False)
    assert list(bare.table.columns) == [
        c for c in full.table.columns if c not in ("brightness", "squareness")
    ]
    pd.testing.assert_frame_equal(bare.table, full.table.drop(columns=["brightness", "squareness"]))
    np.testing.assert_array_equal(bare.crops, full.crops)
    np.testing.assert_array_equal(bare.masks, full.masks)
    written = pd.read_csv(demo / "squares" / "grid01" / "squares.csv")
    assert written["brightness"].tolist() == full.table["brightness"].tolist()
    assert written["squareness"].tolist() == full.table["squareness"].tolist()


def test_labels_join(demo):
    info = json.loads(
        run("labels", demo / "data" / "labels.csv", "--squares", demo / "squares").stdout
    )
    assert info["labels"] > 0
    assert info["joined"] == info["labels"]


def test_bad_atlas_one_line_error_no_output(tmp_path):
    bad = tmp_path / "broken"
    bad.mkdir()
    (bad / "broken.mrc").write_bytes(b"\0" * 100)
    out = run("extract", bad, "--out", tmp_path / "sq", check=False)
    assert_one_line_error(out, "broken.mrc")
    assert not (tmp_path / "sq" / "broken").exists()


def test_bad_grid_does_not_stop_good_ones(demo, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "bad.mrc").write_bytes(b"junk")
    out = run(
        "extract", demo / "data" / "raw" / "grid03", bad, "--out", tmp_path / "sq", check=False
    )
    assert_one_line_error(out, "bad.mrc")
    assert (tmp_path / "sq" / "grid03" / "squares.csv").exists()


def test_rerun_keeps_old_output_on_failure(demo, tmp_path):
    """A failing re-extraction never destroys an earlier good output."""
    out_dir = tmp_path / "sq"
    shutil.copytree(demo / "squares" / "grid03", out_dir / "grid03")
    before = (out_dir / "grid03" / "squares.csv").read_bytes()
    bad = tmp_path / "grid03"
    bad.mkdir()
    (bad / "grid03.mrc").write_bytes(b"junk" * 100)
    assert_one_line_error(run("extract", bad, "--out", out_dir, check=False), "grid03.mrc")
    assert (out_dir / "grid03" / "squares.csv").read_bytes() == before


def test_bad_labels_line_number(demo, tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text(
        "grid_id,x_um,y_um,cracking,contamination,overall\ngrid01,0,0,1,1,1\ngrid01,5,5,7,1,1\n"
    )
    out = run("labels", labels, "--squares", demo / "squares", check=False)
    assert_one_line_error(out, "labels.csv", "line 3", "outside the scores 0..4")


def test_bad_params_and_missing_input(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("extract:\n  crop_px: big\n")
    out = run("extract", FIXTURE, "--out", tmp_path / "o", "--params", params, check=False)
    assert_one_line_error(out, "params.yaml", "crop_px")
    out = run("inspect", tmp_path / "nothing-here", check=False)
    assert_one_line_error(out, "nothing-here")
    out = run("extract", FIXTURE, "--out", tmp_path / "o2", check=False)
    assert_one_line_error(out, "no image")
    # A mistyped --params is an error, not a silent run on the defaults.
    typo = tmp_path / "tuned.yml"
    out = run("extract", FIXTURE, "--out", tmp_path / "o3", "--params", typo, check=False)
    assert_one_line_error(out, "tuned.yml", "does not exist")
    assert not (tmp_path / "o3").exists()


TINY_MODEL = [
    "--set", "model.input_px=32",
    "--set", "model.width=4",
    "--set", "model.hidden=16",
    "--set", "train.epochs=1",
    "--set", "train.progress=false",
]  # fmt: skip


@pytest.fixture(scope="module")
def model_dir(demo):
    out = demo / "model"
    run(
        "train", "--squares", demo / "squares", "--labels", demo / "data" / "labels.csv",
        "--out", out, "--labeled", 20, "--unlabeled", 30, "--params", demo / "defaults.yaml",
        *TINY_MODEL,
    )  # fmt: skip
    return out


def test_train_evaluate_score(demo, model_dir, tmp_path):
    metrics = json.loads((model_dir / "metrics.json").read_text())
    assert metrics["labeled"] == 20 and metrics["unlabeled"] == 30
    mae = json.loads(
        run(
            "evaluate", "--model", model_dir, "--squares", demo / "squares",
            "--labels", demo / "data" / "labels.csv",
        ).stdout
    )["mae"]  # fmt: skip
    assert set(mae) == {"brightness", "squareness", "cracking", "contamination", "overall"}
    assert all(0 <= v <= 4 for v in mae.values())

    grid = demo / "data" / "raw" / "grid01"
    targets_csv, att, nav = tmp_path / "t.csv", tmp_path / "att", tmp_path / "t.nav"
    out = run(
        "score", grid, "--model", model_dir, "--out", targets_csv, "--attention", att,
        "--nav", nav, "--top", 5, "--params", demo / "defaults.yaml",
    )  # fmt: skip
    info = json.loads(out.stdout)
    targets = pd.read_csv(targets_csv)
    assert list(targets.columns) == [
        "grid_id", "square_id", "x_um", "y_um", "brightness", "squareness", "cracking",
        "contamination", "overall", "rank",
    ]  # fmt: skip
    ranked = targets.dropna(subset=["rank"])
    assert ranked["rank"].tolist() == list(range(1, len(ranked) + 1))
    assert ranked["overall"].is_monotonic_decreasing
    assert info["n_squares"] == len(targets)
    assert len(list(att.glob("square_*.png"))) == len(targets)
    assert (att / "overview.png").exists()
    from xcryonet.io.nav import read_navigator

    items = read_navigator(nav)
    assert len(items) == 5
    top = ranked.head(5)
    got = np.array([it["StageXYZ"][:2] for it in items])
    assert np.allclose(got, top[["x_um", "y_um"]].to_numpy(), atol=1e-3)


def test_score_bad_input(demo, model_dir, tmp_path):
    out = run("score", demo / "data" / "raw" / "grid01", "--model", tmp_path, "--out",
              tmp_path / "t.csv", check=False)  # fmt: skip
    assert_one_line_error(out, str(tmp_path), "no model.pt")
    assert not (tmp_path / "t.csv").exists()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "bad.mrc").write_bytes(b"junk" * 64)
    out = run("score", bad, "--model", model_dir, "--out", tmp_path / "t.csv", check=False)
    assert_one_line_error(out, "bad.mrc")
    assert not (tmp_path / "t.csv").exists()
    out = run("train", "--squares", tmp_path / "nope", "--labels", demo / "data" / "labels.csv",
              "--out", tmp_path / "m", check=False)  # fmt: skip
    assert_one_line_error(out, "nope")
    out = run("evaluate", "--model", tmp_path / "nomodel", "--squares", demo / "squares",
              "--labels", demo / "data" / "labels.csv", check=False)  # fmt: skip
    assert_one_line_error(out, "nomodel")
