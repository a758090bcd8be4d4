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

from efsolo.evaluation.evaluate import _coco_from_dict, evaluate


def audit_predictions(gt: dict, results: list[dict], min_on_objects: float = 0.2) -> dict:
    """Split ``results`` (a COCO results list: RLE or polygon masks) by their overlap with ``gt``'s objects.

    A result is "on the background" when less than ``min_on_objects`` of its pixels lie on any
    ground-truth object (ignore regions included). Returns ``{"predictions", "matching"
    (IoU >= 0.5 with an object that counts), "on_background", "objects" (that count), "found"
    (objects with a result at IoU >= 0.5), "segm": {"AP", "AP50", "AP75"}, "segm_without_background":
    {...}}`` (AP in [0, 1]). No results give zeros.
    """
    coco = _coco_from_dict(gt)  # decodes both the ground truth and the results (annToMask: any COCO segmentation)
    results = [r for r in results if r["image_id"] in coco.imgs]
    objects: dict[int, list[tuple[np.ndarray, bool]]] = {i: [] for i in coco.imgs}
    for ann in gt["annotations"]:
        objects[ann["image_id"]].append((coco.annToMask(ann).astype(bool), bool(ann.get("iscrowd", 0))))
    union = {}  # each image's pixels on any object, ignore regions included
    for i, objs in objects.items():
        union[i] = np.zeros((coco.imgs[i]["height"], coco.imgs[i]["width"]), bool)
        for g, _ in objs:
            union[i] |= g
    matching, background, found = 0, set(), set()
    for k, r in enumerate(results):
        m = coco.annToMask(r).astype(bool)
        hits = {j for j, (g, crowd) in enumerate(objects[r["image_id"]])
                if not crowd and (m & g).sum() >= 0.5 * max(1, (m | g).sum())}
        matching += bool(hits)
        found |= {(r["image_id"], j) for j in hits}
        if (m & union[r["image_id"]]).sum() < min_on_objects * max(1, m.sum()):
            background.add(k)

    def segm(res: list[dict]) -> dict:
        s = evaluate(gt, res)[0]["segm"]
        return {k: s[k] for k in ("AP", "AP50", "AP75")}

    return {"predictions": len(results), "matching": matching, "on_background": len(background),
            "objects": sum(not ann.get("iscrowd", 0) for ann in gt["annotations"]), "found": len(found),
            "segm": segm(results),
            "segm_without_background": segm([r for k, r in enumerate(results) if k not in background])}
