"""The paper's experiment (Table 1) on a dataset, plus the baselines a user would try instead.

Protocol: for each repeat, a seeded uniform random split holds out ``test_fraction`` of the
labelled squares as the test set, the same for every method in that repeat. Each method trains on
the first 100, 500 or 900 of the remaining labelled squares (nested), and the SS variants also on
``unlabeled`` unlabelled squares. Reported: MAE per score on the test squares, mean ± std over
the repeats. Every run's model folder is kept under ``out/runs``; a finished run is not run
again and an interrupted one resumes from its checkpoint, so a killed experiment goes on.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from xcryonet.config import Params
from xcryonet.errors import InputError
from xcryonet.io.atomic import atomic_write_text
from xcryonet.labels import SCORE_NAMES

# The paper's Table 1 figures that the issue quotes (MAE per score).
PAPER = {
    ("XCryoNet-SS", 100): (0.91, 1.08, 1.35, 1.23, 1.38),
    ("XCryoNet-SS (best)", 900): (0.26, 0.49, 0.71, 0.62, 0.47),
}


@dataclass(frozen=True)
class ExperimentPlan:
    """What to run.

    Attributes:
        label_counts: labelled training squares per run (nested within a repeat).
        unlabeled: unlabelled squares added for SS runs.
        repeats: random train/test splits (seeds 0..repeats-1).
        variants: model variants; supervisions: ``fs`` and/or ``ss``.
        baselines: names from ``xcryonet.baselines``.
        epochs, input_px, width: overrides of params (None = keep params).
        round_scores: the table scores every method's predictions rounded to whole scores,
            as operators label (results.csv also keeps the raw MAE as ``<score>_raw``).
    """

    label_counts: tuple[int, ...] = (100, 500, 900)
    unlabeled: int = 1500
    repeats: int = 4
    variants: tuple[str, ...] = ("primary", "xcryonet")
    supervisions: tuple[str, ...] = ("fs", "ss")
    baselines: tuple[str, ...] = ("mean", "features_gbm", "ice_filter")
    epochs: int | None = None
    input_px: int | None = None
    width: int | None = None
    round_scores: bool = True


FULL = ExperimentPlan()
# Minutes on a CPU, for CI: the same protocol shape, tiny model, few epochs, two repeats.
QUICK = ExperimentPlan(
    label_counts=(100,), unlabeled=300, repeats=2, epochs=2, input_px=32, width=4
)


def method_name(variant: str, supervision: str) -> str:
    """``XCryoNet-SS``, ``Primary-FS``, ... as in the paper."""
    return f"{'XCryoNet' if variant == 'xcryonet' else 'Primary'}-{supervision.upper()}"


def raw_crops(squares_dir: Path, table: pd.DataFrame) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Native-resolution crops (float32) and masks of ``table``'s rows, in row order."""
    from xcryonet.stages import load_crops

    crops: list[np.ndarray] = [np.zeros((0, 0))] * len(table)
    masks: list[np.ndarray] = [np.zeros((0, 0), bool)] * len(table)
    pos = np.arange(len(table))
    for grid_id, rows in table.groupby("grid_id", sort=True).groups.items():
        where = pos[table.index.get_indexer(rows)]
        ids = table.iloc[where]["square_id"].to_numpy(int)
        c, m = load_crops(squares_dir, str(grid_id), ids)
        for k, w in enumerate(where):
            crops[w] = c[k].astype(np.float32)
            masks[w] = m[k]
    return crops, masks


def _train_job(args: tuple[Any, ...]) -> None:
    """One CNN run of the protocol (a process-pool job); writes ``run_dir/metrics.json``."""
    from xcryonet.train import train

    squares_dir, labels_csv, run_dir, cfg, model_cfg, variant, supervision, n, unlabeled = args
    train(
        squares_dir,
        labels_csv,
        run_dir,
        cfg,
        model_cfg=model_cfg,
        variant=variant,
        supervision=supervision,
        labeled=n,
        unlabeled=unlabeled if supervision == "ss" else None,
    )


