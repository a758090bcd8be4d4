import dataclasses
import hashlib
import json

import cv2
import numpy as np
import pytest

from efsolo.data.coco_format import decode_mask, mask_annotation
from efsolo.config import DataParams, SyntheticParams
from efsolo.data.datasets import DataError, data_metrics, prepare_dataset
from efsolo.data.synthetic import NUM_KINDS, contrast_with_surroundings, indistinct, make_scene


def _prepare(out, source, seed, **kw):
    """prepare_dataset with ``data`` built from keyword arguments (synthetic sizes included)."""
    names = {f.name for f in dataclasses.fields(SyntheticParams)}
    synthetic = SyntheticParams(**{k: kw.pop(k) for k in list(kw) if k in names})
    return prepare_dataset(out, DataParams(source=source, synthetic=synthetic, **kw), seed=seed)


def _write_images(folder, n, size=(20, 30)):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        cv2.imwrite(str(folder / f"{i}.png"), rng.integers(0, 255, (*size, 3), dtype=np.uint8))


@pytest.mark.parametrize("look", ["gradient", "photo"])
def test_synthetic_is_deterministic_and_valid(look):
    a, b = make_scene(0, "val", 3, 96, 2, 6, look), make_scene(0, "val", 3, 96, 2, 6, look)
    assert np.array_equal(a.image, b.image) and a.kinds == b.kinds
    assert not np.array_equal(a.image, make_scene(1, "val", 3, 96, 2, 6, look).image)
    kinds = set()
    for i in range(40):
        s = make_scene(0, "train", i, 96, 2, 6, look)
        assert 1 <= len(s.masks) <= 6
        union = np.zeros((96, 96), int)
        for m in s.masks:
            assert m.sum() >= 16
            union += m
        assert union.max() <= 1  # visible masks do not overlap
        kinds.update(s.kinds)
    assert len(kinds) >= 8 and max(kinds) < NUM_KINDS


def test_the_default_look_is_unchanged_and_the_photo_look_differs():
    """The gradient look's images are pinned: adding looks must not change the demo's data."""
    scenes = [make_scene(s, split, i, 160, 2, 6) for s in (0, 1) for split in ("train", "val") for i in range(3)]
    digest = hashlib.sha256(b"".join(sc.image.tobytes() for sc in scenes)).hexdigest()
    assert digest == "1ccd6142b44ef8f6db185911f103d225807e537b1798dbb21427df75fea3de25"
    photo = make_scene(0, "train", 0, 160, 2, 6, "photo")
    assert not np.array_equal(photo.image, scenes[0].image)
    with pytest.raises(ValueError, match="unknown look 'sketch'"):
        make_scene(0, "train", 0, 64, 2, 6, "sketch")


def test_synthetic_run_writes_manifests_and_gt(tmp_path):
    report = _prepare(tmp_path, "synthetic", seed=0, num_train=4, num_val=3, image_size=64)
    assert report["train_images"] == 4 and report["val_images"] == 3 and report["skipped"] == []
    manifest = json.loads((tmp_path / "train.json").read_text())
    rec = manifest["images"][0]
    assert set(rec) == {"id", "file_name", "width", "height", "sha256"} and len(rec["sha256"]) == 64
    gt = json.loads((tmp_path / "val_gt.json").read_text())
    assert gt["categories"] == [{"id": 1, "name": "object", "supercategory": "object"}]
    ann = gt["annotations"][0]
    x, y, w, h = ann["bbox"]
    m = decode_mask(ann["segmentation"])
    ys, xs = np.nonzero(m)
    assert (x, y, w, h) == (xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)
    assert (tmp_path / "train_gt.json").exists()
    assert report["val_ignored"] == sum(a["iscrowd"] for a in gt["annotations"])
    counts = data_metrics(report)  # the data stage's metrics file
    assert counts["val"] == {"images": 3, "objects": len(gt["annotations"]), "ignored": report["val_ignored"]}
    assert counts["train"]["images"] == 4 and counts["skipped"] == 0


def test_an_object_nobody_can_see_is_an_ignore_region():
    """The ignore rule reads only pixels: a disc of the same texture as its surroundings is
    indistinct; the same disc brighter, or smooth on the textured ground, is not."""
    rng = np.random.default_rng(0)
    ground = rng.integers(60, 200, (96, 96, 3), dtype=np.uint8)
    disc = np.zeros((96, 96), np.uint8)
    cv2.circle(disc, (48, 48), 20, 1, -1)
    disc = disc.astype(bool)
    colour, texture = contrast_with_surroundings(ground, disc)
    assert colour < 0.2 and texture < 0.2 and indistinct(ground, disc)
    bright = ground.copy()
    bright[disc] = np.clip(bright[disc].astype(int) + 120, 0, 255).astype(np.uint8)
    assert not indistinct(bright, disc)
    smooth = ground.copy()
    smooth[disc] = ground.reshape(-1, 3).mean(0).astype(np.uint8)  # the same mean colour, no texture
    assert contrast_with_surroundings(smooth, disc)[1] > 0.5 and not indistinct(smooth, disc)


def test_the_photo_look_ignores_more_objects_than_the_gradient_look():
    """Objects cut from their own photograph are often indistinct; the gradient look's rarely."""
    counts = {}
    for look in ("gradient", "photo"):
        scenes = [make_scene(3, "train", i, 160, 2, 6, look) for i in range(20)]
        flags = [indistinct(sc.image, m) for sc in scenes for m in sc.masks]
        counts[look] = sum(flags) / len(flags)
    assert counts["gradient"] < 0.1 < counts["photo"]


