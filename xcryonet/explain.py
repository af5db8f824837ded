"""Why a square scored as it did: its cracking and contamination attention maps, as pictures."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from xcryonet.labels import SCORE_NAMES
from xcryonet.model import XCryoNet, pool_input
from xcryonet.train import normalize, resample, view_mean_batches


def score_and_explain(
    model: XCryoNet, crops: Sequence[np.ndarray] | np.ndarray, batch_size: int = 64
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scores and attention maps of raw crops (relative transmission, each (S, S); sizes may
    differ), from one forward per batch. With the model's ``cfg.tta`` both are the mean over
    the square's 8 views, ``batch_size // 8`` squares per forward.

    Returns:
        scores (N, 5) float32 clipped to 0..4, in ``SCORE_NAMES`` order (equal to ``predict``);
        inputs (N, P, P) float32: the crops as the model saw them (resampled to P = input_px);
        maps (N, 2, P, P) float32 in (0, 1): channel 0 cracking, 1 contamination.
    """
    cfg = model.cfg
    px = cfg.input_px
    if len(crops) == 0:
        return (
            np.zeros((0, len(SCORE_NAMES)), np.float32),
            np.zeros((0, px, px), np.float32),
            np.zeros((0, 2, px, px), np.float32),
        )
    x = torch.cat(
        [resample(np.asarray(c, np.float32)[None], cfg.data_px, cfg.extremes) for c in crops]
    )
    scores, maps = view_mean_batches(
        model, x, batch_size, maps=True, prepare=lambda xb: normalize(xb, cfg)
    )
    assert maps is not None
    # model.stat_px: the network (and its maps) see the squares pooled to input_px.
    seen = pool_input(x[:, :1], cfg.pool_factor)[:, 0]
    return scores.numpy(), seen.float().numpy(), maps.numpy()


def square_attention(
    model: XCryoNet, crops: Sequence[np.ndarray] | np.ndarray, batch_size: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """The inputs (N, P, P) and attention maps (N, 2, P, P) of ``score_and_explain``."""
    _, inputs, maps = score_and_explain(model, crops, batch_size)
    return inputs, maps


def _heat(v: np.ndarray) -> np.ndarray:
    """(H, W) in [0, 1] -> (H, W, 3) uint8 'hot' colour map (black, red, yellow, white)."""
    v = np.clip(v, 0, 1)
    rgb = np.stack([np.clip(3 * v, 0, 1), np.clip(3 * v - 1, 0, 1), np.clip(3 * v - 2, 0, 1)], -1)
    return (rgb * 255).astype(np.uint8)


def render_attention(
    square: np.ndarray,
    maps: np.ndarray,
    scores: Sequence[float] | None = None,
    *,
    title: str = "",
    scale: int | None = None,
) -> Image.Image:
    """Three panels: the square, and its cracking and contamination maps over it.

    Args:
        square: (P, P) relative transmission (0 = bars, 1 = vacuum).
        maps: (2, P, P) attention in (0, 1).
        scores: optional five scores, written under the panels.
        title: text above the panels (e.g. grid and square id).
        scale: pixel magnification of each panel (default: panels about 256 px wide).
    """
    if scale is None:
        scale = max(1, round(256 / square.shape[-1]))
    grey = (np.clip(square, 0, 1.2) / 1.2 * 255).astype(np.uint8)
    base = np.repeat(grey[..., None], 3, -1).astype(np.float32)
    panels = [base.astype(np.uint8)]
    for k in range(2):
        m = maps[k]
        # Stretch each map to its own range: what matters is where it looks, not its level.
        m = (m - m.min()) / max(float(m.max() - m.min()), 1e-6)
        heat = _heat(m).astype(np.float32)
        alpha = 0.35 + 0.5 * m[..., None]
        panels.append((base * (1 - alpha) + heat * alpha).astype(np.uint8))
    strip = np.concatenate([np.pad(p, ((0, 0), (0, 4), (0, 0))) for p in panels], axis=1)
    # Nearest-neighbour magnification: the model's own pixels, and a picture that PNG packs in
    # a quarter of the bytes and the time of a bicubic one (9 against 36 MB for a demo grid).
    size = (strip.shape[1] * scale, strip.shape[0] * scale)
    img = Image.fromarray(strip).resize(size, Image.Resampling.NEAREST)
    header, footer = 18, 18 if scores is not None else 0
    canvas = Image.new("RGB", (img.width, img.height + header + footer), (0, 0, 0))
    canvas.paste(img, (0, header))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=12)
    w = img.width // 3
    for k, label in enumerate(("square", "cracking attention", "contamination attention")):
        draw.text((k * w + 4, 2), f"{title} {label}" if k == 0 and title else label, font=font)
    if scores is not None:
        text = "  ".join(f"{n} {s:.1f}" for n, s in zip(SCORE_NAMES, scores, strict=True))
        draw.text((4, header + img.height + 2), text, font=font)
    return canvas
