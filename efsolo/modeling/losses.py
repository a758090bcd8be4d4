"""FreeSOLO losses (method reference, section 3), each a pure function with an explicit empty case.

L_mask = gamma * L_avg_proj + L_max_proj + L_pairwise;  L_cate = L_focal + mu * L_sem.
Empty inputs (no positive instance) return a zero that still carries a gradient.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _zero(like: torch.Tensor) -> torch.Tensor:
    return like.sum() * 0.0


def dice_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """D(x, y) = 1 - 2 sum(xy) / (sum(x^2) + sum(y^2) + 1e-5) over the last dim. (K, L) -> (K,)."""
    return 1 - 2 * (x * y).sum(-1) / ((x * x).sum(-1) + (y * y).sum(-1) + 1e-5)


def _projection_loss(probs: torch.Tensor, targets: torch.Tensor, project) -> torch.Tensor:  # noqa: ANN001
    if probs.shape[0] == 0:
        return _zero(probs)
    t = targets.float()
    loss = dice_distance(project(probs, 1), project(t, 1)) + dice_distance(project(probs, 2), project(t, 2))
    return loss.mean()


def max_projection_loss(probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Dice of the max projections onto the x and y axes. probs, targets (K, H, W) -> mean over K."""
    return _projection_loss(probs, targets, torch.amax)


def avg_projection_loss(probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Dice of the mean projections onto the x and y axes. probs, targets (K, H, W) -> mean over K."""
    return _projection_loss(probs, targets, torch.mean)


def _neighbours(x: torch.Tensor, dilation: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, 8, H, W): the 8 neighbours at ``dilation`` of every pixel (zero padded),
    in the order of ``NEIGHBOUR_OFFSETS``."""
    return torch.stack([shift(x, dy, dx, dilation) for dy, dx in NEIGHBOUR_OFFSETS], dim=2)


# (dy, dx) of the 8 neighbours, row-major (unfold's order without the centre): offset o and 7 - o
# are opposite
NEIGHBOUR_OFFSETS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


def shift(x: torch.Tensor, dy: int, dx: int, dilation: int) -> torch.Tensor:
    """(..., H, W) -> (..., H, W): y[..., i, j] = x[..., i + dy * dilation, j + dx * dilation], 0 outside."""
    h, w = x.shape[-2:]
    d = dilation
    p = F.pad(x, (d, d, d, d))
    return p[..., d + dy * d: d + dy * d + h, d + dx * d: d + dx * d + w]


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB in [0, 1] (B, 3, H, W) -> CIE Lab (D65), (B, 3, H, W)."""
    lin = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    m = torch.tensor([[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169],
                      [0.019334, 0.119193, 0.950227]], device=rgb.device, dtype=rgb.dtype)
    xyz = torch.einsum("ij,bjhw->bihw", m, lin)
    xyz = xyz / torch.tensor([0.950456, 1.0, 1.088754], device=rgb.device, dtype=rgb.dtype).view(1, 3, 1, 1)
    f = torch.where(xyz > 0.008856, xyz.clamp_min(1e-12) ** (1 / 3), 7.787 * xyz + 16 / 116)
    return torch.stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], dim=1)


def colour_similarity(rgb: torch.Tensor, dilation: int = 2) -> torch.Tensor:
    """exp(-0.5 * ||Lab_i - Lab_j||) between every pixel and its 8 neighbours. (B, 3, H, W) -> (B, 8, H, W)."""
    lab = rgb_to_lab(rgb)
    diff = lab.unsqueeze(2) - _neighbours(lab, dilation)
    # the norm as sqrt(sum of squares): torch's norm over a non-innermost dim is ~100x slower on the CPU
    return torch.exp(-0.5 * diff.square().sum(1).sqrt())


def pairwise_loss(logits: torch.Tensor, similarity: torch.Tensor, box_masks: torch.Tensor,
                  colour_threshold: float = 0.3, dilation: int = 2) -> torch.Tensor:
    """BoxInst pairwise affinity: -log P(pixel and neighbour take the same label).

    logits (K, H, W) mask logits; similarity (K, 8, H, W) colour similarity of each instance's
    image; box_masks (K, H, W) 1 inside the instance's pseudo box. Each pixel's term towards each
    of its 8 neighbours (a neighbour outside the image: 0) is weighted by (similarity >= threshold)
    x (pixel inside the box), and the sum is divided by the sum of the weights.

    With p = sigmoid(x), P(same) = p_i p_j + (1 - p_i)(1 - p_j), so
    -log P(same) = softplus(x_i) + softplus(x_j) - softplus(x_i + x_j), symmetric in i and j: it is
    computed once per unordered pair (4 of the 8 offsets), with the weights of both directions.
    """
    if logits.shape[0] == 0:
        return _zero(logits)
    weights = (similarity >= colour_threshold) & box_masks.unsqueeze(1).bool()  # (K, 8, H, W)
    h, w = logits.shape[-2:]
    d = dilation
    soft = F.softplus(logits)
    # padded once; each offset reads a window of the padded tensors (a view, no copy)
    pad_logits, pad_soft = F.pad(logits, (d, d, d, d)), F.pad(soft, (d, d, d, d))
    pad_inside = F.pad(torch.ones((1, h, w), dtype=torch.bool, device=logits.device), (d, d, d, d))
    total = _zero(logits)
    for o, (dy, dx) in enumerate(NEIGHBOUR_OFFSETS[:4]):
        at = (..., slice(d + dy * d, d + dy * d + h), slice(d + dx * d, d + dx * d + w))
        # pixel i with neighbour j = i + o: the weight at i towards o, plus the weight at j towards
        # the opposite offset (7 - o), which is i; 0 where j lies outside the image
        # (uint8 sums: converting the boolean weights to float costs more than the loss itself)
        wgt = (weights[:, o] & pad_inside[at]).view(torch.uint8) + shift(weights[:, 7 - o], dy, dx, d).view(torch.uint8)
        nll = soft + pad_soft[at] - F.softplus(logits + pad_logits[at])
        total = total + (nll * wgt).sum()
    return total / torch.count_nonzero(weights).clamp_min(1)


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0,
               weights: torch.Tensor | None = None) -> torch.Tensor:
    """Sigmoid focal loss summed and divided by (number of positives + 1). Any shape; targets in {0, 1};
    ``weights`` (same shape, optional) scale each element's term (0 drops it)."""
    t = targets.float()
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, t, reduction="none")
    p_t = p * t + (1 - p) * (1 - t)
    a_t = alpha * t + (1 - alpha) * (1 - t)
    terms = a_t * (1 - p_t) ** gamma * ce
    if weights is not None:
        terms = terms * weights
    return terms.sum() / (t.sum() + 1)


