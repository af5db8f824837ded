"""Active learning: which squares are most worth an operator's label next.

The model's uncertainty on a square is the spread of its predictions over the 8 flips and
90-degree rotations of the square (test-time augmentation), which must agree for a confident
model because the labels do not change under them. The spread is summed over the scores that
operators label (cracking, contamination, overall).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from xcryonet.labels import SCORE_NAMES
from xcryonet.model import XCryoNet, dihedral_views
from xcryonet.train import model_input, predict_tensor

LABELLED_SCORES = ("cracking", "contamination", "overall")


def tta_uncertainty(model: XCryoNet, crops: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
    """(N,) summed s.d. over the 8 views of the labelled scores, for raw crops (each (S, S))."""
    if len(crops) == 0:
        return np.zeros(0)
    cfg = model.cfg
    x = torch.cat([model_input(np.asarray(c)[None], cfg) for c in crops])
    # (8, N, 5): each view on its own (tta=False), for the spread between them.
    preds = torch.stack([predict_tensor(model, v, tta=False) for v in dihedral_views(x)])
    cols = [SCORE_NAMES.index(s) for s in LABELLED_SCORES]
    return preds[:, :, cols].std(dim=0).sum(dim=1).numpy()


def labelling_order(
    uncertainty: np.ndarray, labelled: np.ndarray, *, mode: str = "uncertainty", seed: int = 0
) -> np.ndarray:
    """Row order for labelling: unlabelled squares first, most uncertain first (``mode``
    ``uncertainty``) or shuffled (``random``); the labelled ones last, in the same way."""
    n = len(uncertainty)
    if mode == "random":
        key = np.random.default_rng(seed).random(n)
    elif mode == "uncertainty":
        key = -np.asarray(uncertainty, float)
    else:
        raise ValueError(f"mode must be uncertainty or random, got {mode!r}")
    return np.lexsort((key, np.asarray(labelled, bool)))