def _baseline_rows(
    squares_dir: Path,
    table: pd.DataFrame,
    y_all: np.ndarray,
    plan: ExperimentPlan,
    test_fraction: float,
) -> list[dict[str, Any]]:
    """Fit and score every baseline of ``plan`` on every (repeat, label count) split."""
    from xcryonet.baselines import FeaturesGBM, build_baseline, square_features
    from xcryonet.train import split_rows

    crops, masks = raw_crops(squares_dir, table)
    features: np.ndarray | None = None
    if "features_gbm" in plan.baselines:
        # The features of a square do not depend on the split: compute them once, for the
        # labelled squares (every split's train and test rows are among them).
        labelled = np.flatnonzero(table["labelled"].to_numpy())
        x, _ = square_features([crops[i] for i in labelled], [masks[i] for i in labelled])
        features = np.full((len(table), x.shape[1]), np.nan)
        features[labelled] = x
    rows: list[dict[str, Any]] = []
    for r in range(plan.repeats):
        for n in plan.label_counts:
            lab, _, test = split_rows(
                table, supervision="fs", labeled=n, unlabeled=0, test_fraction=test_fraction, seed=r
            )
            for name in plan.baselines:
                t0 = time.perf_counter()
                model = build_baseline(name, round_scores=False)
                if isinstance(model, FeaturesGBM) and features is not None:
                    raw = model.fit_features(features[lab], y_all[lab]).predict_features(
                        features[test]
                    )
                else:
                    model.fit([crops[i] for i in lab], [masks[i] for i in lab], y_all[lab])
                    raw = model.predict([crops[i] for i in test], [masks[i] for i in test])
                pred = np.rint(raw) if plan.round_scores else raw
                err, err_raw = np.abs(pred - y_all[test]), np.abs(raw - y_all[test])
                rows.append(
                    {
                        "method": name,
                        "labeled": n,
                        "repeat": r,
                        "n_test": len(test),
                        "seconds": round(time.perf_counter() - t0, 2),
                        **{s: float(np.nanmean(err[:, k])) for k, s in enumerate(SCORE_NAMES)},
                        **{
                            f"{s}_raw": float(np.nanmean(err_raw[:, k]))
                            for k, s in enumerate(SCORE_NAMES)
                        },
                    }
                )
    return rows


def _run_metrics(
    run_dir: Path, squares_dir: Path, table: pd.DataFrame, tta: bool
) -> dict[str, Any]:
    """A run's ``metrics.json``, its test MAE scored again when it was taken with another ``tta``.

    ``model.tta`` does not change training, so a run kept from before it changed is scored
    again from its saved model on its own test squares instead of being trained again; the
    file is updated (atomically).
    """
    from xcryonet.train import (
        MODEL_FILE,
        evaluate,
        key_rows,
        load_checkpoint,
        load_model,
        load_squares_set,
    )

    path = run_dir / "metrics.json"
    metrics: dict[str, Any] = json.loads(path.read_text())
    if bool(metrics.get("tta", False)) == tta:
        return metrics
    keys = load_checkpoint(run_dir / MODEL_FILE)["run"]["test_keys"]
    rows = key_rows(table, keys, run_dir)
    model, cfg = load_model(run_dir)
    data = load_squares_set(squares_dir, table.iloc[rows], cfg, np.ones(len(rows), bool))
    metrics["tta"] = tta
    metrics["test_mae"] = evaluate(model, data, tta=tta)
    metrics["test_mae_rounded"] = evaluate(model, data, round_scores=True, tta=tta)
    atomic_write_text(path, json.dumps(metrics, indent=2) + "\n")
    return metrics


