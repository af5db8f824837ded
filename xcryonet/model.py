"""XCryoNet: the attention-guided square scorer, one ``nn.Module`` per concept.

Shapes: images are (B, C, H, W) float32 (C = 1, or 3 with ``ModelConfig.extremes``; any H, W;
H = W = ``ModelConfig.data_px`` in training); scores are (B, 5) in ``SCORE_NAMES`` order
(brightness, squareness, cracking, contamination, overall), on the 0..4 label scale.

Layout (paper, Fig. 2):

    x ──► primary Branch ──► scores_primary, recon_primary
            │ features (B, C, h, w)
            ▼
          Attention ──► maps (B, 2, H, W) ──► x * map ──► cracking / contamination Branch
                                                                 │ features
    Fusion(primary + attribute features) ──► scores ◄────────────┘

Variants are built by name: ``build_model("primary")`` (no attention, the paper's baseline) and
``build_model("xcryonet")`` (the full model).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xcryonet.config import ModelConfig
from xcryonet.errors import InputError

N_SCORES = 5
N_ATTRIBUTES = 4
# Index of the attributes that get an attention-guided branch, in SCORE_NAMES order.
ATTRIBUTE_BRANCHES = {"cracking": 2, "contamination": 3}
BRANCH_PARTS = ("features", "classifier", "decoder")


def _norm(channels: int) -> nn.GroupNorm:
    # GroupNorm, not BatchNorm: no running statistics, so a phase that freezes a module
    # really leaves all of its state unchanged, and batches with few squares behave.
    return nn.GroupNorm(math.gcd(channels, 4), channels)


class ResBlock(nn.Module):
    """Two 3x3 convolutions with a shortcut (He et al. 2016); ``stride`` downsamples.

    ``activate_output=False`` returns the pre-activation sum, so the feature maps that feed
    the attention can be negative and the sigmoid spans the whole (0, 1) range.
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1, activate_output: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.norm1 = _norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.norm2 = _norm(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), _norm(c_out)
            )
        self.activate_output = activate_output

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y)) + self.shortcut(x)
        return F.relu(y) if self.activate_output else y


def n_stats_of(cfg: ModelConfig) -> int:
    """Statistics the classifiers get, in this order: ``input_stats``'s, ``crack_share`` with
    ``cfg.crack_stat`` (its profile's ``N_CRACK_PROFILE`` with ``cfg.crack_profile``),
    ``hole_share`` with ``cfg.hole_stat`` (last)."""
    if not cfg.input_stats:
        return 0
    crack = (N_CRACK_PROFILE if cfg.crack_profile else N_CRACK_STATS) if cfg.crack_stat else 0
    return N_INPUT_STATS + crack + (N_HOLE_STATS if cfg.hole_stat else 0)


def stat_skips_of(cfg: ModelConfig) -> list[tuple[str, int, int]]:
    """The statistics the answer's attribute outputs also get directly: (the gain's parameter
    name, attribute index, statistic column) for ``crack_skip`` (``crack_share``, into
    cracking) and ``hole_skip`` (``hole_share``, the last column, into contamination)."""
    skips = []
    if cfg.crack_skip:
        skips.append(("crack_gain", ATTRIBUTE_BRANCHES["cracking"], N_INPUT_STATS))
    if cfg.hole_skip:
        skips.append(("skip_gain", ATTRIBUTE_BRANCHES["contamination"], -1))
    return skips


def in_channels(cfg: ModelConfig) -> int:
    """Input channels: the resampled square, plus its local max and min with ``extremes``."""
    return 3 if cfg.extremes else 1


class FeatureNet(nn.Module):
    """A strided convolution and two ResBlocks: (B, C, H, W) -> (B, 2*width, H/(4s), W/(4s)),
    s = ``stride`` of the first convolution."""

    def __init__(self, cfg: ModelConfig, stride: int):
        super().__init__()
        w = cfg.width
        k = 2 * stride + 1
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels(cfg), w, k, stride, k // 2, bias=False),
            _norm(w),
            nn.ReLU(),
        )
        self.block1 = ResBlock(w, 2 * w, stride=2)
        self.block2 = ResBlock(2 * w, 2 * w, stride=2, activate_output=False)
        self.out_channels = 2 * w

    def forward(self, x: Tensor) -> Tensor:
        return self.block2(self.block1(self.stem(x)))


N_INPUT_STATS = 7
N_HOLE_STATS = 1  # ``hole_share``'s column with ``ModelConfig.hole_stat``
# Below this contrast (relative transmission) between a crop's 5th and 90th percentiles it
# shows no opening to measure and ``hole_share`` gives 0: on the demo, black squares and
# partial squares at the edge of the imaged field (0.015-0.096; the next is 0.104).
HOLE_MIN_CONTRAST = 0.1
N_CRACK_STATS = 1  # ``crack_share``'s column with ``ModelConfig.crack_stat``
# ``crack_share``: a pixel of the opening is bright when it lies more than this share of the
# way from the opening's median to full transmission. A crack counts in the cracking label where
# it lets through at least half the beam the film stops (0.5 of the way, at native
# resolution); at 64 px a hairline crack is averaged with film beside it. One monotone map from
# the share fits the label best with 0.3 (cracking MAE 0.175 at 500 labels against 0.187 with
# 0.25 and 0.191 with 0.4; bench/crack_probe.py, docs/experiment.md "Follow-up 14").
CRACK_HEADROOM = 0.3
# ``crack_share(profile=True)``, with ``ModelConfig.crack_profile``: the shares above more
# margins, then soft shares (the mean excess over a margin). One monotone map from any of them
# does worse than CRACK_HEADROOM alone, but gradient boosting on all seven reaches cracking MAE
# 0.155 at 900 labels against 0.182 from the one (docs/experiment.md "Follow-up 15").
CRACK_PROFILE_HEADROOMS = (0.2, 0.4, 0.5)
CRACK_PROFILE_SOFT = (0.05, 0.1, 0.2)
N_CRACK_PROFILE = 1 + len(CRACK_PROFILE_HEADROOMS) + len(CRACK_PROFILE_SOFT)
# The open-area threshold, as the extractor draws it: bar level + OPEN_FRACTION x (open - bar),
# with the 5th percentile as the bar level and the 90th as the open level.
OPEN_FRACTION = 0.3


