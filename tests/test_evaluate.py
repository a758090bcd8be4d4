import json

import numpy as np
import pytest

from efsolo.data.coco_format import AGNOSTIC_CATEGORY, mask_annotation
from efsolo.evaluation.evaluate import as_results, evaluate, results_table, write_metrics


def _gt():
    images, anns = [], []
    rng = np.random.default_rng(0)
    for image_id in (1, 2):
        images.append({"id": image_id, "file_name": f"{image_id}.png", "width": 64, "height": 48})
        for _ in range(3):
            m = np.zeros((48, 64), bool)
            y, x = rng.integers(0, 30), rng.integers(0, 40)
            m[y:y + 15, x:x + 20] = True
            ann = mask_annotation(m, len(anns) + 1, image_id)
            ann["category_id"] = 7  # any category: evaluation is class-agnostic
            anns.append(ann)
    return {"images": images, "annotations": anns, "categories": [{"id": 7, "name": "dog"}]}


def test_perfect_predictions_give_ap_one():
    gt = _gt()
    preds = [{**a, "score": 0.9} for a in gt["annotations"]]
    metrics, curves = evaluate(gt, as_results(preds))
    for iou_type in ("segm", "bbox"):
        assert metrics[iou_type]["AP"] == pytest.approx(1.0)
        assert metrics[iou_type]["AP50"] == pytest.approx(1.0)
        assert metrics[iou_type]["AR100"] == pytest.approx(1.0)
    assert curves["segm"]["precision_iou50"].iloc[0] == pytest.approx(1.0)


def test_no_predictions_give_zero():
    metrics, _ = evaluate(_gt(), [])
    assert metrics["segm"]["AP"] == 0.0 and metrics["bbox"]["AR100"] == 0.0


def test_wrong_predictions_give_zero_and_dataset_input(tmp_path):
    gt = _gt()
    far = np.zeros((48, 64), bool)
    far[0:2, 62:64] = True
    pred = {"images": gt["images"], "annotations": [{**mask_annotation(far, 1, 1), "score": 0.5}],
            "categories": [AGNOSTIC_CATEGORY]}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "pred.json").write_text(json.dumps(pred))
    metrics = write_metrics(tmp_path / "gt.json", tmp_path / "pred.json", tmp_path / "m" / "x.json", tmp_path / "pr")
    assert metrics["segm"]["AP"] == 0.0
    saved = json.loads((tmp_path / "m" / "x.json").read_text())
    assert set(saved["segm"]) == {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100"}
    assert (tmp_path / "pr" / "segm.csv").read_text().startswith("recall,precision_iou50,precision_iou75")
    table = results_table(tmp_path / "m")
    assert list(table["model"]) == ["x"] and table["segm AP"].iloc[0] == 0.0


def test_predictions_missing_score_is_one_line_error():
    with pytest.raises(ValueError, match="prediction 0 has no score"):
        as_results([{"image_id": 1, "segmentation": {}, "bbox": [0, 0, 1, 1]}], "p.json")


def test_readme_table_is_written_between_markers(tmp_path, monkeypatch):
    from efsolo import pipeline
    from efsolo.config import Params

    monkeypatch.chdir(tmp_path)
    (tmp_path / "metrics").mkdir()
    m = {t: {k: 0.123 for k in ("AP", "AP50", "AP75", "AR100")} for t in ("segm", "bbox")}
    (tmp_path / "metrics" / "freemask.json").write_text(json.dumps(m))
    (tmp_path / "README.md").write_text("intro\n<!-- results:start -->\nold\n<!-- results:end -->\nrest\n")
    pipeline.update_readme(Params(), "README.md")
    text = (tmp_path / "README.md").read_text()
    assert text.startswith("intro\n<!-- results:start -->\n| model | segm AP |") and text.endswith("-->\nrest\n")
    assert "| freemask | 12.3 |" in text and "old" not in text
    (tmp_path / "R2.md").write_text("no markers")
    with pytest.raises(ValueError, match="R2.md: no"):
        pipeline.update_readme(Params(), "R2.md")
