"""Class-agnostic mask NMS: Matrix NMS (SOLOv2) and Fast NMS (YOLACT), as score decays."""
from __future__ import annotations

import torch


def mask_iou_upper(masks: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of score-sorted masks, upper triangle only.

    masks: (..., N, P) binary (bool or 0/1 float), sorted by descending score.
    Returns (..., N, N) with entry [i, j] = IoU(mask_i, mask_j) for i < j and 0 elsewhere.
    """
    m = masks.float()
    inter = m @ m.transpose(-1, -2)
    area = m.sum(-1)
    union = area.unsqueeze(-1) + area.unsqueeze(-2) - inter
    iou = inter / union.clamp_min(1e-6)
    return torch.triu(iou, diagonal=1)


def matrix_nms(masks: torch.Tensor, scores: torch.Tensor, sigma: float = 2.0,
               kernel: str = "gaussian") -> torch.Tensor:
    """Matrix NMS decayed scores.

    masks: (..., N, P) binary, sorted by descending ``scores`` (..., N). For each mask j,
    decay_j = min over higher-scored i of f(IoU_ij) / f(compensate_i), where compensate_i is
    the largest IoU of mask i with any mask scored above it; f(x) = exp(-sigma * x^2)
    (gaussian) or 1 - x (linear). Returns scores * decay, shape (..., N); N = 0 gives (..., 0).
    """
    if masks.shape[-2] == 0:
        return scores.clone()
    iou = mask_iou_upper(masks)
    compensate = iou.max(dim=-2).values  # (..., N): max IoU with a higher-scored mask
    comp = compensate.unsqueeze(-1)  # row i -> compensate_i
    if kernel == "gaussian":
        decay = torch.exp(-sigma * (iou**2 - comp**2))
    elif kernel == "linear":
        decay = (1 - iou) / (1 - comp).clamp_min(1e-6)
    else:
        raise ValueError(f"unknown Matrix NMS kernel {kernel!r}")
    return scores * decay.min(dim=-2).values


def fast_nms(masks: torch.Tensor, scores: torch.Tensor, iou_threshold: float = 0.5) -> torch.Tensor:
    """Fast NMS: a mask is dropped (score set to 0) when its IoU with any higher-scored mask,
    suppressed or not, exceeds ``iou_threshold``. masks (..., N, P) sorted by ``scores`` (..., N)."""
    if masks.shape[-2] == 0:
        return scores.clone()
    max_iou = mask_iou_upper(masks).max(dim=-2).values
    return torch.where(max_iou > iou_threshold, torch.zeros_like(scores), scores)
