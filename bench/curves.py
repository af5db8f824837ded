"""Learning curves of experiment runs: held-out MAE per epoch, one panel per label count.

    python bench/curves.py --runs out/experiment_ff/runs out/experiment_e75/runs \
        --names "30 epochs" "75 epochs" --method xcryonet-ss --out docs/img/experiment-epochs.png

Each run folder of ``xcryonet experiment`` keeps its learning curve in ``metrics.json``
(``curve[i].val_mae``: MAE of the raw predictions on the run's test squares after epoch i+1).
The script draws every repeat as a thin line per runs folder and prints, per label count and
folder, the mean over the repeats of the first, the best and the last epoch's MAE.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from xcryonet.io.atomic import atomic_path  # noqa: E402


def read_curves(root: Path, method: str, labelled: int, score: str) -> list[np.ndarray]:
    """Held-out MAE per epoch (n_epochs,) of every repeat of ``method`` at ``labelled`` labels."""
    curves = []
    for f in sorted(root.glob(f"{method}-{labelled}-r*/metrics.json")):
        curve = json.loads(f.read_text())["curve"]
        curves.append(np.array([c["val_mae"][score] for c in curve], float))
    return curves


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", nargs="+", type=Path, required=True, help="experiment runs folders")
    ap.add_argument("--names", nargs="+", help="legend names (default: the folder paths)")
    ap.add_argument("--method", default="xcryonet-ss", help="run name prefix, e.g. primary-fs")
    ap.add_argument("--labelled", nargs="+", type=int, default=[100, 500, 900])
    ap.add_argument("--score", default="overall")
    ap.add_argument("--out", type=Path, help="PNG to write (default: print only)")
    args = ap.parse_args(argv)
    names = args.names or [str(r) for r in args.runs]
    if len(names) != len(args.runs):
        ap.error("--names needs one name per --runs folder")
    for root in args.runs:
        if not any(root.glob(f"{args.method}-*-r*/metrics.json")):
            ap.error(f"{root}: no finished {args.method} run (no {args.method}-N-rK/metrics.json)")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        1, len(args.labelled), figsize=(4 * len(args.labelled), 3.6), squeeze=False
    )
    for ax, n in zip(axes[0], args.labelled, strict=True):
        for k, (root, name) in enumerate(zip(args.runs, names, strict=True)):
            curves = read_curves(root, args.method, n, args.score)
            for i, c in enumerate(curves):
                ax.plot(
                    np.arange(1, len(c) + 1),
                    c,
                    color=f"C{k}",
                    lw=1,
                    alpha=0.75,
                    label=name if i == 0 else None,
                )
            if curves:
                first = np.mean([c[0] for c in curves])
                best = np.mean([c.min() for c in curves])
                last = np.mean([c[-1] for c in curves])
                print(
                    f"{args.method} {n:4d} labels, {name}: {len(curves)} repeats, "
                    f"{args.score} MAE first {first:.3f}, best {best:.3f}, last {last:.3f}"
                )
        ax.set_title(f"{args.method}, {n} labels")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel(f"held-out {args.score} MAE (raw)")
    axes[0, 0].legend()
    fig.tight_layout()
    if args.out:
        with atomic_path(args.out) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
        print("wrote", args.out)


if __name__ == "__main__":
    main()