def _coco(tmp_path):
    val = tmp_path / "val2017"
    _write_images(val, 3)
    (val / "3.png").write_bytes(b"garbage")  # corrupt
    m = np.zeros((20, 30), bool)
    m[2:8, 3:9] = True
    images = [{"id": 10 + i, "file_name": f"{i}.png", "width": 30, "height": 20} for i in range(4)]
    images.append({"id": 99, "file_name": "missing.png", "width": 30, "height": 20})
    anns = [{**mask_annotation(m, 1, 10), "category_id": 18}, {**mask_annotation(m, 2, 13), "category_id": 3},
            {**mask_annotation(m, 3, 11), "category_id": 3, "iscrowd": 1}]
    cats = [{"id": 3, "name": "car"}, {"id": 18, "name": "dog"}]
    (tmp_path / "instances_val.json").write_text(json.dumps({"images": images, "annotations": anns,
                                                             "categories": cats}))
    _write_images(tmp_path / "train_a", 2)
    _write_images(tmp_path / "train_b", 2)
    return val


def test_coco_source_is_class_agnostic_and_skips_bad_images(tmp_path):
    val = _coco(tmp_path)
    out = tmp_path / "out"
    report = _prepare(out, "coco", seed=0, train_images=(str(tmp_path / "train_a"), str(tmp_path / "train_b")),
                 val_images=(str(val),), val_annotations=str(tmp_path / "instances_val.json"))
    assert report["train_images"] == 4 and report["val_images"] == 3
    skipped = {s["file"].split("/")[-1]: s["reason"] for s in report["skipped"]}
    assert set(skipped) == {"3.png", "missing.png"} and "not a readable image" in skipped["3.png"]
    gt = json.loads((out / "val_gt.json").read_text())
    assert [c["id"] for c in gt["categories"]] == [1]
    assert {a["category_id"] for a in gt["annotations"]} == {1}
    assert sorted(a["id"] for a in gt["annotations"]) == [1, 3]  # image 13 was corrupt
    assert [a["iscrowd"] for a in sorted(gt["annotations"], key=lambda a: a["id"])] == [0, 1]
    manifest = json.loads((out / "val.json").read_text())
    assert [r["id"] for r in manifest["images"]] == [10, 11, 12]
    counts = data_metrics(report)
    assert counts["val"] == {"images": 3, "objects": 2, "ignored": 1} and counts["skipped"] == 2


def test_missing_paths_and_empty_sets_stop_with_one_line(tmp_path):
    with pytest.raises(DataError, match="nowhere: no such folder"):
        _prepare(tmp_path / "o", "folder", seed=0, train_images=(str(tmp_path / "nowhere"),), val_images=("x",))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no image files"):
        _prepare(tmp_path / "o", "folder", seed=0, train_images=(str(tmp_path / "empty"),), val_images=("x",))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.jpg").write_bytes(b"nope")
    with pytest.raises(DataError, match="no readable images"):
        _prepare(tmp_path / "o", "folder", seed=0, train_images=(str(tmp_path / "bad"),), val_images=("x",))
    _write_images(tmp_path / "imgs", 2)
    with pytest.raises(Exception, match="ann.json: no such file"):
        _prepare(tmp_path / "o", "coco", seed=0, train_images=(str(tmp_path / "imgs"),),
            val_images=(str(tmp_path / "imgs"),), val_annotations=str(tmp_path / "ann.json"))


def test_folder_source_has_no_ground_truth(tmp_path):
    _write_images(tmp_path / "mine", 3)
    _prepare(tmp_path / "o", "folder", seed=0, train_images=(str(tmp_path / "mine"),),
        val_images=(str(tmp_path / "mine"),))
    gt = json.loads((tmp_path / "o" / "val_gt.json").read_text())
    assert gt["info"]["has_ground_truth"] is False and gt["annotations"] == [] and len(gt["images"]) == 3


def test_uvo_style_json_with_polygons_and_frame_folders_loads_and_evaluates(tmp_path):
    """UVO val is COCO-format: frames in per-video folders, polygon masks; loaded by source coco."""
    from efsolo.data.coco_format import mask_annotation
    from efsolo.evaluation.evaluate import evaluate

    frames = tmp_path / "uvo_frames"
    _write_images(frames / "vid_a", 2)
    images = [{"id": 7, "file_name": "vid_a/0.png", "width": 30, "height": 20},
              {"id": 8, "file_name": "vid_a/1.png", "width": 30, "height": 20}]
    anns = [{"id": 1, "image_id": 7, "category_id": 1, "segmentation": [[3, 2, 12, 2, 12, 10, 3, 10]],
             "bbox": [3, 2, 9, 8], "area": 72, "iscrowd": 0}]
    (tmp_path / "uvo_val.json").write_text(json.dumps({"images": images, "annotations": anns,
                                                       "categories": [{"id": 1, "name": "object"}]}))
    _write_images(tmp_path / "coco_train", 2)
    report = _prepare(tmp_path / "o", "coco", seed=0, train_images=(str(tmp_path / "coco_train"),),
                 val_images=(str(frames),), val_annotations=str(tmp_path / "uvo_val.json"))
    assert report["val_images"] == 2 and report["skipped"] == []
    gt = json.loads((tmp_path / "o" / "val_gt.json").read_text())
    from pycocotools import mask as mask_utils
    rle = mask_utils.frPyObjects(anns[0]["segmentation"], 20, 30)
    m = mask_utils.decode(mask_utils.merge(rle)).astype(bool)
    pred = {**mask_annotation(m, 1, 7, score=0.9), "category_id": 1}
    metrics, _ = evaluate(gt, [pred])
    assert metrics["segm"]["AP50"] == pytest.approx(1.0) and metrics["bbox"]["AP50"] == pytest.approx(1.0)
