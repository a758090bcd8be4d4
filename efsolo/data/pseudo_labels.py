"""Training batches from pseudo-labels: images with their masks and embeddings, resized, flipped
and padded to a multiple of 32 (the geometric part of both views)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from efsolo.data.coco_format import decode_mask, read_json
from efsolo.data.images import read_image, resize_short_side
from efsolo.data.pseudo_label_format import load_embeddings


@dataclass
class Batch:
    images: torch.Tensor  # (B, 3, H, W) RGB in [0, 1], zero padded to multiples of 32
    masks: list[torch.Tensor]  # per image (N_b, H, W) bool at padded input resolution
    embeds: list[torch.Tensor]  # per image (N_b, D) float
    sizes: list[tuple[int, int]]  # per image the (h, w) of its content (top-left of the canvas)

    def to(self, device: torch.device) -> "Batch":
        return Batch(self.images.to(device, non_blocking=True), [m.to(device) for m in self.masks],
                     [e.to(device) for e in self.embeds], self.sizes)


class PseudoLabelSet:
    """Images of a COCO pseudo-label file with their masks and (optional) embeddings."""

    def __init__(self, labels: str | Path, embeddings: str | Path | None, min_score: float = 0.0,
                 max_per_image: int = 100) -> None:
        data = read_json(labels)
        self.images = sorted(data["images"], key=lambda r: r["id"])
        emb = load_embeddings(embeddings) if embeddings else {}
        self.embed_dim = len(next(iter(emb.values()))) if emb else 128
        by_image: dict[int, list[dict]] = {}
        for a in data["annotations"]:
            if a.get("score", 1.0) >= min_score:
                by_image.setdefault(a["image_id"], []).append(a)
        self.anns = {k: sorted(v, key=lambda a: -a.get("score", 1.0))[:max_per_image] for k, v in by_image.items()}
        self.emb = emb

    def __len__(self) -> int:
        return len(self.images)

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(image (H, W, 3) uint8, masks (N, H, W) bool, embeddings (N, D) float32)."""
        rec = self.images[i]
        img = read_image(rec["file_name"])
        anns = self.anns.get(rec["id"], [])
        h, w = img.shape[:2]
        masks = np.stack([decode_mask(a["segmentation"]).astype(bool) for a in anns]) if anns else np.zeros((0, h, w), bool)
        embeds = np.stack([self.emb.get(a["id"], np.zeros(self.embed_dim)) for a in anns]).astype(np.float32) \
            if anns else np.zeros((0, self.embed_dim), np.float32)
        return img, masks, embeds


def make_batch(samples: list[tuple[np.ndarray, np.ndarray, np.ndarray]], short_side: int, max_side: int,
               flips: list[bool]) -> Batch:
    """Resize (short side first), flip and pad a list of samples into one batch."""
    resized = []
    for (img, masks, embeds), flip in zip(samples, flips):
        h, w = resize_short_side(img.shape[0], img.shape[1], short_side, max_side)
        img = cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR)
        if masks.shape[0]:
            m = cv2.resize(masks.transpose(1, 2, 0).astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST)
            masks = (m.reshape(h, w, -1).transpose(2, 0, 1) > 0)
        else:
            masks = np.zeros((0, h, w), bool)
        if flip:
            img, masks = img[:, ::-1], masks[:, :, ::-1]
        resized.append((img, masks, embeds))
    ph = max(int(np.ceil(r[0].shape[0] / 32)) * 32 for r in resized)
    pw = max(int(np.ceil(r[0].shape[1] / 32)) * 32 for r in resized)
    images = torch.zeros(len(resized), 3, ph, pw)
    out_masks, out_embeds, sizes = [], [], []
    for i, (img, masks, embeds) in enumerate(resized):
        h, w = img.shape[:2]
        images[i, :, :h, :w] = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float() / 255
        m = torch.zeros(masks.shape[0], ph, pw, dtype=torch.bool)
        m[:, :h, :w] = torch.from_numpy(np.ascontiguousarray(masks))
        out_masks.append(m)
        out_embeds.append(torch.from_numpy(embeds))
        sizes.append((h, w))
    return Batch(images, out_masks, out_embeds, sizes)
