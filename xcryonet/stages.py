"""Stage functions: one per pipeline step. Each reads its inputs, calls the core, writes its outputs
atomically and returns a small JSON-able result. The CLI, dvc.yaml, Prefect and the dashboard all
call these, so every piece of logic is written once.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from xcryonet.config import ExtractConfig, MlflowConfig, Params, SimulateConfig, to_dict
from xcryonet.errors import InputError
from xcryonet.io.atlas import Atlas
from xcryonet.io.atomic import atomic_dir

SQUARES_CSV = "squares.csv"
CROPS_NPZ = "crops.npz"
OVERVIEW_PNG = "overview.png"
ATLAS_JSON = "atlas.json"


def simulate(
    cfg: SimulateConfig,
    *,
    out_dir: str | None = None,
    labels_path: str | None = None,
    truth_dir: str | None = None,
    n_grids: int | None = None,
) -> dict[str, Any]:
    """Write the simulated demo dataset (grids, truth, labels.csv); see xcryonet.simulate."""
    from dataclasses import replace

    from xcryonet.simulate import simulate_dataset

    changes: dict[str, Any] = {}
    if out_dir is not None:
        changes["out_dir"] = out_dir
    if labels_path is not None:
        changes["labels_path"] = labels_path
    if truth_dir is not None:
        changes["truth_dir"] = truth_dir
    if n_grids is not None:
        changes["n_grids"] = n_grids
    return simulate_dataset(replace(cfg, **changes))


def inspect(path: Path) -> dict[str, Any]:
    """JSON summary of an atlas: format, tiles, shape, pixel size, affine, software squares."""
    from xcryonet.io import inspect_atlas

    return inspect_atlas(path)


@dataclass
class ExtractedGrid:
    """One atlas' squares, in memory (what ``extract_grid`` writes and ``score`` consumes).

    Attributes:
        grid_id: the grid's id (its folder name).
        atlas: the atlas read from disk.
        table: one row per square (the squares.csv columns; without the auto-labels when
            ``extract_atlas`` was asked to leave them out).
        crops: (N, S, S) float16 relative transmission (0 = bars, 1 = vacuum), native px.
        masks: (N, S, S) bool open area.
        angles_deg: (N,) square orientation (see ``xcryonet.extract.Lattice.angle_deg``).
        summary: JSON-able facts about the atlas and the lattice (atlas.json).
    """

    grid_id: str
    atlas: Atlas
    table: pd.DataFrame
    crops: np.ndarray
    masks: np.ndarray
    angles_deg: np.ndarray
    summary: dict[str, Any]


def extract_atlas(
    atlas_path: Path, cfg: ExtractConfig, *, auto_labels: bool = True
) -> ExtractedGrid:
    """Read an atlas, find, crop and auto-label every square; nothing is written.

    ``auto_labels=False`` leaves out the brightness and squareness auto-labels (and their table
    columns): scoring does not use them, and on a 290-square atlas they are about a quarter of
    scoring's CPU time (Canny edges and a bounding square per square).
    """
    from xcryonet.autolabel import auto_brightness, auto_squareness
    from xcryonet.extract import NoLatticeError, crop_square, find_squares
    from xcryonet.io import grid_id_for, read_atlas

    atlas = read_atlas(atlas_path, flat_field=cfg.flat_field)
    if atlas.image is None:
        raise InputError(atlas_path, "has metadata but no image (no tiles and no stitched atlas)")
    image = atlas.image
    grid_id = grid_id_for(atlas_path)
    try:
        result = find_squares(image, atlas.pixel_size_um, cfg)
    except NoLatticeError as err:
        raise InputError(atlas_path, f"no grid-square lattice found ({err})") from None
    # Number squares in lattice raster order, so neighbours on the overview have close numbers.
    squares = sorted(result.squares, key=lambda s: (s.index[0], s.index[1]))
    # Crops are stored as relative transmission (0 = the grid's bars, 1 = its vacuum level), so
    # they compare between grids whatever the dose or gain, and float16 is then ample.
    levels = result.levels
    span = max(float(levels.vacuum - levels.bar), 1e-12)
    side = max((int(sq.crop_px) for sq in squares), default=0)
    crops = np.zeros((len(squares), side, side), np.float16)
    masks = np.zeros((len(squares), side, side), bool)
    bright = np.zeros(len(squares), int)
    square = np.zeros(len(squares), int)

    def crop_and_label(i: int) -> None:
        crop, mask = crop_square(image, squares[i], cfg)
        if auto_labels:
            bright[i] = auto_brightness(crop, mask, levels)
            square[i] = auto_squareness(crop, mask, nominal_px=result.lattice.square_px)
        crops[i] = (crop - np.float32(levels.bar)) / np.float32(span)
        masks[i] = mask

    # numpy and scikit-image release the GIL in the heavy parts, so threads share the work.
    with ThreadPoolExecutor(max_workers=max(1, cfg.threads)) as pool:
        list(pool.map(crop_and_label, range(len(squares))))
    rows = np.array([s.row_px for s in squares], float)
    cols = np.array([s.col_px for s in squares], float)
    xy = atlas.pixel_to_stage(rows, cols) if len(squares) else np.zeros((0, 2))
    size_px = np.array([s.size_px for s in squares], float)
    pitch_um = result.lattice.pitch_px * atlas.pixel_size_um
    table = pd.DataFrame(
        {
            "grid_id": grid_id,
            "square_id": np.arange(len(squares)),
            "row_px": rows.round(2),
            "col_px": cols.round(2),
            "x_um": xy[:, 0].round(3),
            "y_um": xy[:, 1].round(3),
            "size_um": (size_px * atlas.pixel_size_um).round(3),
            "size_px": size_px.round(2),
            "pitch_um": round(pitch_um, 3),
            "ncc": np.array([s.ncc for s in squares], float).round(4),
            "complete": [bool(s.complete) for s in squares],
        }
    )
    if auto_labels:
        table["brightness"] = bright
        table["squareness"] = square
    summary = {
        "grid_id": grid_id,
        "atlas": str(atlas_path),
        "format": atlas.format,
        "shape": list(atlas.shape),
        "pixel_size_um": atlas.pixel_size_um,
        "affine": atlas.affine.tolist(),
        "affine_source": atlas.affine_source,
        "lattice": {k: _jsonable(v) for k, v in asdict(result.lattice).items()},
        "levels": {k: _jsonable(v) for k, v in asdict(result.levels).items()},
        "n_squares": len(squares),
        "n_complete": int(table["complete"].sum()),
        "config": to_dict(cfg),
    }
    angles = np.array([s.angle_deg for s in squares], float)
    return ExtractedGrid(grid_id, atlas, table, crops, masks, angles, summary)


def extract_grid(atlas_path: Path, out_root: Path, cfg: ExtractConfig) -> dict[str, Any]:
    """Find, crop and auto-label every square of one atlas; write ``out_root/<grid_id>/``.

    Writes ``squares.csv`` (one row per square: ids, atlas px, stage µm, size, auto-labels),
    ``crops.npz`` (``crops`` (N, S, S) float16 at native resolution, as relative transmission:
    0 = the grid's bar level, 1 = its vacuum level; ``masks`` (N, S, S) bool open area),
    ``overview.png`` and ``atlas.json``. The grid folder appears only when complete.
    """
    from xcryonet.overview import render_overview

    grid = extract_atlas(atlas_path, cfg)
    t = grid.table
    assert grid.atlas.image is not None
    with atomic_dir(out_root / grid.grid_id) as tmp:
        t.to_csv(tmp / SQUARES_CSV, index=False)
        np.savez(tmp / CROPS_NPZ, crops=grid.crops, masks=grid.masks)
        rc_size = t[["row_px", "col_px", "size_px"]].to_numpy(float).T
        picture = render_overview(grid.atlas.image, *rc_size, angles_deg=grid.angles_deg)
        picture.save(tmp / OVERVIEW_PNG)
        (tmp / ATLAS_JSON).write_text(json.dumps(grid.summary, indent=2))
    return {"grid_id": grid.grid_id, "n_squares": len(t), "out": str(out_root / grid.grid_id)}


def _jsonable(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, tuple):
        return [_jsonable(x) for x in v]
    return v


def extract(
    atlases: list[Path], out_root: Path, cfg: ExtractConfig, *, workers: int | None = None
) -> dict[str, Any]:
    """Extract several grids in parallel, with a progress bar.

    A grid that fails with bad input is reported (one line each) and leaves no output; the others
    still complete. Returns ``{"grids": [...], "failed": [...]}``.
    """
    workers = max(1, min(workers or cfg.workers, len(atlases), os.cpu_count() or 1))
    done: list[dict[str, Any]] = []
    failed: list[str] = []
    bar = tqdm(total=len(atlases), desc="extract", unit="grid")
    if workers == 1:
        for path in atlases:
            try:
                done.append(extract_grid(path, out_root, cfg))
            except InputError as err:
                failed.append(str(err))
            bar.update()
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = {pool.submit(extract_grid, p, out_root, cfg): p for p in atlases}
            for fut in as_completed(futures):
                try:
                    done.append(fut.result())
                except InputError as err:
                    failed.append(str(err))
                bar.update()
    bar.close()
    done.sort(key=lambda d: d["grid_id"])
    return {"grids": done, "failed": failed, "n_squares": sum(d["n_squares"] for d in done)}


def load_squares(squares_root: Path) -> pd.DataFrame:
    """All ``squares.csv`` tables under an extraction output folder, concatenated."""
    files = sorted(Path(squares_root).glob(f"*/{SQUARES_CSV}"))
    if not files:
        raise InputError(squares_root, f"holds no */{SQUARES_CSV}: run `xcryonet extract` first")
    return pd.concat([pd.read_csv(f, dtype={"grid_id": str}) for f in files], ignore_index=True)


def load_crops(
    squares_root: Path, grid_id: str, ids: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """A grid's native-resolution crops (N, S, S) and open-area masks (N, S, S) bool, as
    ``xcryonet extract`` wrote them (row i = square_id i), or only the rows ``ids``.

    Raises a one-line ``InputError`` naming crops.npz when it is unreadable or holds fewer
    crops than ``ids`` asks for.
    """
    path = Path(squares_root) / str(grid_id) / CROPS_NPZ
    try:
        with np.load(path) as z:
            crops, masks = z["crops"], z["masks"]
    except (OSError, KeyError, ValueError) as err:
        raise InputError(path, f"cannot read the crops ({err})") from None
    if ids is None:
        return crops, masks
    if np.max(ids, initial=-1) >= len(crops):
        raise InputError(path, f"holds {len(crops)} crops but squares.csv names more")
    return crops[ids], masks[ids]


def check_labels(labels_path: Path, squares_root: Path) -> dict[str, Any]:
    """Validate labels.csv and join it to the extracted squares; returns counts per grid."""
    from xcryonet.labels import join_labels, read_labels

    labels = read_labels(labels_path)
    joined = join_labels(load_squares(squares_root), labels, path=labels_path)
    labelled = joined["label_line"] > 0
    per_grid = joined[labelled].groupby("grid_id").size().to_dict()
    return {
        "labels": len(labels),
        "joined": int(labelled.sum()),
        "unmatched": len(labels) - int(labelled.sum()),
        "per_grid": {str(k): int(v) for k, v in per_grid.items()},
    }


SPLIT_CSV = "split.csv"
EVAL_METRICS = "metrics.json"
REGISTRY_JSON = "registry.json"


def make_dataset(
    squares_dir: Path, labels_csv: Path, out_dir: Path, params: Params
) -> dict[str, Any]:
    """The ``dataset`` stage: join the labels to the squares and write the stable split
    (``out_dir/split.csv``, see :mod:`xcryonet.dataset`) and ``summary.json`` (counts)."""
    from xcryonet.dataset import make_split
    from xcryonet.io.atomic import atomic_write_text
    from xcryonet.train import read_table

    table = read_table(squares_dir, labels_csv)
    pc = params.pipeline
    split = make_split(
        table,
        test_fraction=params.train.test_fraction,
        seed=params.train.seed,
        supervision=pc.supervision,
        labeled=pc.labeled,
        unlabeled=pc.unlabeled,
        path=labels_csv,
    )
    counts = split["role"].value_counts()
    summary = {
        "squares": len(split),
        **{r: int(counts.get(r, 0)) for r in ("train", "test", "unlabelled", "unused")},
        "test_per_grid": {
            str(k): int(v)
            for k, v in split[split["role"] == "test"].groupby("grid_id").size().items()
        },
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / SPLIT_CSV, split.to_csv(index=False))
    atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def _split_rows(
    squares_dir: Path, labels_csv: Path, split_csv: Path
) -> tuple[pd.DataFrame, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    from xcryonet.dataset import read_split, rows_from_split
    from xcryonet.train import read_table

    table = read_table(squares_dir, labels_csv)
    return table, rows_from_split(table, read_split(split_csv), split_csv)


def split_id(split_csv: Path) -> str:
    """A short hash of the held-out squares of a split: equal ids, same test set."""
    import hashlib

    from xcryonet.dataset import read_split

    split = read_split(split_csv)
    test = split[split["role"] == "test"]
    keys = sorted(f"{g}/{s}" for g, s in zip(test["grid_id"], test["square_id"], strict=True))
    return hashlib.sha1("\n".join(keys).encode()).hexdigest()[:12]


def train_model(
    squares_dir: Path,
    labels_csv: Path,
    out_dir: Path,
    params: Params,
    *,
    variant: str = "xcryonet",
    supervision: str = "ss",
    labeled: int | None = None,
    unlabeled: int | None = None,
    split_csv: Path | None = None,
    track: bool = False,
    run_name: str | None = None,
    on_epoch: Any = None,
    nproc: int = 1,
) -> dict[str, Any]:
    """Train a variant on extracted squares and operator labels; see ``xcryonet.train.train``.

    ``split_csv``: the roles from the ``dataset`` stage instead of a random split (``labeled``
    and ``unlabeled`` are then the split's). ``track``: log the run and the model to MLflow
    and write ``out_dir/mlflow.json``. ``on_epoch``: an extra per-epoch callback.
    ``nproc`` > 1: DistributedDataParallel over that many local processes
    (``xcryonet.distributed``); the per-epoch callbacks then run when training ends.
    """
    from xcryonet.train import EpochRecord, train

    rows = None
    if split_csv is not None:
        _, rows = _split_rows(squares_dir, labels_csv, split_csv)

    common: dict[str, Any] = dict(
        model_cfg=params.model,
        variant=variant,
        supervision=supervision,
        labeled=labeled,
        unlabeled=unlabeled,
        rows=rows,
    )

    def run(callback: Any) -> dict[str, Any]:
        if nproc == 1:
            return train(
                squares_dir, labels_csv, out_dir, params.train, on_epoch=callback, **common
            )
        from xcryonet.distributed import train_distributed

        metrics = train_distributed(
            squares_dir, labels_csv, out_dir, params.train, world_size=nproc, **common
        )
        for rec in metrics["curve"] if callback is not None else []:
            seconds = metrics["train_seconds"] * rec["epoch"] / max(len(metrics["curve"]), 1)
            callback(
                EpochRecord(rec["epoch"], metrics["epochs"], rec["losses"], rec["val_mae"], seconds)
            )
        return metrics

    if not track:
        return run(on_epoch)

    from xcryonet import tracking

    tags = {"variant": variant, "supervision": supervision}
    name = run_name or f"{variant}-{supervision}"
    with tracking.training_run(params, run_name=name, tags=tags) as logger:

        def both(rec: Any) -> None:
            logger.on_epoch(rec)
            if on_epoch is not None:
                on_epoch(rec)

        metrics = run(both)
        import mlflow

        mlflow.log_metrics(
            {
                **{f"test_mae/{k}": v for k, v in metrics["test_mae"].items() if v is not None},
                **{
                    f"test_mae_rounded/{k}": v
                    for k, v in metrics["test_mae_rounded"].items()
                    if v is not None
                },
                "labeled": metrics["labeled"],
                "unlabeled": metrics["unlabeled"],
                "train_seconds": metrics["train_seconds"],
            }
        )
        mlflow.set_tag("labeled", str(metrics["labeled"]))
        mlflow.log_dict(to_dict(params), "params.json")  # the resolved config, every section
        model_uri = tracking.log_model(Path(out_dir))
        info = {"run_id": logger.run_id, "experiment_id": logger.experiment_id}
        info["model_uri"] = model_uri
        info["tracking_uri"] = tracking.tracking_uri(params.mlflow)
        tracking.write_run_file(Path(out_dir), info)
    # The run's pictures (attention gallery, predicted vs true, learning curves, overviews),
    # on the squares this run held out.
    used = write_model_split(Path(out_dir))
    if (used["role"] == "test").any():
        evaluate_model(
            Path(out_dir),
            squares_dir,
            labels_csv,
            split_csv=Path(out_dir) / SPLIT_CSV,
            out_dir=Path(out_dir) / "report",
            params=params,
        )
    return {**metrics, "mlflow": info}


def write_model_split(model_dir: Path) -> pd.DataFrame:
    """Write ``model_dir/split.csv``: the roles of the squares the model trained and was
    tested on, read from its checkpoint. Returns the table."""
    from xcryonet.io.atomic import atomic_write_text
    from xcryonet.train import MODEL_FILE, load_checkpoint

    run = load_checkpoint(Path(model_dir) / MODEL_FILE)["run"]
    n_lab = int(run["labeled"])
    keys = list(run["train_keys"]) + list(run["test_keys"])
    roles = ["train"] * n_lab + ["unlabelled"] * (len(run["train_keys"]) - n_lab)
    roles += ["test"] * len(run["test_keys"])
    grid, square = zip(*(k.rsplit("/", 1) for k in keys), strict=True) if keys else ((), ())
    split = pd.DataFrame({"grid_id": grid, "square_id": [int(s) for s in square], "role": roles})
    atomic_write_text(Path(model_dir) / SPLIT_CSV, split.to_csv(index=False))
    return split


def evaluate_model(
    model_ref: Path | str,
    squares_dir: Path,
    labels_csv: Path,
    *,
    split_csv: Path | None = None,
    out_dir: Path | None = None,
    params: Params | None = None,
) -> dict[str, Any]:
    """MAE per score of a model (folder or ``models:/`` URI) on the labelled squares.

    ``split_csv``: only its ``test`` squares. ``out_dir``: also write ``metrics.json`` (raw and
    rounded MAE), ``plots/learning_curve.csv`` and ``plots/pred_vs_true.csv`` (DVC plots), and
    ``figures/`` (learning curves, predicted vs true, an attention gallery); when the model
    folder has an MLflow run (``mlflow.json``), the metrics and figures are logged to it.
    """
    from xcryonet import tracking
    from xcryonet.train import evaluate, load_model, load_squares_set, predict_tensor, read_table

    params = params or Params()
    with tracking.model_folder(model_ref, params.mlflow) as folder:
        model, cfg = load_model(folder)
        curve_path = folder / "metrics.json"
        curve = json.loads(curve_path.read_text()).get("curve", []) if curve_path.exists() else []
    model_dir = Path(model_ref) if not tracking.is_registry_uri(model_ref) else None
    if split_csv is not None:
        table, (_, _, rows) = _split_rows(squares_dir, labels_csv, split_csv)
    else:
        table = read_table(squares_dir, labels_csv)
        rows = np.flatnonzero(table["labelled"].to_numpy())
    if len(rows) == 0:
        raise InputError(split_csv or labels_csv, "has no labelled square to evaluate on")
    data = load_squares_set(squares_dir, table.iloc[rows], cfg, np.ones(len(rows), bool))
    result: dict[str, Any] = {
        "mae": evaluate(model, data),
        "mae_rounded": evaluate(model, data, round_scores=True),
        "n": len(rows),
    }
    if out_dir is None:
        return result
    from xcryonet import report
    from xcryonet.explain import render_attention, square_attention
    from xcryonet.io.atomic import atomic_write_text

    out_dir = Path(out_dir)
    (out_dir / "plots").mkdir(parents=True, exist_ok=True)
    (out_dir / "figures").mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / EVAL_METRICS, json.dumps(result, indent=2) + "\n")
    pred = predict_tensor(model, data.x).numpy()
    pvt = report.pred_true_table(data.keys, pred, data.y.numpy())
    atomic_write_text(out_dir / "plots" / "pred_vs_true.csv", pvt.to_csv(index=False))
    lc = report.curve_table(curve)
    atomic_write_text(out_dir / "plots" / "learning_curve.csv", lc.to_csv(index=False))
    figures = {"pred_vs_true.png": report.figure_image(report.pred_true_figure(pvt))}
    if len(lc):
        figures["learning_curve.png"] = report.figure_image(report.learning_curve_figure(lc))
    n_gallery = min(params.pipeline.gallery, len(rows))
    if n_gallery and model.fusion is not None:
        pick = np.linspace(0, len(rows) - 1, n_gallery).round().astype(int)
        sub = table.iloc[rows[pick]]
        by_grid = {
            str(g): load_crops(squares_dir, str(g), part["square_id"].to_numpy(int))[0]
            for g, part in sub.groupby("grid_id", sort=False)
        }
        seen: dict[str, int] = {}
        crops = []
        for g in sub["grid_id"].astype(str):
            crops.append(by_grid[g][seen.setdefault(g, 0)])
            seen[g] += 1
        inputs, maps = square_attention(model, crops)
        panels = [
            render_attention(inputs[i], maps[i], pred[pick[i]], title=data.keys[pick[i]])
            for i in range(n_gallery)
        ]
        figures["attention_gallery.png"] = report.tile(panels, columns=3)
    for name, image in figures.items():
        image.save(out_dir / "figures" / name)
    if model_dir is not None and (model_dir / tracking.RUN_FILE).exists():
        import mlflow

        info = tracking.read_run_file(Path(model_dir))
        tracking.setup(params.mlflow)
        with mlflow.start_run(run_id=info["run_id"]):
            mlflow.log_metrics(
                {f"eval_mae/{k}": v for k, v in result["mae"].items() if v is not None}
            )
            mlflow.log_artifacts(str(out_dir / "figures"), "figures")
            for grid in sorted({str(g) for g in table["grid_id"]}):
                overview = Path(squares_dir) / grid / OVERVIEW_PNG
                if overview.exists():
                    mlflow.log_artifact(str(overview), f"overviews/{grid}")
    return result


def register_model(
    model_dir: Path,
    squares_dir: Path,
    labels_csv: Path,
    split_csv: Path,
    params: Params,
    out_json: Path | None = None,
) -> dict[str, Any]:
    """The ``register`` stage: register the trained model as ``challenger`` and move
    ``champion`` to it only if its held-out MAE (``mlflow.metric``) beats the champion's on
    the same split. Writes ``out_json`` with what happened."""
    from xcryonet import tracking
    from xcryonet.io.atomic import atomic_write_text

    info = tracking.read_run_file(Path(model_dir))
    mine = evaluate_model(model_dir, squares_dir, labels_csv, split_csv=split_csv, params=params)

    def champion_mae(uri: str) -> dict[str, float | None]:
        return evaluate_model(uri, squares_dir, labels_csv, split_csv=split_csv, params=params)[
            "mae"
        ]

    result = tracking.register(
        params.mlflow,
        info["model_uri"],
        mine["mae"],
        champion_mae,
        split_id=split_id(split_csv),
        run_id=info["run_id"],
    )
    if out_json is not None:
        atomic_write_text(Path(out_json), json.dumps(result, indent=2) + "\n")
    return result


def rollback_champion(params: Params) -> dict[str, Any]:
    """Move the registry's ``champion`` alias back to the previous champion."""
    from xcryonet import tracking

    return tracking.rollback(params.mlflow)


@dataclass
class ScoredGrid:
    """One scored atlas, in memory (the dashboard keeps it; ``score`` writes it out).

    Attributes:
        grid: the extraction (table, crops, atlas image, angles).
        targets: ``rank_targets`` frame (grid_id, square_id, x_um, y_um, five scores, rank).
        scores: (N, 5) in 0..4, in the rows of ``grid.table``.
        inputs: (N, P, P) the squares as the model saw them; maps: (N, 2, P, P) attention.
    """

    grid: ExtractedGrid
    targets: pd.DataFrame
    scores: np.ndarray
    inputs: np.ndarray
    maps: np.ndarray


def load_scoring_model(model_ref: Path | str, mlflow_cfg: MlflowConfig | None = None) -> Any:
    """A trained model from a folder or a registry URI (weights-only checkpoint), eval mode."""
    from xcryonet.tracking import model_folder
    from xcryonet.train import load_model

    with model_folder(model_ref, mlflow_cfg or MlflowConfig()) as folder:
        if not (folder / "model.pt").exists():
            raise InputError(model_ref, "is not a model folder (no model.pt): train one first")
        model, _ = load_model(folder)
    return model


def score_atlas(atlas_path: Path, model: Any, cfg: ExtractConfig) -> ScoredGrid:
    """Extract an atlas's squares, score them and compute their attention maps."""
    from xcryonet.explain import score_and_explain
    from xcryonet.targets import rank_targets

    grid = extract_atlas(atlas_path, cfg, auto_labels=False)
    # One forward gives the scores and the maps (with test-time augmentation, both the mean
    # over the 8 views).
    scores, inputs, maps = score_and_explain(model, grid.crops.astype(np.float32))
    return ScoredGrid(grid, rank_targets(grid.table, scores), scores, inputs, maps)


def overview_picture(scored: ScoredGrid, top_n: int = 0) -> Any:
    """The atlas with every square coloured by overall (red 0 to green 4); with ``top_n``,
    the best ``top_n`` numbered by rank."""
    from xcryonet.overview import render_overview

    grid = scored.grid
    assert grid.atlas.image is not None
    t = grid.table
    rc_size = t[["row_px", "col_px", "size_px"]].to_numpy(float).T
    numbers = None
    if top_n:
        rank = scored.targets.set_index("square_id")["rank"].reindex(t["square_id"]).to_numpy()
        numbers = [int(r) if r == r and r <= top_n else None for r in rank]
    return render_overview(
        grid.atlas.image,
        *rc_size,
        numbers=numbers,
        scores=scored.scores[:, 4],
        angles_deg=grid.angles_deg,
    )


def score(
    atlas_path: Path,
    model_dir: Path | str,
    out_csv: Path,
    cfg: ExtractConfig,
    *,
    attention_dir: Path | None = None,
    nav_path: Path | None = None,
    top_n: int = 20,
    mlflow_cfg: MlflowConfig | None = None,
) -> dict[str, Any]:
    """Score a new grid: extract its squares, predict the five scores, rank the targets.

    Writes ``out_csv`` (``grid_id, square_id, x_um, y_um, <five scores>, rank``; rank 1 = best,
    blank for squares cut by the image edge or rim); with ``attention_dir``, one picture per
    square (``square_<id>.png``: the square and its cracking and contamination attention) and
    ``overview.png`` (squares coloured by overall, red 0 to green 4); with ``nav_path``, a
    SerialEM navigator file of the top ``top_n`` squares at their stage positions.
    """
    import time

    from xcryonet.explain import render_attention
    from xcryonet.io.atomic import atomic_path
    from xcryonet.io.nav import write_navigator
    from xcryonet.targets import select_top

    t0 = time.perf_counter()
    model = load_scoring_model(model_dir, mlflow_cfg)
    scored = score_atlas(atlas_path, model, cfg)
    grid, targets, scores = scored.grid, scored.targets, scored.scores
    with atomic_path(out_csv) as tmp:
        targets.to_csv(tmp, index=False)
    if nav_path is not None:
        write_navigator(nav_path, select_top(targets, top_n), grid_id=grid.grid_id)
    if attention_dir is not None:
        with atomic_dir(attention_dir) as tmp_dir:

            def save_one(i: int) -> None:
                sid = grid.table["square_id"].iat[i]
                picture = render_attention(
                    scored.inputs[i], scored.maps[i], scores[i], title=f"{grid.grid_id} #{sid}"
                )
                # Fast PNG compression: the default level spends seconds per grid in zlib.
                picture.save(tmp_dir / f"square_{sid}.png", compress_level=1)

            with ThreadPoolExecutor(max_workers=max(1, cfg.threads)) as pool:
                list(pool.map(save_one, range(len(grid.table))))
            overview_picture(scored).save(tmp_dir / OVERVIEW_PNG, compress_level=1)
    ranked = targets.dropna(subset=["rank"])
    return {
        "grid_id": grid.grid_id,
        "n_squares": len(targets),
        "n_ranked": len(ranked),
        "best": ranked.head(5).to_dict(orient="records"),
        "targets": str(out_csv),
        "seconds": round(time.perf_counter() - t0, 2),
    }


def commit_data(repo: Path = Path("."), target: str = "data.dvc") -> dict[str, Any]:
    """Record the current ``data/`` (new labels) as a new DVC data version: ``dvc commit``.
    Returns the new md5 and whether it changed."""
    import subprocess
    import sys

    from xcryonet.tracking import data_version

    before = data_version(Path(repo) / target)
    out = subprocess.run(
        [sys.executable, "-m", "dvc", "commit", "-f", "-q", target],
        cwd=repo,
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["dvc commit failed"])[-1]
        raise InputError(Path(repo) / target, f"dvc commit failed: {last}")
    after = data_version(Path(repo) / target)
    return {"md5": after, "changed": after != before}


def label_table(squares_root: Path, labels_csv: Path) -> pd.DataFrame:
    """Every extracted square with its labels joined (``labelled`` and ``label_<score>``)."""
    from xcryonet.train import read_table

    if not Path(labels_csv).exists():
        from xcryonet.labels import REQUIRED_COLUMNS

        Path(labels_csv).parent.mkdir(parents=True, exist_ok=True)
        Path(labels_csv).write_text(",".join(REQUIRED_COLUMNS) + "\n", encoding="utf-8")
    return read_table(squares_root, labels_csv)
