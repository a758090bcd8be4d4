"""Drawing instances on images: coloured masks, contours, boxes and scores; panels side by side.

Used by ``efsolo predict`` (one overlay per image) and by the ``report`` stage (ground truth,
Free Mask, FreeSOLO and Exemplar-FreeSOLO of the same val image next to each other).
"""
from __future__ import annotations

import colorsys

import cv2
import numpy as np

from efsolo.data.coco_format import decode_mask


def palette(n: int) -> np.ndarray:
    """``n`` distinct, saturated RGB colours (uint8, (n, 3)), the same for the same ``n``."""
    golden = 0.618033988749895
    return np.array([[round(255 * c) for c in colorsys.hsv_to_rgb((i * golden) % 1.0, 0.85, 0.95)]
                     for i in range(n)], dtype=np.uint8).reshape(n, 3)


def draw_instances(img: np.ndarray, masks: np.ndarray, boxes: np.ndarray | None = None,
                   scores: np.ndarray | None = None, alpha: float = 0.5, dim: float = 0.5) -> np.ndarray:
    """Instances over an RGB uint8 image (H, W, 3).

    masks (N, H, W) bool; boxes (N, 4) COCO ``[x, y, w, h]`` (drawn when given); scores (N,)
    (written at the box's corner when given). Pixels outside every mask are dimmed by ``dim``
    so the instances stand out from the image's own colours; drawn lowest score first, so the
    best is on top. Returns a new image; with N = 0 a copy of ``img``.
    """
    n = len(masks)
    if n == 0:
        return img.copy()
    out = img.copy()
    outside = ~masks.any(0)
    out[outside] = (out[outside] * dim).astype(np.uint8)
    order = np.argsort(scores, kind="stable") if scores is not None else np.arange(n)
    colours = palette(n)
    for rank, i in enumerate(order):
        m = masks[i].astype(bool)
        c = colours[rank].astype(np.float32)
        out[m] = (out[m] * (1 - alpha) + c * alpha).astype(np.uint8)
        contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        colour = tuple(int(v) for v in colours[rank])
        cv2.drawContours(out, contours, -1, (255, 255, 255), 2)
        cv2.drawContours(out, contours, -1, colour, 1)
        if boxes is not None:
            x, y, w, h = (int(round(v)) for v in boxes[i])
            cv2.rectangle(out, (x, y), (x + max(w - 1, 0), y + max(h - 1, 0)), colour, 1)
            if scores is not None:
                cv2.putText(out, f"{scores[i]:.2f}", (x + 1, max(y + 9, 9)), cv2.FONT_HERSHEY_PLAIN, 0.7,
                            colour, 1, cv2.LINE_AA)
    return out


def draw_annotations(img: np.ndarray, annotations: list[dict], max_instances: int = 100,
                     min_score: float = 0.0) -> np.ndarray:
    """COCO annotations or results (RLE ``segmentation`` or none, ``bbox``, optional ``score``) over ``img``."""
    anns = [a for a in annotations if a.get("score", 1.0) >= min_score]
    anns = sorted(anns, key=lambda a: -a.get("score", 1.0))[:max_instances]
    h, w = img.shape[:2]
    # box-only annotations (PASCAL VOC ground truth) draw their box and an empty mask
    masks = np.stack([decode_mask(a["segmentation"]).astype(bool) if a.get("segmentation") else np.zeros((h, w), bool)
                      for a in anns]) if anns else np.zeros((0, h, w), bool)
    boxes = np.array([a["bbox"] for a in anns], dtype=np.float32).reshape(-1, 4)
    scores = np.array([a["score"] for a in anns], dtype=np.float32) if anns and "score" in anns[0] else None
    return draw_instances(img, masks, boxes, scores)


def titled(img: np.ndarray, title: str, bar: int = 16) -> np.ndarray:
    """``img`` with a white title bar above it."""
    top = np.full((bar, img.shape[1], 3), 255, np.uint8)
    cv2.putText(top, title, (3, bar - 4), cv2.FONT_HERSHEY_PLAIN, 0.9, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([top, img])


def side_by_side(panels: list[tuple[str, np.ndarray]], gap: int = 4) -> np.ndarray:
    """Titled panels (RGB uint8, same height) in one row, separated by white gaps."""
    if not panels:
        raise ValueError("side_by_side needs at least one panel")
    tiles = [titled(img, title) for title, img in panels]
    h = max(t.shape[0] for t in tiles)
    row = []
    for i, t in enumerate(tiles):
        if t.shape[0] < h:
            t = np.concatenate([t, np.full((h - t.shape[0], t.shape[1], 3), 255, np.uint8)])
        row.append(t)
        if i + 1 < len(tiles):
            row.append(np.full((h, gap, 3), 255, np.uint8))
    return np.concatenate(row, axis=1)
