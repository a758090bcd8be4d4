"""The pipeline's stages: each maps validated Params to one library ``run(...)`` with plain arguments.

``stages/*.py`` and the ``efsolo`` CLI both call these functions, so there is one wiring of
params to code. The paths here are the ones ``dvc.yaml`` declares.
"""
from __future__ import annotations

import resource
import sys
import time
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
                         feature_stride=f.feature_stride, feature_level=f.feature_level, seed=p.seed,
                         short_side=f.short_side,
                         max_side=f.max_side, query_scales=f.query_scales, mask_threshold=f.mask_threshold,
                         min_pixels=f.min_pixels, nms=f.nms, nms_sigma=f.nms_sigma, fast_nms_iou=f.fast_nms_iou,
                         keep_top=f.keep_top, pre_nms_top=f.pre_nms_top, score_threshold=f.score_threshold, max_box_width=f.max_box_width,
                         top_exclude=f.top_exclude, embed_dim=f.embed_dim, embed_method=f.embed_method,
                         batch_size=f.batch_size)


def evaluate(model: str, predictions: str | Path | None = None) -> dict:
    from efsolo import evaluate as ev

    if predictions is None:
        if model not in PREDICTIONS:
            raise EfsoloError(f"unknown model {model!r}; one of {sorted(PREDICTIONS)} or pass --predictions")
        predictions = PREDICTIONS[model]
    return ev.run(VAL_GT, predictions, METRICS_DIR / f"{model}.json", METRICS_DIR / "pr" / model)


README_START = "<!-- results:start -->"
README_END = "<!-- results:end -->"


def table(models: list[str] | None = None) -> str:
    """The results table (percent) of every model in metrics/, as Markdown."""
    from efsolo.evaluate import results_table

    df = results_table(METRICS_DIR, models)
    if df.empty:
        return "(no metrics yet: run `dvc repro`)"
    header = "| " + " | ".join(df.columns) + " |\n|" + "---|" * len(df.columns)
    rows = ["| " + " | ".join(str(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([header, *rows])


def update_readme(readme: str | Path = "README.md") -> str:
    """Replace the text between the results markers of ``readme`` with the current table."""
    from efsolo import atomic

    path = Path(readme)
    text = path.read_text()
    if README_START not in text or README_END not in text:
        raise EfsoloError(f"{path}: no {README_START} ... {README_END} markers to write the results between")
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    body = table()
    atomic.write_text(path, f"{head}{README_START}\n{body}\n{README_END}{tail}")
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
