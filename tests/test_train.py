"""Training: phases as data, masked supervised losses, data selection, kill-and-resume."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from xcryonet.errors import InputError
from xcryonet.labels import SCORE_NAMES
from xcryonet.model import MODELS, ModelConfig, build_model, dihedral_views, parameter_groups
from xcryonet.train import (
    CHECKPOINT,
    LOSSES,
    PhaseConfig,
    SquareSet,
    TrainConfig,
    augment,
    epoch_lr,
    evaluate,
    evaluate_dir,
    key_rows,
    load_model,
    make_optimizers,
    masked_mse,
    masked_ordinal,
    model_input,
    normalize,
    phase_batches,
    phase_loss,
    phase_size,
    phases_for,
    predict,
    predict_tensor,
    read_table,
    resample,
    run_phase,
    split_rows,
    square_keys,
    train,
)

TINY_MODEL = ModelConfig(width=4, hidden=8, input_px=16)
TINY_TRAIN = TrainConfig(epochs=2, batch_size=6, seed=3, test_fraction=0.25, progress=False)
SQUARES_COLUMNS = (
    "grid_id,square_id,row_px,col_px,x_um,y_um,size_um,size_px,pitch_um,ncc,complete,"
    "brightness,squareness"
)


def write_dataset(root, n_per_grid=(14, 12), sides=(20, 28), labelled_every=2, blank_cell=True):
    """A tiny extraction output (squares/<grid>/{squares.csv, crops.npz}) and labels.csv.
    ``blank_cell``: square 4 of each grid has no cracking label (partly labelled)."""
    rng = np.random.default_rng(0)
    squares = root / "squares"
    label_rows = ["grid_id,x_um,y_um,cracking,contamination,overall"]
    for g, (n, side) in enumerate(zip(n_per_grid, sides, strict=True)):
        grid = f"g{g}"
        (squares / grid).mkdir(parents=True)
        rows = [SQUARES_COLUMNS]
        for i in range(n):
            x_um, y_um = 100.0 * i, 50.0 * g
            rows.append(
                f"{grid},{i},0,0,{x_um},{y_um},60,{side},100.0,0.9,True,{i % 5},{(i + g) % 5}"
            )
            if i % labelled_every == 0:
                crack = "" if i == 4 and blank_cell else str(i % 5)
                label_rows.append(f"{grid},{x_um},{y_um},{crack},{(i * 3) % 5},{(i * 2) % 5}")
        (squares / grid / "squares.csv").write_text("\n".join(rows) + "\n")
        crops = rng.random((n, side, side)).astype(np.float16)
        np.savez(squares / grid / "crops.npz", crops=crops, masks=crops > 0.5)
    labels = root / "labels.csv"
    labels.write_text("\n".join(label_rows) + "\n")
    return squares, labels


@pytest.fixture
def dataset(tmp_path):
    return write_dataset(tmp_path)


def batch(n=6, px=16, labelled=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((n, 1, px, px), generator=gen)
    y = torch.randint(0, 5, (n, 5), generator=gen).float()
    y[labelled:] = float("nan")
    return x, y


# ----------------------------------------------------------------------------- batches


@pytest.mark.parametrize(("n_lab", "n_unl"), [(100, 1500), (900, 1500), (40, 40), (5, 3), (7, 0)])
def test_mixed_batches_cover_every_row_with_a_fixed_labelled_share(n_lab, n_unl):
    labelled, unlabelled = np.arange(n_lab), np.arange(n_lab, n_lab + n_unl)
    gen = torch.Generator().manual_seed(0)
    batches = phase_batches(labelled, unlabelled, 32, 0.25, gen)
    rows = torch.cat(batches).numpy()
    assert set(rows) == set(range(n_lab + n_unl))  # every row at least once per pass
    lab_per_batch = {int((b < n_lab).sum()) for b in batches}
    if n_unl and n_lab + n_unl > 32:
        assert len(lab_per_batch) == 1  # the same labelled share in every batch
        share = lab_per_batch.pop()
        assert share >= 8 and share >= 32 * n_lab / (n_lab + n_unl)
        assert all(len(b) == 32 for b in batches)
    else:
        assert len(rows) == n_lab + n_unl  # plain shuffle: each row exactly once
    cfg = TrainConfig(batch_size=32, labelled_fraction=0.25)
    mixed = phases_for("xcryonet")[0]
    assert phase_size(mixed, n_lab, n_lab + n_unl, cfg) == len(rows)
    again = phase_batches(labelled, unlabelled, 32, 0.25, torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(batches, again, strict=True))


def test_default_fraction_keeps_the_labels_at_their_natural_share():
    """100 labels among 1500 unlabelled: 2 per batch of 32, each label about once per epoch."""
    fraction = TrainConfig().labelled_fraction
    labelled, unlabelled = np.arange(100), np.arange(100, 1600)
    batches = phase_batches(labelled, unlabelled, 32, fraction, torch.Generator().manual_seed(0))
    assert {int((b < 100).sum()) for b in batches} == {2}
    counts = np.bincount(torch.cat(batches).numpy(), minlength=1600)
    assert counts[:100].max() == 1 and (counts[100:] == 1).all()
    # From 500 labels among 1500 their natural share (8 of 32) is above the default anyway.
    many = phase_batches(np.arange(500), np.arange(500, 2000), 32, fraction, torch.Generator())
    assert {int((b < 500).sum()) for b in many} == {8}


def test_plain_shuffle_when_the_fraction_is_zero():
    gen = torch.Generator().manual_seed(1)
    rows = torch.cat(phase_batches(np.arange(10), np.arange(10, 100), 32, 0.0, gen)).numpy()
    assert sorted(rows) == list(range(100))
    # With 10 labelled among 100, plain shuffling leaves batches with very few labels.
    assert phase_size(phases_for("xcryonet")[0], 10, 100, TrainConfig(labelled_fraction=0)) == 100


def test_cosine_schedule_decays_to_five_percent_and_constant_stays():
    cfg = TrainConfig(epochs=10, lr=1e-3)
    lrs = [epoch_lr(cfg, e) for e in range(10)]
    assert lrs[0] == pytest.approx(1e-3)
    assert all(a > b for a, b in zip(lrs, lrs[1:], strict=False))
    assert lrs[-1] > 5e-5 and epoch_lr(cfg, 10) == pytest.approx(5e-5)
    assert epoch_lr(TrainConfig(lr_schedule="constant"), 7) == TrainConfig().lr
    with pytest.raises(InputError, match="lr_schedule"):
        epoch_lr(TrainConfig(lr_schedule="step"), 0)


def test_rounded_evaluation_scores_whole_predictions():
    torch.manual_seed(0)
    model = build_model("primary", TINY_MODEL)
    x, y = batch(n=8, px=16, labelled=8)
    data = SquareSet(x, y, [str(i) for i in range(8)])
    raw, rounded = evaluate(model, data), evaluate(model, data, round_scores=True)
    pred = predict_tensor(model, x)
    for k, name in enumerate(SCORE_NAMES):
        assert raw[name] == pytest.approx(float((pred[:, k] - y[:, k]).abs().mean()), abs=1e-6)
        assert rounded[name] == pytest.approx(
            float((pred[:, k].round() - y[:, k]).abs().mean()), abs=1e-6
        )


def test_fusion_passes_repeat_the_fusion_phase_only():
    phases = phases_for("xcryonet", fusion_passes=3)
    assert [p.epochs for p in phases] == [1, 1, 3]
    with pytest.raises(InputError):
        phases_for("xcryonet", fusion_passes=0)


# ----------------------------------------------------------------------------- phases


@pytest.mark.parametrize("stat_head", [False, True])
@pytest.mark.parametrize("variant", sorted(MODELS))
def test_each_phase_updates_exactly_its_parameters(variant, stat_head):
    x, y = batch(labelled=6)
    model_cfg = ModelConfig(**{**TINY_MODEL.__dict__, "stat_head": stat_head})
    for k, phase in enumerate(phases_for(variant, statistics=stat_head)):
        torch.manual_seed(k)
        model = build_model(variant, model_cfg)
        groups = parameter_groups(model)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt = make_optimizers(model, [phase])[phase.name]
        data = SquareSet(x.half(), y, [str(i) for i in range(len(x))])
        cfg = TrainConfig(batch_size=len(x), progress=False)
        run_phase(
            model, phase, opt, data, cfg, torch.Generator().manual_seed(0), torch.device("cpu")
        )
        trainable = {id(p) for g in phase.trainable for p in groups[g]}
        for name, p in model.named_parameters():
            changed = not torch.equal(p.detach(), before[name])
            assert changed == (id(p) in trainable), f"{phase.name}: {name} changed={changed}"


def test_fusion_phase_ignores_unlabelled_squares():
    """A supervised-only phase never steps on unlabelled squares (Adam momentum would move it)."""
    fusion = phases_for("xcryonet")[-1]
    model = build_model("xcryonet", TINY_MODEL)
    opt = make_optimizers(model, [fusion])[fusion.name]
    cfg = TrainConfig(batch_size=4, progress=False)
    cpu, gen = torch.device("cpu"), torch.Generator().manual_seed(0)
    x, y = batch(n=12, labelled=4)
    labelled = SquareSet(x.half(), y, [str(i) for i in range(len(x))])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    run_phase(model, fusion, opt, labelled, cfg, gen, cpu)  # builds Adam momentum
    assert not all(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    unlabelled = SquareSet(x.half(), torch.full_like(y, float("nan")), labelled.keys)
    run_phase(model, fusion, opt, unlabelled, cfg, gen, cpu)
    assert all(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())


def test_phases_are_the_papers():
    names = [p.name for p in phases_for("xcryonet")]
    assert names == ["primary_attribute", "attribute_autoencoder", "fusion"]
    p1, p2, p3 = phases_for("xcryonet")
    assert "primary.decoder" in p1.trainable and "cracking.decoder" not in p1.trainable
    assert set(p2.trainable) == {
        "cracking.features",
        "cracking.decoder",
        "contamination.features",
        "contamination.decoder",
    }
    assert p2.losses == ("attribute_reconstruction",)
    assert p3.trainable == ("fusion",) and p3.losses == ("fusion_supervised",)
    # model.stat_head: the statistics head trains beside the answer, on its own loss.
    *_, p3 = phases_for("xcryonet", statistics=True)
    assert p3.trainable == ("fusion", "statistics")
    assert p3.losses == ("fusion_supervised", "statistics_supervised")
    (p,) = phases_for("primary", statistics=True)
    assert "statistics" in p.trainable and p.losses[-1] == "statistics_supervised"
    assert [p.name for p in phases_for("primary")] == ["primary"]
    assert all(name in LOSSES for p in phases_for("xcryonet") for name in p.losses)
    with pytest.raises(InputError, match="unknown model"):
        phases_for("nope")


# ----------------------------------------------------------------------------- losses


def test_masked_mse_ignores_nan():
    pred = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    target = torch.tensor([[2.0, float("nan")], [float("nan"), float("nan")]])
    assert float(masked_mse(pred, target)) == 1.0
    assert float(masked_mse(pred, torch.full_like(pred, float("nan")))) == 0.0


def test_masked_ordinal_is_threshold_cross_entropy_and_ignores_nan():
    logits = torch.tensor([[[2.0, 0.0, -1.0, -3.0]], [[5.0, 5.0, 5.0, 5.0]]])
    target = torch.tensor([[2.0], [float("nan")]])
    above = torch.tensor([1.0, 1.0, 0.0, 0.0])
    expected = torch.nn.functional.binary_cross_entropy_with_logits(
        logits[0, 0], above, reduction="sum"
    )
    torch.testing.assert_close(masked_ordinal(logits, target), expected)
    assert float(masked_ordinal(logits, torch.full_like(target, float("nan")))) == 0.0
    # Confident and right costs less than confident and wrong.
    right = masked_ordinal(torch.tensor([[9.0, 9.0, -9.0, -9.0]]), torch.tensor([2.0]))
    wrong = masked_ordinal(torch.tensor([[9.0, 9.0, 9.0, -9.0]]), torch.tensor([2.0]))
    assert float(right) < 0.01 < float(wrong)


SUPERVISED = ("primary_supervised", "attribute_supervised", "fusion_supervised")


@pytest.mark.parametrize("head", ["regression", "ordinal", "coral"])
@pytest.mark.parametrize("loss_name", SUPERVISED)
def test_unlabelled_squares_contribute_no_supervised_loss(loss_name, head):
    torch.manual_seed(0)
    model = build_model("xcryonet", replace(TINY_MODEL, head=head))
    x, y = batch(n=6, labelled=3)
    x.requires_grad_(True)
    phase = PhaseConfig("probe", (), (loss_name,))
    loss, _ = phase_loss(model, phase, x, y)
    (grad,) = torch.autograd.grad(loss, x)
    assert grad[:3].abs().sum() > 0
    assert torch.count_nonzero(grad[3:]) == 0
    # And the loss is the same without the unlabelled rows at all.
    alone, _ = phase_loss(model, phase, x[:3], y[:3])
    torch.testing.assert_close(loss, alone)


def test_reconstruction_uses_unlabelled_squares():
    torch.manual_seed(0)
    model = build_model("primary", TINY_MODEL)
    x, y = batch(n=4, labelled=0)
    x.requires_grad_(True)
    phase = phases_for("primary")[0]
    loss, parts = phase_loss(model, phase, x, y)
    assert parts["primary_supervised"] == 0.0 and parts["primary_reconstruction"] > 0
    (grad,) = torch.autograd.grad(loss, x)
    assert torch.count_nonzero(grad) > 0


# ----------------------------------------------------------------------------- data


def test_split_rows_is_seeded_and_disjoint(dataset):
    squares, labels = dataset
    table = read_table(squares, labels)
    n_lab = int(table["labelled"].sum())
    a = split_rows(table, supervision="ss", labeled=5, unlabeled=4, test_fraction=0.25, seed=1)
    b = split_rows(table, supervision="ss", labeled=5, unlabeled=4, test_fraction=0.25, seed=1)
    c = split_rows(table, supervision="ss", labeled=5, unlabeled=4, test_fraction=0.25, seed=2)
    assert all(np.array_equal(u, v) for u, v in zip(a, b, strict=True))
    assert not all(np.array_equal(u, v) for u, v in zip(a, c, strict=True))
    lab, unl, test = a
    assert (len(lab), len(unl), len(test)) == (5, 4, round(0.25 * n_lab))
    assert table["labelled"].iloc[lab].all() and table["labelled"].iloc[test].all()
    assert not table["labelled"].iloc[unl].any()
    assert not set(lab) & set(test)
    _, unl_fs, _ = split_rows(
        table, supervision="fs", labeled=None, unlabeled=4, test_fraction=0.25, seed=1
    )
    assert len(unl_fs) == 0


def test_key_rows_finds_a_runs_squares_in_their_order(dataset):
    squares, labels = dataset
    table = read_table(squares, labels)
    rows = np.array([5, 0, 3], np.int64)
    keys = [square_keys(table)[i] for i in rows]
    assert np.array_equal(key_rows(table, keys, "run"), rows)
    with pytest.raises(InputError, match=r"run: square gridX/1 is not in the squares"):
        key_rows(table, [*keys, "gridX/1"], "run")


def test_augment_is_a_dihedral_transform():
    x = torch.arange(2 * 16 * 16, dtype=torch.float32).reshape(2, 1, 16, 16)
    out = augment(x, torch.Generator().manual_seed(0))
    for i in range(2):
        candidates = [torch.rot90(x[i], k, (-2, -1)) for k in range(4)]
        candidates += [torch.rot90(x[i].flip(-1), k, (-2, -1)) for k in range(4)]
        assert any(torch.equal(out[i], c) for c in candidates)


def test_tta_is_the_mean_over_the_8_views_and_follows_the_config():
    torch.manual_seed(0)
    model = build_model("xcryonet", TINY_MODEL).eval()
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        views = torch.stack([model(v, reconstruct=())["scores"] for v in dihedral_views(x)])
    tta = predict_tensor(model, x, batch_size=2, tta=True)
    assert torch.allclose(tta, views.mean(0).clamp(0, 4), atol=1e-5)
    # The mean over the views is the same for any view of the square; one view's is not.
    turned = torch.rot90(x.flip(-1), 1, dims=(-2, -1))
    assert torch.allclose(predict_tensor(model, turned, tta=True), tta, atol=1e-5)
    plain = predict_tensor(model, x, tta=False)
    assert (plain - tta).abs().max() > 1e-4
    assert (predict_tensor(model, turned, tta=False) - plain).abs().max() > 1e-4
    # tta=None follows the model's config.
    assert torch.allclose(predict_tensor(model, x), tta, atol=1e-6)
    model.cfg = ModelConfig(**{**TINY_MODEL.__dict__, "tta": False})
    assert torch.allclose(predict_tensor(model, x), plain, atol=1e-6)


@pytest.mark.parametrize(("tta", "extremes"), [(True, False), (False, False), (True, True)])
def test_score_and_explain_gives_predicts_scores_and_the_maps(tta, extremes):
    from xcryonet.explain import score_and_explain, square_attention
    from xcryonet.model import attention_maps

    torch.manual_seed(0)
    cfg = ModelConfig(**{**TINY_MODEL.__dict__, "tta": tta, "extremes": extremes})
    model = build_model("xcryonet", cfg)
    rng = np.random.default_rng(0)
    crops = [rng.random((s, s)).astype(np.float32) for s in (20, 16, 24)]
    scores, inputs, maps = score_and_explain(model, crops, batch_size=8)
    np.testing.assert_allclose(scores, predict(model, crops), atol=1e-5)
    assert inputs.shape == (3, 16, 16) and maps.shape == (3, 2, 16, 16)
    x = torch.cat([model_input(c[None], cfg) for c in crops])
    np.testing.assert_array_equal(x[:, 0].numpy(), normalize(torch.from_numpy(inputs), cfg))
    np.testing.assert_allclose(maps, attention_maps(model, x).numpy(), atol=1e-5)
    np.testing.assert_array_equal(square_attention(model, crops, batch_size=8)[1], maps)
    assert model.training  # the mode is restored
    empty = score_and_explain(model, [])
    assert [a.shape for a in empty] == [(0, 5), (0, 16, 16), (0, 2, 16, 16)]


def test_local_extremes_keep_a_one_pixel_crack_that_averaging_dilutes():
    """A bright line one native pixel wide on grey film, resampled 96 -> 32 px: the averaged
    channel keeps a third of its contrast or less, the max channel all of it, and the min
    channel is the film; dark specks likewise keep their depth in the min channel."""
    crop = np.full((1, 96, 96), 0.5, np.float32)
    crop[0, 40, :] = 1.0  # the crack
    crop[0, 70, 70] = 0.0  # a one-pixel speck
    x = resample(crop, 32, extremes=True)
    assert x.shape == (1, 3, 32, 32)
    np.testing.assert_array_equal(resample(crop, 32)[0, 0], x[0, 0])
    mean, hi, lo = x[0, 0], x[0, 1], x[0, 2]
    assert float(mean.max()) - 0.5 <= 0.5 / 3 + 1e-3
    assert float(hi.max()) == 1.0 and int((hi == 1.0).all(dim=1).sum()) == 1  # one full row
    assert float(lo.min()) == 0.0 and int((lo == 0.0).sum()) == 1
    assert float(mean.min()) > 0.4
    # Crops already at the model's size pass through: every channel is the crop itself.
    same = resample(crop[:, :32, :32], 32, extremes=True)
    for k in range(3):
        np.testing.assert_array_equal(same[0, k], crop[0, :32, :32])


def test_attention_picture_shows_the_models_pixels_and_heats_where_the_map_is_high():
    """render_attention: three panels of P x P pixels, each magnified to scale x scale blocks
    (nearest neighbour: the pixels the model saw). Where the map is high the 'hot' colours
    cover the square (white at the top, red-orange half way); where it is 0 the grey square
    shows through."""
    from xcryonet.explain import render_attention

    p, scale = 16, 4
    square = np.full((p, p), 0.6, np.float32)
    maps = np.zeros((2, p, p), np.float32)
    maps[0, :4, :4] = 1.0  # cracking attention: top-left corner ...
    maps[0, 8:10, :] = 0.5  # ... and a half-height band
    maps[1, -4:, -4:] = 1.0  # contamination attention: bottom-right corner
    img = render_attention(square, maps, [1, 2, 3, 4, 0], title="g #1", scale=scale)
    header = 18
    rgb = np.asarray(img)[header : header + p * scale]
    assert rgb.shape[:2] == (p * scale, 3 * (p + 4) * scale)
    panel = (p + 4) * scale  # each panel is padded by 4 model pixels

    def pixel(k, row, col):  # model pixel (row, col) of panel k, as int RGB
        return rgb[row * scale, k * panel + col * scale].astype(int)

    crack = rgb[:, panel : panel + p * scale]
    blocks = crack.reshape(p, scale, p, scale, 3)
    assert (blocks == blocks[:, :1, :, :1]).all()  # one flat block per model pixel
    grey, top, band = pixel(1, 12, 12), pixel(1, 2, 2), pixel(1, 9, 8)
    assert abs(grey[0] - grey[2]) < 5 and grey[0] < 120, grey  # the square, darkened a little
    assert top.min() > 200, top  # white-hot
    assert band[0] > 200 and band[0] > band[1] + 40 and band[1] > band[2] + 40, band  # orange
    assert pixel(2, 13, 13).min() > 200 and abs(pixel(2, 2, 2)[0] - pixel(2, 2, 2)[2]) < 5
    assert (pixel(0, 2, 2) == pixel(0, 13, 13)).all()  # the plain square has no overlay


# ----------------------------------------------------------------------------- train / resume


def test_view_mean_batches_is_the_same_at_any_batch_size_and_restores_the_mode():
    from xcryonet.train import view_mean_batches

    torch.manual_seed(0)
    model = build_model("xcryonet", TINY_MODEL)  # tta on
    x = torch.randn(5, 1, 16, 16)
    whole_s, whole_m = view_mean_batches(model, x, batch_size=64, maps=True)  # one forward
    one_s, one_m = view_mean_batches(model, x, batch_size=8, maps=True)  # a square a forward
    assert whole_m is not None and one_m is not None
    torch.testing.assert_close(one_s, whole_s, atol=1e-5, rtol=0)
    torch.testing.assert_close(one_m, whole_m, atol=1e-5, rtol=0)
    # prepare is applied to every batch; no maps asked, none given.
    shifted, none = view_mean_batches(model, x - 1, batch_size=16, prepare=lambda b: b + 1)
    assert none is None
    torch.testing.assert_close(shifted, whole_s, atol=1e-5, rtol=0)
    assert model.training

    def boom(batch: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("bad batch")

    with pytest.raises(RuntimeError, match="bad batch"):
        view_mean_batches(model, x, prepare=boom)
    assert model.training  # restored on the error too
    model.eval()
    view_mean_batches(model, x)
    assert not model.training  # and eval stays eval


def _state(out_dir):
    rec = torch.load(out_dir / "model.pt", weights_only=True)
    return rec["model"], json.loads((out_dir / "metrics.json").read_text())


def _assert_same_run(a, b):
    (sa, ma), (sb, mb) = _state(a), _state(b)
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert ma["test_mae"] == mb["test_mae"] and ma["final_losses"] == mb["final_losses"]


def test_kill_and_resume_gives_identical_results(dataset, tmp_path, monkeypatch):
    squares, labels = dataset
    # With the statistics head, whose standardisation a resume loads instead of fitting.
    model_cfg = ModelConfig(**{**TINY_MODEL.__dict__, "stat_head": True})
    kw = {"model_cfg": model_cfg, "variant": "xcryonet", "labeled": 6, "unlabeled": 6}
    straight = train(squares, labels, tmp_path / "straight", TINY_TRAIN, **kw)
    assert set(straight["test_mae"]) == {
        "brightness",
        "squareness",
        "cracking",
        "contamination",
        "overall",
    }
    assert straight["labeled"] == 6 and straight["unlabeled"] == 6

    # Stop after one epoch, then resume to two.
    short = TrainConfig(**{**TINY_TRAIN.__dict__, "epochs": 1})
    train(squares, labels, tmp_path / "resumed", short, **kw)
    assert torch.load(tmp_path / "resumed" / CHECKPOINT, weights_only=True)["epoch"] == 1
    train(squares, labels, tmp_path / "resumed", TINY_TRAIN, **kw)
    _assert_same_run(tmp_path / "straight", tmp_path / "resumed")

    # Kill in the middle of epoch 2 (before its second phase), then resume.
    import xcryonet.train as tr

    real, calls = tr.run_phase, {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(tr, "run_phase", dying)
    with pytest.raises(KeyboardInterrupt):
        train(squares, labels, tmp_path / "killed", TINY_TRAIN, **kw)
    assert not (tmp_path / "killed" / "model.pt").exists()
    monkeypatch.setattr(tr, "run_phase", real)
    train(squares, labels, tmp_path / "killed", TINY_TRAIN, **kw)
    _assert_same_run(tmp_path / "straight", tmp_path / "killed")


@pytest.mark.parametrize(
    ("extremes", "head", "hole_stat"),
    [
        (False, "regression", False),
        (True, "regression", False),
        (False, "ordinal", False),
        (False, "coral", True),
        (True, "coral", True),
    ],
)
def test_trained_model_loads_predicts_and_evaluates(dataset, tmp_path, extremes, head, hole_stat):
    squares, labels = dataset
    cfg = TrainConfig(**{**TINY_TRAIN.__dict__, "epochs": 1})
    # The statistics: hole_stat with its skip; with the extremes too, crack_stat with its skip
    # and profile, read at twice the network's side (stat_px).
    stats = hole_stat and extremes
    holes = {
        "hole_stat": hole_stat,
        "hole_skip": hole_stat,
        "crack_stat": stats,
        "crack_skip": stats,
        "crack_profile": stats,
        "stat_head": stats,
        "stat_px": 2 * TINY_MODEL.input_px if stats else 0,
    }
    model_cfg = ModelConfig(**{**TINY_MODEL.__dict__, "extremes": extremes, "head": head, **holes})
    metrics = train(
        squares,
        labels,
        tmp_path / "m",
        cfg,
        model_cfg=model_cfg,
        variant="primary",
        supervision="fs",
    )
    assert metrics["unlabeled"] == 0
    model, mcfg = load_model(tmp_path / "m")
    assert mcfg == model_cfg and model.variant == "primary"
    assert model.primary.features.stem[0].in_channels == (3 if extremes else 1)
    if stats:  # the statistics head's standardisation was fitted and saved
        assert not torch.equal(model.stat_scale, torch.ones_like(model.stat_scale))
    crops = [np.random.default_rng(0).random((s, s)) for s in (10, 20, 33)]
    scores = predict(model, crops)
    assert scores.shape == (3, 5) and (scores >= 0).all() and (scores <= 4).all()
    # The overlays show what the network saw: the squares at its side, whatever stat_px.
    from xcryonet.explain import score_and_explain

    shown, inputs, maps = score_and_explain(model, crops)
    px = TINY_MODEL.input_px
    assert inputs.shape == (3, px, px) and maps.shape == (3, 2, px, px)
    np.testing.assert_allclose(shown, scores, atol=1e-5)
    mae = evaluate_dir(tmp_path / "m", squares, labels)
    assert set(mae) == {"brightness", "squareness", "cracking", "contamination", "overall"}
    assert all(v is not None and v >= 0 for v in mae.values())


def test_model_saved_before_finer_branches_loads_as_it_was_built(tmp_path):
    """A model.pt whose config has no branch_stem_stride (written before the setting existed)
    was built with the primary's stride in every branch; it must load that way and predict as
    it did, not take today's default."""
    from dataclasses import asdict, replace

    from xcryonet.train import MODEL_FILE

    torch.manual_seed(0)
    old_cfg = replace(TINY_MODEL, branch_stem_stride=0)
    model = build_model("xcryonet", old_cfg).eval()
    record = {k: v for k, v in asdict(old_cfg).items() if k != "branch_stem_stride"}
    (tmp_path / "m").mkdir()
    torch.save(
        {"variant": "xcryonet", "model_cfg": record, "run": {}, "model": model.state_dict()},
        tmp_path / "m" / MODEL_FILE,
    )
    assert ModelConfig().branch_stem_stride != 0  # today's default differs
    loaded, cfg = load_model(tmp_path / "m")
    assert cfg.branch_stem_stride == 0
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)["scores"], model(x)["scores"])


