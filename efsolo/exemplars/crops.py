"""Exemplar knowledge abstraction (paper section 3.3): GrabCut exemplar crops, then FreeSOLO
refinement into exemplar objects X_e (the pool D_P), with contact sheets to look at."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm import tqdm

from efsolo.config import TestSettings
from efsolo.data.coco_format import read_json
from efsolo.data.datasets import load_manifest
from efsolo.data.images import ImageReadError, read_image
from efsolo.utils import atomic


def grabcut_crop(img: np.ndarray, rect_margin: float = 0.05, iterations: int = 5, crop_margin: float = 0.1,
                 seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[int]] | None:
    """GrabCut a coarse foreground of an RGB uint8 image (H, W, 3) from a rectangle inset by
    ``rect_margin`` of each side; crop to the foreground's box grown by ``crop_margin``.

    Returns (crop (h, w, 3), coarse mask of the crop (h, w) bool, crop box [x, y, w, h] in the
    image), or ``None`` when GrabCut finds no foreground.
    """
    h, w = img.shape[:2]
    mx, my = max(1, int(round(w * rect_margin))), max(1, int(round(h * rect_margin)))
    rect = (mx, my, max(1, w - 2 * mx), max(1, h - 2 * my))
    mask = np.zeros((h, w), np.uint8)
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    cv2.setRNGSeed(seed)
    try:
        cv2.grabCut(img[:, :, ::-1].copy(), mask, rect, bgd, fgd, iterations, cv2.GC_INIT_WITH_RECT)
    except cv2.error:
        return None
    fg = (mask == cv2.GC_FGD) | (mask == cv2.GC_PR_FGD)
    if not fg.any():
        return None
    ys, xs = np.nonzero(fg)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    gy, gx = int(round((y1 - y0) * crop_margin)), int(round((x1 - x0) * crop_margin))
    y0, y1, x0, x1 = max(0, y0 - gy), min(h, y1 + gy), max(0, x0 - gx), min(w, x1 + gx)
    return img[y0:y1, x0:x1].copy(), fg[y0:y1, x0:x1].copy(), [int(x0), int(y0), int(x1 - x0), int(y1 - y0)]


def contact_sheet(tiles: list[np.ndarray], tile: int = 96, columns: int = 8) -> np.ndarray:
    """Tiles (RGB uint8, any size) letterboxed into ``tile`` squares on a grid."""
    rows = max(1, (len(tiles) + columns - 1) // columns)
    sheet = np.full((rows * tile, columns * tile, 3), 255, np.uint8)
    for i, t in enumerate(tiles):
        s = tile / max(t.shape[:2])
        th, tw = max(1, int(t.shape[0] * s)), max(1, int(t.shape[1] * s))
        r, c = divmod(i, columns)
        y, x = r * tile + (tile - th) // 2, c * tile + (tile - tw) // 2
        sheet[y:y + th, x:x + tw] = cv2.resize(t, (tw, th), interpolation=cv2.INTER_AREA)
    return sheet


def _overlay(img: np.ndarray, mask: np.ndarray) -> np.ndarray:
    out = img.copy()
    out[~mask] = (0.35 * out[~mask]).astype(np.uint8)
    return out


def run_crops(train_manifest: str | Path, out_dir: str | Path, num_images: int, seed: int, rect_margin: float,
              iterations: int, crop_margin: float) -> dict:
    """Pick ``num_images`` training images at random and GrabCut each; write crops, coarse masks,
    ``crops.json`` and ``crops_sheet.png``. Images with no foreground are skipped and listed."""
    out_dir = Path(out_dir)
    (out_dir / "crops").mkdir(parents=True, exist_ok=True)
    records = load_manifest(train_manifest)
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(len(records), size=min(num_images, len(records)), replace=False).tolist())
    crops, skipped, tiles = [], [], []
    for k, i in enumerate(tqdm(chosen, desc="grabcut", disable=None, leave=False)):
        rec = records[i]
        try:
            img = read_image(rec["file_name"])
        except ImageReadError as err:
            skipped.append({"image_id": rec["id"], "file": rec["file_name"], "reason": str(err)})
            continue
        res = grabcut_crop(img, rect_margin, iterations, crop_margin, seed=seed + k)
        if res is None:
            skipped.append({"image_id": rec["id"], "file": rec["file_name"], "reason": "GrabCut found no foreground"})
            continue
        crop, coarse, box = res
        name = f"{len(crops):04d}"
        atomic.write_image(out_dir / "crops" / f"{name}.png", crop)
        atomic.write_image(out_dir / "crops" / f"{name}_coarse.png", coarse.astype(np.uint8) * 255)
        crops.append({"id": len(crops), "image_id": rec["id"], "source": rec["file_name"], "box": box,
                      "image_size": [int(img.shape[0]), int(img.shape[1])],
                      "crop": str(out_dir / "crops" / f"{name}.png"),
                      "coarse_mask": str(out_dir / "crops" / f"{name}_coarse.png")})
        tiles.append(_overlay(crop, coarse))
    atomic.write_json(out_dir / "crops.json", {"crops": crops, "skipped": skipped}, indent=1)
    atomic.write_image(out_dir / "crops_sheet.png", contact_sheet(tiles))
    for s in skipped:
        print(f"skipped {s['file']}: {s['reason']}")
    return {"chosen": len(chosen), "crops": len(crops), "skipped": len(skipped)}


def choose_mask(masks: np.ndarray, scores: np.ndarray, coarse: np.ndarray, min_overlap: float) -> int | None:
    """The refinement rule: among predicted masks (K, h, w) that lie at least ``min_overlap``
    inside the coarse GrabCut mask (|pred & coarse| / |pred|), the highest-scoring one; ``None``
    if there is none."""
    best, best_score = None, -1.0
    for k, (m, s) in enumerate(zip(masks, scores)):
        area = m.sum()
        if area == 0:
            continue
        if (m & coarse).sum() / area >= min_overlap and s > best_score:
            best, best_score = k, float(s)
    return best


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of a bool mask (h, w); an empty mask gives itself."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if n <= 1:
        return mask.copy()
    return labels == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))


REFINE_FALLBACKS = ("grabcut", "none")


def run_refine(crops_json: str | Path, model_path: str | Path, out_dir: str | Path, test: TestSettings,
               min_overlap: float, device: torch.device, fallback: str = "grabcut",
               min_fallback_pixels: int = 16) -> dict:
    """Run the trained FreeSOLO on every crop, keep the chosen mask and apply it: exemplar objects
    X_e (object pixels, background black), their masks, ``pool.json`` and ``pool_sheet.png``.
    Inference uses ``test`` (its size and thresholds: the stage's ``freesolo.test``).

    A crop where no predicted mask qualifies falls back, with ``fallback`` ``grabcut``, to the
    largest connected component of its GrabCut mask (if it has ``min_fallback_pixels``);
    ``none`` drops it. Each exemplar records its ``source`` (freesolo | grabcut), and the counts
    are returned."""
    if fallback not in REFINE_FALLBACKS:
        raise ValueError(f"refine fallback must be one of {REFINE_FALLBACKS}, got {fallback!r}")
    from efsolo.modeling.inference import predict_image
    from efsolo.modeling.model_io import load_model

    out_dir = Path(out_dir)
    (out_dir / "objects").mkdir(parents=True, exist_ok=True)
    model = load_model(model_path).to(device)
    crops = read_json(crops_json)["crops"]
    pool, dropped, tiles = [], [], []
    for c in tqdm(crops, desc="refining exemplars", disable=None, leave=False):
        crop = read_image(c["crop"])
        coarse = read_image(c["coarse_mask"])[:, :, 0] > 127
        masks, scores, _ = predict_image(model, crop, test.short_side, test.max_side, test, device)
        k = choose_mask(masks, scores, coarse, min_overlap)
        if k is not None:
            mask, score, source = masks[k], float(scores[k]), "freesolo"
        else:
            why = f"no predicted mask lies {min_overlap:.0%} inside the coarse mask ({len(masks)} predicted)"
            mask = largest_component(coarse) if fallback == "grabcut" else None
            if mask is None or mask.sum() < min_fallback_pixels:
                dropped.append({"crop": c["crop"], "reason": why + ("" if fallback == "none" else
                                                                     ", and the GrabCut mask is too small")})
                continue
            score, source = 0.0, "grabcut"
        obj = crop.copy()
        obj[~mask] = 0
        name = f"{len(pool):04d}"
        atomic.write_image(out_dir / "objects" / f"{name}.png", obj)
        atomic.write_image(out_dir / "objects" / f"{name}_mask.png", mask.astype(np.uint8) * 255)
        pool.append({"id": len(pool), "crop_id": c["id"], "image_id": c["image_id"], "score": score,
                     "source": source, "box": c["box"], "image_size": c.get("image_size"),
                     "object": str(out_dir / "objects" / f"{name}.png"),
                     "mask": str(out_dir / "objects" / f"{name}_mask.png")})
        tiles.append(obj)
    sources = {s: sum(e["source"] == s for e in pool) for s in ("freesolo", "grabcut")}
    atomic.write_json(out_dir / "pool.json", {"exemplars": pool, "sources": sources, "dropped": dropped}, indent=1)
    atomic.write_image(out_dir / "pool_sheet.png", contact_sheet(tiles))
    for d in dropped:
        print(f"dropped {d['crop']}: {d['reason']}")
    print(f"exemplar pool: {len(pool)} of {len(crops)} crops ({sources['freesolo']} refined by FreeSOLO, "
          f"{sources['grabcut']} from the GrabCut mask, {len(dropped)} dropped)")
    return {"crops": len(crops), "exemplars": len(pool), "from_freesolo": sources["freesolo"],
            "from_grabcut": sources["grabcut"], "dropped": len(dropped)}
