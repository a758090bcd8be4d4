"""``efsolo predict``: segment any images with a trained model.

Writes, under ``out_dir``: ``results.json`` (COCO results: RLE masks, ``[x, y, w, h]`` boxes,
scores), ``images.json`` (the COCO ``images`` those results refer to, with their paths), and
``overlays/<name>.png`` (masks, boxes and scores drawn on each image). Files that cannot be
read are skipped and listed in ``skipped.json``.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from efsolo.config import OVERLAY_MIN_SCORE, TestSettings
from efsolo.data.coco_format import AGNOSTIC_CATEGORY, encode_mask, mask_box
from efsolo.data.images import IMAGE_SUFFIXES, ImageReadError, list_images, read_image
from efsolo.evaluation.overlay import draw_instances
from efsolo.modeling.inference import predict_image
from efsolo.modeling.model_io import load_model_and_settings
from efsolo.utils import atomic
from efsolo.utils.errors import EfsoloError


def collect_images(inputs: list[str]) -> list[Path]:
    """Image files named directly, and every image file (by suffix) under named folders, in order,
    each once. A path that does not exist is an error; a named file is taken whatever its suffix."""
    if not inputs:
        raise EfsoloError("predict: no images or folders given")
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            out.extend(list_images([str(p)]))
        elif p.is_file():
            out.append(p)
        else:
            raise EfsoloError(f"{p}: no such file or folder")
    seen: set[Path] = set()
    return [p for p in out if not (p.resolve() in seen or seen.add(p.resolve()))]


def _overlay_names(paths: list[Path]) -> list[str]:
    """A distinct ``<stem>.png`` per image (``<stem>-2.png``, ... when stems repeat)."""
    names, used = [], set()
    for p in paths:
        name, k = f"{p.stem}.png", 1
        while name in used:
            k += 1
            name = f"{p.stem}-{k}.png"
        used.add(name)
        names.append(name)
    return names


def predict_folder(model_path: str | Path, inputs: list[str], out_dir: str | Path, short_side: int | None = None,
        max_side: int | None = None, test: TestSettings | None = None, device: torch.device | None = None,
        overlay_min_score: float = OVERLAY_MIN_SCORE, overlays: bool = True, test_overrides: dict | None = None) -> dict:
    """Predict every image; returns a summary ``{images, instances, skipped, out}``.

    ``test`` defaults to the inference settings the model file records (those its stage evaluated
    it with), with ``test_overrides`` (field -> value, e.g. ``{"score_threshold": 0.2}``) applied on
    top; ``short_side`` / ``max_side`` default to its input size.
    """
    device = device or torch.device("cpu")
    model, recorded = load_model_and_settings(model_path)
    model = model.to(device)
    test = replace(test or recorded, **(test_overrides or {}))
    short_side, max_side = short_side or test.short_side, max_side or test.max_side
    paths = collect_images(inputs)
    if not paths:
        raise EfsoloError(f"predict: no image files in {', '.join(inputs)} (suffixes {sorted(IMAGE_SUFFIXES)})")
    out_dir = Path(out_dir)
    names = _overlay_names(paths)
    results, images, skipped = [], [], []
    for image_id, (path, name) in enumerate(tqdm(list(zip(paths, names)), desc="predict", disable=None), start=1):
        try:
            img = read_image(path)
        except ImageReadError as err:
            skipped.append({"file": str(path), "reason": str(err)})
            continue
        masks, scores, _ = predict_image(model, img, short_side, max_side, test, device)
        boxes = [mask_box(m) for m in masks]
        images.append({"id": image_id, "file_name": str(path), "width": img.shape[1], "height": img.shape[0],
                       "overlay": f"overlays/{name}" if overlays else None})
        for m, b, s in zip(masks, boxes, scores):
            results.append({"image_id": image_id, "category_id": AGNOSTIC_CATEGORY["id"],
                            "segmentation": encode_mask(m), "bbox": b, "score": float(s)})
        if overlays:
            keep = scores >= overlay_min_score
            atomic.write_image(out_dir / "overlays" / name,
                               draw_instances(img, masks[keep], np.array(boxes, np.float32).reshape(-1, 4)[keep],
                                              scores[keep]))
    atomic.write_json(out_dir / "results.json", results)
    atomic.write_json(out_dir / "images.json", {"images": images, "categories": [AGNOSTIC_CATEGORY]}, indent=1)
    atomic.write_json(out_dir / "skipped.json", skipped, indent=1)
    for s in skipped:
        print(f"skipped: {s['reason']}")
    return {"images": len(images), "instances": len(results), "skipped": len(skipped), "out": str(out_dir)}
