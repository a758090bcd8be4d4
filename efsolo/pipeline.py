"""The pipeline's stages: each hands one library function its files and its settings objects.

``stages/*.py`` and the ``efsolo`` CLI both call these functions, so there is one wiring of
params to code. Every path comes from ``params.yaml``'s ``paths`` (``Layout``), the keys that
``dvc.yaml`` reads as ``${paths.*}``.
"""
from __future__ import annotations

import dataclasses
import resource
import sys
import time
from functools import wraps
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from efsolo.config import DATA_METRICS, MODELS, Params, PathSettings, load_params, to_dict
from efsolo.utils.errors import EfsoloError

if TYPE_CHECKING:
    import torch


@dataclasses.dataclass(frozen=True)
class Layout:
    """Every file and folder the stages read and write, built from ``params.yaml``'s ``paths``:
    the keys ``dvc.yaml`` reads as ``${paths.*}``, so the code and the pipeline agree by
    construction (tests/test_dvc_deps.py checks each stage's outs against these)."""

    paths: PathSettings = PathSettings()

    @property
    def data(self) -> Path:
        return Path(self.paths.data)

    @property
    def train_manifest(self) -> Path:
        return self.data / "train.json"

    @property
    def val_manifest(self) -> Path:
        return self.data / "val.json"

    @property
    def val_gt(self) -> Path:
        return self.data / "val_gt.json"

    def model(self, name: str) -> Path:
        """``backbone``, ``freesolo``, ``exemplar_freesolo``, or ``freesolo_start`` (FreeSOLO's
        training state after ``eec.start_iter`` iterations)."""
        return Path(self.paths.models) / f"{name}.pt"

    @property
    def freemask(self) -> Path:
        """Free Mask's training pseudo-labels, their embeddings and its stats."""
        return Path(self.paths.pseudo) / "freemask"

    def predictions(self, model: str) -> Path:
        """A model's val predictions (COCO results; Free Mask's are its val pseudo-labels)."""
        return Path(self.paths.predictions) / model / "val.json"

    def checkpoints(self, stage: str) -> Path:
        return Path(self.paths.checkpoints) / stage

    def live(self, stage: str) -> Path:
        return Path(self.paths.dvclive) / stage

    @property
    def exemplars(self) -> Path:
        return Path(self.paths.exemplars)

    @property
    def pool(self) -> Path:
        return self.exemplars / "pool.pt"

    @property
    def metrics(self) -> Path:
        return Path(self.paths.metrics)

    @property
    def data_metrics(self) -> Path:
        """Each split's images, objects and ignore regions (the ``data`` stage's metrics)."""
        return self.metrics / DATA_METRICS

    @property
    def overlays(self) -> Path:
        return Path(self.paths.reports) / "overlays"


def _device(p: Params) -> torch.device:
    """The torch device ``runtime.device`` names (``auto``: CUDA when present)."""
    from efsolo.modeling.backbone import resolve_device

    return resolve_device(p.runtime.device)


def _precision(p: Params) -> str:
    """The networks' arithmetic ``precision`` resolves to on this machine's device (float32 or bfloat16)."""
    from efsolo.modeling.backbone import resolve_precision

    return resolve_precision(p.precision, _device(p))


def data(p: Params) -> dict:
    """Prepare both splits (``paths.data``) and write their counts as DVC metrics (``data.json``)."""
    from efsolo.data.datasets import data_metrics, prepare_dataset
    from efsolo.utils import atomic

    files = Layout(p.paths)
    report = prepare_dataset(files.data, p.data, seed=p.seed)
    atomic.write_json(files.data_metrics, data_metrics(report), indent=1)
    return report


def backbone(p: Params) -> dict:
    from efsolo.modeling.backbone import save_backbone

    files = Layout(p.paths)
    b = p.backbone
    if b.weights:
        from efsolo.modeling.checkpoint import load_densecl

        sd = load_densecl(b.weights, b.arch)
        save_backbone(files.model("backbone"), b.arch, sd, source=f"densecl:{b.weights}")
        files.live("backbone").mkdir(parents=True, exist_ok=True)
        files.checkpoints("backbone").mkdir(parents=True, exist_ok=True)
        return {"source": b.weights}
    from efsolo.engine.pretrain import pretrain_backbone

    return pretrain_backbone(files.train_manifest, files.model("backbone"), files.checkpoints("backbone"),
                             files.live("backbone"), arch=b.arch, seed=p.seed, settings=b.pretrain,
                             runtime=p.runtime.pretrain, device=_device(p), precision=_precision(p))


