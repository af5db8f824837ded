"""Which head of a trained XCryoNet scores best? Per-head test MAE of experiment runs.

    python bench/heads.py out/EXPERIMENT [--squares squares] [--labels data/labels.csv]

For every finished run under ``EXPERIMENT/runs/`` it scores the run's own test squares (kept in
its ``model.pt``) with each head the model has, rounded as in the experiment's table, with the
model's own test-time augmentation setting:

- ``fusion``: the model's answer (for the primary variant, the primary head);
- ``primary``: the primary branch's head inside the model;
- ``branch``: the cracking and contamination attribute branches' own scores (xcryonet only).

If the attribute branches or the primary head inside XCryoNet beat the fusion, the fusion is
what loses XCryoNet's lead, not the attention.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

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

from xcryonet.labels import SCORE_NAMES  # noqa: E402
from xcryonet.model import ATTRIBUTE_BRANCHES, dihedral_views  # noqa: E402
from xcryonet.train import (  # noqa: E402
    MODEL_FILE,
    key_rows,
    load_checkpoint,
    load_model,
    load_squares_set,
    read_table,
)


@torch.no_grad()
def head_scores(model: torch.nn.Module, x: torch.Tensor, tta: bool) -> dict[str, np.ndarray]:
    """(N, 5) rounded scores per head for normalised squares x (N, 1, P, P); NaN where a head
    does not score."""
    heads: dict[str, list[np.ndarray]] = {"fusion": [], "primary": [], "branch": []}
    model.eval()
    for start in range(0, len(x), 8):
        xb = x[start : start + 8].float()
        views = dihedral_views(xb) if tta else [xb]
        out = model(torch.cat(views), reconstruct=())
        n_v = len(views)

        def mean(t: torch.Tensor, n_v: int = n_v) -> torch.Tensor:
            return t.reshape(n_v, -1, *t.shape[1:]).mean(0)

        heads["fusion"].append(mean(out["scores"]).numpy())
        heads["primary"].append(mean(out["scores_primary"]).numpy())
        branch = np.full((len(xb), len(SCORE_NAMES)), np.nan, np.float32)
        for name, k in ATTRIBUTE_BRANCHES.items():
            if f"score_{name}" in out:
                branch[:, k] = mean(out[f"score_{name}"]).numpy()
        heads["branch"].append(branch)
    return {h: np.rint(np.clip(np.concatenate(v), 0, 4)) for h, v in heads.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("experiment", help="an `xcryonet experiment --out` folder")
    add_data_args(ap, ROOT)
    args = ap.parse_args(argv)
    return report_or_one_line_error(Path(__file__).name, report, args)


def report(args: argparse.Namespace) -> int:
    """Print the per-head MAE table of every finished run of ``args.experiment``."""
    runs = finished_runs(args.experiment)
    torch.set_num_threads(1)
    table = read_table(args.squares, args.labels)
    y_all = label_matrix(table)
    print("run | head | " + " | ".join(SCORE_NAMES))
    for run in runs:
        rows = key_rows(table, load_checkpoint(run / MODEL_FILE)["run"]["test_keys"], run)
        model, cfg = load_model(run)
        data = load_squares_set(args.squares, table.iloc[rows], cfg, np.ones(len(rows), bool))
        y = y_all[rows]
        for head, pred in head_scores(model, data.x, cfg.tta).items():
            if np.isnan(pred).all() or (head == "primary" and model.fusion is None):
                continue
            err = np.abs(pred - y)
            cells = [
                f"{np.nanmean(err[:, k]):.3f}" if np.isfinite(pred[:, k]).any() else "-"
                for k in range(len(SCORE_NAMES))
            ]
            print(f"{run.name} | {head} | " + " | ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
