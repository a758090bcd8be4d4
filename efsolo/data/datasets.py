"""The ``data`` stage: training (unlabelled) and validation sets as small manifests.

Outputs, all under ``out_dir``:

- ``train.json`` / ``val.json``: manifests ``{"source", "split", "images": [{id, file_name,
  width, height, sha256}]}``; later stages depend on these, not on thousands of files.
- ``val_gt.json``: class-agnostic COCO ground truth of the validation images (no annotations
  and ``info.has_ground_truth = false`` for a plain folder).
- ``train_gt.json``: synthetic source only, for analysis; no training stage reads it.
- ``report.json``: counts and every skipped file with the reason.
- ``images/``: the generated images (synthetic source only).
"""
from __future__ import annotations

from efsolo.utils.errors import EfsoloError

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable

from tqdm import tqdm

from efsolo.config.schema import DataParams
from efsolo.data.coco_format import AGNOSTIC_CATEGORY, class_agnostic, empty_dataset, mask_annotation, read_json
from efsolo.data.images import ImageReadError, file_sha256, list_images, read_image
from efsolo.utils import atomic


class DataError(EfsoloError):
    """A missing path or an empty image set (one-line message naming it)."""


def _probe(path: Path) -> tuple[int, int, str]:
    """Decode the whole image (catches truncated files) and hash its bytes."""
    img = read_image(path)
    return img.shape[0], img.shape[1], file_sha256(path)


def probe_images(paths: list[Path], desc: str) -> tuple[list[dict], list[dict]]:
    """Validate images in parallel. Returns (records in input order, skipped [{file, reason}])."""

    def one(p: Path) -> dict:
        try:
            h, w, digest = _probe(p)
            return {"file_name": str(p), "width": w, "height": h, "sha256": digest}
        except ImageReadError as err:
            return {"file": str(p), "reason": str(err)}

    workers = min(16, (os.cpu_count() or 1) * 2)
    with ThreadPoolExecutor(workers) as pool:
        results = list(tqdm(pool.map(one, paths), total=len(paths), desc=desc, disable=None, leave=False))
    good = [r for r in results if "sha256" in r]
    bad = [r for r in results if "reason" in r]
    return good, bad


def _manifest(source: str, split: str, images: Iterable[dict]) -> dict:
    return {"source": source, "split": split, "images": list(images)}


def _require_nonempty(images: list, what: str) -> None:
    if not images:
        raise DataError(f"{what}: no readable images")


def prepare_synthetic(out_dir: Path, seed: int, num_train: int, num_val: int, image_size: int,
                      min_objects: int, max_objects: int, look: str = "gradient") -> dict:
    from efsolo.data.synthetic import indistinct, make_scene

    outputs: dict[str, dict] = {}
    for split, count in (("train", num_train), ("val", num_val)):
        records, anns = [], []
        for i in tqdm(range(count), desc=f"synthetic {split}", disable=None, leave=False):
            scene = make_scene(seed, split, i, image_size, min_objects, max_objects, look)
            path = out_dir / "images" / split / f"{i:05d}.png"
            atomic.write_image(path, scene.image)
            image_id = i + 1
            records.append({"id": image_id, "file_name": str(path), "width": image_size,
                            "height": image_size, "sha256": file_sha256(path)})
            for mask, kind in zip(scene.masks, scene.kinds):
                ann = mask_annotation(mask, len(anns) + 1, image_id)
                ann["kind"] = kind  # hidden kind, for analysis only
                # an object that cannot be told from its surroundings is an ignore region (synthetic.indistinct)
                ann["iscrowd"] = int(indistinct(scene.image, mask))
                anns.append(ann)
        gt = {"info": {"description": "efsolo synthetic demo", "has_ground_truth": True},
              "images": records, "annotations": anns, "categories": [AGNOSTIC_CATEGORY]}
        outputs[split] = {"manifest": _manifest("synthetic", split, records), "gt": gt, "skipped": []}
    return outputs


def _find_file(name: str, folders: tuple[str, ...]) -> Path | None:
    for folder in folders:
        p = Path(folder) / name
        if p.is_file():
            return p
    return None


def prepare_val_with_gt(gt: dict, val_images: tuple[str, ...], source: str, what: str) -> dict:
    """Locate and validate the images of a class-agnostic ground truth in ``val_images``; images
    that are missing or unreadable are skipped (and listed), their annotations dropped."""
    for folder in val_images:
        if not Path(folder).is_dir():
            raise DataError(f"{folder}: no such folder (data.val_images)")
    skipped: list[dict] = []
    located: list[tuple[dict, Path]] = []
    for img in gt["images"]:
        p = _find_file(img.get("file_name", ""), val_images)
        if p is None:
            skipped.append({"file": img.get("file_name", "?"), "reason": f"not found in {list(val_images)}"})
        else:
            located.append((img, p))
    good, bad = probe_images([p for _, p in located], "validating val images")
    skipped += bad
    good_by_path = {g["file_name"]: g for g in good}
    records, kept_ids = [], set()
    for img, p in located:
        g = good_by_path.get(str(p))
        if g is None:
            continue
        records.append({"id": img["id"], **g})
        kept_ids.add(img["id"])
    _require_nonempty(records, f"{what} with images in {list(val_images)}")
    by_id = {r["id"]: r for r in records}
    gt = {**gt, "info": {**gt.get("info", {}), "has_ground_truth": True},
          "images": [{**img, "width": by_id[img["id"]]["width"], "height": by_id[img["id"]]["height"]}
                     for img in gt["images"] if img["id"] in kept_ids],
          "annotations": [a for a in gt["annotations"] if a["image_id"] in kept_ids]}
    return {"manifest": _manifest(source, "val", records), "gt": gt, "skipped": skipped}


