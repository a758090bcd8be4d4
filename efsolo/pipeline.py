"""The pipeline's stages: each maps validated Params to one library ``run(...)`` with plain arguments.

``stages/*.py`` and the ``efsolo`` CLI both call these functions, so there is one wiring of
params to code. The paths here are the ones ``dvc.yaml`` declares.
"""
from __future__ import annotations

import dataclasses
import resource
import sys
import time
from functools import wraps
from pathlib import Path
from typing import Any, Callable

from efsolo.config import Params, load_params, to_dict
from efsolo.utils.errors import EfsoloError

DATA_DIR = Path("data/prepared")
TRAIN_MANIFEST = DATA_DIR / "train.json"
VAL_MANIFEST = DATA_DIR / "val.json"
VAL_GT = DATA_DIR / "val_gt.json"
BACKBONE = Path("models/backbone.pt")
BACKBONE_CKPT_DIR = Path("checkpoints/backbone")
BACKBONE_LIVE_DIR = Path("dvclive/backbone")
FREEMASK_DIR = Path("pseudo/freemask")
FREEMASK_SHARD_DIR = Path("checkpoints/freemask")
FREESOLO_MODEL = Path("models/freesolo.pt")
FREESOLO_START = Path("models/freesolo_start.pt")  # FreeSOLO's training state after eec.start_iter iterations
FREESOLO_WORK_DIR = Path("checkpoints/freesolo")
FREESOLO_LIVE_DIR = Path("dvclive/freesolo")
EXEMPLAR_DIR = Path("exemplars")
POOL = EXEMPLAR_DIR / "pool.pt"
EFS_MODEL = Path("models/exemplar_freesolo.pt")
EFS_WORK_DIR = Path("checkpoints/exemplar_freesolo")
EFS_LIVE_DIR = Path("dvclive/exemplar_freesolo")
METRICS_DIR = Path("metrics")
REPORT_DIR = Path("reports/overlays")

# model name -> its validation predictions (the ``evaluate`` foreach in dvc.yaml)
PREDICTIONS = {"freemask": FREEMASK_DIR / "val.json", "freesolo": Path("predictions/freesolo/val.json"),
               "exemplar_freesolo": Path("predictions/exemplar_freesolo/val.json")}


def data(p: Params) -> dict:
    from efsolo.data import datasets

    d, s = p.data, p.data.synthetic
    return datasets.run(DATA_DIR, source=d.source, seed=p.seed, train_images=d.train_images,
                        val_images=d.val_images, val_annotations=d.val_annotations,
                        voc_image_set=d.voc_image_set, num_train=s.num_train,
                        num_val=s.num_val, image_size=s.image_size, min_objects=s.min_objects,
                        max_objects=s.max_objects, look=s.look)


def backbone(p: Params) -> dict:
    from efsolo.modeling.backbone import resolve_device, save_backbone

    b = p.backbone
    if b.weights:
        from efsolo.modeling.checkpoint import load_densecl

        sd = load_densecl(b.weights, b.arch)
        save_backbone(BACKBONE, b.arch, sd, source=f"densecl:{b.weights}")
        BACKBONE_LIVE_DIR.mkdir(parents=True, exist_ok=True)
        BACKBONE_CKPT_DIR.mkdir(parents=True, exist_ok=True)
        return {"source": b.weights}
    from efsolo.engine import pretrain

    t = b.pretrain
    return pretrain.run(TRAIN_MANIFEST, BACKBONE, BACKBONE_CKPT_DIR, BACKBONE_LIVE_DIR, arch=b.arch, seed=p.seed,
                        iters=t.iters, batch_size=t.batch_size, crop_size=t.crop_size, lr=t.lr,
                        weight_decay=t.weight_decay, momentum=t.momentum, queue_size=t.queue_size,
                        temperature=t.temperature, dense_weight=t.dense_weight, proj_dim=t.proj_dim,
                        log_every=p.runtime.pretrain.log_every, checkpoint_every=p.runtime.pretrain.checkpoint_every,
                        device=resolve_device(p.runtime.device))


