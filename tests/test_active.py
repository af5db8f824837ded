"""Active learning: dihedral test-time augmentation as uncertainty, and the labelling order."""

import numpy as np
import torch

from xcryonet.active import labelling_order, tta_uncertainty
from xcryonet.model import ModelConfig, build_model, dihedral_views


def test_dihedral_views_are_the_8_distinct_symmetries():
    x = torch.arange(9.0).reshape(1, 1, 3, 3)
    views = {tuple(v.flatten().tolist()) for v in dihedral_views(x)}
    assert len(views) == 8


def test_symmetric_squares_have_zero_uncertainty_asymmetric_ones_not():
    torch.manual_seed(0)
    model = build_model("xcryonet", ModelConfig(width=4, hidden=8, input_px=16)).eval()
    flat = np.full((16, 16), 0.7, np.float32)
    rng = np.random.default_rng(0)
    blob = rng.random((16, 16)).astype(np.float32)
    u = tta_uncertainty(model, [flat, blob])
    assert u.shape == (2,)
    assert u[0] < 1e-5 < u[1]


def test_labelling_order_puts_uncertain_unlabelled_first():
    u = np.array([0.1, 0.9, 0.5, 0.95])
    labelled = np.array([False, False, False, True])
    assert labelling_order(u, labelled).tolist() == [1, 2, 0, 3]
    shuffled = labelling_order(u, labelled, mode="random", seed=1)
    assert sorted(shuffled[:3].tolist()) == [0, 1, 2] and shuffled[3] == 3
