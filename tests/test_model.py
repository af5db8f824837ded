"""The XCryoNet variants: forward, backward, shapes, attention and parameter groups."""

import numpy as np
import pytest
import torch

from xcryonet.errors import InputError
from xcryonet.model import (
    MODELS,
    ModelConfig,
    attention_maps,
    build_model,
    dihedral_views,
    fit_stat_scale,
    parameter_groups,
    undo_dihedral,
)

TINY = {"width": 4, "hidden": 8, "input_px": 32}


@pytest.mark.parametrize("variant", sorted(MODELS))
@pytest.mark.parametrize(
    ("px", "extremes", "head"),
    [
        (32, False, "regression"),
        (36, False, "regression"),
        (32, True, "regression"),
        (32, False, "ordinal"),
        (36, True, "coral"),
    ],
)
def test_forward_backward_shapes_no_nan(variant, px, extremes, head):
    torch.manual_seed(0)
    model = build_model(variant, **{**TINY, "input_px": px, "extremes": extremes, "head": head})
    c = 3 if extremes else 1
    x = torch.randn(3, c, px, px)
    out = model(x)
    assert out["scores"].shape == (3, 5)
    assert out["scores_primary"].shape == (3, 5)
    assert out["attention"].shape == (3, 2, px, px)
    assert out["recon_primary"].shape == (3, c, px, px)
    if variant == "xcryonet":
        for a in ("cracking", "contamination"):
            assert out[f"score_{a}"].shape == (3,)
            assert out[f"recon_{a}"].shape == out[f"input_{a}"].shape == (3, c, px, px)
    assert ("logits" in out) == (head != "regression")
    if head != "regression":
        assert out["logits"].shape == (3, 5, 4)
        torch.testing.assert_close(out["scores"], torch.sigmoid(out["logits"]).sum(-1))
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


def test_undo_dihedral_turns_every_view_back():
    x = torch.arange(2 * 5 * 5, dtype=torch.float32).reshape(1, 2, 5, 5)
    views = dihedral_views(x)
    assert len({tuple(v.flatten().tolist()) for v in views}) == 8
    for back in undo_dihedral(views):
        assert torch.equal(back, x)
    # Not its own inverse for the quarter turns: undoing the identity view's list is not enough.
    assert not torch.equal(undo_dihedral([x] * 8)[1], x)


def test_tta_maps_are_the_turned_back_mean_and_follow_the_square():
    torch.manual_seed(4)
    model = build_model("xcryonet", **{**TINY, "tta": True}).eval()
    x = torch.randn(2, 1, 32, 32)
    maps = attention_maps(model, x)
    with torch.no_grad():
        per_view = [model(v, reconstruct=())["attention"] for v in dihedral_views(x)]
    expected = torch.stack(undo_dihedral(per_view)).mean(0)
    torch.testing.assert_close(maps, expected, atol=1e-5, rtol=0)
    # The square turned and flipped: its averaged maps are the same maps turned and flipped.
    turned = torch.rot90(x.flip(-1), 3, dims=(-2, -1))
    torch.testing.assert_close(
        attention_maps(model, turned),
        torch.rot90(maps.flip(-1), 3, dims=(-2, -1)),
        atol=1e-5,
        rtol=0,
    )
    # One view (tta=False) is the plain forward's map, which differs from the mean.
    single = attention_maps(model, x, tta=False)
    torch.testing.assert_close(single, per_view[0], atol=1e-6, rtol=0)
    assert (single - maps).abs().max() > 1e-4


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


