"""Atlas overview pictures: the atlas with every square outlined and numbered."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def to_uint8(image: np.ndarray, lo_pct: float = 0.5, hi_pct: float = 99.5) -> np.ndarray:
    """Contrast-stretch a float image (row, col) to uint8 between two percentiles."""
    finite = image[np.isfinite(image)]
    if finite.size == 0:
        return np.zeros(image.shape, np.uint8)
    sample = finite[:: max(1, finite.size // 1_000_000)]
    lo, hi = np.percentile(sample, [lo_pct, hi_pct])
    scaled = (image.astype(np.float32) - lo) / max(float(hi - lo), 1e-12)
    return (np.clip(scaled, 0, 1) * 255).astype(np.uint8)


def downsample_for_display(image: np.ndarray, max_side: int) -> tuple[np.ndarray, int]:
    """Block-mean downsample (row, col) so the longer side is <= ``max_side``; returns factor."""
    factor = max(1, int(np.ceil(max(image.shape) / max_side)))
    if factor == 1:
        return np.asarray(image, np.float32), 1
    rows, cols = (image.shape[0] // factor) * factor, (image.shape[1] // factor) * factor
    small = np.empty((rows // factor, cols // factor), np.float32)
    band = 256 * factor  # band by band, so a memory-mapped atlas is never copied whole
    for r0 in range(0, rows, band):
        block = np.asarray(image[r0 : min(rows, r0 + band), :cols], np.float32)
        small[r0 // factor : r0 // factor + block.shape[0] // factor] = block.reshape(
            block.shape[0] // factor, factor, cols // factor, factor
        ).mean(axis=(1, 3))
    return small, factor


def score_colour(score: float) -> tuple[int, int, int]:
    """Red (0) -> yellow (2) -> green (4) for a score; grey for NaN."""
    if not np.isfinite(score):
        return (160, 160, 160)
    t = float(np.clip(score / 4.0, 0, 1))
    return (int(255 * min(1, 2 - 2 * t)), int(255 * min(1, 2 * t)), 40)


def render_overview(
    image: np.ndarray,
    rows: Sequence[float] | np.ndarray,
    cols: Sequence[float] | np.ndarray,
    sizes: Sequence[float] | np.ndarray,
    *,
    numbers: Sequence[int | None] | None = None,
    scores: Sequence[float] | np.ndarray | None = None,
    angles_deg: Sequence[float] | np.ndarray | None = None,
    max_side: int = 2048,
) -> Image.Image:
    """Draw each square (centre ``rows``/``cols`` px, side ``sizes`` px) outlined and numbered.

    Args:
        image: atlas (row, col), any float dtype; may be memory-mapped.
        rows, cols, sizes: square centres and sides in atlas px.
        numbers: label drawn beside each square (default 0..N-1; None: no label).
        scores: optional 0..4 score per square, used as the outline colour.
        angles_deg: optional direction of each square's side, from the +col axis towards +row
            (degrees), as in :class:`xcryonet.extract.Lattice`.
        max_side: longest side of the picture in px.

    Returns:
        An RGB PIL image.
    """
    small, factor = downsample_for_display(image, max_side)
    rgb = Image.fromarray(to_uint8(small)).convert("RGB")
    draw = ImageDraw.Draw(rgb)
    n = len(rows)
    median_side = float(np.median(np.asarray(sizes, float))) / factor if n else 0.0
    numbers = list(range(n)) if numbers is None else list(numbers)
    # Numbers about a third of a square high stay legible without hiding the square. When only
    # a few squares are numbered (the top N by rank), they may cover more of theirs: two thirds,
    # outlined in black so that they read over bright and dark squares alike.
    few = sum(x is not None for x in numbers) <= max(1, n // 4)
    size = int(np.clip(median_side * (2 / 3 if few else 1 / 3), 9, 56 if few else 28))
    font = ImageFont.load_default(size=size)
    stroke = max(1, size // 8) if few else 0
    corners = np.array([[-1, -1], [-1, 1], [1, 1], [1, -1]], float)  # (a, b) along (e1, e2)
    for i in range(n):
        r, c, half = rows[i] / factor, cols[i] / factor, sizes[i] / factor / 2
        colour = score_colour(scores[i]) if scores is not None else (0, 200, 255)
        theta = np.deg2rad(angles_deg[i]) if angles_deg is not None else 0.0
        cos, sin = np.cos(theta), np.sin(theta)
        # Side directions e1 = (sin, cos) and e2 = (cos, -sin) in (row, col).
        d_row = half * (corners[:, 0] * sin + corners[:, 1] * cos)
        d_col = half * (corners[:, 0] * cos - corners[:, 1] * sin)
        polygon = [(float(c + dc), float(r + dr)) for dr, dc in zip(d_row, d_col, strict=True)]
        draw.polygon(polygon, outline=colour, width=1 if half < 20 else 2)
        if numbers[i] is not None:
            draw.text(
                (c, r), str(numbers[i]), fill=colour, font=font, anchor="mm",
                stroke_width=stroke, stroke_fill=(0, 0, 0),
            )  # fmt: skip
    return rgb
