import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from efsolo.evaluation.audit import audit_predictions


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode()
    return rle


def _box(r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    m = np.zeros((10, 10), bool)
    m[r0:r1, c0:c1] = True
    return m


def _scene():
    """One 10x10 image: an object (rows 0-4, cols 0-4) and an ignore region (rows 6-9, cols 6-9).
    Results: the object itself (0.9); a background patch that touches neither (0.95); the ignore
    region (0.5); a mask with 10 of its 25 pixels on the object (IoU 0.25, 0.1)."""
    obj, crowd = _box(0, 5, 0, 5), _box(6, 10, 6, 10)
    gt = {"images": [{"id": 1, "height": 10, "width": 10}], "categories": [{"id": 1, "name": "object"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": _rle(obj), "area": 25,
                           "bbox": [0, 0, 5, 5], "iscrowd": 0},
                          {"id": 2, "image_id": 1, "category_id": 1, "segmentation": _rle(crowd), "area": 16,
                           "bbox": [6, 6, 4, 4], "iscrowd": 1}]}
    masks = [(obj, 0.9), (_box(6, 10, 0, 4), 0.95), (crowd, 0.5), (_box(0, 5, 3, 8), 0.1)]
    results = [{"image_id": 1, "category_id": 1, "segmentation": _rle(m), "score": s,
                "bbox": list(mask_utils.toBbox(_rle(m)))} for m, s in masks]
    return gt, results


def test_audit_counts_masks_on_the_background_and_scores_without_them():
    gt, results = _scene()
    a = audit_predictions(gt, results)
    assert (a["predictions"], a["matching"], a["on_background"], a["objects"], a["found"]) == (4, 1, 1, 1, 1)
    # as predicted, the background patch outranks the object: precision 1/2 at full recall
    assert a["segm"]["AP50"] == pytest.approx(0.5, abs=1e-6)
    assert a["segm_without_background"]["AP50"] == pytest.approx(1.0, abs=1e-6)
    # 10 of 25 pixels on the object (40%): on the background only when the bar is above that
    assert audit_predictions(gt, results, min_on_objects=0.5)["on_background"] == 2


def test_audit_of_no_results_is_zero():
    gt, _ = _scene()
    a = audit_predictions(gt, [])
    assert (a["predictions"], a["matching"], a["on_background"], a["found"]) == (0, 0, 0, 0)
    assert a["segm"]["AP"] == 0.0 and a["segm_without_background"]["AP"] == 0.0


def test_audit_command_prints_the_counts(tmp_path):
    from typer.testing import CliRunner

    from efsolo.cli import app

    gt, results = _scene()
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "pred.json").write_text(json.dumps(results))
    out = CliRunner().invoke(app, ["audit", "--gt", str(tmp_path / "gt.json"), "--predictions",
                                   str(tmp_path / "pred.json")])
    assert out.exit_code == 0, out.output
    assert "4 masks: 1 match an object (IoU >= 0.5), 1 (25%) on the background; 1 of 1 objects found" in out.output
    assert "background masks removed: 100.00 / 100.00 / 100.00" in out.output


def test_audit_reads_polygon_results():
    """A result given as a polygon (the object's outline) is decoded like its RLE."""
    gt, results = _scene()
    results[0]["segmentation"] = [[0, 0, 5, 0, 5, 5, 0, 5]]
    a = audit_predictions(gt, results[:1])
    assert (a["matching"], a["on_background"], a["found"]) == (1, 0, 1)
