"""Where predictions lie against the ground truth: on its objects, or on what it does not list.

COCOeval counts a mask that matches no ground-truth object as a false positive, whatever it
covers. ``audit_predictions`` tells the masks that cover ground-truth objects (ignore regions
included) with too few of their pixels, "on the background", apart from the rest, and gives the
segm AP both as predicted and with those masks removed. The second figure needs the ground truth
to choose the masks: it is a diagnostic of the data (how much of what a model finds the ground
truth leaves out), not a result (docs/free-mask.md, "What the photo look's ground truth leaves out").
"""
from __future__ import annotations

import numpy as np
from pycocotools import mask as mask_utils

from efsolo.evaluation.evaluate import _coco_from_dict, evaluate


def _decode(segmentation: dict | list, height: int, width: int) -> np.ndarray:
    """A COCO segmentation (polygons, or RLE compressed or not) -> (height, width) bool."""
    if isinstance(segmentation, list):
        segmentation = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation.get("counts"), list):
        segmentation = mask_utils.frPyObjects(segmentation, height, width)
    return mask_utils.decode(segmentation).astype(bool)


def audit_predictions(gt: dict, results: list[dict], min_on_objects: float = 0.2) -> dict:
    """Split ``results`` (a COCO results list with RLE masks) by their overlap with ``gt``'s objects.

    A result is "on the background" when less than ``min_on_objects`` of its pixels lie on any
    ground-truth object (ignore regions included). Returns ``{"predictions", "matching"
    (IoU >= 0.5 with an object that counts), "on_background", "objects" (that count), "found"
    (objects with a result at IoU >= 0.5), "segm": {"AP", "AP50", "AP75"}, "segm_without_background":
    {...}}`` (AP in [0, 1]). No results give zeros.
    """
    coco = _coco_from_dict(gt)
    sizes = {im["id"]: (im["height"], im["width"]) for im in gt["images"]}
    results = [r for r in results if r["image_id"] in sizes]
    objects = {i: [] for i in sizes}
    for ann in gt["annotations"]:
        objects[ann["image_id"]].append((coco.annToMask(ann).astype(bool), bool(ann.get("iscrowd", 0))))
    matching, background, found, counted = 0, [], set(), 0
    for image_id, objs in objects.items():
        counted += sum(not crowd for _, crowd in objs)
    for k, r in enumerate(results):
        h, w = sizes[r["image_id"]]
        m = _decode(r["segmentation"], h, w)
        objs = objects[r["image_id"]]
        union = np.zeros((h, w), bool)
        hit = False
        for j, (g, crowd) in enumerate(objs):
            union |= g
            inter = np.logical_and(m, g).sum()
            if not crowd and inter / max(1, np.logical_or(m, g).sum()) >= 0.5:
                hit = True
                found.add((r["image_id"], j))
        matching += hit
        if np.logical_and(m, union).sum() < min_on_objects * max(1, m.sum()):
            background.append(k)
    dropped = set(background)
    kept = [r for k, r in enumerate(results) if k not in dropped]

    def segm(res: list[dict]) -> dict:
        s = evaluate(gt, res)[0]["segm"]
        return {k: s[k] for k in ("AP", "AP50", "AP75")}

    return {"predictions": len(results), "matching": matching, "on_background": len(background),
            "objects": counted, "found": len(found), "segm": segm(results), "segm_without_background": segm(kept)}