def freemask(p: Params) -> dict:
    from efsolo.freemask import free_mask
    from efsolo.modeling.backbone import resolve_device

    f = p.freemask
    return free_mask.run(TRAIN_MANIFEST, VAL_MANIFEST, BACKBONE, FREEMASK_DIR, device=resolve_device(p.runtime.device),
                         feature_stride=f.feature_stride, feature_level=f.feature_level, seed=p.seed,
                         short_side=f.short_side,
                         max_side=f.max_side, query_scales=f.query_scales, mask_threshold=f.mask_threshold,
                         min_pixels=f.min_pixels, nms=f.nms, nms_sigma=f.nms_sigma, fast_nms_iou=f.fast_nms_iou,
                         keep_top=f.keep_top, pre_nms_top=f.pre_nms_top, score_threshold=f.score_threshold, max_box_width=f.max_box_width,
                         top_exclude=f.top_exclude, split_components=f.split_components,
                         component_min_fraction=f.component_min_fraction, embed_dim=f.embed_dim,
                         embed_method=f.embed_method, batch_size=p.runtime.freemask.batch_size,
                         shard_size=p.runtime.freemask.shard_size, shard_dir=FREEMASK_SHARD_DIR)


def _kwargs(settings: Any) -> dict:
    """A settings dataclass's fields as keyword arguments (shallow: tuples stay tuples)."""
    return {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)}


def solo_training_kwargs(p: Params, embeddings: Path) -> dict:
    """The network and training settings of ``freesolo`` (its model, input, loss and solver
    sections, and the ``runtime.freesolo`` intervals) as keyword arguments of ``train.train``."""
    import numpy as np

    from efsolo.modeling.solo_model import SOLOArch

    f, r = p.freesolo, p.runtime.freesolo
    with np.load(embeddings) as z:
        embed_dim = int(z["embeddings"].shape[1])
    arch = SOLOArch(arch=p.backbone.arch, embed_dim=embed_dim, **_kwargs(f.model))
    return dict(backbone=BACKBONE, arch=arch, seed=p.seed, losses=f.loss, **_kwargs(f.solver), **_kwargs(f.input),
                log_every=r.log_every, checkpoint_every=r.checkpoint_every, eval_every=r.eval_every)


def freesolo(p: Params) -> dict:
    from efsolo.engine import self_training as fs
    from efsolo.modeling.backbone import resolve_device

    f = p.freesolo
    embeddings = FREEMASK_DIR / "train_embeddings.npz"
    return fs.run(labels=FREEMASK_DIR / "train.json", embeddings=embeddings, val_manifest=VAL_MANIFEST,
                  train_manifest=TRAIN_MANIFEST, model_path=FREESOLO_MODEL, predictions_path=PREDICTIONS["freesolo"],
                  stats_path=METRICS_DIR / "train" / "freesolo.json", work_dir=FREESOLO_WORK_DIR, live_dir=FREESOLO_LIVE_DIR, rounds=f.rounds,
                  relabel_score=f.relabel_score, relabel_max=f.relabel_max, test=f.test,
                  device=resolve_device(p.runtime.device),
                  val_gt=VAL_GT, state_at=p.eec.start_iter, state_path=FREESOLO_START,
                  **solo_training_kwargs(p, embeddings))


def exemplars(p: Params) -> dict:
    from efsolo.exemplars.crops import run_crops

    e = p.exemplar
    return run_crops(TRAIN_MANIFEST, EXEMPLAR_DIR, num_images=e.num_images, seed=p.seed,
                     rect_margin=e.grabcut_rect_margin, iterations=e.grabcut_iterations, crop_margin=e.crop_margin)


def refine(p: Params) -> dict:
    from efsolo.modeling.backbone import resolve_device
    from efsolo.exemplars.crops import run_refine

    return run_refine(EXEMPLAR_DIR / "crops.json", FREESOLO_MODEL, EXEMPLAR_DIR, test=p.freesolo.test,
                      min_overlap=p.exemplar.refine_min_overlap,
                      device=resolve_device(p.runtime.device), fallback=p.exemplar.refine_fallback)


def pool(p: Params) -> dict:
    from efsolo.modeling.backbone import resolve_device
    from efsolo.exemplars.eec import run_pool

    e = p.eec
    return run_pool(EXEMPLAR_DIR / "pool.json", BACKBONE, POOL, feature_level=e.feature_level, upsample=e.upsample,
                    short_side=e.exemplar_short_side, max_side=e.exemplar_max_side, device=resolve_device(p.runtime.device),
                    view=e.exemplar_view)


