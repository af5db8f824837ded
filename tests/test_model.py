"""The XCryoNet variants: forward, backward, shapes, attention and parameter groups."""

import pytest
import torch

from xcryonet.errors import InputError
from xcryonet.model import MODELS, ModelConfig, attention_maps, build_model, parameter_groups

TINY = {"width": 4, "hidden": 8, "input_px": 32}


@pytest.mark.parametrize("variant", sorted(MODELS))
@pytest.mark.parametrize("px", [32, 36])
def test_forward_backward_shapes_no_nan(variant, px):
    torch.manual_seed(0)
    model = build_model(variant, **{**TINY, "input_px": px})
    x = torch.randn(3, 1, px, px)
    out = model(x)
    assert out["scores"].shape == (3, 5)
    assert out["scores_primary"].shape == (3, 5)
    assert out["attention"].shape == (3, 2, px, px)
    assert out["recon_primary"].shape == (3, 1, px, px)
    if variant == "xcryonet":
        for a in ("cracking", "contamination"):
            assert out[f"score_{a}"].shape == (3,)
            assert out[f"recon_{a}"].shape == out[f"input_{a}"].shape == (3, 1, px, px)
    loss = sum(v.float().square().mean() for v in out.values())
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert all(torch.isfinite(v).all() for v in out.values())


@pytest.mark.parametrize("variant", sorted(MODELS))
def test_attention_maps_in_open_unit_interval(variant):
    torch.manual_seed(1)
    model = build_model(variant, **TINY)
    maps = attention_maps(model, torch.randn(2, 1, 32, 32))
    assert maps.shape == (2, 2, 32, 32) and maps.dtype == torch.float32
    assert (maps > 0).all() and (maps < 1).all()
    assert model.training  # the helper restores the mode


def test_attention_weights_attribute_inputs():
    torch.manual_seed(2)
    model = build_model("xcryonet", **TINY)
    x = torch.randn(2, 1, 32, 32)
    out = model(x)
    torch.testing.assert_close(out["input_cracking"], x * out["attention"][:, :1])
    torch.testing.assert_close(out["input_contamination"], x * out["attention"][:, 1:])


def test_reconstruct_selects_decoders():
    model = build_model("xcryonet", **TINY)
    out = model(torch.randn(1, 1, 32, 32), reconstruct=["cracking"])
    assert "recon_cracking" in out
    assert "recon_primary" not in out and "recon_contamination" not in out


def test_large_input_and_stem_stride():
    model = build_model("primary", width=2, hidden=4, stem_stride=4, input_px=640)
    with torch.no_grad():
        out = model(torch.randn(1, 1, 640, 640))
    assert out["features_primary"].shape[-1] == 640 // 16
    assert out["recon_primary"].shape == (1, 1, 640, 640)


@pytest.mark.parametrize("variant", sorted(MODELS))
def test_parameter_groups_partition_parameters(variant):
    model = build_model(variant, **TINY)
    groups = parameter_groups(model)
    ids = [id(p) for ps in groups.values() for p in ps]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters()}
    assert all(groups.values())
    assert ("fusion" in groups) == (variant == "xcryonet")


def test_build_model_rejects_bad_input():
    with pytest.raises(InputError, match="unknown model 'resnet'"):
        build_model("resnet")
    with pytest.raises(InputError, match="unknown setting"):
        build_model("primary", depth=3)
    with pytest.raises(InputError, match="width"):
        ModelConfig(width=0)


def test_initial_scores_start_mid_scale():
    model = build_model("xcryonet", **TINY)
    with torch.no_grad():
        scores = model(torch.zeros(2, 1, 32, 32), reconstruct=())["scores"]
    assert ((scores > 0) & (scores < 4)).all()