def freemask(p: Params) -> dict:
    from efsolo.freemask.free_mask import label_dataset

    files = Layout(p.paths)
    return label_dataset(files.train_manifest, files.val_manifest, files.model("backbone"), files.freemask,
                         settings=p.freemask, runtime=p.runtime.freemask, seed=p.seed, device=_device(p),
                         shard_dir=files.checkpoints("freemask"), val_dir=files.predictions("freemask").parent,
                         precision=_precision(p))


def _kwargs(settings: Any) -> dict:
    """A settings dataclass's fields as keyword arguments (shallow: tuples stay tuples)."""
    return {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)}


def solo_training_kwargs(p: Params, embeddings: Path) -> dict:
    """The network and the settings objects ``train.train`` takes: ``freesolo``'s model (as the
    network's ``SOLOArch``), solver, input and loss sections, and ``runtime.freesolo``."""
    import numpy as np

    from efsolo.modeling.solo_model import SOLOArch

    files = Layout(p.paths)
    f, r = p.freesolo, p.runtime.freesolo
    with np.load(embeddings) as z:
        embed_dim = int(z["embeddings"].shape[1])
    arch = SOLOArch(backbone=p.backbone.arch, embed_dim=embed_dim, **_kwargs(f.model))
    return dict(backbone=files.model("backbone"), arch=arch, seed=p.seed, solver=f.solver, inputs=f.input,
                losses=f.loss, runtime=r, precision=_precision(p))


def freesolo(p: Params) -> dict:
    from efsolo.engine.self_training import self_train

    files = Layout(p.paths)
    f = p.freesolo
    embeddings = files.freemask / "train_embeddings.npz"
    return self_train(labels=files.freemask / "train.json", embeddings=embeddings, val_manifest=files.val_manifest,
                  train_manifest=files.train_manifest, model_path=files.model("freesolo"), predictions_path=files.predictions("freesolo"),
                  stats_path=files.metrics / "train" / "freesolo.json", work_dir=files.checkpoints("freesolo"), live_dir=files.live("freesolo"), rounds=f.rounds,
                  relabel_score=f.relabel_score, relabel_max=f.relabel_max, test=f.test,
                  device=_device(p),
                  val_gt=files.val_gt, state_at=p.eec.start_iter, state_path=files.model("freesolo_start"),
                  **solo_training_kwargs(p, embeddings))


def exemplars(p: Params) -> dict:
    from efsolo.exemplars.crops import run_crops

    files = Layout(p.paths)
    e = p.exemplar
    return run_crops(files.train_manifest, files.exemplars, num_images=e.num_images, seed=p.seed,
                     rect_margin=e.grabcut_rect_margin, iterations=e.grabcut_iterations, crop_margin=e.crop_margin)


def refine(p: Params) -> dict:
    from efsolo.exemplars.crops import run_refine

    files = Layout(p.paths)
    return run_refine(files.exemplars / "crops.json", files.model("freesolo"), files.exemplars, test=p.freesolo.test,
                      min_overlap=p.exemplar.refine_min_overlap,
                      device=_device(p), fallback=p.exemplar.refine_fallback)


def _free_mask_options(p: Params) -> tuple[dict, dict]:
    """Free Mask's operations and its filters as the EEC module applies them to its guide masks."""
    m = p.freemask
    options = dict(query_scales=m.query_scales, mask_threshold=m.mask_threshold, min_pixels=m.min_pixels,
                   nms=m.nms, nms_sigma=m.nms_sigma, fast_nms_iou=m.fast_nms_iou, pre_nms_top=m.pre_nms_top)
    guide = dict(score_threshold=m.score_threshold, max_box_width=m.max_box_width, top_exclude=m.top_exclude,
                 max_border_fraction=m.max_border_fraction)
    return options, guide


