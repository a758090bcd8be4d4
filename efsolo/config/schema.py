"""The parameters' schema: typed, frozen dataclasses, one per section of ``params.yaml``, each
validating its own values on construction (one line naming the key, e.g.
``freemask.score_threshold must be in [0, 1], got 1.5``)."""
from __future__ import annotations

from efsolo.utils.errors import EfsoloError

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal



class ParamsError(EfsoloError):
    """An invalid value, type or key in the params file (one-line message)."""


def require(ok: bool, key: str, msg: str, value: Any) -> None:
    """Raise a one-line ParamsError naming ``key`` and the value when ``ok`` is false."""
    if not ok:
        raise ParamsError(f"{key} {msg}, got {value!r}")


def _in_unit(key: str, value: float) -> None:
    require(0.0 <= value <= 1.0, key, "must be in [0, 1]", value)


def _positive(key: str, value: float) -> None:
    require(value > 0, key, "must be > 0", value)


def _non_negative(key: str, value: float) -> None:
    require(value >= 0, key, "must be >= 0", value)


@dataclass(frozen=True)
class SyntheticParams:
    """The embedded demo dataset generated from images shipped with scikit-image."""

    num_train: int = 320
    num_val: int = 80
    image_size: int = 160
    min_objects: int = 2
    max_objects: int = 6
    look: Literal["gradient", "photo"] = "gradient"

    def __post_init__(self) -> None:
        _positive("data.synthetic.num_train", self.num_train)
        _positive("data.synthetic.num_val", self.num_val)
        require(self.image_size >= 32, "data.synthetic.image_size", "must be >= 32", self.image_size)
        require(1 <= self.min_objects <= self.max_objects, "data.synthetic.min_objects",
               "must be >= 1 and <= data.synthetic.max_objects", self.min_objects)


@dataclass(frozen=True)
class DataParams:
    source: Literal["synthetic", "coco", "folder", "voc"] = "synthetic"
    train_images: tuple[str, ...] = ()
    val_images: tuple[str, ...] = ()
    val_annotations: str = ""
    voc_image_set: str = ""
    synthetic: SyntheticParams = field(default_factory=SyntheticParams)

    def __post_init__(self) -> None:
        if self.source in ("coco", "folder"):
            require(len(self.train_images) > 0, "data.train_images",
                   f"must name at least one folder when data.source is {self.source}", self.train_images)
            require(len(self.val_images) > 0, "data.val_images",
                   f"must name at least one folder when data.source is {self.source}", self.val_images)
        if self.source == "coco":
            require(bool(self.val_annotations), "data.val_annotations",
                   "must name a COCO instances json when data.source is coco", self.val_annotations)
        if self.source == "voc":
            require(len(self.val_images) > 0, "data.val_images",
                   "must name the VOC JPEGImages folder when data.source is voc", self.val_images)
            require(bool(self.val_annotations), "data.val_annotations",
                   "must name the VOC Annotations folder when data.source is voc", self.val_annotations)


@dataclass(frozen=True)
class PretrainParams:
    """DenseCL-style self-supervised pretraining (used when backbone.weights is empty)."""

    iters: int = 300
    batch_size: int = 32
    crop_size: int = 96
    lr: float = 0.05
    weight_decay: float = 1e-4
    momentum: float = 0.99
    queue_size: int = 2048
    temperature: float = 0.2
    dense_weight: float = 0.5
    proj_dim: int = 128
    color_jitter: float = 0.4  # MoCo v2 / DenseCL: brightness, contrast, saturation 0.4, hue 0.1
    grayscale_prob: float = 0.2
    dense_level: str = "c5"  # DenseCL: the dense head and its correspondence on C5; c4 or c3: finer grids

    def __post_init__(self) -> None:
        _non_negative("backbone.pretrain.iters", self.iters)
        require(self.batch_size >= 2, "backbone.pretrain.batch_size", "must be >= 2", self.batch_size)
        require(self.crop_size >= 32, "backbone.pretrain.crop_size", "must be >= 32", self.crop_size)
        _positive("backbone.pretrain.lr", self.lr)
        _non_negative("backbone.pretrain.weight_decay", self.weight_decay)
        require(0.0 <= self.momentum < 1.0, "backbone.pretrain.momentum", "must be in [0, 1)", self.momentum)
        require(self.queue_size >= self.batch_size, "backbone.pretrain.queue_size",
               "must be >= backbone.pretrain.batch_size", self.queue_size)
        _positive("backbone.pretrain.temperature", self.temperature)
        _in_unit("backbone.pretrain.dense_weight", self.dense_weight)
        _positive("backbone.pretrain.proj_dim", self.proj_dim)
        _in_unit("backbone.pretrain.color_jitter", self.color_jitter)
        _in_unit("backbone.pretrain.grayscale_prob", self.grayscale_prob)
        require(self.dense_level in ("c3", "c4", "c5"), "backbone.pretrain.dense_level", "must be c3, c4 or c5",
                self.dense_level)


