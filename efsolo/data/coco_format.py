"""COCO-format helpers: RLE encoding, tight ``[x, y, w, h]`` boxes, class-agnostic ground truth."""
from __future__ import annotations

from efsolo.utils.errors import EfsoloError

import json
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

AGNOSTIC_CATEGORY = {"id": 1, "name": "object", "supercategory": "object"}


class AnnotationError(EfsoloError):
    """A COCO annotation file that is missing or malformed (one-line message naming it)."""


def encode_mask(mask: np.ndarray) -> dict:
    """Binary mask (H, W) -> COCO RLE with a JSON-safe ``counts`` string."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def decode_mask(rle: dict) -> np.ndarray:
    """COCO RLE (compressed or not) -> binary mask (H, W) uint8."""
    if isinstance(rle.get("counts"), list):
        rle = mask_utils.frPyObjects(rle, *rle["size"])
    return mask_utils.decode(rle)


def mask_box(mask: np.ndarray) -> list[float]:
    """Tight COCO box ``[x, y, w, h]`` of the mask's pixels; ``[0, 0, 0, 0]`` for an empty mask."""
    ys = np.flatnonzero(mask.any(axis=1))
    xs = np.flatnonzero(mask.any(axis=0))
    if ys.size == 0:
        return [0.0, 0.0, 0.0, 0.0]
    return [float(xs[0]), float(ys[0]), float(xs[-1] - xs[0] + 1), float(ys[-1] - ys[0] + 1)]


def mask_annotation(mask: np.ndarray, ann_id: int, image_id: int, score: float | None = None) -> dict:
    ann = {
        "id": ann_id,
        "image_id": image_id,
        "category_id": AGNOSTIC_CATEGORY["id"],
        "segmentation": encode_mask(mask),
        "area": float(mask.sum()),
        "bbox": mask_box(mask),
        "iscrowd": 0,
    }
    if score is not None:
        ann["score"] = float(score)
    return ann


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(f"{path}: no such file")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise AnnotationError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None


def class_agnostic(dataset: dict, path: str | Path = "<dataset>") -> dict:
    """A COCO instances dataset with every category merged into one ``object`` (iscrowd kept)."""
    for key in ("images", "annotations"):
        if not isinstance(dataset.get(key), list):
            raise AnnotationError(f"{path}: not a COCO instances file (no '{key}' list)")
    anns = []
    for i, ann in enumerate(dataset["annotations"]):
        for key in ("image_id", "bbox"):
            if key not in ann:
                raise AnnotationError(f"{path}: annotation {ann.get('id', i)} has no '{key}'")
        anns.append({**ann, "category_id": AGNOSTIC_CATEGORY["id"], "iscrowd": int(ann.get("iscrowd", 0))})
    return {
        "info": dataset.get("info", {}),
        "images": dataset["images"],
        "annotations": anns,
        "categories": [AGNOSTIC_CATEGORY],
    }


def empty_dataset(images: list[dict]) -> dict:
    return {"images": images, "annotations": [], "categories": [AGNOSTIC_CATEGORY]}
