"""The ``xcryonet`` command line: a thin runner over :mod:`xcryonet.stages`.

Every subcommand parses arguments, calls one stage function and prints its small result.
Bad input (:class:`~xcryonet.errors.InputError`) prints one line, ``error: PATH: problem``, and
exits with code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from xcryonet.errors import InputError


def _add_params(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--params",
        default="params.yaml",
        help="params file (default: params.yaml in the working folder, else the defaults)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a param, e.g. --set extract.crop_px=512 (repeatable)",
    )


_MODEL_HELP = "model folder of `xcryonet train`, or models:/xcryonet@champion (or /VERSION)"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = argparse.ArgumentParser(
        prog="xcryonet", description="Automated cryo-EM grid-square screening (XCryoNet)."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("simulate", help="write the simulated demo grids, truth and labels.csv")
    _add_params(p)
    p.add_argument("--out", help="root folder for the grids (default: simulate.out_dir)")
    p.add_argument("--labels", help="labels.csv to write (default: simulate.labels_path)")
    p.add_argument("--truth", help="folder for per-grid truth CSVs (default: simulate.truth_dir)")
    p.add_argument("--grids", type=int, help="number of grids (default: simulate.n_grids)")

    p = sub.add_parser("extract", help="find, crop and auto-score every grid square of atlases")
    _add_params(p)
    p.add_argument("atlases", nargs="+", help="EPU atlas folders, SerialEM montages or MRC files")
    p.add_argument(
        "--out", help="output folder, one sub-folder per grid (default: extract.out_dir)"
    )
    p.add_argument(
        "--workers", type=int, help="grids processed in parallel (default: extract.workers)"
    )

    p = sub.add_parser("train", help="train XCryoNet (three phases) on squares and labels")
    _add_params(p)
    p.add_argument("--squares", required=True, help="output folder of `xcryonet extract`")
    p.add_argument("--labels", required=True, help="labels.csv")
    p.add_argument("--out", required=True, help="model folder (resumes from its checkpoint)")
    p.add_argument("--variant", default="xcryonet", choices=("xcryonet", "primary"))
    p.add_argument("--supervision", default="ss", choices=("ss", "fs"))
    p.add_argument("--labeled", type=int, help="labelled squares to train on (default: all)")
    p.add_argument("--unlabeled", type=int, help="unlabelled squares for ss (default: all)")
    p.add_argument("--split", help="split.csv of `xcryonet dataset` (replaces the random split)")
    p.add_argument(
        "--no-track", dest="track", action="store_false", help="do not log the run to MLflow"
    )
    p.add_argument("--run-name", help="MLflow run name (default: VARIANT-SUPERVISION)")
    p.add_argument(
        "--nproc", type=int, default=1, help="DistributedDataParallel processes (gloo, CPU)"
    )

    p = sub.add_parser("dataset", help="join labels to squares and write the stable split")
    _add_params(p)
    p.add_argument("--squares", required=True, help="output folder of `xcryonet extract`")
    p.add_argument("--labels", required=True, help="labels.csv")
    p.add_argument("--out", required=True, help="folder for split.csv and summary.json")

    p = sub.add_parser("evaluate", help="print the MAE per score of a model as JSON")
    _add_params(p)
    p.add_argument("--model", required=True, help=_MODEL_HELP)
    p.add_argument("--squares", required=True, help="output folder of `xcryonet extract`")
    p.add_argument("--labels", required=True, help="labels.csv")
    p.add_argument("--split", help="split.csv: evaluate on its test squares only")
    p.add_argument("--out", help="folder for metrics.json, plots/ and figures/")

    p = sub.add_parser("register", help="register a model; promote it to champion if better")
    _add_params(p)
    p.add_argument("--model", required=True, help="model folder trained with MLflow tracking")
    p.add_argument("--squares", required=True, help="output folder of `xcryonet extract`")
    p.add_argument("--labels", required=True, help="labels.csv")
    p.add_argument("--split", required=True, help="split.csv: champion and challenger meet here")
    p.add_argument("--out", help="JSON file recording what happened")

    p = sub.add_parser("tune", help="Optuna study; writes the best params (see README)")
    _add_params(p)
    p.add_argument("--squares", required=True, help="output folder of `xcryonet extract`")
    p.add_argument("--labels", required=True, help="labels.csv")
    p.add_argument("--split", required=True, help="split.csv of `xcryonet dataset`")
    p.add_argument("--out", required=True, help="folder for trials/, best_params.yaml, best.json")
    p.add_argument("--trials", type=int, help="trials in all (default: tune.trials)")
    p.add_argument("--workers", type=int, default=1, help="processes sharing the study")

    p = sub.add_parser("dashboard", help="start the Streamlit dashboard on 127.0.0.1")
    p.add_argument("--port", type=int, default=8501)
    p.add_argument("--address", default="127.0.0.1", help="bind address (default 127.0.0.1)")

    p = sub.add_parser("profile", help="print a params profile as `dvc exp run` -S flags")
    p.add_argument("file", help="a partial params.yaml, e.g. profiles/paper.yaml")

    p = sub.add_parser("registry", help="show the registered models or roll champion back")
    _add_params(p)
    p.add_argument("action", choices=("show", "rollback"))

    p = sub.add_parser("score", help="score a new grid: ranked targets in stage coordinates")
    _add_params(p)
    p.add_argument("atlas", help="EPU atlas folder, SerialEM montage or MRC file")
    p.add_argument("--model", required=True, help=_MODEL_HELP)
    p.add_argument("--out", required=True, help="targets CSV to write")
    p.add_argument("--attention", help="folder for attention-map pictures of every square")
    p.add_argument(
        "--nav",
        help="SerialEM navigator file of the top squares (registration 1: transform the items "
        "in SerialEM first if the grid was reloaded)",
    )
    p.add_argument("--top", type=int, default=20, help="squares in the navigator (default 20)")

    p = sub.add_parser("experiment", help="the paper's Table 1 protocol plus baselines")
    _add_params(p)
    p.add_argument("--squares", required=True, help="output folder of `xcryonet extract`")
    p.add_argument("--labels", required=True, help="labels.csv")
    p.add_argument("--out", required=True, help="results folder (runs resume from here)")
    p.add_argument("--quick", action="store_true", help="minutes on a CPU: tiny model, 2 epochs")
    p.add_argument("--repeats", type=int, help="random train/test splits (default 4; quick 2)")
    p.add_argument("--labeled", type=int, nargs="+", help="label counts (default 100 500 900)")
    p.add_argument("--workers", type=int, default=1, help="runs trained at once (processes)")
    p.add_argument("--variants", nargs="+", choices=("primary", "xcryonet"), help="(default: both)")
    p.add_argument("--supervisions", nargs="+", choices=("fs", "ss"), help="(default: both)")

    p = sub.add_parser("inspect", help="print a JSON summary of an atlas")
    p.add_argument("path", help="EPU atlas folder or Atlas.dm, SerialEM montage, or MRC file")

    p = sub.add_parser("labels", help="check a labels.csv against extracted squares")
    p.add_argument("labels", help="labels.csv")
    p.add_argument("--squares", required=True, help="output folder of `xcryonet extract`")
    return parser


def _print_json(result: object) -> None:
    """Print a stage's result as readable JSON (µm stays µm)."""
    print(json.dumps(result, indent=2, ensure_ascii=False, default=str))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 1 failure, 2 bad input)."""
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    # Stage imports are deferred so `xcryonet --help` stays fast.
    from xcryonet import stages

    # One progress bar per download of a registry model is noise in a terminal or a DVC log.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from xcryonet.config import load_params

    if args.command == "inspect":
        _print_json(stages.inspect(Path(args.path)))
        return 0
    if args.command == "labels":
        _print_json(stages.check_labels(Path(args.labels), Path(args.squares)))
        return 0
    if args.command == "dashboard":
        import subprocess

        app = Path(__file__).resolve().parents[1] / "dashboards" / "app.py"
        if not app.exists():
            raise InputError(app, "is missing: run the dashboard from a checkout of the project")
        cmd = [sys.executable, "-m", "streamlit", "run", str(app),
               "--server.address", args.address, "--server.port", str(args.port)]  # fmt: skip
        return subprocess.call(cmd)
    if args.command == "profile":
        from xcryonet.config import profile_overrides

        print(" ".join(f"-S {o}" for o in profile_overrides(args.file)))
        return 0
    params = load_params(args.params, args.overrides)
    if args.command == "evaluate":
        result = stages.evaluate_model(
            args.model,
            Path(args.squares),
            Path(args.labels),
            split_csv=Path(args.split) if args.split else None,
            out_dir=Path(args.out) if args.out else None,
            params=params,
        )
        _print_json(result)
        return 0
    if args.command == "dataset":
        _print_json(
            stages.make_dataset(Path(args.squares), Path(args.labels), Path(args.out), params)
        )
        return 0
    if args.command == "register":
        result = stages.register_model(
            Path(args.model),
            Path(args.squares),
            Path(args.labels),
            Path(args.split),
            params,
            Path(args.out) if args.out else None,
        )
        _print_json(result)
        return 0
    if args.command == "tune":
        from xcryonet.tune import tune

        result = tune(
            Path(args.squares),
            Path(args.labels),
            Path(args.split),
            Path(args.out),
            params,
            n_trials=args.trials,
            workers=args.workers,
        )
        _print_json(result)
        return 0
    if args.command == "registry":
        from xcryonet import tracking

        if args.action == "rollback":
            _print_json(stages.rollback_champion(params))
        else:
            _print_json(tracking.registry_summary(params.mlflow))
        return 0
    if args.command == "train":
        result = stages.train_model(
            Path(args.squares),
            Path(args.labels),
            Path(args.out),
            params,
            variant=args.variant,
            supervision=args.supervision,
            labeled=args.labeled,
            unlabeled=args.unlabeled,
            split_csv=Path(args.split) if args.split else None,
            track=args.track,
            run_name=args.run_name,
            nproc=args.nproc,
        )
        result.pop("curve", None)  # in metrics.json; too long for the terminal
        _print_json(result)
        return 0
    if args.command == "experiment":
        from dataclasses import replace

        from xcryonet.experiment import FULL, QUICK, run_experiment, summarize

        plan = QUICK if args.quick else FULL
        if args.repeats:
            plan = replace(plan, repeats=args.repeats)
        if args.labeled:
            plan = replace(plan, label_counts=tuple(args.labeled))
        if args.variants:
            plan = replace(plan, variants=tuple(dict.fromkeys(args.variants)))
        if args.supervisions:
            plan = replace(plan, supervisions=tuple(dict.fromkeys(args.supervisions)))
        results = run_experiment(
            Path(args.squares), Path(args.labels), Path(args.out), params, plan, args.workers
        )
        print((Path(args.out) / "results.md").read_text())
        print(json.dumps({"runs": len(results), "summary": len(summarize(results))}))
        return 0
    if args.command == "score":
        result = stages.score(
            Path(args.atlas),
            args.model,
            Path(args.out),
            params.extract,
            attention_dir=Path(args.attention) if args.attention else None,
            nav_path=Path(args.nav) if args.nav else None,
            top_n=args.top,
            mlflow_cfg=params.mlflow,
        )
        _print_json(result)
        return 0
    if args.command == "simulate":
        result = stages.simulate(
            params.simulate,
            out_dir=args.out,
            labels_path=args.labels,
            truth_dir=args.truth,
            n_grids=args.grids,
        )
        _print_json(result)
        return 0
    if args.command == "extract":
        result = stages.extract(
            [Path(a) for a in args.atlases],
            Path(args.out or params.extract.out_dir),
            params.extract,
            workers=args.workers,
        )
        _print_json(result)
        for problem in result["failed"]:
            print(f"error: {problem}", file=sys.stderr)
        return 0 if not result["failed"] else 2
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