@dataclass(frozen=True)
class BackboneParams:
    arch: Literal["resnet18", "resnet34", "resnet50", "resnet101"] = "resnet50"
    weights: str = ""
    pretrain: PretrainParams = field(default_factory=PretrainParams)


@dataclass(frozen=True)
class FreeMaskParams:
    """Free Mask (method reference, section 1); every threshold is a parameter."""

    short_side: int = 800
    max_side: int = 1333
    feature_level: Literal["c3", "c4", "c5"] = "c5"
    # other levels whose features, brought to feature_level's grid (average-pooled or bilinear), are
    # concatenated with it, each block L2-normalised per position (empty: feature_level alone, the paper)
    concat_levels: tuple[Literal["c2", "c3", "c4", "c5"], ...] = ()
    trunk_output_stride: Literal[8, 16, 32] = 32  # 32: the plain trunk; 16 / 8 dilate its last stage(s)
    query_scales: tuple[float, ...] = (1.0, 0.5, 0.25)
    mask_threshold: float = 0.5
    min_pixels: int = 1
    nms: Literal["matrix", "fast"] = "matrix"
    nms_sigma: float = 2.0
    fast_nms_iou: float = 0.5
    keep_top: int = 20
    pre_nms_top: int = 0
    score_threshold: float = 0.7
    max_box_width: float = 0.95
    top_exclude: float = 0.2
    max_border_fraction: float = 1.0  # masks covering more of the image's outermost pixels are dropped (1: off)
    split_components: bool = False
    component_min_fraction: float = 0.1
    embed_dim: int = 128
    embed_method: Literal["linear", "random"] = "linear"

    def __post_init__(self) -> None:
        require(self.short_side >= 32, "freemask.short_side", "must be >= 32", self.short_side)
        require(self.max_side >= self.short_side, "freemask.max_side", "must be >= freemask.short_side",
               self.max_side)
        require(len(self.query_scales) > 0 and all(0 < s <= 1 for s in self.query_scales),
               "freemask.query_scales", "must be a non-empty list of factors in (0, 1]", self.query_scales)
        _in_unit("freemask.mask_threshold", self.mask_threshold)
        _non_negative("freemask.min_pixels", self.min_pixels)
        _positive("freemask.nms_sigma", self.nms_sigma)
        _in_unit("freemask.fast_nms_iou", self.fast_nms_iou)
        _positive("freemask.keep_top", self.keep_top)
        _non_negative("freemask.pre_nms_top", self.pre_nms_top)
        _in_unit("freemask.score_threshold", self.score_threshold)
        _in_unit("freemask.max_box_width", self.max_box_width)
        _in_unit("freemask.top_exclude", self.top_exclude)
        _in_unit("freemask.max_border_fraction", self.max_border_fraction)
        require(self.feature_level not in self.concat_levels and len(set(self.concat_levels)) == len(self.concat_levels),
                "freemask.concat_levels", "must not repeat a level or freemask.feature_level", self.concat_levels)
        _in_unit("freemask.component_min_fraction", self.component_min_fraction)
        _positive("freemask.embed_dim", self.embed_dim)