def exemplar_freesolo(p: Params) -> dict:
    """FreeSOLO training plus lambda_eec * L_eec, then predictions on val."""
    from efsolo.engine import self_training as fs
    from efsolo.modeling.backbone import resolve_device, feature_channels
    from efsolo.exemplars.eec import EECModule, load_objects, load_pool, make_eec_loss
    from efsolo.engine.resume import file_digest

    f, e, m = p.freesolo, p.eec, p.freemask
    pool_blob = load_pool(POOL)
    size = len(pool_blob["exemplars"])
    if size < p.exemplar.min_pool:
        raise EfsoloError(f"{POOL}: the exemplar pool holds {size} exemplars, fewer than exemplar.min_pool "
                          f"({p.exemplar.min_pool}); see exemplars/pool.json for why crops were dropped, and raise "
                          f"exemplar.num_images or set exemplar.refine_fallback: grabcut")
    options = dict(query_scales=m.query_scales, mask_threshold=m.mask_threshold, min_pixels=m.min_pixels,
                   nms=m.nms, nms_sigma=m.nms_sigma, fast_nms_iou=m.fast_nms_iou, pre_nms_top=m.pre_nms_top)
    guide = dict(score_threshold=m.score_threshold, max_box_width=m.max_box_width, top_exclude=m.top_exclude)
    extra_loss = make_eec_loss(pool_blob, e.alpha, e.beta, e.tau, e.weight, e.granularity, e.max_instances, p.seed,
                               options, e.pool_refresh,
                               load_objects(EXEMPLAR_DIR / "pool.json") if e.pool_refresh else None,
                               logits=e.logits, centre=e.centre, proj_tau=e.proj_tau, guide_filters=guide)
    channels = feature_channels(p.backbone.arch)[e.feature_level]
    embeddings = FREEMASK_DIR / "train_embeddings.npz"
    kwargs = solo_training_kwargs(p, embeddings)
    return fs.run(labels=FREEMASK_DIR / "train.json", embeddings=embeddings, val_manifest=VAL_MANIFEST,
                  train_manifest=TRAIN_MANIFEST, model_path=EFS_MODEL,
                  predictions_path=PREDICTIONS["exemplar_freesolo"],
                  stats_path=METRICS_DIR / "train" / "exemplar_freesolo.json", work_dir=EFS_WORK_DIR,
                  live_dir=EFS_LIVE_DIR, rounds=1, relabel_score=f.relabel_score, relabel_max=f.relabel_max,
                  test=f.test,
                  device=resolve_device(p.runtime.device), val_gt=VAL_GT,
                  extra_modules={"eec": EECModule(channels, e.upsample, e.proj_dim if e.logits == "projection" else 0,
                                                  seed=p.seed)},
                  extra_loss=extra_loss, init_state=FREESOLO_START,
                  fingerprint_extra={"eec": to_dict(e), "pool": file_digest(POOL), "freemask_ops": options,
                                     "guide": guide, "min_pool": p.exemplar.min_pool,
                                     "init_state": file_digest(FREESOLO_START)}, **kwargs)


def evaluate(model: str, predictions: str | Path | None = None) -> dict:
    from efsolo.evaluation import evaluate as ev

    if predictions is None:
        if model not in PREDICTIONS:
            raise EfsoloError(f"unknown model {model!r}; one of {sorted(PREDICTIONS)} or pass --predictions")
        predictions = PREDICTIONS[model]
    return ev.run(VAL_GT, predictions, METRICS_DIR / f"{model}.json", METRICS_DIR / "pr" / model)


def report(p: Params) -> dict:
    from efsolo.evaluation import report as rp

    r = p.report
    titles = {"freemask": "Free Mask", "freesolo": "FreeSOLO", "exemplar_freesolo": "Exemplar-FreeSOLO"}
    return rp.run(VAL_MANIFEST, VAL_GT, {titles[k]: v for k, v in PREDICTIONS.items()}, REPORT_DIR, num_images=r.num_images, seed=p.seed,
                  min_score=r.min_score, max_instances=r.max_instances)


README_START = "<!-- results:start -->"
README_END = "<!-- results:end -->"


def table(models: list[str] | None = None) -> str:
    """The results table (percent) of every model in metrics/, as Markdown."""
    from efsolo.evaluation.evaluate import results_table

    df = results_table(METRICS_DIR, models)
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


def update_readme(readme: str | Path = "README.md") -> str:
    """Replace the text between the results markers of ``readme`` with the current table."""
    body = table()
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
