"""Class-agnostic COCO evaluation (pycocotools COCOeval, ``useCats = 0``) of segm and bbox.

Ground truth with boxes only (PASCAL VOC, multi-object discovery) is evaluated for bbox only.

Predictions may be a COCO results list (``[{image_id, segmentation, bbox, score}]``) or a
COCO dataset whose annotations carry a ``score`` (as the Free Mask pseudo-labels do).
"""
from __future__ import annotations

import contextlib
import copy
import io
from pathlib import Path

import numpy as np
import pandas as pd
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from tqdm import tqdm

from efsolo.data.coco_format import AGNOSTIC_CATEGORY, AnnotationError, class_agnostic, read_json
from efsolo.utils import atomic

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100")
IOU_TYPES = ("segm", "bbox")


def _coco_from_dict(dataset: dict) -> COCO:
    coco = COCO()
    coco.dataset = copy.deepcopy(dataset)
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def as_results(predictions: list | dict, path: str | Path = "<predictions>") -> list[dict]:
    """Normalise predictions to a class-agnostic COCO results list."""
    if isinstance(predictions, dict):
        if not isinstance(predictions.get("annotations"), list):
            raise AnnotationError(f"{path}: neither a results list nor a dataset with 'annotations'")
        predictions = predictions["annotations"]
    if not isinstance(predictions, list):
        raise AnnotationError(f"{path}: predictions must be a list of results")
    out = []
    for i, p in enumerate(predictions):
        missing = [k for k in ("image_id", "segmentation", "bbox", "score") if k not in p]
        if missing:
            raise AnnotationError(f"{path}: prediction {i} has no {', '.join(missing)}")
        out.append({"image_id": p["image_id"], "category_id": AGNOSTIC_CATEGORY["id"],
                    "segmentation": p["segmentation"], "bbox": p["bbox"], "score": float(p["score"])})
    return out


def iou_types(gt: dict) -> tuple[str, ...]:
    """("segm", "bbox"), or ("bbox",) when some ground-truth annotation has no mask."""
    if gt.get("info", {}).get("boxes_only") or any("segmentation" not in a for a in gt["annotations"]):
        return ("bbox",)
    return IOU_TYPES


def evaluate(gt: dict, results: list[dict]) -> tuple[dict, dict]:
    """COCOeval, class-agnostic, for segm and bbox (bbox only for box-only ground truth).

    Returns (metrics ``{"segm": {"AP": ..}, "bbox": {..}}`` in [0, 1], precision-recall curves
    ``{iou_type: DataFrame(recall, precision_iou50, precision_iou75)}``). No predictions give 0.
    """
    gt = class_agnostic(gt)
    coco_gt = _coco_from_dict(gt)
    image_ids = sorted(coco_gt.getImgIds())
    known = set(image_ids)
    results = [r for r in results if r["image_id"] in known]
    metrics, curves = {}, {}
    recall = np.linspace(0, 1, 101)
    for iou_type in tqdm(iou_types(gt), desc="evaluating", disable=None, leave=False):
        if not results or not gt["annotations"]:
            metrics[iou_type] = {k: 0.0 for k in STAT_NAMES}
            curves[iou_type] = pd.DataFrame({"recall": recall, "precision_iou50": 0.0, "precision_iou75": 0.0})
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            coco_dt = coco_gt.loadRes(copy.deepcopy(results))
            ev = COCOeval(coco_gt, coco_dt, iou_type)
            ev.params.useCats = 0
            ev.params.imgIds = image_ids
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        # stats are -1 where undefined (e.g. no ground truth in a size range): report 0
        metrics[iou_type] = {k: float(max(v, 0.0)) for k, v in zip(STAT_NAMES, ev.stats[:9])}
        precision = ev.eval["precision"]  # (T, R, K, A, M); K = 1 class-agnostic, A = all, M = 100 dets
        p50, p75 = precision[0, :, 0, 0, -1], precision[5, :, 0, 0, -1]
        curves[iou_type] = pd.DataFrame({"recall": ev.params.recThrs, "precision_iou50": np.maximum(p50, 0),
                                         "precision_iou75": np.maximum(p75, 0)})
    return metrics, curves


def write_metrics(gt_path: str | Path, predictions_path: str | Path, metrics_path: str | Path, curves_dir: str | Path) -> dict:
    """Evaluate one model's val predictions; write ``metrics_path`` (nested JSON) and PR curves."""
    gt = read_json(gt_path)
    if not gt.get("info", {}).get("has_ground_truth", True):
        metrics: dict = {"note": "no ground truth (data.source is folder): nothing to evaluate"}
        atomic.write_json(metrics_path, metrics, indent=1)
        Path(curves_dir).mkdir(parents=True, exist_ok=True)
        return metrics
    results = as_results(read_json(predictions_path), predictions_path)
    metrics, curves = evaluate(gt, results)
    metrics["num_images"] = len(gt["images"])
    metrics["num_predictions"] = len(results)
    atomic.write_json(metrics_path, metrics, indent=1)
    for iou_type, df in curves.items():
        atomic.write_text(Path(curves_dir) / f"{iou_type}.csv", df.to_csv(index=False, float_format="%.5f"))
    return metrics


def results_table(metrics_dir: str | Path, models: list[str] | None = None) -> pd.DataFrame:
    """A table (percent) of segm/bbox AP, AP50, AP75 and AR100 of every ``metrics/<model>.json``."""
    rows = []
    paths = sorted(Path(metrics_dir).glob("*.json")) if models is None else [Path(metrics_dir) / f"{m}.json" for m in models]
    for p in paths:
        if not p.is_file():
            continue
        m = read_json(p)
        if not any(t in m for t in IOU_TYPES):
            continue
        row = {"model": p.stem}
        for iou_type in IOU_TYPES:
            for k in ("AP", "AP50", "AP75", "AR100"):
                row[f"{iou_type} {k}"] = round(100 * m[iou_type][k], 1) if iou_type in m else "-"
        rows.append(row)
    return pd.DataFrame(rows)