@dataclass(frozen=True)
class ModelSettings:
    """The SOLO network's sizes (``freesolo.model``); ``solo_model.SOLOArch`` extends them with the
    backbone and the embedding width. Defaults are the paper's: FPN 256, head 512 x 4 convs, mask
    branch 128 -> 256, grids 40 .. 12."""

    fpn_channels: int = 256
    head_channels: int = 512
    head_convs: int = 4
    mask_channels: int = 128
    kernel_dim: int = 256
    grids: tuple[int, ...] = (40, 36, 24, 16, 12)
    freeze_at: int = 2  # trunk stages kept fixed: 0 none, 1 the stem, 2 + res2 (detectron2's default), ... 5 all
    mask_stride: int = 4  # the mask features' stride: 4 (SOLOv2) | 2 (upsampled, fused with the image at stride 2)

    def __post_init__(self) -> None:
        k = "freesolo.model."
        for name in ("fpn_channels", "head_channels", "head_convs", "mask_channels", "kernel_dim"):
            _positive(k + name, getattr(self, name))
        require(len(self.grids) == 5 and all(g > 0 for g in self.grids), k + "grids",
               "must be 5 positive grid sizes (levels of stride 8, 8, 16, 32, 32)", self.grids)
        require(0 <= self.freeze_at <= 5, k + "freeze_at", "must be 0 (train all) to 5 (trunk fixed)", self.freeze_at)
        require(self.mask_stride in (2, 4), k + "mask_stride", "must be 4 or 2", self.mask_stride)


@dataclass(frozen=True)
class InputSettings:
    """Training inputs (``freesolo.input``): multi-scale short sides, the long-side cap, and the
    chance that a strong view gets objects copy-pasted from the batch."""

    train_short_sides: tuple[int, ...] = (640, 672, 704, 736, 768, 800)
    max_side: int = 1333
    copy_paste_prob: float = 0.5

    def __post_init__(self) -> None:
        k = "freesolo.input."
        require(len(self.train_short_sides) > 0 and all(s >= 32 for s in self.train_short_sides),
               k + "train_short_sides", "must be a non-empty list of sizes >= 32", self.train_short_sides)
        _positive(k + "max_side", self.max_side)
        _in_unit(k + "copy_paste_prob", self.copy_paste_prob)


@dataclass(frozen=True)
class LossSettings:
    """FreeSOLO's loss (``freesolo.loss``; method reference, section 3): the level each object is
    assigned to by scale, the mask terms' weights and the category focal loss."""

    scale_ranges: tuple[tuple[float, float], ...] = ((1, 96), (48, 192), (96, 384), (192, 768), (384, 2048))
    gamma: float = 0.1  # average projection weight
    mu: float = 0.4  # semantic embedding weight
    pairwise_weight: float = 1.0
    pairwise_colour_threshold: float = 0.3
    pairwise_dilation: int = 2
    pairwise_warmup: int = 1000
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    centre_sigma: float = 0.2
    drop_loss_iou: float = 0.0  # > 0: CutLER's DropLoss on the category cells (losses.drop_loss_weights); 0: off
    level_average: Literal["pooled", "per_level"] = "pooled"  # mask terms: a mean over every positive cell (ours)
    #   | per_level: a mean within each FPN level, then over the levels with positives (the FreeSOLO release)

    def __post_init__(self) -> None:
        k = "freesolo.loss."
        require(len(self.scale_ranges) == 5 and all(0 <= lo < hi for lo, hi in self.scale_ranges), k + "scale_ranges",
               "must be 5 [low, high] pairs with low < high", self.scale_ranges)
        _positive(k + "pairwise_dilation", self.pairwise_dilation)
        for name in ("pairwise_colour_threshold", "focal_alpha", "centre_sigma", "drop_loss_iou"):
            _in_unit(k + name, getattr(self, name))
        for name in ("gamma", "mu", "pairwise_weight", "pairwise_warmup", "focal_gamma"):
            _non_negative(k + name, getattr(self, name))