def sorted_rows(flat: Tensor) -> Tensor:
    """(B, N) -> (B, N), each row in ascending order.

    On a CPU, when no gradient has to flow through the sort (inference, or inputs that do not
    require one), numpy's sort gives the same values about 2.5x faster than ``Tensor.sort``
    (0.72 -> 0.3 s of a 290-square grid's scoring on 2 cores). Traced or exported (the MLflow
    ``pt2`` model, whose tensors are subclasses) it stays in torch.
    """
    plain = type(flat) is Tensor and not torch.compiler.is_compiling()
    if not plain or flat.device.type != "cpu" or (flat.requires_grad and torch.is_grad_enabled()):
        return flat.sort(dim=1).values
    return torch.from_numpy(np.sort(flat.detach().numpy(), axis=1))


def input_stats(x: Tensor) -> Tensor:
    """Global intensity statistics of (B, 1, H, W) inputs -> (B, 7).

    Columns: mean, s.d., quartiles 25/50, 90th percentile, then the mean and the share of the
    pixels above the open-area threshold (``OPEN_FRACTION`` of the way from the 5th to the 90th
    percentile). Above 64 px they are taken on a regular subsample of about 64 x 64 pixels.

    GroupNorm normalises every square on its own, which removes its absolute intensity level
    from the features; brightness (an open-area mean) and overall (through the ice thickness)
    depend on exactly that, so the classifiers get it directly. The open-area mean is the level
    of the opening alone, without the bars that share the crop.
    """
    step = -(-x.shape[-1] // 64)  # above 64 px, every step-th pixel: the same cost as 64 px
    flat = x[..., ::step, ::step].float().flatten(1)
    # torch.quantile's linear interpolation, by one sort (torch.quantile itself is several
    # times slower on a CPU).
    ordered = sorted_rows(flat)
    pos = torch.tensor([0.05, 0.25, 0.5, 0.9], dtype=torch.float64) * (flat.shape[1] - 1)
    lo, hi = pos.floor().long(), pos.ceil().long()
    frac = (pos - lo).to(flat.dtype).to(x.device)
    q = ordered[:, lo] + (ordered[:, hi] - ordered[:, lo]) * frac
    threshold = q[:, :1] + OPEN_FRACTION * (q[:, 3:4] - q[:, :1])
    is_open = (flat > threshold).to(flat.dtype)
    n_open = is_open.sum(1, keepdim=True)
    open_mean = (flat * is_open).sum(1, keepdim=True) / n_open.clamp(min=1)
    return torch.cat(
        [
            flat.mean(1, keepdim=True),
            flat.std(1, keepdim=True),
            q[:, 1:],
            open_mean,
            n_open / flat.shape[1],
        ],
        dim=1,
    )


# Rounds of ``fill_dark_runs`` in a traced or exported model, which cannot stop when the fill
# does; eagerly it runs until nothing changes. On the demo's 3499 labelled squares at 64 px
# the 3425 with an opening (``HOLE_MIN_CONTRAST``) need at most 3 rounds; the noise of the
# black ones up to 8 (their ``hole_share`` is 0 either way).
TRACED_FILL_ROUNDS = 8


def _fill_runs_along_rows(reach: Tensor, dark: Tensor) -> Tensor:
    """(B, 1, H, W) bool -> bool: every run of dark pixels along a row that holds a reached
    pixel is reached whole (``reach`` lies within ``dark``)."""
    left = F.pad(dark[..., :-1], (1, 0))
    # Run ids, 0 = not dark (a float cumsum: exact to 2^24 and several times faster on a CPU).
    seg = torch.cumsum((dark & ~left).to(torch.float32), dim=-1).to(torch.int64) * dark
    hit = torch.zeros(
        (*dark.shape[:-1], dark.shape[-1] + 1), dtype=torch.float32, device=dark.device
    )
    hit = hit.scatter_reduce(-1, seg, reach.to(torch.float32), "amax")
    return hit.gather(-1, seg) > 0  # run 0 (the open pixels) is never reached


def _fill_numpy(seed: np.ndarray, dark: np.ndarray) -> np.ndarray:
    """``fill_dark_runs`` by one connected-component labelling of the whole stack (scipy, no
    links between squares or channels)."""
    from scipy import ndimage as ndi

    cross = np.zeros((3, 3, 3, 3), bool)
    cross[1, 1] = ndi.generate_binary_structure(2, 1)
    labels, _ = ndi.label(dark, structure=cross)
    joined = np.zeros(labels.max() + 1, bool)
    joined[labels[seed & dark]] = True
    joined[0] = False
    return joined[labels]


def fill_dark_runs(seed: Tensor, dark: Tensor, rounds: int | None = None) -> Tensor:
    """The dark pixels (B, 1, H, W) bool joined to ``seed`` (within ``dark``) by a 4-connected
    path of dark pixels.

    Alternate sweeps along rows and columns, each filling whole runs: a round reaches around
    one more turn of the path, so a path of k straight legs needs about k / 2 rounds. Eagerly
    the sweeps stop when a round changes nothing, after at most ``rounds``; traced, they run
    ``rounds`` (default ``TRACED_FILL_ROUNDS``) every time. On a CPU, untraced and without
    ``rounds``, ``_fill_numpy`` gives the same pixels about 20x faster (32 squares at 64 px:
    15 against 325 ms).
    """
    eager = type(dark) is Tensor and not torch.compiler.is_compiling()
    if rounds is None and eager and dark.device.type == "cpu":
        return torch.from_numpy(_fill_numpy(seed.numpy(), dark.numpy()))
    if rounds is None:
        rounds = dark.shape[-1] * dark.shape[-2] if eager else TRACED_FILL_ROUNDS
    reach = seed & dark
    for _ in range(rounds):
        before = reach
        reach = _fill_runs_along_rows(reach, dark)
        reach = _fill_runs_along_rows(reach.transpose(-1, -2), dark.transpose(-1, -2))
        reach = reach.transpose(-1, -2)
        if eager and torch.equal(reach, before):
            break
    return reach


def _percentiles_nearest(flat: Tensor, qs: Sequence[float]) -> list[Tensor]:
    """Nearest-rank percentiles (B,) of each row of (B, N)."""
    ordered = sorted_rows(flat)
    n = flat.shape[1] - 1
    return [ordered[:, round(q * n)] for q in qs]


def hole_share(x: Tensor, min_contrast: float = 0.0) -> Tensor:
    """The dark share of the opening that the film encloses: (B, C, H, W) -> (B, 1), as
    4 * sqrt(share) (0..4, the scale of the scores); channel 0 is read.

    Dark pixels are those at or below the open-area threshold as ``input_stats`` draws it (here
    with nearest-rank percentiles); the dark pixels that no 4-connected path of dark pixels
    joins to the crop's border (the bars run into it) are holes in the film: contamination
    lying on it. share = holes / (open + holes). The flood fill is ``fill_dark_runs``'s.

    A square whose 90th percentile is less than ``min_contrast`` (in the input's units) above
    its 5th shows no opening to measure (a black square, or a partial one at the edge of the
    imaged field): the threshold would fall in the noise and find holes everywhere, so its
    share is 0.
    """
    step = -(-x.shape[-1] // 64)
    img = x[:, :1, ::step, ::step].float()
    q05, q90 = _percentiles_nearest(img.flatten(1), (0.05, 0.9))
    threshold = (q05 + OPEN_FRACTION * (q90 - q05))[:, None, None, None]
    dark = img <= threshold
    border = torch.ones_like(dark)
    border[..., 1:-1, 1:-1] = False
    reach = fill_dark_runs(dark & border, dark)
    holes = (dark & ~reach).flatten(1).sum(1, keepdim=True).to(img.dtype)
    opening = (~dark).flatten(1).sum(1, keepdim=True).to(img.dtype) + holes
    lit = (q90 - q05 >= min_contrast)[:, None].to(img.dtype)
    return 4 * torch.sqrt(holes / opening.clamp(min=1)) * lit


def square_opening(img: Tensor, own: bool = True) -> tuple[Tensor, Tensor]:
    """The square's own opening in (B, 1, H, W) inputs -> (opening bool (B, 1, H, W), contrast
    (B,) the 90th minus the 5th percentile).

    The pixels above the open-area threshold (as ``hole_share`` draws it) that a 4-connected
    path of such pixels joins to the crop's central window (the middle eighth of each side).
    The crop also shows slivers of the neighbouring squares' openings beyond the bars; they
    are left out, as the extractor's footprint leaves them out of its mask. ``own=False``
    keeps every pixel above the threshold (for comparison, ``bench/crack_probe.py``).
    """
    q05, q90 = _percentiles_nearest(img.flatten(1), (0.05, 0.9))
    threshold = (q05 + OPEN_FRACTION * (q90 - q05))[:, None, None, None]
    is_open = img > threshold
    if not own:
        return is_open, q90 - q05
    h, w = img.shape[-2:]
    seed = torch.zeros_like(is_open)
    seed[..., (7 * h) // 16 : -(-9 * h // 16), (7 * w) // 16 : -(-9 * w // 16)] = True
    return fill_dark_runs(seed, is_open), q90 - q05


def crack_share(
    x: Tensor,
    norm_mean: float,
    norm_std: float,
    min_contrast: float = 0.0,
    own: bool = True,
    profile: bool = False,
    max_px: int = 64,
) -> Tensor:
    """The bright share of the square's own opening: (B, C, H, W) normalised inputs -> (B, 1)
    (``profile``: (B, N_CRACK_PROFILE), that share first), as 4 * sqrt(share) (0..4, the scale
    of the scores); channel 0 is read.

    Bright pixels are those of the opening (``square_opening``) more than ``CRACK_HEADROOM`` of
    the way from the opening's median up to full transmission (1 before the normalisation
    ``norm_mean``, ``norm_std``). A crack or broken film lets through part or all of the beam
    that the film and ice stop, ``t + a * (1 - t)`` for film transmission ``t``, so a margin
    relative to the headroom ``1 - t`` finds them on thick and thin ice alike. A square whose
    90th percentile is less than ``min_contrast`` (in the input's units) above its 5th has no
    opening to measure and gets 0. ``own``: see ``square_opening``.

    ``profile`` adds the shares above ``CRACK_PROFILE_HEADROOMS`` and, for each of
    ``CRACK_PROFILE_SOFT``, the opening's mean excess over that margin in units of the headroom
    (soft shares: a crack's coverage counted, not thresholded), in that order.

    Inputs wider than ``max_px`` are read at every ``ceil(W / max_px)``-th pixel.
    """
    step = -(-x.shape[-1] // max_px)
    img = x[:, :1, ::step, ::step].detach().float()
    opening, contrast = square_opening(img, own)
    op = opening.flatten(1)
    n_open = op.sum(1)
    v = img.flatten(1)
    # The opening's median: the other pixels pushed past the end of each sorted row.
    ordered = sorted_rows(torch.where(op, v, torch.full_like(v, float("inf"))))
    median = ordered.gather(1, ((n_open - 1).clamp(min=0) // 2)[:, None])
    # No opening (a flat crop): a finite median, so the soft shares stay 0, not inf - inf.
    median = torch.where(n_open[:, None] > 0, median, torch.zeros_like(median))
    full = (1.0 - norm_mean) / norm_std
    headroom = full - median
    shares = []
    for level in (CRACK_HEADROOM, *(CRACK_PROFILE_HEADROOMS if profile else ())):
        bright = (v > median + level * headroom) & op
        shares.append(bright.sum(1) / n_open.clamp(min=1))
    for level in CRACK_PROFILE_SOFT if profile else ():
        # The excess over the margin in units of the headroom: a crack's coverage a, summed.
        excess = (v - median - level * headroom).clamp(min=0) / headroom.clamp(min=1e-3)
        shares.append((excess * op).sum(1) / n_open.clamp(min=1))
    lit = ((contrast >= min_contrast) & (n_open > 0)).to(img.dtype)
    share = torch.stack(shares, dim=1).to(img.dtype)
    return 4 * torch.sqrt(share) * lit[:, None]


N_THRESHOLDS = 4  # an ordinal head's "score > k" logits, k = 0..3
ORDINAL_HEADS = ("ordinal", "coral")  # the heads trained on those logits


def ordinal_scores(logits: Tensor) -> Tensor:
    """(..., N_THRESHOLDS) logits of P(score > k) -> (...) expected score on 0..4: the sum of
    the probabilities."""
    return torch.sigmoid(logits.float()).sum(-1)


class Classifier(nn.Module):
    """Pooling, two FC layers regressing the attributes, two FC layers regressing overall.

    Overall is computed *from the predicted attributes* (paper: "enforce the dependency of the
    overall score on the fine-grained attributes"). ``forward`` returns (scores (B, n_attributes
    [+1 if overall]), logits): with an ordinal ``head`` (``ordinal``, ``coral``) every score comes
    from ``N_THRESHOLDS`` logits of P(score > k) (``ordinal_scores``), returned as
    (B, n, N_THRESHOLDS); with ``regression`` logits is None. ``coral`` makes each score's logits
    one output plus ``thresholds`` (n, N_THRESHOLDS) of its own: every threshold moves along the
    same learned direction, so a rare high score shares what the common low ones teach.
    ``n_stats`` extra inputs (``input_stats``) join the pooled features when given.
    """

    def __init__(
        self,
        c_in: int,
        n_attributes: int,
        hidden: int,
        overall: bool,
        n_stats: int = 0,
        overall_grad: bool = True,
        overall_features: bool = False,
        head: str = "regression",
        skips: Sequence[tuple[str, int, int]] = (),
    ):
        super().__init__()
        ordinal = head in ORDINAL_HEADS
        # coral: one output per score plus its own four thresholds (a shared slope).
        shared = head == "coral"
        self.overall_grad = overall_grad
        self.overall_features = overall_features
        self.ordinal = ordinal
        k = N_THRESHOLDS if ordinal and not shared else 1
        self.outputs_per_score = k
        n_overall_in = n_attributes + (2 * c_in + n_stats if overall_features else 0)
        # Average and max pooling: average sees global brightness, max sees small defects.
        self.attributes = nn.Sequential(
            nn.Linear(2 * c_in + n_stats, hidden), nn.ReLU(), nn.Linear(hidden, n_attributes * k)
        )
        self.overall = (
            nn.Sequential(nn.Linear(n_overall_in, hidden), nn.ReLU(), nn.Linear(hidden, k))
            if overall
            else None
        )
        # Start predictions at the middle of the 0..4 scale instead of 0 (ordinal: every
        # threshold at even odds, 4 x 0.5 = 2).
        for mlp in (self.attributes, self.overall):
            if mlp is not None:
                nn.init.constant_(mlp[-1].bias, 0.0 if ordinal else 2.0)  # type: ignore[arg-type]
        # skips (``stat_skips_of``): a statistic also enters its attribute's output(s)
        # directly, times a learnt positive gain (softplus, starting at 1).
        self.skips = list(skips)
        self.skip_gain: nn.Parameter | None = None  # hole_share's, into contamination
        self.crack_gain: nn.Parameter | None = None  # crack_share's, into cracking
        for name, _, _ in self.skips:
            setattr(self, name, nn.Parameter(torch.tensor(math.log(math.e - 1))))
        self.thresholds: nn.Parameter | None = None
        if shared:
            # Evenly spaced around 0: the probabilities sum to 2 at a zero output, mid-scale.
            start = torch.linspace(1.5, -1.5, N_THRESHOLDS)
            self.thresholds = nn.Parameter(start.repeat(n_attributes + int(overall), 1))

    def _scores(self, out: Tensor, first: int) -> tuple[Tensor, Tensor | None]:
        """Scores (and logits) of the head output ``out`` for this classifier's scores
        ``first``, ``first + 1``, .. (the attributes from 0, overall after them)."""
        if not self.ordinal:
            return out, None
        if self.thresholds is None:
            logits = out.reshape(len(out), -1, N_THRESHOLDS)
        else:
            # (B, n) -> (B, n, N_THRESHOLDS): each score's one output plus its own thresholds.
            t = self.thresholds[first : first + out.shape[1]]
            logits = out[:, :, None] + t[None].to(out.dtype)
        return ordinal_scores(logits).to(out.dtype), logits

    def forward(
        self, feats: Tensor | Sequence[Tensor], stats: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """``feats``: (B, C, h, w) feature maps, or several (B, C_i, h_i, w_i) on rasters of
        their own, or none (``[]``, with ``stats``). Pooled to the means of their ReLU, then the
        maxes (each in ``feats`` order; for maps of one raster the same vector as pooling their
        concatenation), plus ``stats``.
        """
        relu = [F.relu(f) for f in ([feats] if isinstance(feats, Tensor) else feats)]
        parts = [f.mean(dim=(2, 3)) for f in relu] + [f.amax(dim=(2, 3)) for f in relu]
        if stats is not None:
            # No feature maps (``c_in`` 0, the statistics head): the statistics alone.
            parts.append(stats.to(parts[0].dtype) if parts else stats)
        pooled = torch.cat(parts, dim=1)
        out = self.attributes(pooled)
        if self.skips and stats is not None:
            # (B, n * k) -> (B, n, k): the statistic moves every output of its attribute.
            rows = out.view(len(out), -1, self.outputs_per_score)
            for name, attribute, column in self.skips:
                which = F.one_hot(torch.tensor(attribute), rows.shape[1]).to(out.device, out.dtype)
                bump = F.softplus(getattr(self, name)) * stats[:, column].to(out.dtype)
                rows = rows + bump[:, None, None] * which[None, :, None]
            out = rows.flatten(1)
        attrs, attr_logits = self._scores(out, 0)
        if self.overall is None:
            return attrs, attr_logits
        # overall_grad=False: the overall loss no longer bends the attribute outputs into
        # features for overall (measured: it wipes out contamination; docs/experiment.md).
        head_in = attrs if self.overall_grad else attrs.detach()
        if self.overall_features:
            head_in = torch.cat([head_in, pooled], dim=1)
        overall, overall_logits = self._scores(self.overall(head_in), attrs.shape[1])
        scores = torch.cat([attrs, overall], dim=1)
        if attr_logits is None or overall_logits is None:
            return scores, None
        return scores, torch.cat([attr_logits, overall_logits], dim=1)


class Decoder(nn.Module):
    """Two transposed convolutions and one convolution: features -> (B, 1, H, W) image.

    The convolution runs at the transposed convolutions' output size and only its one-channel
    result is resized to the input size: a 3x3 convolution over 8 channels at 128 x 128 costs
    about 8x as much on a CPU as at 64 x 64 (oneDNN), for a picture that is smooth anyway.
    """

    def __init__(self, cfg: ModelConfig, c_in: int):
        super().__init__()
        w = cfg.width
        self.up1 = nn.ConvTranspose2d(c_in, w, 4, 2, 1)
        self.up2 = nn.ConvTranspose2d(w, w, 4, 2, 1)
        self.out = nn.Conv2d(w, in_channels(cfg), 3, 1, 1)

    def forward(self, feat: Tensor, size: tuple[int, int]) -> Tensor:
        y = self.out(F.relu(self.up2(F.relu(self.up1(F.relu(feat))))))
        if y.shape[-2:] != size:
            # The stem stride (and sizes that are not multiples of 4s) leave the transposed
            # convolutions short of the input size; bilinear resampling makes up the rest.
            y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
        return y


class Attention(nn.Module):
    """Cracking and contamination attention from the primary features (no parameters).

    The channels are split in half (first half cracking, second contamination); each half is
    max-pooled over channels, upsampled to the input size and squashed by a sigmoid.
    Returns (B, 2, H, W) in (0, 1).
    """

    def forward(self, feat: Tensor, size: tuple[int, int]) -> Tensor:
        half = feat.shape[1] // 2
        pooled = torch.stack(
            [feat[:, :half].amax(dim=1), feat[:, half : 2 * half].amax(dim=1)], dim=1
        )
        up = F.interpolate(pooled, size=size, mode="bilinear", align_corners=False)
        return torch.sigmoid(up)


def pool_input(x: Tensor, k: int) -> Tensor:
    """(B, C, kH, kW) model inputs -> (B, C, H, W): channel 0 (the resampled square) averaged
    over each k x k block; with ``extremes`` (C = 3) channel 1 its maximum, channel 2 its
    minimum, so they stay the largest and smallest native pixel under each coarser pixel."""
    if k == 1:
        return x
    parts = [F.avg_pool2d(x[:, :1], k)]
    if x.shape[1] > 1:
        parts += [F.max_pool2d(x[:, 1:2], k), -F.max_pool2d(-x[:, 2:3], k)]
    return torch.cat(parts, dim=1)


class Branch(nn.Module):
    """Feature net + classifier + decoder: the primary branch, or an attribute branch.

    The primary branch regresses the four attributes and overall; an attribute branch regresses
    one attribute from its attention-weighted input and reconstructs that input.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        n_attributes: int,
        overall: bool,
        stem_stride: int,
        answer: bool = False,
    ):
        super().__init__()
        self.features = FeatureNet(cfg, stem_stride)
        c = self.features.out_channels
        self.use_stats = cfg.input_stats
        self.hole_stat = cfg.input_stats and cfg.hole_stat
        self.crack_stat = cfg.input_stats and cfg.crack_stat
        self.crack_profile = cfg.crack_profile
        self.norm = (cfg.norm_mean, cfg.norm_std)
        self.hole_contrast = HOLE_MIN_CONTRAST / cfg.norm_std  # in the normalised input's units
        n_stats = n_stats_of(cfg)
        self.classifier = Classifier(
            c,
            n_attributes,
            cfg.hidden,
            overall,
            n_stats,
            cfg.overall_grad,
            cfg.overall_features,
            cfg.head if answer else "regression",
            stat_skips_of(cfg) if answer else (),
        )
        self.decoder = Decoder(cfg, c)

    def statistics(self, x: Tensor, fine: Tensor | None = None) -> Tensor | None:
        """The statistics the classifier gets (``n_stats_of``) of inputs (B, C, H, W) ->
        (B, n_stats), or None without ``input_stats``. ``fine`` (B, C, kH, kW): the same
        squares before ``pool_input`` (``ModelConfig.stat_px``), which the crack statistics
        are read from, at full resolution."""
        if not self.use_stats:
            return None
        stats = input_stats(x[:, :1])
        if self.crack_stat:
            src, px = (x, 64) if fine is None else (fine, fine.shape[-1])
            cracks = crack_share(
                src, *self.norm, self.hole_contrast, profile=self.crack_profile, max_px=px
            )
            stats = torch.cat([stats, cracks], dim=1)
        if self.hole_stat:
            stats = torch.cat([stats, hole_share(x, self.hole_contrast)], dim=1)
        return stats

    def forward(
        self, x: Tensor, reconstruct: bool = True, fine: Tensor | None = None
    ) -> dict[str, Tensor]:
        feat = self.features(x)
        stats = self.statistics(x, fine)
        scores, logits = self.classifier(feat, stats)
        out = {"features": feat, "scores": scores}
        if logits is not None:
            out["logits"] = logits
        if stats is not None:
            out["stats"] = stats
        if reconstruct:
            out["recon"] = self.decoder(feat, (x.shape[-2], x.shape[-1]))
        return out


def answer_classifier(cfg: ModelConfig, c_in: int) -> Classifier:
    """A classifier of all five scores with the answer's head (``cfg.head``) and skips, on
    ``c_in`` pooled channels (0: the statistics alone) plus the statistics."""
    return Classifier(
        c_in,
        N_ATTRIBUTES,
        cfg.hidden,
        True,
        n_stats_of(cfg),
        cfg.overall_grad,
        cfg.overall_features,
        cfg.head,
        stat_skips_of(cfg),
    )


class Fusion(nn.Module):
    """Fuses the primary and attribute feature maps and predicts the five scores.

    ``cfg.fusion_mix``: a 3x3 convolution mixes the concatenated maps (B, n*C, h, w) down to C
    channels before the classifier pools them; otherwise the classifier pools every branch's
    maps and sees the concatenated (B, 2*n*C) vectors.
    """

    def __init__(self, cfg: ModelConfig, c_in: int, n_branches: int):
        super().__init__()
        self.mix: nn.Module = nn.Identity()
        c_cls = n_branches * c_in
        if cfg.fusion_mix:
            self.mix = nn.Sequential(
                nn.Conv2d(n_branches * c_in, c_in, 3, 1, 1, bias=False), _norm(c_in), nn.ReLU()
            )
            c_cls = c_in
        self.classifier = answer_classifier(cfg, c_cls)

    def forward(
        self, feats: list[Tensor], stats: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """(scores (B, 5), ordinal logits (B, 5, N_THRESHOLDS) or None)."""
        if isinstance(self.mix, nn.Identity):
            # Each branch pooled on its own raster (the attribute branches may be finer).
            return self.classifier(feats, stats)
        h, w = feats[0].shape[-2:]
        same = [f if f.shape[-2:] == (h, w) else F.adaptive_avg_pool2d(f, (h, w)) for f in feats]
        return self.classifier(self.mix(torch.cat(same, dim=1)), stats)


class XCryoNet(nn.Module):
    """The scorer. ``attention=False`` is the primary-only baseline.

    ``forward(x)`` returns a dict:
        ``scores`` (B, 5): the model's answer (fusion for xcryonet, primary for primary);
        ``input`` (B, C, H/k, W/k): what the network saw (``network_input``; k =
        ``cfg.pool_factor``, 1 unless ``cfg.stat_px``; the maps and reconstructions are
        on its raster);
        ``scores_primary`` (B, 5); ``attention`` (B, 2, H, W) in (0, 1);
        ``features_primary`` (B, C, h, w); ``recon_primary`` (B, 1, H, W);
        xcryonet only, per attribute a in (cracking, contamination): ``input_<a>`` (B, 1, H, W)
        the attention-weighted input, ``score_<a>`` (B,), ``features_<a>``, ``recon_<a>``;
        with an ordinal ``cfg.head``, ``logits`` (B, 5, N_THRESHOLDS) of the answer (and
        ``logits_primary`` for the primary variant, whose answer is the primary head);
        xcryonet only, ``scores_fusion`` (B, 5) (and ``logits_fusion``), the fusion's own;
        with ``cfg.stat_head``, ``scores_statistics`` (B, 5) (and ``logits_statistics``) of the
        statistics head, and ``scores`` is the mean of it and the primary or fusion scores
        (without ``logits``: the answer is a mean, not one head's).
    """

    stat_mean: Tensor  # (n_stats,) buffers of the statistics head's standardisation
    stat_scale: Tensor

    def __init__(self, cfg: ModelConfig, attention: bool, variant: str):
        super().__init__()
        self.cfg = cfg
        self.variant = variant
        # cfg.head shapes the classifier that gives the answer only: the primary
        # head of the primary variant, the fusion of xcryonet.
        self.primary = Branch(
            cfg, N_ATTRIBUTES, overall=True, stem_stride=cfg.stem_stride, answer=not attention
        )
        self.attention = Attention()
        self.branches = nn.ModuleDict()
        self.fusion: Fusion | None = None
        if attention:
            for name in ATTRIBUTE_BRANCHES:
                self.branches[name] = Branch(
                    cfg, 1, overall=False, stem_stride=cfg.attribute_stem_stride
                )
            c = self.primary.features.out_channels
            self.fusion = Fusion(cfg, c, 1 + len(ATTRIBUTE_BRANCHES))
        # stat_head: a classifier of the same design on the statistics alone (no feature
        # maps), with a loss of its own; the answer is the mean of its scores and the
        # network's. Trained beside the network, not through it, so its errors differ. It
        # reads them standardised (``fit_stat_scale``): the ice and brightness lie in small
        # differences of the intensity statistics, which a head on the raw numbers misses
        # (docs/experiment.md, "Follow-up 16").
        self.statistics: Classifier | None = None
        if cfg.stat_head:
            n_stats = n_stats_of(cfg)
            self.register_buffer("stat_mean", torch.zeros(n_stats))
            self.register_buffer("stat_scale", torch.ones(n_stats))
            self.statistics = answer_classifier(cfg, 0)

    def forward(self, x: Tensor, reconstruct: Collection[str] | None = None) -> dict[str, Tensor]:
        """Score a batch. ``reconstruct`` names the branches whose decoders run (None = all)."""
        x, fine = self.network_input(x)
        size = (x.shape[-2], x.shape[-1])
        want = set(reconstruct) if reconstruct is not None else {"primary", *self.branches}
        p = self.primary(x, reconstruct="primary" in want, fine=fine)
        out = {"input": x, "scores_primary": p["scores"], "features_primary": p["features"]}
        if "logits" in p:
            out["logits_primary"] = p["logits"]
        if "recon" in p:
            out["recon_primary"] = p["recon"]
        out["attention"] = self.attention(p["features"], size)
        if self.fusion is None:
            out["scores"] = p["scores"]
            if "logits" in p:
                out["logits"] = p["logits"]
            return self._with_statistics(out, p.get("stats"))
        feats = [p["features"]]
        for k, name in enumerate(self.branches):
            xi = x * out["attention"][:, k : k + 1]
            b = self.branches[name](xi, reconstruct=name in want)
            out[f"input_{name}"] = xi
            out[f"score_{name}"] = b["scores"][:, 0]
            out[f"features_{name}"] = b["features"]
            if "recon" in b:
                out[f"recon_{name}"] = b["recon"]
            feats.append(b["features"])
        out["scores"], logits = self.fusion(feats, p.get("stats"))
        out["scores_fusion"] = out["scores"]
        if logits is not None:
            out["logits"] = out["logits_fusion"] = logits
        return self._with_statistics(out, p.get("stats"))

    def network_input(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Inputs (B, C, H, W) -> (what the network sees, the inputs the crack statistics are
        read from or None). With ``cfg.stat_px`` the squares arrive ``cfg.pool_factor`` times
        finer than the network's raster and are pooled to it (``pool_input``)."""
        k = self.cfg.pool_factor
        return (x, None) if k == 1 else (pool_input(x, k), x)

    def input_statistics(self, x: Tensor) -> Tensor | None:
        """The primary classifier's statistics of inputs (B, C, H, W) as ``forward`` takes
        them -> (B, n_stats), or None without ``input_stats``."""
        net, fine = self.network_input(x)
        return self.primary.statistics(net, fine)

    def _with_statistics(self, out: dict[str, Tensor], stats: Tensor | None) -> dict[str, Tensor]:
        """With the statistics head: its outputs, and the answer the mean of its scores and
        the network's."""
        if self.statistics is None or stats is None:
            return out
        # Its skips get the standardised shares: a positive scale, so still monotone.
        scores, logits = self.statistics([], (stats - self.stat_mean) / self.stat_scale)
        out["scores_statistics"] = scores
        if logits is not None:
            out["logits_statistics"] = logits
        out.pop("logits", None)
        out["scores"] = (out["scores"] + scores.to(out["scores"].dtype)) / 2
        return out


@torch.no_grad()
def fit_stat_scale(model: XCryoNet, x: Tensor, batch: int = 256) -> None:
    """Set the statistics head's standardisation (``cfg.stat_head``) to the mean and s.d. of
    each statistic over normalised squares ``x`` (N, C, H, W) (the training squares); a
    statistic that does not vary keeps scale 1. Without the head, nothing to do."""
    if model.statistics is None:
        return
    device = model.stat_mean.device
    parts = [
        model.input_statistics(x[k : k + batch].to(device).float()) for k in range(0, len(x), batch)
    ]
    table = torch.cat(cast(list[Tensor], parts)).double()  # stat_head needs input_stats
    std = table.std(0).nan_to_num(0.0)  # one square: no spread
    model.stat_mean.copy_(table.mean(0))
    model.stat_scale.copy_(torch.where(std > 1e-6, std, torch.ones_like(std)))


def parameter_groups(model: XCryoNet) -> dict[str, list[nn.Parameter]]:
    """Named parameter groups that training phases refer to.

    Names: ``<branch>.<part>`` for branch in primary, cracking, contamination and part in
    features, classifier, decoder; ``fusion``; ``statistics`` (``cfg.stat_head``). Every
    parameter is in exactly one group.
    """
    groups: dict[str, list[nn.Parameter]] = {}
    branches: dict[str, nn.Module] = {"primary": model.primary, **model.branches}
    for bname, branch in branches.items():
        for part in BRANCH_PARTS:
            groups[f"{bname}.{part}"] = list(getattr(branch, part).parameters())
    if model.fusion is not None:
        groups["fusion"] = list(model.fusion.parameters())
    if model.statistics is not None:
        groups["statistics"] = list(model.statistics.parameters())
    return groups


MODELS: dict[str, Callable[..., XCryoNet]] = {}


def register(name: str) -> Callable[[Callable[..., XCryoNet]], Callable[..., XCryoNet]]:
    """Add a model constructor to the registry under ``name``."""

    def deco(fn: Callable[..., XCryoNet]) -> Callable[..., XCryoNet]:
        MODELS[name] = fn
        return fn

    return deco


@register("primary")
def primary(cfg: ModelConfig) -> XCryoNet:
    """The primary branch alone: the paper's no-attention baseline."""
    return XCryoNet(cfg, attention=False, variant="primary")


@register("xcryonet")
def xcryonet(cfg: ModelConfig) -> XCryoNet:
    """The full model: primary, cracking and contamination branches, and fusion."""
    return XCryoNet(cfg, attention=True, variant="xcryonet")


def build_model(
    name: str, cfg: ModelConfig | None = None, **overrides: int | float | str
) -> XCryoNet:
    """Build a registered variant; ``overrides`` replace fields of ``cfg`` (default config)."""
    if name not in MODELS:
        raise InputError("variant", f"unknown model {name!r} (choose from {', '.join(MODELS)})")
    base = asdict(cfg) if cfg is not None else {}
    fields = set(asdict(ModelConfig()))
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise InputError("model", f"unknown setting(s) {', '.join(unknown)}")
    return MODELS[name](ModelConfig(**{**base, **overrides}))


def dihedral_views(x: Tensor) -> list[Tensor]:
    """The 8 flips/rotations of (B, C, H, W) squares (H = W), the identity first.

    View ``4 * f + r`` is ``x`` flipped left-right if ``f``, then turned ``r`` quarter turns.
    """
    views: list[Tensor] = []
    for flip in (False, True):
        base = x.flip(-1) if flip else x
        views.extend(torch.rot90(base, k, dims=(-2, -1)) for k in range(4))
    return views


def undo_dihedral(views: Sequence[Tensor]) -> list[Tensor]:
    """Turn each of ``dihedral_views``' outputs (in its order) back to the original orientation."""
    out: list[Tensor] = []
    for k, v in enumerate(views):
        flip, turns = divmod(k, 4)
        back = torch.rot90(v, -turns, dims=(-2, -1))
        out.append(back.flip(-1) if flip else back)
    return out


def view_mean_outputs(
    model: XCryoNet, x: Tensor, tta: bool, maps: bool = False
) -> tuple[Tensor, Tensor | None]:
    """Scores (B, 5), not clipped, and with ``maps`` the attention (B, 2, P, P), of normalised
    squares x (B, 1, P, P), from one forward over all views (GroupNorm: no batch statistics).

    With ``tta`` both are the mean over the square's 8 flips/rotations; each view's maps are
    turned back to the square's own orientation first, so they stay on the defects.
    """
    views = dihedral_views(x) if tta else [x]
    out = model(torch.cat(views), reconstruct=())
    scores = out["scores"]
    # (views, B, ...) without naming B: torch.export keeps the batch size free (ScoringModel).
    mean_scores = scores.reshape(len(views), -1, scores.shape[-1]).mean(0)
    if not maps:
        return mean_scores, None
    att = out["attention"]
    per_view = att.reshape(len(views), -1, *att.shape[1:]).unbind(0)
    return mean_scores, torch.stack(undo_dihedral(per_view)).mean(0)


@torch.no_grad()
def attention_maps(model: XCryoNet, x: Tensor, tta: bool | None = None) -> Tensor:
    """Cracking and contamination attention for normalised squares x (B, 1, H, W).

    Returns (B, 2, H/k, W/k) float32 in (0, 1), channel 0 cracking, 1 contamination, on the
    network's raster (k = ``cfg.pool_factor``, 1 unless ``cfg.stat_px``). ``tta``
    (None = the model's ``cfg.tta``): the mean of the maps over the square's 8 views, each
    turned back. For the primary variant the maps come from its (unguided) features, so they
    mean little.
    """
    was_training = model.training
    model.eval()
    try:
        _, maps = view_mean_outputs(model, x, model.cfg.tta if tta is None else tta, maps=True)
    finally:
        model.train(was_training)
    assert maps is not None
    return maps.float()