# ----------------------------------------------------------------------------- bad input


def test_bad_input_gets_one_line_errors(dataset, tmp_path):
    squares, labels = dataset
    kw = {"model_cfg": TINY_MODEL}
    cfg = TrainConfig(**{**TINY_TRAIN.__dict__, "epochs": 1})
    cases = [
        (lambda: train(tmp_path / "nope", labels, tmp_path / "o", cfg, **kw), "does not exist"),
        (lambda: train(squares, tmp_path / "no.csv", tmp_path / "o", cfg, **kw), "does not exist"),
        (lambda: train(squares, labels, tmp_path / "o", cfg, variant="vit", **kw), "unknown model"),
        (lambda: train(squares, labels, tmp_path / "o", cfg, supervision="x", **kw), "ss or fs"),
        (lambda: train(squares, labels, tmp_path / "o", cfg, labeled=999, **kw), "--labeled 999"),
        (lambda: train(squares, labels, tmp_path / "o", cfg, unlabeled=999, **kw), "--unlabeled"),
        (lambda: evaluate_dir(tmp_path / "nomodel", squares, labels), "does not exist"),
    ]
    for fn, match in cases:
        with pytest.raises(InputError, match=match) as err:
            fn()
        assert "\n" not in str(err.value)

    far = tmp_path / "far.csv"
    far.write_text("grid_id,x_um,y_um,cracking,contamination,overall\ng0,9999,9999,1,1,1\n")
    with pytest.raises(InputError, match="no label matches"):
        train(squares, far, tmp_path / "o", cfg, **kw)
    other = tmp_path / "other.csv"
    other.write_text("grid_id,x_um,y_um,cracking,contamination,overall\nzz,0,0,1,1,1\n")
    with pytest.raises(InputError, match="unknown grid"):
        train(squares, other, tmp_path / "o", cfg, **kw)

    (squares / "g1" / "crops.npz").unlink()
    with pytest.raises(InputError, match="cannot read the crops"):
        train(squares, labels, tmp_path / "o", cfg, **kw)