@dataclass(frozen=True)
class SolverSettings:
    """The optimisation (``freesolo.solver``): SGD with momentum, a linear warm-up, then a constant,
    step or cosine learning rate; optional moving average of the weights."""

    iters: int = 30000
    batch_size: int = 8  # images an iteration (each gives a weak and a strong view)
    lr: float = 0.001
    momentum: float = 0.9
    weight_decay: float = 0.0001
    warmup_iters: int = 1000
    warmup_factor: float = 0.01
    lr_schedule: Literal["constant", "step", "cosine"] = "constant"
    lr_steps: tuple[float, ...] = (0.67, 0.89)  # step schedule: lr x 0.1 at these fractions of iters
    clip_grad_norm: float = 35.0  # 0 = off
    ema_decay: float = 0.0  # > 0: the model is an exponential moving average of the weights

    def __post_init__(self) -> None:
        k = "freesolo.solver."
        for name in ("iters", "batch_size", "lr"):
            _positive(k + name, getattr(self, name))
        _in_unit(k + "momentum", self.momentum)
        _in_unit(k + "warmup_factor", self.warmup_factor)
        for name in ("weight_decay", "warmup_iters", "clip_grad_norm"):
            _non_negative(k + name, getattr(self, name))
        require(0 <= self.ema_decay < 1, k + "ema_decay", "must be in [0, 1)", self.ema_decay)
        require(all(0 < f < 1 for f in self.lr_steps) and list(self.lr_steps) == sorted(self.lr_steps),
               k + "lr_steps", "must be increasing fractions of iters in (0, 1)", self.lr_steps)


@dataclass(frozen=True)
class TestSettings:
    """SOLO inference (``freesolo.test``; method reference, section 4): input size, candidates by
    category score, maskness-weighted scores, Matrix NMS, at most ``max_per_image`` instances."""

    __test__ = False  # not a pytest test class

    short_side: int = 800
    max_side: int = 1333
    score_threshold: float = 0.1
    mask_threshold: float = 0.5
    nms_pre: int = 500
    update_threshold: float = 0.05
    max_per_image: int = 100
    nms_sigma: float = 2.0
    maskness_power: float = 1.0  # score = category score x maskness ** this (SOLOv2, the release: 1)

    def __post_init__(self) -> None:
        k = "freesolo.test."
        for name in ("short_side", "max_side", "nms_pre", "max_per_image", "nms_sigma", "maskness_power"):
            _positive(k + name, getattr(self, name))
        for name in ("score_threshold", "mask_threshold", "update_threshold"):
            _in_unit(k + name, getattr(self, name))


@dataclass(frozen=True)
class FreeSOLOParams:
    """FreeSOLO self-training (method reference, sections 2-4): one section per concern, each the
    settings object its module takes. Defaults are the paper's."""

    model: ModelSettings = field(default_factory=ModelSettings)
    input: InputSettings = field(default_factory=InputSettings)
    loss: LossSettings = field(default_factory=LossSettings)
    solver: SolverSettings = field(default_factory=SolverSettings)
    test: TestSettings = field(default_factory=TestSettings)
    rounds: int = 1  # self-training rounds, each on the previous round's predictions
    relabel_score: float = 0.3
    relabel_max: int = 20

    def __post_init__(self) -> None:
        _positive("freesolo.rounds", self.rounds)
        _positive("freesolo.relabel_max", self.relabel_max)
        _in_unit("freesolo.relabel_score", self.relabel_score)


@dataclass(frozen=True)
class ExemplarParams:
    """Exemplar knowledge abstraction (paper section 3.3)."""

    num_images: int = 80
    grabcut_rect_margin: float = 0.05
    grabcut_iterations: int = 5
    crop_margin: float = 0.1
    refine_min_overlap: float = 0.5
    refine_fallback: Literal["grabcut", "none"] = "grabcut"  # a crop no FreeSOLO mask fits: its GrabCut mask
    min_pool: int = 8  # exemplar_freesolo stops when the pool holds fewer exemplars

    def __post_init__(self) -> None:
        _non_negative("exemplar.min_pool", self.min_pool)
        _positive("exemplar.num_images", self.num_images)
        require(0 <= self.grabcut_rect_margin < 0.5, "exemplar.grabcut_rect_margin", "must be in [0, 0.5)",
               self.grabcut_rect_margin)
        _positive("exemplar.grabcut_iterations", self.grabcut_iterations)
        _non_negative("exemplar.crop_margin", self.crop_margin)
        _in_unit("exemplar.refine_min_overlap", self.refine_min_overlap)


