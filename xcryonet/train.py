"""Training, evaluation and prediction for the XCryoNet variants.

Training alternates three phases per epoch (paper, "XCryoNet Training"). A phase is data: which
parameter groups train (:func:`xcryonet.model.parameter_groups`) and which named losses apply.
Each phase has its own Adam over its trainable parameters only, so a phase can never move a
parameter it does not own.

Determinism: every phase of every epoch draws its shuffling and augmentation from a generator
seeded by ``(seed, epoch, phase)``, and a checkpoint is written after every epoch, so a run
killed at any point and resumed ends with the same weights and metrics as an uninterrupted one
(on the same device and thread count).
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from xcryonet.config import TrainConfig
from xcryonet.errors import InputError
from xcryonet.io.atomic import atomic_path, atomic_write_text
from xcryonet.labels import SCORE_NAMES, join_labels, read_labels
from xcryonet.model import (
    ATTRIBUTE_BRANCHES,
    MODELS,
    N_THRESHOLDS,
    ModelConfig,
    XCryoNet,
    build_model,
    fit_stat_scale,
    in_channels,
    parameter_groups,
    view_mean_outputs,
)

CHECKPOINT = "checkpoint.pt"
MODEL_FILE = "model.pt"
METRICS = "metrics.json"
SUPERVISION = ("ss", "fs")


@dataclass(frozen=True)
class PhaseConfig:
    """One training phase: the parameter groups it trains and the losses it minimises."""

    name: str
    trainable: tuple[str, ...]
    losses: tuple[str, ...]
    lr: float = 1e-3
    epochs: int = 1
    # Weight of each loss in ``losses`` (empty: all 1).
    weights: tuple[float, ...] = ()


@dataclass
class SquareSet:
    """Squares ready for the model.

    Attributes:
        x: (N, C, P, P) float16 normalised squares (float16 halves memory at 640 px); C = 1, or
            3 with ``model.extremes`` (``model_input``).
        y: (N, 5) float32 labels in SCORE_NAMES order, NaN = not labelled.
        keys: ``"<grid_id>/<square_id>"`` per square.
    """

    x: Tensor
    y: Tensor
    keys: list[str]

    def __len__(self) -> int:
        return len(self.keys)

    def subset(self, idx: Sequence[int] | np.ndarray) -> SquareSet:
        index = torch.as_tensor(np.asarray(idx, dtype=np.int64))
        return SquareSet(self.x[index], self.y[index], [self.keys[int(i)] for i in index])


# ----------------------------------------------------------------------------- losses


def masked_mse(pred: Tensor, target: Tensor) -> Tensor:
    """MSE over the elements whose target is not NaN (0 when none is): unlabelled = no loss."""
    mask = ~torch.isnan(target)
    diff = torch.where(mask, pred.float() - torch.nan_to_num(target), torch.zeros_like(target))
    return (diff**2).sum() / mask.sum().clamp(min=1)


def masked_ordinal(logits: Tensor, target: Tensor) -> Tensor:
    """Ordinal loss of logits (..., N_THRESHOLDS) of P(score > k) against scores (...): binary
    cross-entropy of each threshold, summed over them, averaged over the targets that are not
    NaN (0 when none is)."""
    mask = ~torch.isnan(target)
    above = torch.nan_to_num(target)[..., None] > torch.arange(N_THRESHOLDS, device=target.device)
    bce = F.binary_cross_entropy_with_logits(logits.float(), above.float(), reduction="none")
    per_score = bce.sum(-1)
    return torch.where(mask, per_score, torch.zeros_like(per_score)).sum() / mask.sum().clamp(min=1)


def _supervised(out: dict[str, Tensor], head: str, y: Tensor) -> Tensor:
    """Eq. 2 for ``head`` ("" = the model's answer, "_primary"): MSE over the four attributes
    plus MSE over overall, or their ordinal losses when the head is ordinal (``model.head``)."""
    logits = out.get(f"logits{head}")
    if logits is not None:
        return masked_ordinal(logits[:, :4], y[:, :4]) + masked_ordinal(logits[:, 4], y[:, 4])
    scores = out[f"scores{head}"]
    return masked_mse(scores[:, :4], y[:, :4]) + masked_mse(scores[:, 4], y[:, 4])


def _attribute_supervised(out: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
    return sum(
        (masked_mse(out[f"score_{a}"], y[:, k]) for a, k in ATTRIBUTE_BRANCHES.items()),
        torch.zeros((), device=x.device),
    )


def _attribute_reconstruction(out: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
    # The target is detached: the attribute decoders must not shape the attention.
    return sum(
        (
            F.mse_loss(out[f"recon_{a}"].float(), out[f"input_{a}"].detach().float())
            for a in ATTRIBUTE_BRANCHES
        ),
        torch.zeros((), device=x.device),
    )


# name -> (loss(out, x, y), decoders it needs)
LOSSES: dict[str, tuple[Callable[[dict[str, Tensor], Tensor, Tensor], Tensor], tuple[str, ...]]] = {
    "primary_supervised": (lambda out, x, y: _supervised(out, "_primary", y), ()),
    "primary_reconstruction": (
        # out["input"]: what the network saw (x pooled with model.stat_px).
        lambda out, x, y: F.mse_loss(out["recon_primary"].float(), out["input"].float()),
        ("primary",),
    ),
    "attribute_supervised": (_attribute_supervised, ()),
    "attribute_reconstruction": (_attribute_reconstruction, tuple(ATTRIBUTE_BRANCHES)),
    "fusion_supervised": (lambda out, x, y: _supervised(out, "_fusion", y), ()),
    "statistics_supervised": (lambda out, x, y: _supervised(out, "_statistics", y), ()),
}

_PRIMARY = ("primary.features", "primary.classifier", "primary.decoder")
_ATTR_FEATURES = tuple(f"{a}.features" for a in ATTRIBUTE_BRANCHES)
_ATTR_CLASSIFIERS = tuple(f"{a}.classifier" for a in ATTRIBUTE_BRANCHES)
_ATTR_DECODERS = tuple(f"{a}.decoder" for a in ATTRIBUTE_BRANCHES)


def phases_for(
    variant: str,
    lr: float = 1e-3,
    fusion_passes: int = 1,
    *,
    recon_weight: float = 1.0,
    attribute_weight: float = 1.0,
    autoencoder_passes: int = 1,
    statistics: bool = False,
) -> tuple[PhaseConfig, ...]:
    """The training phases of a variant, in the order they run each epoch.

    ``fusion_passes``: passes of the fusion phase per epoch (it sees only labelled squares, so
    one pass is a handful of steps); ``autoencoder_passes``: of the attribute autoencoder
    phase. ``recon_weight`` weighs the primary reconstruction loss against the supervised
    ones in phase 1, ``attribute_weight`` the attribute branches' supervised loss.
    ``statistics`` (``model.stat_head``): the statistics head trains, on its own supervised
    loss, in the phase that trains the answer (the primary variant's only phase, xcryonet's
    fusion phase).
    """
    stat_groups = ("statistics",) if statistics else ()
    stat_losses = ("statistics_supervised",) if statistics else ()
    if fusion_passes < 1 or autoencoder_passes < 1:
        raise InputError(
            "fusion_passes", f"passes must be at least 1, got {fusion_passes}/{autoencoder_passes}"
        )
    if variant == "primary":
        return (
            PhaseConfig(
                "primary",
                _PRIMARY + stat_groups,
                ("primary_supervised", "primary_reconstruction", *stat_losses),
                lr,
                weights=(1.0, recon_weight, *(1.0 for _ in stat_losses)),
            ),
        )
    if variant == "xcryonet":
        return (
            # (1) Feature nets, primary/attribute classifiers and primary decoder.
            PhaseConfig(
                "primary_attribute",
                _PRIMARY + _ATTR_FEATURES + _ATTR_CLASSIFIERS,
                ("primary_supervised", "primary_reconstruction", "attribute_supervised"),
                lr,
                weights=(1.0, recon_weight, attribute_weight),
            ),
            # (2) Attribute autoencoders only, on their reconstruction loss.
            PhaseConfig(
                "attribute_autoencoder",
                _ATTR_FEATURES + _ATTR_DECODERS,
                ("attribute_reconstruction",),
                lr,
                autoencoder_passes,
            ),
            # (3) Fusion only, on the fusion (supervised) loss.
            PhaseConfig(
                "fusion",
                ("fusion", *stat_groups),
                ("fusion_supervised", *stat_losses),
                lr,
                fusion_passes,
            ),
        )
    raise InputError("variant", f"unknown model {variant!r} (choose from {', '.join(MODELS)})")


def fusion_pass_count(cfg: TrainConfig, n_labelled: int) -> int:
    """Passes of the fusion phase per epoch: ``ceil(cfg.fusion_squares / n_labelled)``, >= 1."""
    return max(1, math.ceil(cfg.fusion_squares / max(n_labelled, 1)))


def phase_loss(
    model: XCryoNet, phase: PhaseConfig, x: Tensor, y: Tensor
) -> tuple[Tensor, dict[str, float]]:
    """Forward a batch and sum the phase's losses; returns (total, per-loss values)."""
    decoders = {d for name in phase.losses for d in LOSSES[name][1]}
    out = model(x, reconstruct=decoders)
    parts = {name: LOSSES[name][0](out, x, y) for name in phase.losses}
    weights = phase.weights or (1.0,) * len(phase.losses)
    total = sum(
        (w * v for w, v in zip(weights, parts.values(), strict=True)),
        torch.zeros((), device=x.device),
    )
    return total, {k: float(v.detach()) for k, v in parts.items()}


def set_trainable(model: XCryoNet, trainable: Sequence[str]) -> list[torch.nn.Parameter]:
    """Freeze every parameter except those of the named groups; returns the trainable ones."""
    groups = parameter_groups(model)
    unknown = sorted(set(trainable) - set(groups))
    if unknown:
        raise InputError("phase", f"unknown parameter group(s) {', '.join(unknown)}")
    for p in model.parameters():
        p.requires_grad_(False)
    params = [p for name in trainable for p in groups[name]]
    for p in params:
        p.requires_grad_(True)
    return params


def make_optimizers(model: XCryoNet, phases: Sequence[PhaseConfig]) -> dict[str, torch.optim.Adam]:
    """One Adam per phase, over that phase's parameters only."""
    groups = parameter_groups(model)
    return {
        ph.name: torch.optim.Adam([p for g in ph.trainable for p in groups[g]], lr=ph.lr)
        for ph in phases
    }


# ----------------------------------------------------------------------------- data


def normalize(crops: Tensor, cfg: ModelConfig) -> Tensor:
    """Relative transmission -> model input (fixed affine, so brightness stays visible)."""
    return (crops - cfg.norm_mean) / cfg.norm_std


def local_extremes(t: Tensor, px: int) -> Tensor:
    """(N, 1, S, S) -> (N, 2, px, px): the largest and the smallest native pixel under each
    output pixel (``adaptive_max_pool2d`` windows).

    Averaging S -> px (1.5-4x on the demo grids) dilutes a crack one native pixel wide, or a speck
    of a few, to a fraction of its contrast; the extremes keep it at full contrast.
    """
    return torch.cat([F.adaptive_max_pool2d(t, px), -F.adaptive_max_pool2d(-t, px)], dim=1)


def resample_images(t: Tensor, px: int, extremes: bool = False) -> Tensor:
    """(N, 1, S, S) float32 -> (N, 1, px, px), antialiased bilinear (the identity at S = px);
    with ``extremes`` (N, 3, px, px), channels 1-2 the ``local_extremes``. Tensor in, tensor
    out, no branch on the size: the served model (``tracking.ScoringModel``) exports it."""
    out = F.interpolate(t, size=(px, px), mode="bilinear", align_corners=False, antialias=True)
    return torch.cat([out, local_extremes(t, px)], dim=1) if extremes else out


def resample(crops: np.ndarray | Tensor, px: int, extremes: bool = False) -> Tensor:
    """(N, S, S) crops of one size -> ``resample_images`` of them, (N, C, px, px) float32."""
    t = torch.as_tensor(np.asarray(crops, dtype=np.float32)).unsqueeze(1)
    return resample_images(t, px, extremes)


def model_input(crops: np.ndarray | Tensor, cfg: ModelConfig) -> Tensor:
    """(N, S, S) raw crops of one size -> the model's normalised (N, C, P, P) input, P =
    ``cfg.data_px``."""
    return normalize(resample(crops, cfg.data_px, cfg.extremes), cfg)


def read_table(squares_dir: str | Path, labels_csv: str | Path) -> pd.DataFrame:
    """Extracted squares joined to the labels (``label_<score>`` columns, NaN = unlabelled)."""
    from xcryonet.stages import load_squares

    squares_dir = Path(squares_dir)
    if not squares_dir.is_dir():
        raise InputError(squares_dir, "does not exist or is not a folder")
    table = join_labels(load_squares(squares_dir), read_labels(labels_csv), path=labels_csv)
    table["labelled"] = table["label_line"] > 0
    return table


def load_squares_set(
    squares_dir: str | Path, table: pd.DataFrame, cfg: ModelConfig, label_rows: np.ndarray
) -> SquareSet:
    """Read, resample and normalise the crops of ``table``'s rows.

    Args:
        label_rows: (N,) bool; rows where it is False get NaN labels (they contribute only
            reconstruction losses).
    """
    from xcryonet.stages import load_crops

    xs = torch.zeros((len(table), in_channels(cfg), cfg.data_px, cfg.data_px), dtype=torch.float16)
    pos = np.arange(len(table))
    for grid_id, rows in table.groupby("grid_id", sort=True).groups.items():
        where = pos[table.index.get_indexer(rows)]
        ids = table.iloc[where]["square_id"].to_numpy(int)
        crops, _ = load_crops(Path(squares_dir), str(grid_id), ids)
        xs[torch.as_tensor(where)] = model_input(crops, cfg).half()
    y = table[[f"label_{s}" for s in SCORE_NAMES]].to_numpy(np.float32).copy()
    y[~np.asarray(label_rows, bool)] = np.nan
    return SquareSet(xs, torch.as_tensor(y), square_keys(table))


def square_keys(table: pd.DataFrame) -> list[str]:
    """``grid_id/square_id`` of each row: how a run records its squares (``train_keys``...)."""
    return [f"{g}/{s}" for g, s in zip(table["grid_id"], table["square_id"], strict=True)]


def key_rows(table: pd.DataFrame, keys: Sequence[str], source: str | Path) -> np.ndarray:
    """Row numbers of ``table`` for a run's recorded square ``keys`` (``square_keys``), in their
    order; a key with no row is an ``InputError`` naming ``source`` (the run)."""
    row_of = {k: i for i, k in enumerate(square_keys(table))}
    missing = [k for k in keys if k not in row_of]
    if missing:
        raise InputError(source, f"square {missing[0]} is not in the squares or labels")
    return np.array([row_of[k] for k in keys], np.int64)


def split_rows(
    table: pd.DataFrame,
    *,
    supervision: str,
    labeled: int | None,
    unlabeled: int | None,
    test_fraction: float,
    seed: int,
    path: str | Path = "labels.csv",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded uniform random selection of (train labelled, train unlabelled, test) row numbers.

    The test rows are ``test_fraction`` of the labelled squares; ``labeled`` of the rest train
    (None = all); ``unlabeled`` unlabelled squares join for ``ss`` (None = all; none for fs).
    """
    if supervision not in SUPERVISION:
        raise InputError("supervision", f"must be ss or fs, got {supervision!r}")
    if not 0 <= test_fraction < 1:
        raise InputError("test_fraction", f"must be in [0, 1), got {test_fraction}")
    rng = np.random.default_rng([seed, 1])
    lab = rng.permutation(np.flatnonzero(table["labelled"].to_numpy()))
    unl = rng.permutation(np.flatnonzero(~table["labelled"].to_numpy()))
    if len(lab) == 0:
        raise InputError(
            path, "no label matches an extracted square (check grid ids and x_um/y_um)"
        )
    n_test = int(round(test_fraction * len(lab)))
    if test_fraction > 0:
        n_test = min(max(n_test, 1), len(lab) - 1)
    test, pool = lab[:n_test], lab[n_test:]
    n_lab = len(pool) if labeled is None else labeled
    if not 1 <= n_lab <= len(pool):
        raise InputError(
            path, f"--labeled {n_lab}: only {len(pool)} labelled squares are left for training"
        )
    n_unl = 0 if supervision == "fs" else (len(unl) if unlabeled is None else unlabeled)
    if not 0 <= n_unl <= len(unl):
        raise InputError(path, f"--unlabeled {n_unl}: only {len(unl)} unlabelled squares exist")
    return np.sort(pool[:n_lab]), np.sort(unl[:n_unl]), np.sort(test)


def augment(x: Tensor, gen: torch.Generator, flips: bool = True, noise: float = 0.0) -> Tensor:
    """Label-preserving augmentation of (B, C, H, W) squares (H = W).

    ``flips``: a random one of the 8 flips/90-degree rotations per square; ``noise``: s.d. of
    additive Gaussian pixel noise (normalised units).
    """
    out = x
    if flips:
        k = torch.randint(0, 8, (len(x),), generator=gen)
        out = x.clone()
        for g in range(1, 8):
            idx = torch.nonzero(k == g).flatten()
            if len(idx) == 0:
                continue
            xi = x[idx].flip(-1) if g >= 4 else x[idx]
            out[idx] = torch.rot90(xi, g % 4, dims=(-2, -1))
    if noise > 0:
        out = out + noise * torch.randn(out.shape, generator=gen)
    return out


def phase_generator(seed: int, epoch: int, phase: int) -> torch.Generator:
    """The generator of one phase of one epoch (it is what makes resuming exact)."""
    state = np.random.SeedSequence([seed, epoch, phase]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & ((1 << 63) - 1))


# ----------------------------------------------------------------------------- loop


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise InputError("device", f"must be auto, cpu or cuda, got {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("device", "cuda was asked for but no GPU is available")
    return torch.device(name)


def autocast(device: torch.device, amp: str) -> AbstractContextManager[Any]:
    """bf16 autocast when asked (or ``auto`` on cuda); bf16 needs no loss scaling."""
    if amp not in ("auto", "bf16", "off"):
        raise InputError("amp", f"must be auto, bf16 or off, got {amp!r}")
    if amp == "bf16" or (amp == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def epoch_lr(cfg: TrainConfig, epoch: int) -> float:
    """Learning rate of epoch ``epoch`` (0-based) under ``cfg.lr_schedule``."""
    if cfg.lr_schedule == "constant":
        return cfg.lr
    if cfg.lr_schedule == "cosine":
        floor = 0.05
        t = epoch / max(cfg.epochs, 1)
        return cfg.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))
    raise InputError("lr_schedule", f"must be cosine or constant, got {cfg.lr_schedule!r}")


def phase_is_supervised_only(phase: PhaseConfig) -> bool:
    """True when every loss of ``phase`` needs labels (it learns nothing from unlabelled rows)."""
    return all(name.endswith("_supervised") for name in phase.losses)


def phase_mixes(phase: PhaseConfig) -> bool:
    """True when ``phase`` has both supervised and label-free losses."""
    sup = [name.endswith("_supervised") for name in phase.losses]
    return any(sup) and not all(sup)


def _mixed_layout(n_lab: int, n_unl: int, batch_size: int, fraction: float) -> tuple[int, int]:
    """(labelled rows per batch, batches per pass) of a mixed pass; (0, 0) = plain shuffle.

    Labelled rows per batch: at least ``fraction`` of the batch, never below their natural share.
    """
    if fraction <= 0 or n_lab == 0 or n_unl == 0 or n_lab + n_unl <= batch_size:
        return 0, 0
    share = math.ceil(batch_size * n_lab / (n_lab + n_unl))
    n_l = min(max(int(round(fraction * batch_size)), share, 1), batch_size - 1)
    return n_l, max(-(-n_unl // (batch_size - n_l)), -(-n_lab // n_l))


def phase_batches(
    labelled: np.ndarray,
    unlabelled: np.ndarray,
    batch_size: int,
    labelled_fraction: float,
    gen: torch.Generator,
) -> list[Tensor]:
    """Row indices of one pass, batch by batch.

    With ``labelled_fraction`` f > 0 and both kinds of rows present, each batch holds a fixed
    number of labelled rows, at least ``f * batch_size`` and at least their natural share, and
    the rest unlabelled. The pass ends when every row of both kinds has been seen; the kind that
    runs out first is reshuffled and cycled. Otherwise: one plain shuffle of all rows.
    """
    n_l, n_batches = _mixed_layout(len(labelled), len(unlabelled), batch_size, labelled_fraction)
    if n_batches == 0:
        rows = torch.as_tensor(np.concatenate([labelled, unlabelled]).astype(np.int64))
        order = rows[torch.randperm(len(rows), generator=gen)]
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    n_u = batch_size - n_l

    def cycled(rows: np.ndarray, n: int) -> Tensor:
        t = torch.as_tensor(rows.astype(np.int64))
        reps = -(-n // len(t))
        return torch.cat([t[torch.randperm(len(t), generator=gen)] for _ in range(reps)])[:n]

    lab = cycled(labelled, n_batches * n_l)
    unl = cycled(unlabelled, n_batches * n_u)
    return [
        torch.cat([lab[b * n_l : (b + 1) * n_l], unl[b * n_u : (b + 1) * n_u]])
        for b in range(n_batches)
    ]


def phase_size(phase: PhaseConfig, n_labelled: int, n_total: int, cfg: TrainConfig) -> int:
    """Squares one epoch of ``phase`` processes (for progress bars and benchmarks)."""
    n_unl = n_total - n_labelled
    if phase_is_supervised_only(phase):
        return n_labelled * phase.epochs
    fraction = cfg.labelled_fraction if phase_mixes(phase) else 0.0
    _, n_batches = _mixed_layout(n_labelled, n_unl, cfg.batch_size, fraction)
    return (n_batches * cfg.batch_size if n_batches else n_total) * phase.epochs


def run_phase(
    model: XCryoNet,
    phase: PhaseConfig,
    opt: torch.optim.Optimizer,
    data: SquareSet,
    cfg: TrainConfig,
    gen: torch.Generator,
    device: torch.device,
    bar: tqdm | None = None,
) -> dict[str, float]:
    """One pass of a phase over the data; returns the mean of each loss.

    A phase whose losses are all supervised (fusion) runs over the labelled squares only:
    unlabelled ones would give it zero loss, and Adam's momentum would still move the weights
    on a batch without labels. A phase that mixes supervised and reconstruction losses draws
    ``cfg.labelled_fraction`` of each batch from the labelled squares (:func:`phase_batches`).
    """
    is_labelled = (~torch.isnan(data.y)).any(dim=1).numpy()
    labelled, unlabelled = np.flatnonzero(is_labelled), np.flatnonzero(~is_labelled)
    if phase_is_supervised_only(phase):
        unlabelled = unlabelled[:0]
    fraction = cfg.labelled_fraction if phase_mixes(phase) else 0.0
    set_trainable(model, phase.trainable)
    model.train()
    net: torch.nn.Module = model
    rank, world = 0, 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # Data parallel: every rank draws the same batches (same generator) and takes its
        # share; DistributedDataParallel averages the gradients of this phase's parameters.
        from torch.nn.parallel import DistributedDataParallel

        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        net = DistributedDataParallel(model, find_unused_parameters=True)
    sums: dict[str, float] = {}
    n = 0
    for _ in range(phase.epochs):
        for idx in phase_batches(labelled, unlabelled, cfg.batch_size, fraction, gen):
            x = data.x[idx].float()
            # Augment the whole batch on every rank, so the generators stay in step.
            x = augment(x, gen, flips=cfg.augment, noise=cfg.noise)
            y = data.y[idx]
            if world > 1:
                x, y = x[rank::world], y[rank::world]
            x, y = x.to(device), y.to(device)
            with autocast(device, cfg.amp):
                loss, parts = phase_loss(net, phase, x, y)  # type: ignore[arg-type]
            model.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v * len(idx)
            n += len(idx)
            if bar is not None:
                bar.update(len(idx))
                bar.set_postfix(phase=phase.name, loss=f"{float(loss.detach()):.3f}", refresh=False)
    return {k: v / max(n, 1) for k, v in sums.items()}


def view_mean_scores(model: XCryoNet, x: Tensor, tta: bool) -> Tensor:
    """Scores (B, 5), not clipped, of normalised squares x (B, 1, P, P): with ``tta`` the mean
    over the 8 views, from one forward over all of them (``model.view_mean_outputs``)."""
    return view_mean_outputs(model, x, tta)[0]


@torch.no_grad()
def view_mean_batches(
    model: XCryoNet,
    x: Tensor,
    batch_size: int = 64,
    tta: bool | None = None,
    maps: bool = False,
    prepare: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Scores, and optionally attention maps, of squares x (N, 1, P, P), batch by batch in eval
    mode (the model's training mode is restored afterwards, also on an error).

    Args:
        batch_size: images per forward; with test-time augmentation ``batch_size // 8`` squares
            with their 8 views, so a forward holds about as many images at any input size
            (memory at 640 px).
        tta: the mean over each square's 8 flips/rotations (None = the model's ``cfg.tta``).
        maps: also return the attention maps (the model must have attention).
        prepare: applied to each batch before the forward (e.g. ``normalize``), so a whole
            normalised copy of x is never held.

    Returns:
        scores (N, 5) float32 on the CPU, clipped to 0..4 after averaging; maps (N, 2, P/k,
        P/k) (k = ``cfg.pool_factor``) float32 in (0, 1) (channel 0 cracking, 1
        contamination), or None without ``maps``.
    """
    device = next(model.parameters()).device
    use_tta = model.cfg.tta if tta is None else tta
    step = max(1, batch_size // 8) if use_tta else batch_size
    k = model.cfg.pool_factor  # model.stat_px: the maps are on the network's raster
    scores, att = [torch.zeros((0, 5))], [torch.zeros((0, 2, x.shape[-2] // k, x.shape[-1] // k))]
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(x), step):
            xb = x[start : start + step]
            xb = (prepare(xb) if prepare is not None else xb).float().to(device)
            s, m = view_mean_outputs(model, xb, use_tta, maps=maps)
            scores.append(s.float().clamp(0, 4).cpu())
            if m is not None:
                att.append(m.float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(scores), torch.cat(att) if maps else None


def predict_tensor(
    model: XCryoNet, x: Tensor, batch_size: int = 64, tta: bool | None = None
) -> Tensor:
    """Scores (N, 5) float32 clipped to 0..4 for normalised squares x (N, 1, P, P).

    ``tta`` (None = the model's ``cfg.tta``): the mean over the 8 flips/rotations of each
    square, clipped after averaging. See ``view_mean_batches``.
    """
    return view_mean_batches(model, x, batch_size, tta)[0]


def predict(model: XCryoNet, crops: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
    """Score raw crops (relative transmission, each (S, S), sizes may differ) -> (N, 5) in 0..4."""
    cfg = model.cfg
    x = [model_input(np.asarray(c)[None], cfg) for c in crops]
    if not x:
        return np.zeros((0, 5), np.float32)
    return predict_tensor(model, torch.cat(x)).numpy()


def evaluate(
    model: XCryoNet, data: SquareSet, round_scores: bool = False, tta: bool | None = None
) -> dict[str, float | None]:
    """Mean absolute error per score over the labelled entries (None where there are none).

    ``round_scores``: score the predictions rounded to whole scores, as operators label.
    ``tta``: see ``predict_tensor``.
    """
    pred = predict_tensor(model, data.x, tta=tta)
    if round_scores:
        pred = pred.round()
    out: dict[str, float | None] = {}
    for k, name in enumerate(SCORE_NAMES):
        mask = ~torch.isnan(data.y[:, k])
        out[name] = float((pred[mask, k] - data.y[mask, k]).abs().mean()) if mask.any() else None
    return out


@dataclass(frozen=True)
class EpochRecord:
    """What ``train``'s ``on_epoch`` callback gets after each epoch.

    ``losses``: phase name -> loss name -> mean loss; ``val_mae``: score -> MAE on the held-out
    squares, one view of each (no test-time augmentation; empty without a test set);
    ``seconds``: training time so far.
    """

    epoch: int
    epochs: int
    losses: dict[str, dict[str, float]]
    val_mae: dict[str, float | None]
    seconds: float


def _rng_state() -> dict[str, Any]:
    name, key, pos, has_gauss, cached = np.random.get_state(legacy=True)
    key = np.asarray(key)
    return {
        "python": random.getstate(),
        "numpy": (name, torch.as_tensor(key.astype(np.int64)), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, key, *rest = state["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ModelConfig fields that only change how a trained model predicts, not what training does.
PREDICTION_ONLY = ("tta",)
# Architecture settings added after models were first saved, with the value those models were
# built with: a saved config without the key means that value, not today's default.
LEGACY_MODEL_CFG: dict[str, Any] = {"branch_stem_stride": 0}


def saved_model_cfg(saved: dict[str, Any] | None) -> dict[str, Any]:
    """A model config as a checkpoint stored it, with ``LEGACY_MODEL_CFG`` for missing keys."""
    return {**LEGACY_MODEL_CFG, **(saved or {})}


def _trained_cfg(model_cfg: dict[str, Any]) -> dict[str, Any]:
    """A ModelConfig dict without the prediction-only fields (what a resumed run must match)."""
    return {k: v for k, v in model_cfg.items() if k not in PREDICTION_ONLY}


def _model_record(model: XCryoNet, run: dict[str, Any]) -> dict[str, Any]:
    # Plain data only, so torch.load(weights_only=True) can read it back.
    return {
        "variant": model.variant,
        "model_cfg": asdict(model.cfg),
        "run": run,
        "model": model.state_dict(),
    }


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint or model file we wrote (weights only: plain data, no code)."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise InputError(path, "does not exist") from None
    except Exception as err:  # a truncated or foreign file: say so in one line
        raise InputError(path, f"is not a readable xcryonet checkpoint ({err})") from None
    if not isinstance(data, dict) or "model" not in data:
        raise InputError(path, "is not an xcryonet checkpoint")
    return data


def train(
    squares_dir: str | Path,
    labels_csv: str | Path,
    out_dir: str | Path,
    cfg: TrainConfig | None = None,
    *,
    model_cfg: ModelConfig | None = None,
    variant: str = "xcryonet",
    supervision: str = "ss",
    labeled: int | None = None,
    unlabeled: int | None = None,
    resume: bool = True,
    rows: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    on_epoch: Callable[[EpochRecord], None] | None = None,
    rank: int = 0,
) -> dict[str, Any]:
    """Train a variant and write ``out_dir/{checkpoint.pt, model.pt, metrics.json}``.

    Resumes from ``out_dir/checkpoint.pt`` when it exists and ``resume`` is true (the run
    settings other than ``epochs`` must match). Returns the metrics: MAE per score on the
    held-out labelled squares, the counts, the final losses per phase and the learning curve.

    ``rows``: (train labelled, train unlabelled, test) row numbers of ``read_table`` instead of
    the seeded random split (``xcryonet.dataset`` makes a stable one from ``split.csv``).
    ``on_epoch``: called after every epoch's checkpoint is written, with the epoch's losses and
    validation MAE (MLflow logging, Optuna pruning); an exception there stops training with
    the checkpoint intact, so the run resumes.
    ``rank``: this process's rank when ``torch.distributed`` is initialised (see
    ``xcryonet.distributed``): only rank 0 writes files, shows progress and calls ``on_epoch``.
    """
    cfg = cfg or TrainConfig()
    model_cfg = model_cfg or ModelConfig()
    out_dir = Path(out_dir)
    device = resolve_device(cfg.device)
    autocast(device, cfg.amp)  # validates cfg.amp before any work
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)

    table = read_table(squares_dir, labels_csv)
    if rows is None:
        lab, unl, test = split_rows(
            table,
            supervision=supervision,
            labeled=labeled,
            unlabeled=unlabeled,
            test_fraction=cfg.test_fraction,
            seed=cfg.seed,
            path=labels_csv,
        )
    else:
        lab, unl, test = (np.asarray(r, np.int64) for r in rows)
        if len(lab) == 0:
            raise InputError(labels_csv, "the split has no labelled training square")
    phases = phases_for(
        variant,
        cfg.lr,
        fusion_pass_count(cfg, len(lab)),
        recon_weight=cfg.recon_weight,
        attribute_weight=cfg.attribute_weight,
        autoencoder_passes=cfg.autoencoder_passes,
        statistics=model_cfg.stat_head,
    )
    train_rows = np.concatenate([lab, unl])
    train_set = load_squares_set(
        squares_dir, table.iloc[train_rows], model_cfg, np.arange(len(train_rows)) < len(lab)
    )
    test_set = load_squares_set(squares_dir, table.iloc[test], model_cfg, np.ones(len(test), bool))
    run = {
        "train": {k: v for k, v in asdict(cfg).items() if k not in ("epochs", "progress")},
        "supervision": supervision,
        "labeled": len(lab),
        "unlabeled": len(unl),
        "train_keys": train_set.keys,
        "test_keys": test_set.keys,
    }

    torch.manual_seed(cfg.seed)
    model = build_model(variant, model_cfg).to(device)
    optimizers = make_optimizers(model, phases)
    start, history, seconds = 0, [], 0.0
    val_history: list[dict[str, float | None]] = []
    ckpt_path = out_dir / CHECKPOINT
    if resume and ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path)
        saved_cfg = _trained_cfg(saved_model_cfg(ckpt.get("model_cfg")))
        saved = (ckpt.get("variant"), saved_cfg, ckpt.get("run"))
        if saved != (variant, _trained_cfg(asdict(model_cfg)), run):
            raise InputError(
                ckpt_path,
                "was written by a run with other settings or data; "
                "use another --out or delete the checkpoint",
            )
        model.load_state_dict(ckpt["model"])
        for name, opt in optimizers.items():
            opt.load_state_dict(ckpt["optimizers"][name])
        start, history, seconds = int(ckpt["epoch"]), list(ckpt["history"]), ckpt["seconds"]
        val_history = list(ckpt.get("val_history", []))
        _set_rng_state(ckpt["rng"])
    else:
        # model.stat_head: standardise on the training squares (a resume loads it instead).
        fit_stat_scale(model, train_set.x)

    for epoch in range(start, cfg.epochs):
        t0 = time.perf_counter()
        n_labelled = int((~torch.isnan(train_set.y)).any(dim=1).sum())
        total = sum(phase_size(p, n_labelled, len(train_set), cfg) for p in phases)
        desc = f"epoch {epoch + 1}/{cfg.epochs}"
        for opt in optimizers.values():
            for group in opt.param_groups:
                group["lr"] = epoch_lr(cfg, epoch)
        show = cfg.progress and rank == 0
        with tqdm(total=total, desc=desc, unit="sq", disable=not show, leave=False) as bar:
            losses = {
                ph.name: run_phase(
                    model,
                    ph,
                    optimizers[ph.name],
                    train_set,
                    cfg,
                    phase_generator(cfg.seed, epoch, k),
                    device,
                    bar,
                )
                for k, ph in enumerate(phases)
            }
        bad = [f"{p}/{k}" for p, d in losses.items() for k, v in d.items() if not math.isfinite(v)]
        if bad:
            # Stop before this epoch's checkpoint: the last good one stays for a resume.
            kept = f"the checkpoint of epoch {epoch} is kept" if epoch else "no checkpoint written"
            raise InputError(
                out_dir,
                f"training diverged at epoch {epoch + 1}, non-finite loss ({', '.join(bad)}); "
                f"{kept}; check the inputs or lower train.lr",
            )
        history.append(losses)
        # Validation MAE on the held-out squares (no randomness: resuming stays exact), from one
        # view of each square: test-time augmentation here would add about 20 % to an epoch
        # at 900 labels. The final metrics use the model's tta setting.
        val_history.append(evaluate(model, test_set, tta=False) if len(test) else {})
        seconds += time.perf_counter() - t0
        ckpt = {
            **_model_record(model, run),
            "epoch": epoch + 1,
            "phase": 0,  # checkpoints sit at epoch boundaries: the next phase is the first
            "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
            "rng": _rng_state(),
            "history": history,
            "val_history": val_history,
            "seconds": seconds,
        }
        if rank == 0:
            with atomic_path(ckpt_path) as tmp:
                torch.save(ckpt, tmp)
        if on_epoch is not None and rank == 0:
            on_epoch(EpochRecord(epoch + 1, cfg.epochs, losses, val_history[-1], seconds))

    set_trainable(model, [])
    metrics = {
        "variant": variant,
        "supervision": supervision,
        "labeled": len(lab),
        "unlabeled": len(unl),
        "test": len(test),
        "tta": model_cfg.tta,
        "epochs": cfg.epochs,
        "world_size": (
            torch.distributed.get_world_size()
            if torch.distributed.is_available() and torch.distributed.is_initialized()
            else 1
        ),
        "test_mae": evaluate(model, test_set) if len(test) else {},
        "test_mae_rounded": evaluate(model, test_set, round_scores=True) if len(test) else {},
        "final_losses": history[-1] if history else {},
        "train_seconds": round(seconds, 2),
        "curve": [
            {"epoch": k + 1, "losses": h, "val_mae": v}
            for k, (h, v) in enumerate(zip(history, val_history, strict=False))
        ],
    }
    if rank == 0:
        with atomic_path(out_dir / MODEL_FILE) as tmp:
            torch.save(_model_record(model, run), tmp)
        atomic_write_text(out_dir / METRICS, json.dumps(metrics, indent=2) + "\n")
    return metrics


def load_model(model_dir: str | Path, device: str = "cpu") -> tuple[XCryoNet, ModelConfig]:
    """Rebuild a trained model from ``model_dir/model.pt`` (eval mode, frozen)."""
    path = Path(model_dir) / MODEL_FILE
    rec = load_checkpoint(path)
    known = {f.name for f in fields(ModelConfig)}
    saved = saved_model_cfg(rec["model_cfg"])
    cfg = ModelConfig(**{k: v for k, v in saved.items() if k in known})
    model = build_model(str(rec["variant"]), cfg)
    try:
        model.load_state_dict(rec["model"])
    except RuntimeError as err:
        raise InputError(path, f"weights do not fit the {rec['variant']} model ({err})") from None
    set_trainable(model, [])
    return model.to(resolve_device(device)).eval(), cfg


def evaluate_dir(
    model_dir: str | Path, squares_dir: str | Path, labels_csv: str | Path
) -> dict[str, float | None]:
    """MAE per score of a trained model on every labelled square of a dataset."""
    model, cfg = load_model(model_dir)
    table = read_table(squares_dir, labels_csv)
    rows = np.flatnonzero(table["labelled"].to_numpy())
    if len(rows) == 0:
        raise InputError(labels_csv, "no label matches an extracted square")
    data = load_squares_set(squares_dir, table.iloc[rows], cfg, np.ones(len(rows), bool))
    return evaluate(model, data)
