import json

import cv2
import numpy as np
import pytest

from efsolo.data.datasets import DataError
from efsolo.evaluation.evaluate import evaluate, results_table
from test_datasets import _prepare
from efsolo.data.voc import VOCError, image_set, read_annotation, voc_dataset


def _xml(name, w, h, objects):
    objs = "".join(f"<object><name>{n}</name><difficult>{int(d)}</difficult><bndbox><xmin>{x0}</xmin>"
                   f"<ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"
                   for n, (x0, y0, x1, y1), d in objects)
    return f"<annotation><filename>{name}</filename><size><width>{w}</width><height>{h}</height>" \
           f"<depth>3</depth></size>{objs}</annotation>"


def _voc(root):
    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    (root / "ImageSets" / "Main").mkdir(parents=True)
    rng = np.random.default_rng(0)
    specs = {"000001": [("dog", (1, 1, 10, 20), False), ("cat", (15, 5, 30, 15), True)],
             "000002": [("car", (5, 5, 24, 14), False)],
             "000003": []}
    for i, objs in specs.items():
        (root / "Annotations" / f"{i}.xml").write_text(_xml(f"{i}.jpg", 40, 30, objs))
        cv2.imwrite(str(root / "JPEGImages" / f"{i}.jpg"), rng.integers(0, 255, (30, 40, 3), dtype=np.uint8))
    (root / "ImageSets" / "Main" / "trainval.txt").write_text("000002\n000001\n")
    return root


def test_read_annotation_converts_inclusive_one_based_boxes(tmp_path):
    root = _voc(tmp_path / "VOC2007")
    a = read_annotation(root / "Annotations" / "000001.xml")
    assert (a["file_name"], a["width"], a["height"]) == ("000001.jpg", 40, 30)
    assert a["objects"][0] == {"name": "dog", "bbox": [0.0, 0.0, 10.0, 20.0], "difficult": False}
    assert a["objects"][1]["difficult"] is True


def test_voc_dataset_follows_the_image_set_and_ignores_difficult(tmp_path):
    root = _voc(tmp_path / "VOC2007")
    gt = voc_dataset(root / "Annotations", image_set(root / "ImageSets" / "Main" / "trainval.txt"))
    assert [i["file_name"] for i in gt["images"]] == ["000002.jpg", "000001.jpg"]
    assert [(a["image_id"], a["iscrowd"]) for a in gt["annotations"]] == [(1, 0), (2, 0), (2, 1)]
    assert all("segmentation" not in a for a in gt["annotations"])
    assert len(voc_dataset(root / "Annotations")["images"]) == 3  # no image set: every XML


@pytest.mark.parametrize("text, message", [
    ("<annotation>", "not valid XML"),
    ("<annotation><filename>a.jpg</filename></annotation>", "no <size>"),
    ("<annotation><filename>a.jpg</filename><size><width>4</width><height>4</height></size><object><name>x</name>"
     "<bndbox><xmin>3</xmin><ymin>1</ymin><xmax>1</xmax><ymax>2</ymax></bndbox></object></annotation>", "xmax < xmin"),
])
def test_bad_annotation_is_one_line_naming_the_file(tmp_path, text, message):
    p = tmp_path / "bad.xml"
    p.write_text(text)
    with pytest.raises(VOCError, match=message) as err:
        read_annotation(p)
    assert str(p) in str(err.value) and "\n" not in str(err.value)


def test_voc_source_trains_on_the_evaluation_images_and_evaluates_boxes_only(tmp_path):
    root = _voc(tmp_path / "VOC2007")
    out = tmp_path / "prepared"
    report = _prepare(out, "voc", seed=0, val_images=(str(root / "JPEGImages"),),
                 val_annotations=str(root / "Annotations"),
                 voc_image_set=str(root / "ImageSets" / "Main" / "trainval.txt"))
    assert report["train_images"] == report["val_images"] == 2
    train = json.loads((out / "train.json").read_text())["images"]
    assert [r["file_name"].split("/")[-1] for r in train] == ["000002.jpg", "000001.jpg"]
    gt = json.loads((out / "val_gt.json").read_text())
    # a perfect box on the dog and on the car, a false one elsewhere: AP50 = 1 (difficult cat ignored)
    results = [{"image_id": 2, "bbox": [0, 0, 10, 20], "score": 0.9, "segmentation": None},
               {"image_id": 1, "bbox": [4, 4, 20, 10], "score": 0.8, "segmentation": None},
               {"image_id": 2, "bbox": [15, 5, 16, 11], "score": 0.7, "segmentation": None}]
    metrics, curves = evaluate(gt, [{**r, "category_id": 1} for r in results])
    assert set(metrics) == {"bbox"} and set(curves) == {"bbox"}
    assert metrics["bbox"]["AP50"] == pytest.approx(1.0)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "voc.json").write_text(json.dumps(metrics))
    row = results_table(tmp_path / "m").iloc[0]
    assert row["segm AP"] == "-" and row["bbox AP50"] == 100.0


def test_voc_source_names_a_missing_annotation_file(tmp_path):
    root = _voc(tmp_path / "VOC2007")
    (root / "ImageSets" / "Main" / "trainval.txt").write_text("000002\n000404\n")
    with pytest.raises(DataError, match="000404.xml: no such file"):
        _prepare(tmp_path / "p", "voc", seed=0, val_images=(str(root / "JPEGImages"),),
            val_annotations=str(root / "Annotations"), voc_image_set=str(root / "ImageSets" / "Main" / "trainval.txt"))