@dataclass(frozen=True)
class EECParams:
    """Exemplar embedding contrastive module (paper section 3.4); paper defaults, except where the
    paper read literally cannot train: the temperature (at the paper's 0.02 a used image's loss
    is capped at log(1 + exp(-(alpha - beta) / tau)) = 1.4e-11), centring and the exemplar view
    (README, "Exemplars and the EEC loss")."""

    weight: float = 1.3
    # thresholds: absolute (the paper): alpha and beta are cosines (0.8, 0.3). quantile: they are
    # quantiles of the cosines the pool stage measures on training images (exemplars.eec.selection_thresholds):
    # about 1 - alpha of the images find a positive at the start, whatever the trunk and data
    thresholds: Literal["quantile", "absolute"] = "quantile"
    alpha: float = 0.5
    beta: float = 0.3
    min_frac_used: float = 0.1  # exemplar_freesolo stops when the EEC engages on fewer of the images
    calibration_images: int = 512  # training images the pool stage measures the cosines on (seeded)
    tau: float = 0.5  # paper: 0.02, which caps a used image's loss at 1.4e-11 (README): no gradient
    granularity: Literal["image", "instance"] = "image"
    max_instances: int = 5
    feature_level: Literal["c3", "c4", "c5"] = "c5"
    upsample: int = 2
    pool_refresh: int = 0
    exemplar_short_side: int = 800
    exemplar_max_side: int = 1333
    exemplar_view: Literal["scene", "crop"] = "scene"  # crop: the masked crop on black (paper as read)
    logits: Literal["cosine", "projection"] = "cosine"  # the selecting cosines / tau (paper) | a projection head's
    centre: bool = True  # select on cosines of features centred on the pool's mean
    proj_dim: int = 128  # the projection head's output size (logits: projection)
    proj_tau: float = 0.2  # its temperature
    start_iter: int = 0  # 0: from scratch (paper); N: from FreeSOLO's state after N iterations

    def __post_init__(self) -> None:
        _non_negative("eec.weight", self.weight)
        _positive("eec.proj_dim", self.proj_dim)
        _positive("eec.proj_tau", self.proj_tau)
        _non_negative("eec.start_iter", self.start_iter)
        if self.thresholds == "absolute":
            require(-1 <= self.beta < self.alpha <= 1, "eec.alpha",
                   f"must be greater than eec.beta ({self.beta}) and both in [-1, 1] (cosines: eec.thresholds is "
                   f"absolute)", self.alpha)
        else:
            for name in ("alpha", "beta"):
                require(0 < getattr(self, name) < 1, f"eec.{name}",
                       "must be in (0, 1) (a quantile: eec.thresholds is quantile)", getattr(self, name))
        _in_unit("eec.min_frac_used", self.min_frac_used)
        _positive("eec.calibration_images", self.calibration_images)
        _positive("eec.tau", self.tau)
        _positive("eec.max_instances", self.max_instances)
        _positive("eec.upsample", self.upsample)
        _non_negative("eec.pool_refresh", self.pool_refresh)
        _positive("eec.exemplar_short_side", self.exemplar_short_side)
        _positive("eec.exemplar_max_side", self.exemplar_max_side)


OVERLAY_MIN_SCORE = 0.15  # overlays draw instances from this score (the report's and efsolo predict's default)


@dataclass(frozen=True)
class ReportParams:
    """Overlays of the same val images under every model (the ``report`` stage)."""

    num_images: int = 8
    min_score: float = OVERLAY_MIN_SCORE
    max_instances: int = 20

    def __post_init__(self) -> None:
        _positive("report.num_images", self.num_images)
        _in_unit("report.min_score", self.min_score)
        _positive("report.max_instances", self.max_instances)


MODELS = ("freemask", "freesolo", "exemplar_freesolo")  # the models the pipeline trains or computes
DATA_METRICS = "data.json"  # under paths.metrics: the data stage's counts (each split's images, objects, ignored)


@dataclass(frozen=True)
class PathSettings:
    """Where the stages write, relative to the repository root. ``dvc.yaml`` reads these keys
    (``${paths.*}``) and ``efsolo.pipeline.Layout`` builds every file path from the same keys. No
    stage declares them as params: a moved output is a changed stage definition already."""

    data: str = "data/prepared"   # manifests, images and ground truth
    models: str = "models"        # <model>.pt, backbone.pt, freesolo_start.pt
    pseudo: str = "pseudo"        # freemask/: Free Mask's training pseudo-labels and embeddings
    predictions: str = "predictions"  # <model>/val.json: every model's val predictions (COCO results)
    exemplars: str = "exemplars"  # crops, refined objects, the exemplar pool
    checkpoints: str = "checkpoints"  # <stage>/: training state and finished shards (resumable stages)
    dvclive: str = "dvclive"      # <stage>/: training curves
    metrics: str = "metrics"      # <model>.json, pr/<model>/, train/<model>.json
    reports: str = "reports"      # overlays/

    def __post_init__(self) -> None:
        seen: dict[str, str] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            key = f"paths.{f.name}"
            require(bool(value.strip()), key, "must be a non-empty folder", value)
            norm = Path(value)
            require(not norm.is_absolute() and ".." not in norm.parts, key,
                   "must be a folder inside the repository (relative, without ..)", value)
            require(str(norm) not in seen, key, f"must differ from paths.{seen.get(str(norm))}", value)
            seen[str(norm)] = f.name