def run_experiment(
    squares_dir: Path,
    labels_csv: Path,
    out_dir: Path,
    params: Params,
    plan: ExperimentPlan = FULL,
    workers: int = 1,
) -> pd.DataFrame:
    """Run every method of ``plan``; write results.csv, summary.csv and results.md in ``out_dir``.

    ``workers`` > 1 trains that many runs at once in separate processes, each with
    ``cpu_count // workers`` torch threads (unless ``train.threads`` is set); a run's result
    does not depend on the worker that ran it. Returns the long table: one row per
    (method, labeled, repeat) with the MAE of each score.
    """
    from xcryonet.train import read_table

    if workers < 1:
        raise InputError("workers", f"must be at least 1, got {workers}")

    table = read_table(squares_dir, labels_csv)
    y_all = table[[f"label_{s}" for s in SCORE_NAMES]].to_numpy(float)
    train_cfg = replace(
        params.train,
        epochs=plan.epochs or params.train.epochs,
        progress=False,
    )
    model_cfg = replace(
        params.model,
        input_px=plan.input_px or params.model.input_px,
        width=plan.width or params.model.width,
    )
    n_pool = int(table["labelled"].sum() * (1 - train_cfg.test_fraction))
    if max(plan.label_counts) > n_pool:
        raise InputError(
            labels_csv,
            f"{max(plan.label_counts)} labelled training squares wanted, only about {n_pool} "
            "are left after the test split",
        )
    runs = [
        (out_dir / "runs" / f"{v}-{s}-{n}-r{r}", replace(train_cfg, seed=r), v, s, n)
        for r in range(plan.repeats)
        for n in plan.label_counts
        for v in plan.variants
        for s in plan.supervisions
    ]
    todo = [job for job in runs if not (job[0] / "metrics.json").exists()]
    # Longest first (SS before FS, more labels first), so parallel workers finish together.
    todo.sort(key=lambda job: (job[3] != "ss", job[2] != "xcryonet", -job[4]))
    threads = max(1, (os.cpu_count() or 1) // workers)
    args = [
        (squares_dir, labels_csv, d, replace(c, threads=c.threads or threads), model_cfg)
        + (v, s, n, plan.unlabeled)
        for d, c, v, s, n in todo
    ]
    bar = tqdm(total=len(runs), initial=len(runs) - len(todo), desc="experiment runs")
    pool = None
    if workers > 1 and len(args) > 1:
        # The CNN runs start first; the baselines run here meanwhile (they take a minute or two).
        ctx = multiprocessing.get_context("spawn")
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx)
        futures = [pool.submit(_train_job, a) for a in args]
    try:
        rows = _baseline_rows(squares_dir, table, y_all, plan, train_cfg.test_fraction)
        if pool is not None:
            for fut in as_completed(futures):
                fut.result()
                bar.update()
        else:
            for a in args:
                _train_job(a)
                bar.update()
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    for run_dir, _, v, s, n in runs:
        metrics = _run_metrics(run_dir, squares_dir, table, model_cfg.tta)
        mae = metrics["test_mae_rounded"] if plan.round_scores else metrics["test_mae"]
        rows.append(
            {
                "method": method_name(v, s),
                "labeled": n,
                "repeat": int(run_dir.name.rsplit("-r", 1)[1]),
                "n_test": metrics["test"],
                "seconds": metrics.get("train_seconds"),
                **{k: mae[k] for k in SCORE_NAMES},
                **{f"{k}_raw": metrics["test_mae"][k] for k in SCORE_NAMES},
            }
        )
    bar.close()
    results = pd.DataFrame(rows)
    summary = summarize(results)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "results.csv", results.to_csv(index=False))
    atomic_write_text(out_dir / "summary.csv", summary.to_csv(index=False))
    checks = claims(results)
    atomic_write_text(out_dir / "claims.csv", checks.to_csv(index=False))
    atomic_write_text(out_dir / "results.md", markdown(summary, plan) + claims_markdown(checks))
    return results


def summarize(results: pd.DataFrame) -> pd.DataFrame:
    """Mean and std over repeats of each score's MAE, per method and label count."""
    agg = results.groupby(["method", "labeled"], sort=False)[list(SCORE_NAMES)].agg(["mean", "std"])
    agg.columns = [f"{s}_{stat}" for s, stat in agg.columns]
    agg["repeats"] = results.groupby(["method", "labeled"], sort=False).size()
    return agg.reset_index()


# The claims, each as (winner, loser): the winner's MAE must be lower on these scores.
CLAIM_SCORES = ("cracking", "contamination", "overall")


def claim_pairs(methods: set[str]) -> list[tuple[str, str, str]]:
    """(claim, winner, loser) for every claim whose two methods are in ``methods``.

    The paper's two claims (SS beats FS; XCryoNet beats primary, each within the other
    setting), and "XCryoNet beats every baseline" with XCryoNet-SS (XCryoNet-FS if there is no
    SS run).
    """
    pairs = [("SS beats FS", f"{v}-SS", f"{v}-FS") for v in ("XCryoNet", "Primary")] + [
        ("XCryoNet beats primary", f"XCryoNet-{s}", f"Primary-{s}") for s in ("SS", "FS")
    ]
    best = next((m for m in ("XCryoNet-SS", "XCryoNet-FS") if m in methods), None)
    if best is not None:
        cnn = {method_name(v, s) for v in ("primary", "xcryonet") for s in ("fs", "ss")}
        pairs += [("XCryoNet beats baselines", best, b) for b in sorted(methods - cnn)]
    return [(c, w, lo) for c, w, lo in pairs if w in methods and lo in methods]


