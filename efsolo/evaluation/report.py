"""The ``report`` stage: the same val images under every model, side by side.

For a seeded sample of validation images it writes ``<id>_<name>.png`` under ``out_dir``: the ground
truth (when there is one), then each model's instances (score >= ``min_score``, at most
``max_instances``, best on top). ``dvc.yaml`` declares the folder as image plots, so
``dvc plots show`` puts them in the HTML report next to the training and precision-recall
curves and the exemplar pool's contact sheet.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from efsolo.data.coco_format import encode_mask, decode_mask, read_json
from efsolo.data.datasets import load_manifest
from efsolo.data.images import ImageReadError, read_image
from efsolo.evaluation.overlay import draw_annotations, side_by_side
from efsolo.utils import atomic


def sample_ids(ids: list[int], count: int, seed: int) -> list[int]:
    """``count`` of ``ids`` drawn without replacement by ``seed``, in ascending order."""
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(ids), size=min(count, len(ids)), replace=False)
    return sorted(ids[i] for i in picked)


def _by_image(annotations: list[dict]) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = defaultdict(list)
    for a in annotations:
        out[a["image_id"]].append(a)
    return out


def _rescale(anns: list[dict], scale: float, size: tuple[int, int]) -> list[dict]:
    """Annotations for the image resized by ``scale`` to ``size`` (h, w); box-only ones keep no mask."""
    out = []
    for a in anns:
        b = {**a, "bbox": [v * scale for v in a["bbox"]]}
        if a.get("segmentation"):
            m = cv2.resize(decode_mask(a["segmentation"]), (size[1], size[0]), interpolation=cv2.INTER_NEAREST)
            b["segmentation"] = encode_mask(m)
        out.append(b)
    return out


def write_overlays(val_manifest: str | Path, val_gt: str | Path, predictions: dict[str, str | Path], out_dir: str | Path,
        num_images: int, seed: int, min_score: float = 0.3, max_instances: int = 20, min_height: int = 256) -> dict:
    """Write ``out_dir/<image>.png`` for ``num_images`` seeded val images; returns what was drawn.

    ``predictions`` maps a model name to its val predictions (COCO results, or a dataset whose
    annotations carry scores). Small images are enlarged to ``min_height`` so masks stay visible.
    """
    records = {r["id"]: r for r in load_manifest(val_manifest)}
    gt = read_json(val_gt)
    has_gt = gt.get("info", {}).get("has_ground_truth", True)
    sources: dict[str, dict[int, list[dict]]] = {}
    if has_gt:
        sources["ground truth"] = _by_image(gt["annotations"])
    for name, path in predictions.items():
        p = read_json(path)
        sources[name] = _by_image(p["annotations"] if isinstance(p, dict) else p)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("*.png"):  # a smaller sample must not leave earlier pictures behind
        old.unlink()
    written = []
    for image_id in tqdm(sample_ids(sorted(records), num_images, seed), desc="report", disable=None, leave=False):
        rec = records[image_id]
        try:
            img = read_image(rec["file_name"])
        except ImageReadError as err:
            print(f"report: skipped {err}")
            continue
        scale = max(1.0, min_height / img.shape[0])
        size = (int(round(img.shape[0] * scale)), int(round(img.shape[1] * scale)))
        big = cv2.resize(img, (size[1], size[0]), interpolation=cv2.INTER_NEAREST) if scale > 1 else img
        panels = []
        for name, by_id in sources.items():
            anns = _rescale(by_id.get(image_id, []), scale, size)
            panels.append((name, draw_annotations(big, anns, max_instances, 0.0 if name == "ground truth" else min_score)))
        name = f"{image_id:06d}_{Path(rec['file_name']).stem}.png"
        atomic.write_image(out_dir / name, side_by_side(panels))
        written.append(name)
    return {"images": written, "panels": list(sources)}