def test_a_diverging_run_stops_at_once_and_writes_nothing(dataset, tmp_path):
    """A learning rate of 1e10 blows every loss up in the first epoch: one line naming the run
    and the epoch, and no checkpoint, model or metrics that would pass for a trained run."""
    squares, labels = dataset
    cfg = TrainConfig(**{**TINY_TRAIN.__dict__, "epochs": 3, "lr": 1e10})
    with pytest.raises(InputError, match="diverged at epoch 1, non-finite loss") as err:
        train(squares, labels, tmp_path / "o", cfg, model_cfg=TINY_MODEL, variant="xcryonet")
    assert "\n" not in str(err.value) and "fusion/fusion_supervised" in str(err.value)
    assert not [p.name for p in (tmp_path / "o").glob("*") if not p.name.startswith(".")]


def test_resume_refuses_other_settings_and_bad_checkpoints(dataset, tmp_path):
    squares, labels = dataset
    cfg = TrainConfig(**{**TINY_TRAIN.__dict__, "epochs": 1})
    train(squares, labels, tmp_path / "o", cfg, model_cfg=TINY_MODEL, variant="primary")
    with pytest.raises(InputError, match="other settings"):
        train(
            squares, labels, tmp_path / "o", cfg, model_cfg=TINY_MODEL, variant="primary", labeled=3
        )
    # model.tta only changes prediction: the run resumes, and its metrics say how they were taken.
    plain = ModelConfig(**{**TINY_MODEL.__dict__, "tta": False})
    longer = TrainConfig(**{**cfg.__dict__, "epochs": 2})
    metrics = train(squares, labels, tmp_path / "o", longer, model_cfg=plain, variant="primary")
    assert metrics["tta"] is False and len(metrics["curve"]) == 2
    (tmp_path / "o" / CHECKPOINT).write_bytes(b"garbage")
    with pytest.raises(InputError, match="not a readable"):
        train(squares, labels, tmp_path / "o", cfg, model_cfg=TINY_MODEL, variant="primary")
    (tmp_path / "o" / "model.pt").write_bytes(b"garbage")
    with pytest.raises(InputError, match="not a readable"):
        load_model(tmp_path / "o")


def test_load_crops_selects_rows_and_names_the_file_on_errors(tmp_path):
    from xcryonet.stages import load_crops

    grid = tmp_path / "g0"
    grid.mkdir()
    crops = np.arange(3 * 4 * 4, dtype=np.float32).reshape(3, 4, 4)
    masks = crops > 20
    np.savez(grid / "crops.npz", crops=crops, masks=masks)
    c, m = load_crops(tmp_path, "g0", np.array([2, 0]))
    np.testing.assert_array_equal(c, crops[[2, 0]])
    np.testing.assert_array_equal(m, masks[[2, 0]])
    assert load_crops(tmp_path, "g0")[0].shape == (3, 4, 4)
    with pytest.raises(InputError, match=r"crops.npz.*holds 3 crops") as err:
        load_crops(tmp_path, "g0", np.array([3]))
    assert "\n" not in str(err.value)
    (grid / "crops.npz").write_bytes(b"not a zip")
    with pytest.raises(InputError, match=r"crops.npz.*cannot read the crops"):
        load_crops(tmp_path, "g0")