def drop_loss_weights(cell_logits: torch.Tensor, targets: torch.Tensor, positive: torch.Tensor,
                      iou_threshold: float) -> torch.Tensor:
    """CutLER's DropLoss for SOLO's category cells: which cells the focal loss keeps.

    cell_logits (K, h, w): every cell's predicted mask logits; targets (N, h, w) bool: the
    view's pseudo masks; positive (K,) bool: the cells assigned to a pseudo mask. A positive is
    kept; a negative is kept only when its predicted mask (logit >= 0) has IoU above
    ``iou_threshold`` with some pseudo mask, so a cell predicting an object the pseudo-labels
    missed is not pushed to background. Returns (K,) float weights in {0, 1}. No pseudo masks
    (N = 0): only positives (none) are kept.
    """
    k = cell_logits.shape[0]
    if targets.shape[0] == 0 or k == 0:
        return positive.float()
    pred = (cell_logits >= 0).flatten(1).float()  # (K, hw)
    tgt = targets.flatten(1).float()  # (N, hw)
    inter = pred @ tgt.T  # (K, N)
    union = pred.sum(1, keepdim=True) + tgt.sum(1).unsqueeze(0) - inter
    iou = inter / union.clamp_min(1.0)
    return (positive | (iou.amax(1) > iou_threshold)).float()


def semantic_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - cosine(pred, target), averaged over positives. pred, target (K, D)."""
    if pred.shape[0] == 0:
        return _zero(pred)
    return (1 - F.cosine_similarity(pred, target.to(pred.dtype), dim=1)).mean()