def prepare_coco_val(val_images: tuple[str, ...], val_annotations: str) -> dict:
    gt = class_agnostic(read_json(val_annotations), val_annotations)
    return prepare_val_with_gt(gt, val_images, "coco", val_annotations)


def prepare_voc_val(val_images: tuple[str, ...], annotations_dir: str, image_set_file: str) -> dict:
    from efsolo.data import voc

    try:
        ids = voc.image_set(image_set_file) if image_set_file else None
        gt = voc.voc_dataset(annotations_dir, ids)
    except voc.VOCError as err:
        raise DataError(str(err)) from None
    return prepare_val_with_gt(gt, val_images, "voc", annotations_dir)


def _train_from_val(val: dict, source: str) -> dict:
    """The discovery protocol: train, without labels, on the evaluation images themselves."""
    records = val["manifest"]["images"]
    return {"manifest": _manifest(source, "train", records), "gt": empty_dataset([]), "skipped": []}


def prepare_folder(split: str, folders: tuple[str, ...], source: str) -> dict:
    try:
        paths = list_images(folders)
    except ImageReadError as err:
        raise DataError(f"{err} (data.{split}_images)") from None
    if not paths:
        raise DataError(f"{', '.join(folders)}: no image files (data.{split}_images)")
    good, skipped = probe_images(paths, f"validating {split} images")
    records = [{"id": i + 1, **g} for i, g in enumerate(good)]
    _require_nonempty(records, ", ".join(folders))
    gt = empty_dataset([{k: r[k] for k in ("id", "file_name", "width", "height")} for r in records])
    gt["info"] = {"has_ground_truth": False}
    return {"manifest": _manifest(source, split, records), "gt": gt, "skipped": skipped}


def prepare_dataset(out_dir: str | Path, settings: DataParams, seed: int) -> dict:
    """Prepare both splits of ``settings`` (``data``) and write the manifests, ground truth and
    report. Returns the report."""
    out_dir = Path(out_dir)
    source, train_images, val_images = settings.source, settings.train_images, settings.val_images
    val_annotations, voc_image_set, syn = settings.val_annotations, settings.voc_image_set, settings.synthetic
    if source == "synthetic":
        splits = prepare_synthetic(out_dir, seed, syn.num_train, syn.num_val, syn.image_size, syn.min_objects,
                                   syn.max_objects, syn.look)
    elif source == "coco":
        splits = {"train": prepare_folder("train", train_images, "coco"),
                  "val": prepare_coco_val(val_images, val_annotations)}
    elif source == "voc":
        val = prepare_voc_val(val_images, val_annotations, voc_image_set)
        splits = {"train": prepare_folder("train", train_images, "voc") if train_images else _train_from_val(val, "voc"),
                  "val": val}
    elif source == "folder":
        splits = {"train": prepare_folder("train", train_images, "folder"),
                  "val": prepare_folder("val", val_images, "folder")}
    else:
        raise DataError(f"data.source: unknown source {source!r}")
    for split, result in splits.items():
        atomic.write_json(out_dir / f"{split}.json", result["manifest"])
        if split == "val" or source == "synthetic":
            atomic.write_json(out_dir / f"{split}_gt.json", result["gt"])
    report = {
        "source": source,
        "splits": list(splits),
        **{f"{s}_images": len(r["manifest"]["images"]) for s, r in splits.items()},
        **{f"{s}_annotations": len(r["gt"]["annotations"]) for s, r in splits.items()},
        # ground-truth objects that are ignore regions (COCO iscrowd 1; synthetic: synthetic.indistinct)
        **{f"{s}_ignored": sum(a.get("iscrowd", 0) for a in r["gt"]["annotations"]) for s, r in splits.items()},
        "skipped": [{"split": s, **k} for s, r in splits.items() for k in r["skipped"]],
    }
    atomic.write_json(out_dir / "report.json", report, indent=1)
    for item in report["skipped"]:
        print(f"skipped {item['file']}: {item['reason']}")
    return report


def data_metrics(report: dict) -> dict:
    """The numbers of a ``report.json`` per split (its ``splits``): {split: {images, objects, ignored},
    skipped}. ``objects`` counts every ground-truth annotation, ``ignored`` those that are ignore regions."""
    splits = report["splits"]
    out: dict = {s: {"images": report[f"{s}_images"], "objects": report.get(f"{s}_annotations", 0),
                     "ignored": report.get(f"{s}_ignored", 0)} for s in splits}
    out["skipped"] = len(report.get("skipped", []))
    return out


def load_manifest(path: str | Path) -> list[dict]:
    """The image records of a manifest written by :func:`prepare_dataset`."""
    return read_json(path)["images"]