def pool(p: Params) -> dict:
    from efsolo.exemplars.eec import run_pool

    files = Layout(p.paths)
    options, guide = _free_mask_options(p)
    i = p.freesolo.input
    return run_pool(files.exemplars / "pool.json", files.model("backbone"), files.model("freesolo_start"),
                    files.train_manifest, files.pool, files.metrics / "pool.json", files.metrics / "pool" / "cosines.csv",
                    eec=p.eec, free_mask_options=options, guide_filters=guide,
                    input_short_side=max(i.train_short_sides), input_max_side=i.max_side, seed=p.seed,
                    device=_device(p))


def exemplar_freesolo(p: Params) -> dict:
    """FreeSOLO training plus lambda_eec * L_eec, then predictions on val. Stops with one line when
    the pool is smaller than ``exemplar.min_pool``, or when the EEC engages (an image with a
    positive and a negative) on fewer than ``eec.min_frac_used`` of the images: before training,
    on the pool stage's measured cosines, and after it, on the training's own mean and on its mean over
    the last quarter of the training (an EEC that went silent late)."""
    from efsolo.engine.self_training import self_train
    from efsolo.exemplars.eec import (EECModule, ExemplarFeatures, engaged_fraction, engagement_error, load_objects,
                                      load_pool, make_eec_loss, selection_thresholds, training_engagement_error)
    from efsolo.data.images import file_sha256
    from efsolo.modeling.backbone import feature_channels

    files = Layout(p.paths)
    f, e = p.freesolo, p.eec
    pool_blob = load_pool(files.pool)
    size = len(pool_blob["exemplars"])
    if size < p.exemplar.min_pool:
        raise EfsoloError(f"{files.pool}: the exemplar pool holds {size} exemplars, fewer than exemplar.min_pool "
                          f"({p.exemplar.min_pool}); see exemplars/pool.json for why crops were dropped, and raise "
                          f"exemplar.num_images or set exemplar.refine_fallback: grabcut")
    calibration = pool_blob["calibration"]
    cosines = calibration["cosines"].numpy()
    thresholds = selection_thresholds(e.thresholds, e.alpha, e.beta, cosines)
    images = int(calibration["images"])
    slots = int(calibration["slots"])
    source = f"{images} training images, {len(cosines)} with a guide mask, {files.metrics / 'pool.json'}"
    problem = engagement_error(f"{files.pool}", engaged_fraction(cosines, *thresholds, slots), e.min_frac_used,
                               e.thresholds, e.alpha, e.beta, thresholds, cosines, source,
                               len(cosines) / slots if slots else 0.0)
    if problem:
        raise EfsoloError(problem + " (measured before training)")
    options, guide = _free_mask_options(p)
    objects = load_objects(files.exemplars / "pool.json")
    # the trunk's fixed stages are computed once for the exemplars (at most those below the EEC's level)
    fixed = min(f.model.freeze_at, int(e.feature_level[1]) - 1)
    features = ExemplarFeatures(objects, pool_blob["view"], pool_blob["short_side"], pool_blob["max_side"], fixed) \
        if e.pool_refresh else None
    extra_loss = make_eec_loss(pool_blob, eec=e, thresholds=thresholds, seed=p.seed, free_mask_options=options,
                               guide_filters=guide, features=features)
    channels = feature_channels(p.backbone.arch)[e.feature_level]
    embeddings = files.freemask / "train_embeddings.npz"
    kwargs = solo_training_kwargs(p, embeddings)
    module = EECModule(channels, e.upsample, e.proj_dim if e.logits == "projection" else 0, seed=p.seed,
                       exemplar_queries=pool_blob["pooled_queries"])
    # the guard's threshold is left out: lowering it after a refusal reuses the finished training
    eec_settings = {k: v for k, v in to_dict(e).items() if k != "min_frac_used"}
    stats = self_train(labels=files.freemask / "train.json", embeddings=embeddings, val_manifest=files.val_manifest,
                   train_manifest=files.train_manifest, model_path=files.model("exemplar_freesolo"),
                   predictions_path=files.predictions("exemplar_freesolo"),
                   stats_path=files.metrics / "train" / "exemplar_freesolo.json",
                   work_dir=files.checkpoints("exemplar_freesolo"), live_dir=files.live("exemplar_freesolo"), rounds=1,
                   relabel_score=f.relabel_score, relabel_max=f.relabel_max, test=f.test, device=_device(p),
                   val_gt=files.val_gt, extra_modules={"eec": module}, extra_loss=extra_loss,
                   init_state=files.model("freesolo_start"),
                   fingerprint_extra={"eec": eec_settings, "pool": file_sha256(files.pool), "freemask_ops": options,
                                      "guide": guide, "min_pool": p.exemplar.min_pool,
                                      "init_state": file_sha256(files.model("freesolo_start"))},
                   extra_stats={"thresholds": {"positive_cosine": round(thresholds[0], 4),
                                               "negative_cosine": round(thresholds[1], 4)}}, **kwargs)
    problem = training_engagement_error(str(files.metrics / "train" / "exemplar_freesolo.json"), stats["round1"],
                                        e.min_frac_used, e.thresholds, e.alpha, e.beta, thresholds, cosines, source)
    if problem:
        raise EfsoloError(problem)
    return stats