@pytest.mark.parametrize("mix", [False, True])
def test_finer_attribute_branches(mix):
    """branch_stem_stride=1: the attribute branches see a twice finer raster than the primary;
    the fusion pools (or mixes) maps of both sizes, and everything still trains."""
    torch.manual_seed(5)
    cfg = {**TINY, "stem_stride": 2, "branch_stem_stride": 1, "fusion_mix": mix}
    model = build_model("xcryonet", **cfg)
    x = torch.randn(3, 1, 32, 32)
    out = model(x)
    assert out["features_primary"].shape[-1] == 32 // 8
    assert out["features_cracking"].shape[-1] == out["features_contamination"].shape[-1] == 32 // 4
    assert out["scores"].shape == (3, 5) and out["recon_cracking"].shape == (3, 1, 32, 32)
    sum(v.float().square().mean() for v in out.values()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # 0 means "as the primary": the same raster everywhere (the architecture before the setting).
    same = build_model("xcryonet", **{**TINY, "stem_stride": 2, "branch_stem_stride": 0})(x)
    assert same["features_cracking"].shape == same["features_primary"].shape
    with pytest.raises(InputError, match="branch_stem_stride"):
        ModelConfig(branch_stem_stride=-1)


def test_fusion_pools_each_branch_as_the_concatenation():
    """Pooling branch by branch gives the vector the fusion got from the concatenated maps, so
    models trained before the finer branches existed score the same."""
    torch.manual_seed(6)
    model = build_model("xcryonet", **TINY, branch_stem_stride=0).eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        out = model(x, reconstruct=())
        feats = [out[f"features_{b}"] for b in ("primary", "cracking", "contamination")]
        old = model.fusion.classifier(torch.cat(feats, dim=1), model.primary(x)["stats"])[0]
    torch.testing.assert_close(out["scores"], old, atol=1e-6, rtol=0)


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


@pytest.mark.parametrize("head", ["regression", "ordinal", "coral"])
def test_initial_scores_start_mid_scale(head):
    model = build_model("xcryonet", **TINY, head=head)
    with torch.no_grad():
        scores = model(torch.zeros(2, 1, 32, 32), reconstruct=())["scores"]
    assert ((scores > 0) & (scores < 4)).all()


@pytest.mark.parametrize("variant", sorted(MODELS))
def test_ordinal_head_replaces_only_the_answer(variant):
    """model.head=ordinal changes the classifier that gives the answer (xcryonet's fusion, the
    primary variant's primary head); every other head stays the paper's regression, with the
    same parameters and state-dict keys as a regression model's."""
    regression = build_model(variant, **TINY)
    ordinal = build_model(variant, **TINY, head="ordinal")
    reg, ordi = regression.state_dict(), ordinal.state_dict()
    assert reg.keys() == ordi.keys()
    answer = "fusion.classifier." if variant == "xcryonet" else "primary.classifier."
    for key, value in reg.items():
        if key.startswith(answer) and key.split(".")[-2] == "2":  # the last Linear of a head
            assert ordi[key].shape[0] == 4 * value.shape[0], key
        else:
            assert ordi[key].shape == value.shape, key
    with pytest.raises(InputError, match="head must be regression, ordinal or coral"):
        ModelConfig(head="softmax")


@pytest.mark.parametrize("variant", sorted(MODELS))
def test_coral_head_shares_one_output_across_the_thresholds(variant):
    """model.head=coral: the answer's last Linear keeps the regression shape and four
    thresholds per score are added to its output, so the thresholds' logits differ by
    constants; every other parameter is a regression model's."""
    torch.manual_seed(0)
    regression = build_model(variant, **TINY)
    coral = build_model(variant, **TINY, head="coral")
    reg, cor = regression.state_dict(), coral.state_dict()
    answer = "fusion.classifier." if variant == "xcryonet" else "primary.classifier."
    assert set(cor) - set(reg) == {answer + "thresholds"}
    assert all(cor[k].shape == v.shape for k, v in reg.items())
    thresholds = cor[answer + "thresholds"]
    assert thresholds.shape == (5, 4)
    out = coral(torch.randn(6, 1, 32, 32), reconstruct=())
    logits = out["logits"]
    assert logits.shape == (6, 5, 4)
    steps = logits - logits[..., :1]  # the same for every square: only the thresholds differ
    torch.testing.assert_close(steps, (thresholds - thresholds[:, :1]).expand_as(steps))
    torch.testing.assert_close(out["scores"], torch.sigmoid(logits).sum(-1))
    logits.sum().backward()
    assert coral.get_parameter(answer + "thresholds").grad is not None


def test_input_stats_carry_the_absolute_intensity_level():
    from xcryonet.model import input_stats

    gen = torch.Generator().manual_seed(0)
    x = torch.rand((3, 1, 16, 16), generator=gen)
    stats = input_stats(x).numpy()
    flat = x.flatten(1).numpy()
    np.testing.assert_allclose(stats[:, 0], flat.mean(1), rtol=1e-5)
    np.testing.assert_allclose(stats[:, 1], flat.std(1, ddof=1), rtol=1e-4)
    q05, q25, q50, q90 = np.quantile(flat, [0.05, 0.25, 0.5, 0.9], axis=1)
    np.testing.assert_allclose(stats[:, 2:5], np.stack([q25, q50, q90], 1), 1e-5)
    is_open = flat > (q05 + 0.3 * (q90 - q05))[:, None]
    np.testing.assert_allclose(stats[:, 5], (flat * is_open).sum(1) / is_open.sum(1), 1e-5)
    np.testing.assert_allclose(stats[:, 6], is_open.mean(1), 1e-6)
    # A brighter copy of the same square: GroupNorm features barely move, the statistics do.
    shifted = input_stats(x + 0.5).numpy()
    levels = [0, 2, 3, 4, 5]
    np.testing.assert_allclose(shifted[:, levels] - stats[:, levels], 0.5, atol=1e-5)


def test_sorted_rows_uses_numpy_only_where_no_gradient_flows():
    from xcryonet.model import input_stats, sorted_rows

    gen = torch.Generator().manual_seed(1)
    flat = torch.randn((5, 300), generator=gen)
    flat[0, :10] = 0.25  # ties
    expected = flat.sort(dim=1).values
    # No gradient: numpy's sort, the same values (and a tensor that shares no graph).
    fast = sorted_rows(flat)
    assert torch.equal(fast, expected) and fast.grad_fn is None
    with torch.no_grad():
        assert torch.equal(sorted_rows(flat.clone().requires_grad_()), expected)
    # A gradient to carry (the attention-weighted branch inputs in training): torch's sort.
    leaf = flat.clone().requires_grad_()
    slow = sorted_rows(leaf)
    assert torch.equal(slow.detach(), expected) and slow.grad_fn is not None
    # The statistics' gradient reaches the input through the quantiles.
    x = torch.rand((2, 1, 16, 16), generator=gen).requires_grad_()
    input_stats(x)[:, 2:5].sum().backward()
    assert x.grad is not None and (x.grad != 0).sum() > 0


def test_open_area_statistics_ignore_the_bars():
    from xcryonet.model import input_stats

    # An opening at transmission 0.8 inside dark bars at 0.05: the crop mean depends on how
    # much bar the crop holds, the open-area mean does not.
    for side in (20, 28):
        x = torch.full((1, 1, 32, 32), 0.05)
        a = (32 - side) // 2
        x[..., a : a + side, a : a + side] = 0.8
        stats = input_stats(x)[0].numpy()
        assert abs(stats[5] - 0.8) < 1e-6
        assert abs(stats[6] - side * side / 1024) < 1e-6
        assert stats[0] < 0.8 - 0.05


def test_classifiers_take_the_statistics_only_when_configured():
    with_stats = build_model("xcryonet", **TINY)
    without = build_model("xcryonet", **TINY, input_stats=False)
    first = with_stats.primary.classifier.attributes[0]
    assert first.in_features == without.primary.classifier.attributes[0].in_features + 7
    fused = with_stats.fusion.classifier.attributes[0].in_features
    assert fused == without.fusion.classifier.attributes[0].in_features + 7


def test_hole_share_is_the_opening_that_enclosed_dark_blobs_cover():
    from scipy import ndimage as ndi

    from xcryonet.model import hole_share

    # An opening at 0.8 in bars at 0.05; one dark blob inside the film (a hole: 16 px) and one
    # joined to the bar (not a hole, however large).
    x = torch.full((2, 1, 40, 40), 0.05)
    x[..., 4:36, 4:36] = 0.8
    x[0, 0, 10:14, 10:14] = 0.1
    x[1, 0, 4:20, 20:30] = 0.1
    share = hole_share(x)[:, 0].numpy()
    np.testing.assert_allclose(share, [4 * np.sqrt(16 / 32**2), 0.0], atol=1e-6)
    # Random openings with random specks: the same as scipy's fill of the open mask's holes.
    rng = np.random.default_rng(0)
    img = np.full((12, 1, 48, 48), 0.05, np.float32)
    img[..., 6:42, 6:42] = 0.8
    for k in range(12):
        for _ in range(rng.integers(0, 12)):
            r, c, s = rng.integers(0, 44), rng.integers(0, 44), rng.integers(1, 6)
            img[k, 0, r : r + s, c : c + s] = 0.1
    got = hole_share(torch.from_numpy(img))[:, 0].numpy()
    for k in range(12):
        flat = np.sort(img[k, 0].ravel())
        n = flat.size - 1
        lo, hi = flat[round(0.05 * n)], flat[round(0.9 * n)]
        is_open = img[k, 0] > lo + 0.3 * (hi - lo)
        filled = ndi.binary_fill_holes(is_open)
        want = 4 * np.sqrt((filled & ~is_open).sum() / filled.sum())
        assert abs(got[k] - want) < 1e-5, k
    assert (got > 0).sum() >= 3  # the random specks do make holes
    # A black square (bars and opening within noise of each other): the threshold would cut the
    # noise into holes; below the least contrast the share is 0, above it untouched.
    black = 0.02 + 0.01 * torch.rand((1, 1, 48, 48), generator=torch.Generator().manual_seed(1))
    black[..., 6:42, 6:42] += 0.01
    assert hole_share(black)[0, 0] > 0.2  # spurious holes in the noise
    assert hole_share(black, min_contrast=0.1)[0, 0] == 0
    np.testing.assert_allclose(hole_share(torch.from_numpy(img), min_contrast=0.1)[:, 0], got)


def test_the_traced_flood_fill_finds_the_same_pixels():
    """fill_dark_runs: the row/column sweeps (GPU, and the exported MLflow model) against
    scipy's labelling (the CPU path), and an exported hole_share against the eager one."""
    from xcryonet.model import TRACED_FILL_ROUNDS, fill_dark_runs, hole_share

    gen = torch.Generator().manual_seed(3)
    dark = torch.rand((6, 1, 40, 40), generator=gen) < 0.55  # percolating, winding paths
    seed = torch.zeros_like(dark)
    seed[..., 0, :] = True
    want = fill_dark_runs(seed, dark)
    assert torch.equal(fill_dark_runs(seed, dark, rounds=400), want)
    assert 0 < want.sum() < dark.sum()
    assert not torch.equal(fill_dark_runs(seed, dark, rounds=1), want)  # rounds matter

    class Share(torch.nn.Module):
        def forward(self, x):
            return hole_share(x, 0.1)

    img = torch.full((4, 1, 48, 48), 0.05)
    img[..., 6:42, 6:42] = 0.8
    img[0, 0, 10:14, 10:30] = 0.1  # a hole
    img[1, 0, 6:20, 20:24] = 0.1  # joined to the bar by one straight leg
    img[2, 0, 6:20, 10:12] = 0.1  # and by a path with turns
    img[2, 0, 18:20, 10:30] = 0.1
    img[2, 0, 18:34, 28:30] = 0.1
    img[3] = 0.02  # black
    exported = torch.export.export(Share(), (img,)).module()
    torch.testing.assert_close(exported(img), hole_share(img, 0.1))
    assert TRACED_FILL_ROUNDS >= 2


@pytest.mark.parametrize("head", ["regression", "ordinal", "coral"])
def test_hole_skip_adds_the_share_to_the_answers_contamination_only(head):
    from xcryonet.model import hole_share

    torch.manual_seed(0)
    model = build_model("xcryonet", **TINY, head=head, hole_stat=True, hole_skip=True).eval()
    x = torch.full((2, 1, 32, 32), -1.5)
    x[..., 4:28, 4:28] = 1.0
    x[0, 0, 10:16, 10:16] = -1.5  # a hole in square 0 only
    cls = model.fusion.classifier
    seen: dict[str, torch.Tensor] = {}
    cls.attributes.register_forward_hook(lambda m, i, o: seen.update(out=o.detach()))
    out = model(x, reconstruct=())
    share = hole_share(x, 0.1 / 0.3)[:, 0]
    assert share[0] > 0 and share[1] == 0
    # The gain starts at 1: the answer equals the head's outputs plus the share on every
    # output of contamination (index 3), and nothing else moves.
    raw = seen["out"].view(2, 4, -1)
    bumped = raw.clone()
    bumped[:, 3] += share[:, None]
    want, _ = cls._scores(bumped.flatten(1), 0)
    torch.testing.assert_close(out["scores"][:, :4], want)
    out["scores"][:, 3].sum().backward()
    assert cls.skip_gain is not None and cls.skip_gain.grad is not None
    # Only the answer has the path; without hole_stat the setting is refused.
    assert model.primary.classifier.skip_gain is None
    assert model.branches["contamination"].classifier.skip_gain is None
    with pytest.raises(InputError, match="hole_skip needs hole_stat"):
        ModelConfig(hole_skip=True)


def test_hole_stat_is_one_more_statistic_for_every_classifier():
    plain = build_model("xcryonet", **TINY)
    holes = build_model("xcryonet", **TINY, hole_stat=True)
    for part in ("primary", "fusion", "branches.contamination"):
        a = plain.get_submodule(part).classifier.attributes[0].in_features
        assert holes.get_submodule(part).classifier.attributes[0].in_features == a + 1
    out = holes(torch.randn(3, 1, 32, 32))
    assert out["scores"].shape == (3, 5) and torch.isfinite(out["scores"]).all()
    # Without the statistics the setting changes nothing.
    off = build_model("xcryonet", **TINY, input_stats=False, hole_stat=True)
    bare = build_model("xcryonet", **TINY, input_stats=False)
    fused = off.fusion.classifier.attributes[0].in_features
    assert fused == bare.fusion.classifier.attributes[0].in_features


# Both statistics with their skips, on the coral head.
SKIPS = {
    "head": "coral",
    "hole_stat": True,
    "hole_skip": True,
    "crack_stat": True,
    "crack_skip": True,
}


def _streaked_squares(n: int, seed: int) -> np.ndarray:
    """(n, 1, 48, 48) squares in bars at 0.05: film at a random level, noise, and up to seven
    bright streaks 2 px wide (some across the bars)."""
    rng = np.random.default_rng(seed)
    img = np.full((n, 1, 48, 48), 0.05, np.float32)
    img[..., 6:42, 6:42] = rng.uniform(0.3, 0.8, (n, 1, 1, 1))
    img += rng.normal(0, 0.02, img.shape).astype(np.float32)
    for k in range(n):
        for _ in range(rng.integers(0, 8)):
            r, c, s = rng.integers(0, 46), rng.integers(0, 44), rng.integers(1, 8)
            img[k, 0, r : r + 2, c : c + s] = rng.uniform(0.6, 1.0)
    return img


def test_crack_share_reads_the_squares_own_opening():
    from xcryonet.model import crack_share

    mean, std = 0.5, 0.3

    def norm(t):
        return (t - mean) / std

    # Film at 0.6 in bars at 0.05 (the headroom to full transmission is 0.4, so a pixel above
    # 0.72 is bright). Square 0: a crack at 0.95, 2 x 20 px; square 1: a faint streak at 0.7
    # and, beyond its bar at the crop's edge, a sliver of a broken neighbour (vacuum, 1.0).
    x = torch.full((2, 1, 40, 40), 0.05)
    x[..., 4:36, 4:36] = 0.6
    x[0, 0, 10:12, 8:28] = 0.95
    x[1, 0, 10:12, 8:28] = 0.7
    x[1, 0, :, 38:] = 1.0
    got = crack_share(norm(x), mean, std)[:, 0].numpy()
    np.testing.assert_allclose(got, [4 * np.sqrt(40 / 32**2), 0.0], atol=1e-5)
    assert crack_share(norm(x), mean, std, own=False)[1, 0] > 0  # over the whole crop it counts
    # On thick ice (film at 0.2) a crack at 0.5 lets through more than 0.3 of the headroom.
    thick = torch.full((1, 1, 40, 40), 0.02)
    thick[..., 4:36, 4:36] = 0.2
    thick[0, 0, 10:12, 8:28] = 0.5
    np.testing.assert_allclose(crack_share(norm(thick), mean, std)[0, 0], got[0], atol=1e-5)
    # Random squares (film level, noise, bright streaks): the same as the reference.
    x = norm(torch.from_numpy(_streaked_squares(10, seed=0)))
    got = crack_share(x, mean, std)[:, 0].numpy()
    want = [_crack_profile_numpy(x[k, 0].numpy(), mean, std)[0] for k in range(10)]
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert (got > 0).sum() >= 3
    # A black square (with a few hot pixels) gets 0 below the least contrast.
    black = 0.02 + 0.1 * torch.rand((1, 1, 48, 48), generator=torch.Generator().manual_seed(1))
    black[..., 23:25, 22:26] = 0.6
    assert crack_share(norm(black), mean, std)[0, 0] > 0
    assert crack_share(norm(black), mean, std, min_contrast=0.1 / std)[0, 0] == 0


def test_exported_crack_share_matches_the_eager_one():
    """The traced opening (row/column sweeps) equals scipy's labelling on cracked squares."""
    from xcryonet.model import crack_share

    class Share(torch.nn.Module):
        def forward(self, x):
            return crack_share(x, 0.5, 0.3, 0.1 / 0.3)

    img = torch.full((3, 3, 48, 48), 0.05)
    img[..., 6:42, 6:42] = 0.5
    img[0, :2, 10:12, 6:40] = 0.95  # a crack across the opening
    img[1, :2, 6:30, 20:22] = 0.95
    img[1, :2, 28:30, 20:40] = 0.95
    img[1, :, 20:24, 30:34] = 0.1  # a speck in the film
    img[1, :, :, 45:] = 1.0  # a neighbour's sliver
    img[2] = 0.02  # black
    x = (img - 0.5) / 0.3
    exported = torch.export.export(Share(), (x,)).module()
    torch.testing.assert_close(exported(x), Share()(x))
    assert exported(x)[0, 0] > 0 and exported(x)[2, 0] == 0


def test_crack_stat_comes_before_the_hole_share_and_crack_skip_adds_it_to_cracking():
    from xcryonet.model import crack_share, hole_share

    plain = build_model("xcryonet", **TINY, hole_stat=True)
    both = build_model("xcryonet", **TINY, hole_stat=True, crack_stat=True)
    for part in ("primary", "fusion", "branches.cracking"):
        a = plain.get_submodule(part).classifier.attributes[0].in_features
        assert both.get_submodule(part).classifier.attributes[0].in_features == a + 1
    x = torch.full((2, 1, 32, 32), -1.5)
    x[..., 4:28, 4:28] = 0.5
    x[0, 0, 10:12, 6:26] = 1.6  # a crack in square 0
    x[1, 0, 10:16, 10:16] = -1.5  # a hole in square 1
    stats = both.primary(x)["stats"]
    assert stats.shape == (2, 7 + 1 + 1)
    torch.testing.assert_close(stats[:, 7:8], crack_share(x, 0.5, 0.3, 0.1 / 0.3))
    torch.testing.assert_close(stats[:, 8:], hole_share(x, 0.1 / 0.3))  # last: hole_skip's
    # crack_skip: the answer's cracking outputs (index 2) get the share, contamination (3) the
    # hole share, nothing else moves.
    torch.manual_seed(0)
    model = build_model("xcryonet", **TINY, **SKIPS).eval()
    cls = model.fusion.classifier
    seen: dict[str, torch.Tensor] = {}
    cls.attributes.register_forward_hook(lambda m, i, o: seen.update(out=o.detach()))
    out = model(x, reconstruct=())
    crack, hole = crack_share(x, 0.5, 0.3, 0.1 / 0.3)[:, 0], hole_share(x, 0.1 / 0.3)[:, 0]
    assert crack[0] > 0 and crack[1] == 0 and hole[1] > 0 and hole[0] == 0
    bumped = seen["out"].view(2, 4, -1).clone()
    bumped[:, 2] += crack[:, None]
    bumped[:, 3] += hole[:, None]
    want, _ = cls._scores(bumped.flatten(1), 0)
    torch.testing.assert_close(out["scores"][:, :4], want)
    out["scores"][:, 2].sum().backward()
    assert cls.crack_gain is not None and cls.crack_gain.grad is not None
    assert model.primary.classifier.crack_gain is None
    with pytest.raises(InputError, match="crack_skip needs crack_stat"):
        ModelConfig(crack_skip=True)


def _crack_profile_numpy(img: np.ndarray, mean: float, std: float) -> np.ndarray:
    """crack_share(profile=True) of one (H, W) normalised input, written out with scipy's
    labelling: the reference (its first number is crack_share's)."""
    from scipy import ndimage as ndi

    from xcryonet.model import CRACK_HEADROOM, CRACK_PROFILE_HEADROOMS, CRACK_PROFILE_SOFT

    flat = np.sort(img.ravel())
    n = flat.size - 1
    lo, hi = flat[round(0.05 * n)], flat[round(0.9 * n)]
    labels, _ = ndi.label(img > lo + 0.3 * (hi - lo))
    h, w = img.shape
    window = labels[(7 * h) // 16 : -(-9 * h // 16), (7 * w) // 16 : -(-9 * w // 16)]
    values = np.sort(img[np.isin(labels, window[window > 0])])
    median = values[(values.size - 1) // 2]
    room = (1 - mean) / std - median
    margins = (CRACK_HEADROOM, *CRACK_PROFILE_HEADROOMS)
    hard = [np.mean(values > median + a * room) for a in margins]
    excess = [np.clip(values - median - a * room, 0, None) for a in CRACK_PROFILE_SOFT]
    soft = [np.mean(e) / room for e in excess]
    return 4 * np.sqrt(np.array(hard + soft))


def test_crack_profile_adds_more_margins_and_soft_shares_after_the_share():
    from xcryonet.model import N_CRACK_PROFILE, crack_share, hole_share

    mean, std = 0.5, 0.3
    # Film at 0.6 (headroom 0.4): a crack at 0.95 (0.875 of the headroom), 2 x 20 px in a
    # 32 x 32 opening, and a streak at 0.7 (0.25), 2 x 10 px.
    x = torch.full((1, 1, 40, 40), 0.05)
    x[..., 4:36, 4:36] = 0.6
    x[0, 0, 10:12, 8:28] = 0.95
    x[0, 0, 20:22, 8:18] = 0.7
    got = crack_share((x - mean) / std, mean, std, profile=True)[0].numpy()
    n = 32**2
    hard = [40 / n, 60 / n, 40 / n, 40 / n]  # above 0.3, 0.2, 0.4, 0.5 of the headroom
    soft = [(40 * (0.875 - a) + 20 * max(0.25 - a, 0)) / n for a in (0.05, 0.1, 0.2)]
    np.testing.assert_allclose(got, 4 * np.sqrt(hard + soft), atol=1e-4)
    # Random squares: the same as the reference written out with scipy's labelling.
    xs = (torch.from_numpy(_streaked_squares(8, seed=1)) - mean) / std
    prof = crack_share(xs, mean, std, profile=True).numpy()
    want = [_crack_profile_numpy(xs[k, 0].numpy(), mean, std) for k in range(8)]
    np.testing.assert_allclose(prof, want, atol=1e-4)
    np.testing.assert_allclose(prof[:, :1], crack_share(xs, mean, std).numpy())
    # A flat crop has no opening: every number 0 (not NaN).
    flat = crack_share(torch.zeros((1, 1, 48, 48)), mean, std, profile=True)
    assert torch.equal(flat, torch.zeros_like(flat))

    class Profile(torch.nn.Module):
        def forward(self, x):
            return crack_share(x, mean, std, 0.1 / std, profile=True)

    exported = torch.export.export(Profile(), (xs,)).module()
    torch.testing.assert_close(exported(xs), Profile()(xs))
    # In the model: the profile's columns in place of the one share, hole_share still last,
    # and crack_skip still reads the share (the profile's first column).
    plain = build_model("xcryonet", **TINY, hole_stat=True, crack_stat=True)
    model = build_model("xcryonet", **TINY, **SKIPS, crack_profile=True).eval()
    for part in ("primary", "fusion", "branches.contamination"):
        a = plain.get_submodule(part).classifier.attributes[0].in_features
        assert model.get_submodule(part).classifier.attributes[0].in_features == a + 6
    stats = model.primary(xs[:2])["stats"]
    assert stats.shape == (2, 7 + N_CRACK_PROFILE + 1)
    profile = crack_share(xs[:2], mean, std, 0.1 / std, profile=True)
    torch.testing.assert_close(stats[:, 7:-1], profile)
    torch.testing.assert_close(stats[:, -1:], hole_share(xs[:2], 0.1 / std))
    assert ("crack_gain", 2, 7) in model.fusion.classifier.skips
    with pytest.raises(InputError, match="crack_profile needs crack_stat"):
        ModelConfig(crack_profile=True)


@pytest.mark.parametrize("variant", sorted(MODELS))
def test_stat_head_answers_the_mean_of_the_network_and_a_head_on_the_statistics_alone(variant):
    torch.manual_seed(0)
    cfg = {**TINY, "head": "coral", "hole_stat": True, "crack_stat": True, "crack_profile": True}
    model = build_model(variant, **cfg, stat_head=True).eval()
    x = torch.randn(3, 1, 32, 32)
    out = model(x, reconstruct=())
    own = out["scores_fusion" if variant == "xcryonet" else "scores_primary"]
    torch.testing.assert_close(out["scores"], (own + out["scores_statistics"]) / 2)
    # A mean has no logits of its own; the head's are its own ordinal ones.
    assert "logits" not in out and out["logits_statistics"].shape == (3, 5, 4)
    # The network's own answer is what it is without the head (the same weights).
    plain = build_model(variant, **cfg).eval()
    head = ("statistics.", "stat_mean", "stat_scale")
    weights = {k: v for k, v in model.state_dict().items() if not k.startswith(head)}
    plain.load_state_dict(weights)
    torch.testing.assert_close(plain(x, reconstruct=())["scores"], own)
    # The head reads the 15 statistics, standardised, and nothing else: no gradient reaches
    # the network.
    assert model.statistics.attributes[0].in_features == 15
    with torch.no_grad():
        model.stat_mean.fill_(0.5)
        model.stat_scale.fill_(2.0)
        z = (model.primary.statistics(x) - 0.5) / 2.0
        got = model(x, reconstruct=())["scores_statistics"]
        torch.testing.assert_close(got, model.statistics([], z)[0])
    out = model(x, reconstruct=())
    out["scores_statistics"].sum().backward()
    reached = {n.split(".")[0] for n, p in model.named_parameters() if p.grad is not None}
    assert reached == {"statistics"}
    assert parameter_groups(model)["statistics"] == list(model.statistics.parameters())
    with pytest.raises(InputError, match="stat_head needs input_stats"):
        ModelConfig(stat_head=True, input_stats=False)


def test_pool_input_averages_the_square_and_keeps_the_extremes():
    from xcryonet.model import pool_input

    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4).neg_()
    got = pool_input(x, 2)
    assert got.shape == (2, 3, 2, 2)
    blocks = x.reshape(2, 3, 2, 2, 2, 2).permute(0, 1, 2, 4, 3, 5).reshape(2, 3, 2, 2, 4)
    torch.testing.assert_close(got[:, 0], blocks[:, 0].mean(-1))
    torch.testing.assert_close(got[:, 1], blocks[:, 1].amax(-1))
    torch.testing.assert_close(got[:, 2], blocks[:, 2].amin(-1))
    assert torch.equal(pool_input(x[:, :1], 2), got[:, :1])  # no extremes: the mean alone
    assert pool_input(x, 1) is x


@pytest.mark.parametrize("variant", sorted(MODELS))
def test_stat_px_reads_the_crack_statistics_finer_than_the_network_sees(variant):
    from xcryonet.model import N_CRACK_PROFILE, crack_share, hole_share, pool_input

    mean, std = 0.5, 0.3
    cfg = {**TINY, **SKIPS, "extremes": True, "crack_profile": True, "stat_head": True}
    torch.manual_seed(0)
    model = build_model(variant, **cfg, stat_px=64).eval()
    coarse = build_model(variant, **cfg).eval()  # the same network at 32 px, same weights
    coarse.load_state_dict(model.state_dict())
    fine = np.repeat((torch.from_numpy(_streaked_squares(4, seed=2)) - mean) / std, 3, axis=1)
    x = torch.nn.functional.interpolate(fine, size=64, mode="bilinear", antialias=True)
    seen = pool_input(x, 2)
    out, ref = model(x), coarse(seen)
    # The network and its maps see the squares pooled to 32 px ...
    assert torch.equal(out["input"], seen) and out["attention"].shape == (4, 2, 32, 32)
    assert out["recon_primary"].shape == seen.shape
    torch.testing.assert_close(out["features_primary"], ref["features_primary"])
    # ... and the crack profile is read at 64 px; the other statistics as before.
    stats = model.input_statistics(x)
    torch.testing.assert_close(stats[:, :7], coarse.input_statistics(seen)[:, :7])
    cracks = crack_share(x, mean, std, 0.1 / std, profile=True, max_px=64)
    torch.testing.assert_close(stats[:, 7 : 7 + N_CRACK_PROFILE], cracks)
    torch.testing.assert_close(stats[:, -1:], hole_share(seen, 0.1 / std))
    assert not torch.allclose(cracks, crack_share(seen, mean, std, 0.1 / std, profile=True))
    # Test-time views of the fine input are views of the pooled one: the maps still align.
    maps = attention_maps(model, x, tta=True)
    torch.testing.assert_close(maps, attention_maps(coarse, seen, tta=True), atol=1e-3, rtol=0)
    for bad in (48, 16):
        with pytest.raises(InputError, match="stat_px must be 0 or a multiple of input_px"):
            ModelConfig(**cfg, stat_px=bad)
    with pytest.raises(InputError, match="stat_px needs crack_stat"):
        ModelConfig(stat_px=128)


def test_fit_stat_scale_standardises_what_the_statistics_head_reads():
    torch.manual_seed(0)
    model = build_model("xcryonet", **TINY, stat_head=True)
    x = torch.randn(40, 1, 32, 32) * torch.rand(40, 1, 1, 1) + torch.rand(40, 1, 1, 1)
    fit_stat_scale(model, x, batch=16)  # in three batches
    z = (model.primary.statistics(x) - model.stat_mean) / model.stat_scale
    torch.testing.assert_close(z.mean(0), torch.zeros(7), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std(0), torch.ones(7), atol=1e-4, rtol=0)
    # Identical squares: no statistic varies, so every scale stays 1 (no division by 0).
    fit_stat_scale(model, x[:1].expand(5, -1, -1, -1))
    assert torch.equal(model.stat_scale, torch.ones(7))
    torch.testing.assert_close(model.stat_mean, model.primary.statistics(x[:1])[0])


@pytest.mark.parametrize("overall_grad", [True, False])
def test_overall_loss_reaches_the_attribute_head_only_when_configured(overall_grad):
    torch.manual_seed(0)
    model = build_model("primary", **TINY, overall_grad=overall_grad)
    scores = model(torch.randn(4, 1, 32, 32), reconstruct=())["scores"]
    scores[:, 4].sum().backward()  # a loss on overall alone
    head = model.primary.classifier.attributes[-1].weight.grad
    assert head is not None and (head.abs().sum() > 0) == overall_grad
    assert model.primary.classifier.overall[-1].weight.grad.abs().sum() > 0


def test_overall_head_sees_the_pooled_features_when_configured():
    plain = build_model("xcryonet", **TINY, overall_features=False)
    wide = build_model("xcryonet", **TINY, overall_features=True)
    for m in (plain, wide):
        with torch.no_grad():
            assert m(torch.randn(2, 1, 32, 32), reconstruct=())["scores"].shape == (2, 5)
    n_pooled = plain.primary.classifier.attributes[0].in_features
    assert wide.primary.classifier.overall[0].in_features == 4 + n_pooled
    assert plain.primary.classifier.overall[0].in_features == 4
    n_fused = wide.fusion.classifier.attributes[0].in_features
    assert wide.fusion.classifier.overall[0].in_features == 4 + n_fused


@pytest.mark.parametrize("fusion_mix", [True, False])
def test_fusion_pools_every_branch_without_the_mixing_convolution(fusion_mix):
    torch.manual_seed(3)
    model = build_model("xcryonet", **TINY, fusion_mix=fusion_mix)
    c = model.primary.features.out_channels
    n_stats = 7  # input_stats
    n_in = model.fusion.classifier.attributes[0].in_features
    assert n_in == 2 * c * (1 if fusion_mix else 3) + n_stats
    assert any(isinstance(m, torch.nn.Conv2d) for m in model.fusion.modules()) == fusion_mix
    x = torch.randn(2, 1, 32, 32)
    out = model(x, reconstruct=())
    out["scores"].sum().backward()
    # Without the mix, the fusion scores still depend on every branch's features.
    for name in ("primary", "cracking", "contamination"):
        branch = model.primary if name == "primary" else model.branches[name]
        grad = branch.features.block2.conv2.weight.grad
        assert grad is not None and grad.abs().sum() > 0, name
