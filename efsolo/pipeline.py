"""The pipeline's stages: each maps validated Params to one library ``run(...)`` with plain arguments.

``stages/*.py`` and the ``efsolo`` CLI both call these functions, so there is one wiring of
params to code. The paths here are the ones ``dvc.yaml`` declares.
"""
from __future__ import annotations

import sys
from functools import wraps
from pathlib import Path
from typing import Callable

from efsolo.config import Params, load_params
from efsolo.errors import EfsoloError

DATA_DIR = Path("data/prepared")
TRAIN_MANIFEST = DATA_DIR / "train.json"
VAL_MANIFEST = DATA_DIR / "val.json"
VAL_GT = DATA_DIR / "val_gt.json"
BACKBONE = Path("models/backbone.pt")
BACKBONE_CKPT_DIR = Path("checkpoints/backbone")
BACKBONE_LIVE_DIR = Path("dvclive/backbone")
FREEMASK_DIR = Path("pseudo/freemask")
METRICS_DIR = Path("metrics")

# model name -> its validation predictions (the ``evaluate`` foreach in dvc.yaml)
PREDICTIONS = {"freemask": FREEMASK_DIR / "val.json"}


def data(p: Params) -> dict:
    from efsolo import datasets

    d, s = p.data, p.data.synthetic
    return datasets.run(DATA_DIR, source=d.source, seed=p.seed, train_images=d.train_images,
                        val_images=d.val_images, val_annotations=d.val_annotations, num_train=s.num_train,
                        num_val=s.num_val, image_size=s.image_size, min_objects=s.min_objects,
                        max_objects=s.max_objects)


def backbone(p: Params) -> dict:
    from efsolo.backbone import resolve_device, save_backbone

    b = p.backbone
    if b.weights:
        from efsolo.checkpoint import load_densecl

        sd = load_densecl(b.weights, b.arch)
        save_backbone(BACKBONE, b.arch, sd, source=f"densecl:{b.weights}")
        BACKBONE_LIVE_DIR.mkdir(parents=True, exist_ok=True)
        BACKBONE_CKPT_DIR.mkdir(parents=True, exist_ok=True)
        return {"source": b.weights}
    from efsolo import pretrain

    t = b.pretrain
    return pretrain.run(TRAIN_MANIFEST, BACKBONE, BACKBONE_CKPT_DIR, BACKBONE_LIVE_DIR, arch=b.arch, seed=p.seed,
                        iters=t.iters, batch_size=t.batch_size, crop_size=t.crop_size, lr=t.lr,
                        weight_decay=t.weight_decay, momentum=t.momentum, queue_size=t.queue_size,
                        temperature=t.temperature, dense_weight=t.dense_weight, proj_dim=t.proj_dim,
                        log_every=t.log_every, checkpoint_every=t.checkpoint_every,
                        device=resolve_device(p.device))


def freemask(p: Params) -> dict:
    from efsolo import free_mask
    from efsolo.backbone import resolve_device

    f = p.freemask
    return free_mask.run(TRAIN_MANIFEST, VAL_MANIFEST, BACKBONE, FREEMASK_DIR, device=resolve_device(p.device),
                         feature_stride=f.feature_stride, seed=p.seed, short_side=f.short_side,
                         max_side=f.max_side, query_scales=f.query_scales, mask_threshold=f.mask_threshold,
                         min_pixels=f.min_pixels, nms=f.nms, nms_sigma=f.nms_sigma, fast_nms_iou=f.fast_nms_iou,
                         keep_top=f.keep_top, score_threshold=f.score_threshold, max_box_width=f.max_box_width,
                         top_exclude=f.top_exclude, embed_dim=f.embed_dim, embed_method=f.embed_method,
                         batch_size=f.batch_size)


def evaluate(model: str, predictions: str | Path | None = None) -> dict:
    from efsolo import evaluate as ev

    if predictions is None:
        if model not in PREDICTIONS:
            raise EfsoloError(f"unknown model {model!r}; one of {sorted(PREDICTIONS)} or pass --predictions")
        predictions = PREDICTIONS[model]
    return ev.run(VAL_GT, predictions, METRICS_DIR / f"{model}.json", METRICS_DIR / "pr" / model)


def table(models: list[str] | None = None) -> str:
    from efsolo.evaluate import results_table

    df = results_table(METRICS_DIR, models)
    return "(no metrics yet)" if df.empty else df.to_markdown(index=False) if _has_tabulate() else df.to_string(index=False)


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401  (pandas' to_markdown needs it; dvc ships it)
    except ImportError:
        return False
    return True


def entry_point(stage: Callable[[Params], object]) -> Callable[[str], None]:
    """Wrap a stage for a script: load params, run, and turn our errors into one line + exit 1."""

    @wraps(stage)
    def main(params_path: str = "params.yaml") -> None:
        try:
            stage(load_params(params_path))
        except EfsoloError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(1) from None

    return main
