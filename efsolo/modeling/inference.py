"""SOLO inference (method reference, section 4): point NMS on the category maps, candidates by
score, dynamic masks, maskness, Matrix NMS, at most ``max_per_image`` instances; COCO results."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from efsolo.config import TestSettings
from efsolo.data.coco_format import AGNOSTIC_CATEGORY, encode_mask, mask_box
from efsolo.data.images import IMAGENET_MEAN, IMAGENET_STD, ImageReadError, read_image, resize_short_side
from efsolo.modeling.matrix_nms import matrix_nms
from efsolo.modeling.solo_model import LEVEL_STRIDES, SOLO, SOLOOutput, dynamic_masks
from efsolo.utils import atomic


def normalise(rgb01: torch.Tensor) -> torch.Tensor:
    """RGB in [0, 1] (B, 3, H, W) -> ImageNet-normalised input."""
    mean = torch.tensor(IMAGENET_MEAN, device=rgb01.device).view(1, 3, 1, 1) / 255
    std = torch.tensor(IMAGENET_STD, device=rgb01.device).view(1, 3, 1, 1) / 255
    return (rgb01 - mean) / std


def point_nms(heat: torch.Tensor) -> torch.Tensor:
    """Keep a cell's score only where it is the maximum of its 2x2 neighbourhood. (B, 1, S, S)."""
    hmax = F.max_pool2d(heat, 2, stride=1, padding=1)[..., :-1, :-1]
    return heat * (hmax == heat).float()


def postprocess(out: SOLOOutput, index: int, s: TestSettings) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One image's instances at mask-feature resolution, best first:
    (soft masks (K, H/s, W/s), s = ``out.mask_stride``, scores (K,), predicted embeddings (K, D)).

    A candidate's score is its category score times its maskness (the mean soft value inside
    its binary mask) raised to ``s.maskness_power``; Matrix NMS then decays it and
    ``s.update_threshold`` applies to the decayed score."""
    scores = torch.cat([point_nms(torch.sigmoid(c[index:index + 1].float())).flatten() for c in out.cates])
    kernels = torch.cat([out.dense_kernels(l)[index].flatten(1).T for l in range(len(out.cates))]).float()
    embeds = torch.cat([out.dense_embeds(l)[index].flatten(1).T for l in range(len(out.cates))]).float()
    strides = torch.cat([torch.full((c.shape[-1] ** 2,), st, device=scores.device, dtype=torch.float32)
                         for c, st in zip(out.cates, LEVEL_STRIDES)])
    keep = scores > s.score_threshold
    scores, kernels, strides, embeds = scores[keep], kernels[keep], strides[keep], embeds[keep]
    if scores.numel() > s.nms_pre:
        scores, top = scores.topk(s.nms_pre)
        kernels, strides, embeds = kernels[top], strides[top], embeds[top]
    soft = torch.sigmoid(dynamic_masks(kernels, out.mask_feat[index].float()))
    binary = soft > s.mask_threshold
    area = binary.flatten(1).sum(1).float()
    keep = area * (out.mask_stride / 4) ** 2 > strides  # the release's filter, on the area at stride 4
    soft, binary, area, scores, embeds = soft[keep], binary[keep], area[keep], scores[keep], embeds[keep]
    if scores.numel() == 0:
        return soft, scores, embeds
    maskness = (soft * binary).flatten(1).sum(1) / area
    scores = scores * maskness.pow(s.maskness_power)
    order = scores.argsort(descending=True)
    soft, binary, scores, embeds = soft[order], binary[order], scores[order], embeds[order]
    scores = matrix_nms(binary.flatten(1), scores, sigma=s.nms_sigma)
    keep = scores >= s.update_threshold
    soft, scores, embeds = soft[keep], scores[keep], embeds[keep]
    order = scores.argsort(descending=True)[: s.max_per_image]
    return soft[order], scores[order], embeds[order]


def to_image_masks(soft: torch.Tensor, content: tuple[int, int], padded: tuple[int, int], original: tuple[int, int],
                   mask_threshold: float = 0.5) -> np.ndarray:
    """Soft masks (K, H/s, W/s) -> binary masks (K, H0, W0) of the original image."""
    if soft.shape[0] == 0:
        return np.zeros((0, *original), bool)
    up = F.interpolate(soft.unsqueeze(0), size=padded, mode="bilinear", align_corners=False)[0]
    up = up[:, : content[0], : content[1]]
    up = F.interpolate(up.unsqueeze(0), size=original, mode="bilinear", align_corners=False)[0]
    return (up > mask_threshold).cpu().numpy()


@torch.inference_mode()
def predict_image(model: SOLO, img: np.ndarray, short_side: int, max_side: int, s: TestSettings,
                  device: torch.device) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Instances of one RGB uint8 image: (masks (K, H0, W0) bool, scores (K,), embeddings (K, D))."""
    h0, w0 = img.shape[:2]
    h, w = resize_short_side(h0, w0, short_side, max_side)
    ph, pw = int(np.ceil(h / 32)) * 32, int(np.ceil(w / 32)) * 32
    x = torch.zeros(1, 3, ph, pw, device=device)
    x[0, :, :h, :w] = torch.from_numpy(cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR)).to(device).permute(2, 0, 1) / 255
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        out = model(normalise(x))
    soft, scores, embeds = postprocess(out, 0, s)
    masks = to_image_masks(soft.float(), (h, w), (ph, pw), (h0, w0), s.mask_threshold)
    keep = masks.reshape(masks.shape[0], h0 * w0).any(1)
    return masks[keep], scores.float().cpu().numpy()[keep], embeds.float().cpu().numpy()[keep]


def predict_records(model: SOLO, records: list[dict], short_side: int, max_side: int, s: TestSettings,
                    device: torch.device, desc: str = "inference") -> tuple[list[dict], np.ndarray, list[dict]]:
    """COCO results (RLE, ``[x, y, w, h]``, score) for manifest records, the predicted embedding of
    each result (N, D), and the unreadable files that were skipped."""
    model.eval()
    results, embeddings, skipped = [], [], []
    for r in tqdm(records, desc=desc, disable=None, leave=False):
        try:
            img = read_image(r["file_name"])
        except ImageReadError as err:
            skipped.append({"file": r["file_name"], "reason": str(err)})
            continue
        masks, scores, embeds = predict_image(model, img, short_side, max_side, s, device)
        for m, sc in zip(masks, scores):
            results.append({"image_id": r["id"], "category_id": AGNOSTIC_CATEGORY["id"], "segmentation": encode_mask(m),
                            "bbox": mask_box(m), "score": float(sc)})
        embeddings.append(embeds)
    dim = model.arch.embed_dim
    return results, (np.concatenate(embeddings) if embeddings else np.zeros((0, dim), np.float32)), skipped


def write_results(path: str | Path, results: list[dict]) -> None:
    atomic.write_json(path, results)