def claims(results: pd.DataFrame, confidence: float = 0.95) -> pd.DataFrame:
    """Paired comparisons behind the issue's claims, on the same splits.

    For each claim, label count and score in ``CLAIM_SCORES``: the per-repeat difference
    d = MAE(loser) - MAE(winner) (> 0: the claim holds on that split), its mean, the two-sided
    Student-t interval of the mean at ``confidence``, and the repeats won / lost. Verdict:
    ``holds`` when the whole interval is above 0, ``fails`` when it is below, otherwise
    ``not separable`` (with one repeat there is no interval: ``one repeat``).

    Returns one row per (claim, winner, loser, labeled, score).
    """
    from scipy import stats

    rows: list[dict[str, Any]] = []
    by = results.set_index(["method", "labeled", "repeat"]).sort_index()
    for claim, winner, loser in claim_pairs(set(results["method"])):
        for n in sorted(set(results["labeled"])):
            try:
                w, lo = by.loc[(winner, n)], by.loc[(loser, n)]
            except KeyError:
                continue
            reps = w.index.intersection(lo.index)
            if reps.empty:  # no split run by both
                continue
            for score in CLAIM_SCORES:
                d = (lo.loc[reps, score] - w.loc[reps, score]).to_numpy(float)
                mean = float(d.mean())
                if len(d) > 1:
                    sem = float(d.std(ddof=1) / np.sqrt(len(d)))
                    half = float(stats.t.ppf(0.5 + confidence / 2, len(d) - 1)) * sem
                    verdict = (
                        "holds"
                        if mean - half > 0
                        else "fails"
                        if mean + half < 0
                        else "not separable"
                    )
                else:
                    half, verdict = float("nan"), "one repeat"
                rows.append(
                    {
                        "claim": claim,
                        "winner": winner,
                        "loser": loser,
                        "labeled": int(n),
                        "score": score,
                        "repeats": len(d),
                        "mean_diff": mean,
                        "ci_low": mean - half,
                        "ci_high": mean + half,
                        "won": int((d > 0).sum()),
                        "lost": int((d < 0).sum()),
                        "verdict": verdict,
                    }
                )
    return pd.DataFrame(rows)


def claims_markdown(checks: pd.DataFrame) -> str:
    """The paired claims as a markdown section (empty when there are none)."""
    if checks.empty:
        return ""
    lines = [
        "",
        "## Claims, paired on the same splits",
        "",
        "d = MAE(loser) - MAE(winner) per repeat (> 0: the winner wins), mean and 95 % "
        "t-interval; won / lost counts the repeats.",
        "",
        "| claim | winner vs loser | labelled | score | d mean [95 % CI] | won / lost | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in checks.itertuples(index=False):
        lines.append(
            f"| {r.claim} | {r.winner} vs {r.loser} | {r.labeled} | {r.score} | "
            f"{r.mean_diff:+.3f} [{r.ci_low:+.3f}, {r.ci_high:+.3f}] | {r.won} / {r.lost} | "
            f"{r.verdict} |"
        )
    return "\n".join(lines) + "\n"


def markdown(summary: pd.DataFrame, plan: ExperimentPlan) -> str:
    """Results as a markdown table (MAE mean ± std), with the paper's figures beside them."""
    head = "| method | labelled | " + " | ".join(SCORE_NAMES) + " |"
    lines = [
        "# XCryoNet experiment: MAE per score (lower is better), mean ± std over repeats",
        "",
        f"Plan: {plan}",
        "",
        head,
        "|" + "---|" * (len(SCORE_NAMES) + 2),
    ]
    for row in summary.itertuples(index=False):
        d = row._asdict()
        cells = [
            f"{d[f'{s}_mean']:.2f} ± {0.0 if np.isnan(d[f'{s}_std']) else d[f'{s}_std']:.2f}"
            for s in SCORE_NAMES
        ]
        lines.append(f"| {d['method']} | {d['labeled']} | " + " | ".join(cells) + " |")
    for (name, n), vals in PAPER.items():
        cells = [f"{v:.2f}" for v in vals]
        lines.append(f"| paper: {name} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
