"""Pictures and tables of a trained model: learning curves, predicted vs true, attention gallery.

Tables are plain data (DVC plots read the CSVs); figures are PIL images or matplotlib figures
rendered off-screen (MLflow logs them, the dashboard shows them).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from xcryonet.labels import SCORE_NAMES


def curve_table(curve: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """One row per epoch: ``epoch``, ``val_mae_<score>``, ``loss_<phase>_<loss>``."""
    rows = []
    for rec in curve:
        row: dict[str, Any] = {"epoch": int(rec["epoch"])}
        for k, v in (rec.get("val_mae") or {}).items():
            row[f"val_mae_{k}"] = v
        for phase, parts in (rec.get("losses") or {}).items():
            for k, v in parts.items():
                row[f"loss_{phase}_{k}"] = v
        rows.append(row)
    return pd.DataFrame(rows)


def pred_true_table(keys: Sequence[str], pred: np.ndarray, true: np.ndarray) -> pd.DataFrame:
    """Long table ``square, score, true, predicted`` of the labelled entries.

    pred, true: (N, 5) on the 0..4 scale (true NaN where unlabelled).
    """
    rows = []
    for k, name in enumerate(SCORE_NAMES):
        ok = ~np.isnan(true[:, k])
        rows.append(
            pd.DataFrame(
                {
                    "square": np.asarray(keys)[ok],
                    "score": name,
                    "true": true[ok, k].astype(int),
                    "predicted": np.round(pred[ok, k].astype(float), 3),
                }
            )
        )
    return pd.concat(rows, ignore_index=True)


def learning_curve_figure(table: pd.DataFrame) -> Any:
    """Validation MAE per score and the loss of every phase against the epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6), constrained_layout=True)
    for col in [c for c in table.columns if c.startswith("val_mae_")]:
        a.plot(table["epoch"], table[col], label=col.removeprefix("val_mae_"))
    a.set(xlabel="epoch", ylabel="held-out MAE", title="validation")
    a.legend(fontsize=7)
    for col in [c for c in table.columns if c.startswith("loss_")]:
        b.plot(table["epoch"], table[col], label=col.removeprefix("loss_"))
    b.set(xlabel="epoch", ylabel="loss", yscale="log", title="training losses per phase")
    b.legend(fontsize=6)
    return fig


def pred_true_figure(table: pd.DataFrame) -> Any:
    """Predicted against true score, one panel per score, with jitter on the true score."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(SCORE_NAMES), figsize=(14, 3), constrained_layout=True)
    rng = np.random.default_rng(0)
    for ax, name in zip(axes, SCORE_NAMES, strict=True):
        sub = table[table["score"] == name]
        ax.scatter(
            sub["true"] + rng.uniform(-0.15, 0.15, len(sub)), sub["predicted"], s=6, alpha=0.5
        )
        ax.plot([0, 4], [0, 4], color="grey", lw=0.8)
        mae = float((sub["predicted"] - sub["true"]).abs().mean()) if len(sub) else float("nan")
        ax.set(xlim=(-0.5, 4.5), ylim=(-0.5, 4.5), xlabel="true", title=f"{name} (MAE {mae:.2f})")
    axes[0].set_ylabel("predicted")
    return fig


def figure_image(fig: Any) -> Image.Image:
    """A matplotlib figure as an RGB PIL image (the figure is closed)."""
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def tile(images: Sequence[Image.Image], columns: int = 4) -> Image.Image:
    """Images of one size in a grid, row by row, on white."""
    if not images:
        return Image.new("RGB", (1, 1), "white")
    w, h = images[0].size
    rows = -(-len(images) // columns)
    sheet = Image.new("RGB", (w * min(columns, len(images)), h * rows), "white")
    for k, im in enumerate(images):
        sheet.paste(im, ((k % columns) * w, (k // columns) * h))
    return sheet
