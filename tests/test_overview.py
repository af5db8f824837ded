"""The atlas overview: numbered squares, and the top-N numbers large enough to read."""

import numpy as np

from xcryonet.overview import render_overview


def _label_extent(numbers):
    """Width in px of the label drawn on square 0, and its black (outline) pixels: bright squares
    on dark bars, so inside a square only a label's outline is black."""
    image = np.zeros((400, 400), np.float32)
    rows = [60.0, 60.0, 200.0, 200.0, 340.0, 340.0, 60.0, 200.0]
    cols = [60.0, 200.0, 60.0, 200.0, 60.0, 200.0, 340.0, 340.0]
    for r, c in zip(rows, cols, strict=True):
        image[int(r) - 45 : int(r) + 45, int(c) - 45 : int(c) + 45] = 1.0
    pic = np.asarray(
        render_overview(image, rows, cols, [90.0] * 8, numbers=numbers, scores=[4.0] * 8)
    )
    box = pic[25:95, 25:95].astype(int)  # inside square 0, clear of its outline
    green = (box[..., 1] > 200) & (box[..., 0] < 60)
    black = box.sum(axis=2) < 30
    cols_hit = np.flatnonzero(green.any(axis=0))
    return (cols_hit.max() - cols_hit.min() + 1 if len(cols_hit) else 0), int(black.sum())


def test_top_numbers_are_larger_and_outlined():
    every, every_black = _label_extent(None)  # all eight numbered: the small font, no outline
    top, top_black = _label_extent([8, None, None, None, None, None, None, None])
    assert every > 0 and top > every  # the outline is green too: the bigger glyph is wider
    assert every_black == 0 and top_black > 20