def evaluate(p: Params, model: str, predictions: str | Path | None = None) -> dict:
    """Class-agnostic COCO evaluation of a model's val predictions (by default those the
    pipeline writes for it) into ``metrics/<model>.json`` and ``metrics/pr/<model>/``."""
    from efsolo.evaluation.evaluate import write_metrics

    files = Layout(p.paths)
    if predictions is None:
        if model not in MODELS:
            raise EfsoloError(f"unknown model {model!r}; one of {', '.join(MODELS)}, or pass --predictions")
        predictions = files.predictions(model)
    return write_metrics(files.val_gt, predictions, files.metrics / f"{model}.json", files.metrics / "pr" / model)


def report(p: Params) -> dict:
    from efsolo.evaluation.report import write_overlays

    files = Layout(p.paths)
    r = p.report
    titles = {"freemask": "Free Mask", "freesolo": "FreeSOLO", "exemplar_freesolo": "Exemplar-FreeSOLO"}
    return write_overlays(files.val_manifest, files.val_gt, {titles[m]: files.predictions(m) for m in p.models}, files.overlays, num_images=r.num_images, seed=p.seed,
                  min_score=r.min_score, max_instances=r.max_instances)


README_START = "<!-- results:start -->"
README_END = "<!-- results:end -->"


def table(p: Params, models: list[str] | None = None) -> str:
    """The results table (percent) of every model in the metrics folder, as Markdown."""
    from efsolo.evaluation.evaluate import results_table

    df = results_table(Layout(p.paths).metrics, models)
    if df.empty:
        return "(no metrics yet: run `dvc repro`)"
    header = "| " + " | ".join(df.columns) + " |\n|" + "---|" * len(df.columns)
    rows = ["| " + " | ".join(str(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([header, *rows])


def replace_between_markers(path: str | Path, start: str, end: str, body: str) -> None:
    """Replace the text between the ``start`` and ``end`` markers of a file (atomically)."""
    from efsolo.utils import atomic

    path = Path(path)
    text = path.read_text()
    if start not in text or end not in text:
        raise EfsoloError(f"{path}: no {start} ... {end} markers to write between")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    atomic.write_text(path, f"{head}{start}\n{body}\n{end}{tail}")


def update_readme(p: Params, readme: str | Path = "README.md") -> str:
    """Replace the text between the results markers of ``readme`` with the current table."""
    body = table(p)
    replace_between_markers(readme, README_START, README_END, body)
    return body


def report_stage(name: str, t0: float) -> None:
    """Print a stage's wall time since ``t0`` and the process's peak resident memory."""
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"stage {name}: {time.perf_counter() - t0:.1f} s wall, peak RSS {peak_mib:.0f} MiB")


def entry_point(stage: Callable[[Params], object]) -> Callable[[str], None]:
    """Wrap a stage for a script: load params, run, and turn our errors into one line + exit 1."""

    @wraps(stage)
    def main(params_path: str = "params.yaml") -> None:
        t0 = time.perf_counter()
        try:
            stage(load_params(params_path))
        except EfsoloError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(1) from None
        report_stage(stage.__name__, t0)

    return main