@dataclass(frozen=True)
class PretrainRuntime:
    log_every: int = 10
    checkpoint_every: int = 50

    def __post_init__(self) -> None:
        _positive("runtime.pretrain.log_every", self.log_every)
        _positive("runtime.pretrain.checkpoint_every", self.checkpoint_every)


@dataclass(frozen=True)
class FreeMaskRuntime:
    batch_size: int = 8  # images an inference batch (images of one size are batched together)
    shard_size: int = 2000  # images a shard: finished shards are kept, an interrupted labelling resumes

    def __post_init__(self) -> None:
        _positive("runtime.freemask.batch_size", self.batch_size)
        _non_negative("runtime.freemask.shard_size", self.shard_size)


@dataclass(frozen=True)
class TrainingRuntime:
    log_every: int = 20
    checkpoint_every: int = 500
    eval_every: int = 0  # > 0: val segm AP / AP50 every N iterations into DVCLive (learning curves)

    def __post_init__(self) -> None:
        _positive("runtime.freesolo.log_every", self.log_every)
        _positive("runtime.freesolo.checkpoint_every", self.checkpoint_every)
        _non_negative("runtime.freesolo.eval_every", self.eval_every)


@dataclass(frozen=True)
class RuntimeParams:
    """How the stages run, not what they compute. No stage declares these in ``dvc.yaml``, so
    changing one re-runs nothing (``dvc repro -f -s <stage>`` applies it to a finished stage).
    The trainings' results do not depend on the logging, checkpoint or evaluation intervals
    (tests/test_train.py); the device can (``precision: auto`` is bfloat16 on CUDA and on CPUs with
    bf16 instructions, float32 elsewhere; every stage records the precision it used)."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    pretrain: PretrainRuntime = field(default_factory=PretrainRuntime)
    freemask: FreeMaskRuntime = field(default_factory=FreeMaskRuntime)
    freesolo: TrainingRuntime = field(default_factory=TrainingRuntime)  # FreeSOLO and Exemplar-FreeSOLO


@dataclass(frozen=True)
class Params:
    seed: int = 0
    data: DataParams = field(default_factory=DataParams)
    backbone: BackboneParams = field(default_factory=BackboneParams)
    freemask: FreeMaskParams = field(default_factory=FreeMaskParams)
    freesolo: FreeSOLOParams = field(default_factory=FreeSOLOParams)
    exemplar: ExemplarParams = field(default_factory=ExemplarParams)
    eec: EECParams = field(default_factory=EECParams)
    report: ReportParams = field(default_factory=ReportParams)
    paths: PathSettings = field(default_factory=PathSettings)
    models: tuple[str, ...] = MODELS  # evaluated (dvc.yaml's evaluate foreach), drawn by the report
    # the networks' arithmetic in pretraining, Free Mask and both trainings: auto (bfloat16 on CUDA and
    # on CPUs with bf16 instructions, float32 elsewhere) | float32 | bfloat16. It changes results: the
    # stages that train or label declare it, and record the precision they used
    precision: Literal["auto", "float32", "bfloat16"] = "auto"
    runtime: RuntimeParams = field(default_factory=RuntimeParams)

    def __post_init__(self) -> None:
        require(bool(self.models) and set(self.models) <= set(MODELS) and len(set(self.models)) == len(self.models),
               "models", f"must be distinct names among {', '.join(MODELS)}", list(self.models))
        iters = self.freesolo.solver.iters
        require(self.eec.start_iter < iters, "eec.start_iter", f"must be less than freesolo.solver.iters ({iters})",
               self.eec.start_iter)
