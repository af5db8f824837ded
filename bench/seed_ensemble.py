"""Is the CNN's gap to boosting variance? Train more seeds on each split and average them.

    python bench/seed_ensemble.py out/EXPERIMENT --out out/ENSEMBLE [--seeds 1 2] [--workers 2]
        [--squares squares] [--labels data/labels.csv]

For every finished run under ``EXPERIMENT/runs/`` it trains the same variant with the same
settings (read from the run's ``model.pt``; epochs from its learning curve) on the same squares
(labelled, unlabelled and test rows of the run) with other initialisation and shuffling seeds,
into ``ENSEMBLE/<run>-s<seed>`` (they resume from their checkpoints), then prints the rounded
test MAE of each model and of the mean of their predictions, per split and on average. If the
mean of a few seeds closes the gap to boosting where one seed does not, the gap is the variance
of training from few labels.
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import (  # noqa: E402  (bench/ sibling)
    add_data_args,
    finished_runs,
    label_matrix,
    report_or_one_line_error,
)

from xcryonet.baselines import mae  # noqa: E402
from xcryonet.config import ModelConfig, TrainConfig  # noqa: E402
from xcryonet.train import (  # noqa: E402
    MODEL_FILE,
    key_rows,
    load_checkpoint,
    load_model,
    load_squares_set,
    predict_tensor,
    read_table,
    saved_model_cfg,
    train,
)

SHOWN = ("cracking", "contamination", "overall")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("experiment", help="an `xcryonet experiment --out` folder")
    ap.add_argument("--out", required=True, help="folder for the extra seeds' runs")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2], help="extra seed offsets")
    ap.add_argument("--workers", type=int, default=2, help="runs trained at once (processes)")
    add_data_args(ap, ROOT)
    return report_or_one_line_error(Path(__file__).name, report, ap.parse_args(argv))


def _job(args: tuple[Any, ...]) -> None:
    squares, labels, out_dir, cfg, model_cfg, variant, supervision, rows = args
    torch.set_num_threads(1)
    train(
        squares,
        labels,
        out_dir,
        cfg,
        model_cfg=model_cfg,
        variant=variant,
        supervision=supervision,
        rows=rows,
    )


def report(args: argparse.Namespace) -> int:
    """Train the missing seeds, then print per-model and ensemble test MAE."""
    runs = finished_runs(args.experiment)
    table = read_table(args.squares, args.labels)
    y_all = label_matrix(table)
    jobs, plan = [], {}
    for run in runs:
        saved = load_checkpoint(run / MODEL_FILE)
        rec = saved["run"]
        n_lab = int(rec["labeled"])
        train_rows = key_rows(table, rec["train_keys"], run)
        rows = (train_rows[:n_lab], train_rows[n_lab:], key_rows(table, rec["test_keys"], run))
        epochs = len(json.loads((run / "metrics.json").read_text())["curve"])
        base = TrainConfig(**{**rec["train"], "epochs": epochs, "progress": False, "threads": 1})
        model_cfg = ModelConfig(**saved_model_cfg(saved["model_cfg"]))
        dirs = [run]
        for s in args.seeds:
            out = Path(args.out) / f"{run.name}-s{s}"
            dirs.append(out)
            if not (out / MODEL_FILE).exists():
                cfg = replace(base, seed=base.seed + 1000 * s)
                job = (args.squares, args.labels, out, cfg, model_cfg, saved["variant"])
                jobs.append((*job, rec["supervision"], rows))
        plan[run.name] = (dirs, rows[2])
    if jobs:
        print(f"training {len(jobs)} runs, {args.workers} at a time", flush=True)
        with ProcessPoolExecutor(args.workers) as pool:
            list(pool.map(_job, jobs))
    torch.set_num_threads(2)
    per_split = []
    print("run | " + " | ".join(f"{s}: each seed / mean of seeds" for s in SHOWN))
    for name, (dirs, test) in plan.items():
        # The seeds share the run's input settings: read and resample the test squares once.
        models = [load_model(d) for d in dirs]
        cfg = models[0][1]
        data = load_squares_set(args.squares, table.iloc[test], cfg, np.ones(len(test), bool))
        preds = [predict_tensor(model, data.x).numpy() for model, _ in models]
        y = y_all[test]
        err = [_mae(p, y) for p in preds] + [_mae(np.mean(preds, axis=0), y)]
        per_split.append(err)
        cells = [
            " / ".join(f"{e[k]:.3f}" for e in err[:-1]) + f" / **{err[-1][k]:.3f}**"
            for k in range(len(SHOWN))
        ]
        print(f"{name} | " + " | ".join(cells), flush=True)
    mean = np.mean(per_split, axis=0)  # (models + 1, scores)
    print(
        f"mean of {len(per_split)} | "
        + " | ".join(
            f"one seed {mean[:-1, k].mean():.3f}, mean of {len(mean) - 1} {mean[-1, k]:.3f}"
            for k in range(len(SHOWN))
        )
    )
    return 0


def _mae(pred: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Rounded MAE (len(SHOWN),) over the labelled entries."""
    err = mae(y, np.rint(pred))
    return np.array([err[s] for s in SHOWN])


if __name__ == "__main__":
    sys.exit(main())
