"""Typed mirror of ``params.yaml``: one frozen dataclass per section.

Loading rejects unknown keys and wrong types, so a typo in ``params.yaml`` or in a
``--set key=value`` override fails loudly instead of being ignored.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from xcryonet.errors import InputError

T = TypeVar("T")


@dataclass(frozen=True)
class SimulateConfig:
    """Grid simulator settings (``simulate:`` in params.yaml)."""

    seed: int = 20200904
    n_grids: int = 12
    out_dir: str = "data/raw"
    labels_path: str = "data/labels.csv"
    truth_dir: str = "data/truth"
    # Layouts are cycled over the grids: epu, serialem, mrc.
    layouts: tuple[str, ...] = ("epu", "serialem", "mrc")
    # Meshes (lines per inch: 200, 300, 400) are cycled out of phase with the layouts, so
    # every layout meets every mesh.
    meshes: tuple[int, ...] = (200, 300, 400)
    # Native pixel size of the simulated tiles (µm/px); real EPU atlases are about 0.47, and
    # 0.52 keeps the 12-grid demo under 300 MB.
    pixel_size_um: float = 0.52
    # Complete squares wanted per grid (paper: 250); the imaged field is sized to hold them.
    squares_per_grid: int = 250
    # Side of one (square) tile in pixels, and the fraction shared with a neighbour. 512 px is
    # about 270 µm, like a real EPU atlas tile (392 x 278 µm); the many tiles of a real atlas
    # are what pins the pixel -> stage map down to about 1 µm despite a 2 µm stage error.
    tile_px: int = 512
    overlap: float = 0.09
    # S.d. of the error of each reported tile stage position, µm per axis.
    stage_error_um: float = 2.0
    # Fraction of squares with a visible defect (SmartScope: about a third).
    defect_fraction: float = 0.33
    # Fraction of the complete squares that get an operator label in labels.csv.
    label_fraction: float = 0.35
    # S.d. of the operator's click on a square's centre, µm per axis.
    label_click_um: float = 2.0
    # Grids simulated in parallel (processes).
    workers: int = 2


@dataclass(frozen=True)
class ExtractConfig:
    """Square extraction settings (``extract:`` in params.yaml)."""

    out_dir: str = "squares"
    # Divide tiled atlases (EPU tiles, SerialEM pieces) by their illumination profile, estimated
    # from the tiles, before stitching: vignetting otherwise makes a square's brightness depend
    # on where it lay in its tile (up to 20 %). A single stitched MRC is used as it is.
    flat_field: bool = True
    # The pitch and orientation are read off the atlas downsampled to about this side (px).
    fourier_px: int = 1024
    # The coarse matching pass runs at about this many pixels per mesh pitch.
    coarse_px_per_pitch: float = 24.0
    # Normalized cross-correlation threshold for a peak to count as a square.
    ncc_threshold: float = 0.3
    # A lattice site below the NCC threshold is still a square when its centre is brighter than
    # the bars around it by this fraction of (open - bar level); sites inside the hull of the
    # squares found are squares whatever their contrast (thick ice, occluded).
    min_contrast: float = 0.25
    # Open-area mask: brighter than bar + open_fraction * (open - bar), with the square's own bar
    # level and the 90th percentile of its footprint as open.
    open_fraction: float = 0.3
    # Crop side in px; 0 = automatic (paper: 640 px for squares of about that size, i.e.
    # crop_px: 640 at paper scale).
    crop_px: int = 0
    # Automatic crop side relative to the turned square's axis-aligned extent,
    # side x (|cos| + |sin|) of the lattice angle.
    crop_margin: float = 1.15
    # Threads for the full-resolution refinement of one grid.
    threads: int = 2
    # Parallel grids.
    workers: int = 2


@dataclass(frozen=True)
class ModelConfig:
    """Model architecture and input contract (``model:`` in params.yaml).

    Attributes:
        width: channels after the stem; the feature net outputs ``2 * width`` channels, split
            in half between the cracking and contamination attention.
        hidden: units of the hidden fully connected layers.
        stem_stride: stride of the first convolution; each ResBlock halves again, so feature
            maps are ``input_px / (4 * stem_stride)`` px (8 x 8 at 64 px, 16 x 16 at 128 px).
        branch_stem_stride: the same for the cracking and contamination branches' feature nets
            (0 = ``stem_stride``). The default 1 gives them 16 x 16 maps at 64 px, twice as fine
            as the primary's 8 x 8, for thin cracks and small specks (the paper's "multi-scale"
            attributes): XCryoNet-SS at 100 labels, cracking MAE 0.48 -> 0.38
            (docs/experiment.md, "Follow-up 3"). Models saved before this field existed were
            built with 0 and load as such.
        input_px: side every square is resampled to before the model sees it. The CPU default,
            64, was chosen by ``bench/train.py``: a 1600-square XCryoNet-SS epoch is about 3x
            cheaper than at 128 px, and hand-crafted features lose little at 64 px (README,
            "The experiment"). The paper used 640 px (a GPU setting).
        input_stats: the classifiers also get the square's global intensity statistics
            (``xcryonet.model.input_stats``); GroupNorm alone hides the absolute level.
        overall_grad: the overall loss back-propagates through the predicted attributes that
            overall is regressed from (the paper's reading); false detaches them, so each
            attribute output answers only to its own label.
        overall_features: the overall head also sees the pooled features (and statistics),
            not only the four attributes.
        fusion_mix: the fusion branch mixes the concatenated branch feature maps with a
            3x3 convolution before pooling; false pools each branch's maps and concatenates
            the pooled vectors (fewer parameters to learn from few labels).
        norm_mean, norm_std: fixed affine normalisation of the relative transmission
            (0 = bars, 1 = vacuum). Fixed rather than per-square statistics so that brightness,
            which is the mean intensity, stays visible to the model.
        tta: predictions are the mean over the square's 8 flips and 90-degree rotations
            (test-time augmentation). The labels do not change under them and training draws
            from the same 8 views, so the mean only removes orientation noise. It costs 8x the
            forward passes and lowered XCryoNet-SS-900's overall MAE from 0.32 to 0.27
            (docs/experiment.md). A prediction-time setting: it does not change training,
            and a run resumes whatever its value.
        extremes: the model also sees, as two more input channels, the largest and the smallest
            native pixel under each of its pixels (``xcryonet.train.local_extremes``).
            Resampling a crop 1.5-4x down averages a crack one native pixel wide, or a small
            speck, into a faint smear; the extremes keep them at full contrast. Primary-FS,
            900 labels, 4 splits: cracking MAE 0.296 -> 0.245, contamination 0.181 -> 0.159
            (docs/experiment.md, "Follow-up 6"). Models saved before this field existed load
            with false.
        head: the classifier that gives the answer (xcryonet's fusion, the primary variant's
            primary head): ``regression`` (each score one output, MSE; the paper),
            ``ordinal`` (each score four logits of P(score > k), k = 0..3, binary
            cross-entropy; the score is the sum of their probabilities) or ``coral`` (the same
            loss and score, but each score's four logits are one output plus four learned
            thresholds, so every threshold moves along the same direction; Cao et al., "Rank
            consistent ordinal regression", 2020; docs/experiment.md, "Follow-up 12"). The
            other heads stay regressions.
        hole_stat: with ``input_stats``, the classifiers also get the share of the opening
            that dark holes in the film cover (``xcryonet.model.hole_share``): contamination
            lying on the film. Models saved before this field existed load with false.
        hole_skip: with ``hole_stat``, the answer's contamination output also gets that share
            directly, times a learnt positive gain (a monotone path the rest of the head
            corrects; docs/experiment.md, "Follow-up 13").
        crack_stat: with ``input_stats``, the classifiers also get the share of the square's
            own opening (without the slivers of its neighbours beyond the bars) that is
            brighter than the opening's film by a share of its headroom to full transmission
            (``xcryonet.model.crack_share``): cracks and broken film (docs/experiment.md,
            "Follow-up 14"). Models saved before this field existed load with false.
        crack_skip: with ``crack_stat``, the answer's cracking output also gets that share
            directly, times a learnt positive gain, as ``hole_skip`` does for contamination.
        crack_profile: with ``crack_stat``, the classifiers get six more numbers after that
            share: the shares above three more margins and three soft shares (the mean excess
            over a margin; ``crack_share(profile=True)``, docs/experiment.md "Follow-up 15").
            Models saved before this field existed load with false.
        stat_head: with ``input_stats``, a classifier of the same design on the statistics
            alone (every one the classifiers get, no feature maps) predicts the five scores
            too, with a loss of its own in the answer's training phase, and the answer is the
            mean of its scores and the network's (docs/experiment.md, "Follow-up 16"). Models
            saved before this field existed load with false.
        stat_px: with ``crack_stat``, the side the square arrives at (0 = ``input_px``): the
            crack statistics are read from it, and the network and every other statistic from
            it pooled down to ``input_px`` (mean, and with ``extremes`` max and min, over
            ``stat_px // input_px`` pixels a side; ``xcryonet.model.pool_input``). A hairline
            crack is a few pixels at 64 px; read at 128 px, the statistics alone score
            cracking against the simulator's truth with 0.054 MAE instead of 0.072 at 900
            labels (a small MLP, ``bench/stat_px_probe.py``; docs/experiment.md, "Follow-up
            17"). A multiple of ``input_px``; models saved before this field existed load
            with 0.
    """

    width: int = 8
    hidden: int = 64
    stem_stride: int = 2
    branch_stem_stride: int = 1
    input_px: int = 64
    norm_mean: float = 0.5
    norm_std: float = 0.3
    input_stats: bool = True
    overall_grad: bool = False
    overall_features: bool = True
    fusion_mix: bool = False
    tta: bool = True
    extremes: bool = False
    head: str = "regression"
    hole_stat: bool = False
    hole_skip: bool = False
    crack_stat: bool = False
    crack_skip: bool = False
    crack_profile: bool = False
    stat_head: bool = False
    stat_px: int = 0

    def __post_init__(self) -> None:
        if self.hole_skip and not (self.hole_stat and self.input_stats):
            raise InputError("model", "hole_skip needs hole_stat and input_stats")
        if self.crack_skip and not (self.crack_stat and self.input_stats):
            raise InputError("model", "crack_skip needs crack_stat and input_stats")
        if self.crack_profile and not (self.crack_stat and self.input_stats):
            raise InputError("model", "crack_profile needs crack_stat and input_stats")
        if self.stat_head and not self.input_stats:
            raise InputError("model", "stat_head needs input_stats")
        if self.head not in ("regression", "ordinal", "coral"):
            raise InputError(
                "model", f"head must be regression, ordinal or coral, got {self.head!r}"
            )
        for name in ("width", "hidden", "stem_stride", "input_px"):
            if getattr(self, name) < 1:
                raise InputError("model", f"{name} must be >= 1, got {getattr(self, name)}")
        if self.branch_stem_stride < 0:
            raise InputError(
                "model", f"branch_stem_stride must be >= 0, got {self.branch_stem_stride}"
            )
        if self.norm_std <= 0:
            raise InputError("model", f"norm_std must be > 0, got {self.norm_std}")
        if self.stat_px and (self.stat_px < self.input_px or self.stat_px % self.input_px):
            raise InputError(
                "model",
                f"stat_px must be 0 or a multiple of input_px ({self.input_px}), "
                f"got {self.stat_px}",
            )
        if self.stat_px and not (self.crack_stat and self.input_stats):
            raise InputError("model", "stat_px needs crack_stat and input_stats")

    @property
    def data_px(self) -> int:
        """The side squares are resampled to for the model: ``stat_px``, else ``input_px``."""
        return self.stat_px or self.input_px

    @property
    def pool_factor(self) -> int:
        """How many input pixels a side the model pools into one network pixel (1: none)."""
        return self.data_px // self.input_px

    @property
    def attribute_stem_stride(self) -> int:
        """The attribute branches' stem stride (``branch_stem_stride``; 0 = ``stem_stride``)."""
        return self.branch_stem_stride or self.stem_stride


@dataclass(frozen=True)
class TrainConfig:
    """Training settings (``train:`` in params.yaml).

    Attributes:
        epochs: epochs; each runs every phase once over the training set.
        batch_size: squares per step.
        lr: Adam learning rate of every phase.
        seed: seeds the model initialisation, the train/test split, the selection of
            labelled/unlabelled squares, shuffling and augmentation.
        test_fraction: share of the labelled squares held out for the test metrics.
        augment: random flips and 90-degree rotations (they keep every label true).
        noise: s.d. of additive Gaussian pixel noise, in normalised units (0 = off).
        device: ``auto`` (cuda if available, else cpu), ``cpu`` or ``cuda``.
        amp: ``auto`` (bf16 autocast on cuda, none on cpu), ``bf16`` or ``off``.
        threads: torch CPU threads (0 = torch's default).
        progress: show tqdm progress bars.
        labelled_fraction: least share of each batch drawn from the labelled squares in a phase
            that mixes supervised and reconstruction losses, when unlabelled squares are present;
            never less than their natural share (the labelled ones are cycled; every unlabelled
            one is seen once per epoch). The default 0.03 (1 in 32) leaves them at their
            natural share, so each labelled square is seen about once per epoch, as in FS:
            0.25 showed 100 labels among 1500 unlabelled 4 times per epoch, and at 75 epochs
            XCryoNet-SS-100's overall MAE was 0.46 against 0.39 (docs/experiment.md). 0 =
            plain shuffling (a varying number of labels per batch).
        fusion_squares: the fusion phase passes over the labelled squares
            ``ceil(fusion_squares / labelled)`` times per epoch (at least once), so that with
            100 labels it gets as many steps as with 400.
        lr_schedule: ``cosine`` (lr decays from ``lr`` to 5 % of it over ``epochs``; a function
            of the epoch alone, so resuming stays exact) or ``constant``.
        recon_weight: weight of the primary reconstruction loss in phase 1 (paper: 1).
        attribute_weight: weight of the attribute branches' supervised loss in phase 1.
        autoencoder_passes: passes of the attribute autoencoder phase per epoch.
    """

    epochs: int = 30
    batch_size: int = 32
    lr: float = 3e-3
    seed: int = 0
    test_fraction: float = 0.15
    augment: bool = True
    noise: float = 0.0
    device: str = "auto"
    amp: str = "auto"
    threads: int = 0
    progress: bool = True
    labelled_fraction: float = 0.03
    fusion_squares: int = 400
    lr_schedule: str = "cosine"
    recon_weight: float = 1.0
    attribute_weight: float = 1.0
    autoencoder_passes: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.labelled_fraction < 1:
            raise InputError(
                "train", f"labelled_fraction must be in [0, 1), got {self.labelled_fraction}"
            )
        if self.autoencoder_passes < 1:
            raise InputError(
                "train", f"autoencoder_passes must be >= 1, got {self.autoencoder_passes}"
            )
        if self.recon_weight < 0 or self.attribute_weight < 0:
            raise InputError("train", "recon_weight and attribute_weight must be >= 0")
        if self.fusion_squares < 0:
            raise InputError("train", f"fusion_squares must be >= 0, got {self.fusion_squares}")
        if self.lr_schedule not in ("cosine", "constant"):
            raise InputError(
                "train", f"lr_schedule must be cosine or constant, got {self.lr_schedule!r}"
            )


@dataclass(frozen=True)
class PipelineConfig:
    """What ``dvc repro`` trains, evaluates and registers (``pipeline:`` in params.yaml).

    Attributes:
        variant: ``xcryonet`` or ``primary``.
        supervision: ``ss`` (labelled + unlabelled squares) or ``fs``.
        labeled: labelled training squares (None = every one not held out).
        unlabeled: unlabelled squares for ``ss`` (None = all).
        gallery: squares in the attention-map gallery logged with each run.
    """

    variant: str = "xcryonet"
    supervision: str = "ss"
    labeled: int | None = None
    unlabeled: int | None = 1500
    gallery: int = 12

    def __post_init__(self) -> None:
        if self.variant not in ("xcryonet", "primary"):
            raise InputError(
                "pipeline", f"variant must be xcryonet or primary, got {self.variant!r}"
            )
        if self.supervision not in ("ss", "fs"):
            raise InputError("pipeline", f"supervision must be ss or fs, got {self.supervision!r}")


@dataclass(frozen=True)
class MlflowConfig:
    """Tracking and registry (``mlflow:`` in params.yaml).

    Attributes:
        tracking_uri: the tracking store; a relative ``sqlite:///`` path is taken from the
            current folder. The ``MLFLOW_TRACKING_URI`` environment variable overrides it.
        artifact_root: folder (or URI) for the artifacts of a newly created experiment; a
            relative folder sits beside the SQLite file.
        experiment: experiment name.
        registered_model: the registry's model name; ``register`` sets its ``challenger``
            alias and moves ``champion`` only when the challenger is better.
        metric: the held-out score that decides promotion (MAE, lower is better).
    """

    tracking_uri: str = "sqlite:///mlruns.db"
    artifact_root: str = "mlartifacts"
    experiment: str = "xcryonet"
    registered_model: str = "xcryonet"
    metric: str = "overall"


@dataclass(frozen=True)
class TuneConfig:
    """Optuna tuning (``tune:`` in params.yaml).

    Attributes:
        storage: the study's RDB URL (a relative ``sqlite:///`` path is taken from the current
            folder); any SQLAlchemy database URL lets workers on many machines share it.
        study: study name.
        trials: trials per ``xcryonet tune`` (``--trials`` overrides).
        epochs: epochs of each trial.
        warmup_epochs: epochs before the median pruner may stop a trial.
        val_fraction: share of the labelled training squares each trial validates on (the
            held-out test squares are never used).
        seed: seeds the TPE sampler.
    """

    storage: str = "sqlite:///optuna.db"
    study: str = "xcryonet"
    trials: int = 8
    epochs: int = 10
    warmup_epochs: int = 3
    val_fraction: float = 0.2
    seed: int = 0


@dataclass(frozen=True)
class Params:
    """All settings, as in ``params.yaml``."""

    simulate: SimulateConfig = field(default_factory=SimulateConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)


def _check_type(value: Any, tp: Any, where: str, source: str) -> Any:
    """Return ``value`` converted to ``tp`` or raise InputError (ints are accepted as floats)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise InputError(source, f"{where} must be a mapping, got {type(value).__name__}")
        return from_dict(tp, value, where, source)  # type: ignore[arg-type]
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(value, arg, where, source)
            except InputError as err:
                errors.append(err.problem)
        raise InputError(source, errors[0] if errors else f"{where} has a wrong type")
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise InputError(source, f"{where} must be a list, got {type(value).__name__}")
        (item_tp, *_rest) = typing.get_args(tp)
        return tuple(_check_type(v, item_tp, f"{where}[{i}]", source) for i, v in enumerate(value))
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InputError(source, f"{where} must be a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(source, f"{where} must be an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise InputError(source, f"{where} must be true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise InputError(source, f"{where} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp!r} at {where}")


def from_dict(cls: type[T], data: dict[str, Any], where: str = "", source: str = "params") -> T:
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise InputError(source, f"unknown key {key!r} (known: {', '.join(sorted(names))})")
    kwargs = {
        k: _check_type(v, hints[k], f"{where}.{k}" if where else k, source) for k, v in data.items()
    }
    return cls(**kwargs)


def to_dict(params: Any) -> dict[str, Any]:
    """Plain nested dict of a config dataclass (tuples become lists), e.g. for logging."""

    def conv(v: Any) -> Any:
        if isinstance(v, tuple | list):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return conv(dataclasses.asdict(params))


def _parse_override(text: str) -> tuple[list[str], Any]:
    """``"extract.crop_px=512"`` -> (["extract", "crop_px"], 512), the value parsed as YAML."""
    if "=" not in text:
        raise InputError("--set", f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw)


# The params file every command reads unless told otherwise, relative to the working folder.
DEFAULT_PARAMS = "params.yaml"


def load_params(path: str | Path | None = DEFAULT_PARAMS, overrides: list[str] = ()) -> Params:  # type: ignore[assignment]
    """Load a params file plus ``--set`` overrides.

    ``path`` None gives the defaults; the default name ``params.yaml`` gives that file when the
    working folder has one, else the defaults (a command run outside a project); any other path
    must exist, so a mistyped ``--params`` is an error, not a silent run on the defaults.
    """
    data: dict[str, Any] = {}
    if path is not None and not Path(path).exists():
        if str(path) != DEFAULT_PARAMS:
            raise InputError(path, "does not exist")
        path = None
    source = str(path) if path is not None else "params"
    if path is not None and Path(path).exists():
        try:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            raise InputError(path, f"is not valid YAML ({err})") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise InputError(path, "must be a mapping of sections")
        data = loaded
    for text in overrides:
        keys, value = _parse_override(text)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise InputError("--set", f"{text!r}: {k} is not a section")
        node[keys[-1]] = value
    return from_dict(Params, data, "", source)


def profile_overrides(path: str | Path) -> list[str]:
    """``section.key=value`` overrides of a params profile (a partial params.yaml), checked
    against the config types. ``dvc exp run -S`` and ``--set`` take them as they are."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(path, "does not exist") from None
    except yaml.YAMLError as err:
        raise InputError(path, f"is not valid YAML ({err})") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise InputError(path, "must be a mapping of sections, each a mapping of keys")
    out = []
    for section, values in data.items():
        for key, value in values.items():
            text = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...")
            out.append(f"{section}.{key}={text.strip()}")
    try:
        load_params(None, out)
    except InputError as err:
        raise InputError(path, err.problem) from None
    return out
