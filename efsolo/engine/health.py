"""Training health: how well a SOLO network fits a fixed batch of pseudo-labels.

Used by the health-check test (the demo's settings must fit one small batch: every mask term
falls, the masks' IoU with the pseudo masks rises, the masks do not collapse to constants)
and handy when changing the losses or the schedule.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from efsolo.config import LossSettings
from efsolo.data.pseudo_labels import Batch
from efsolo.modeling.inference import normalise
from efsolo.modeling.solo_model import SOLO, dynamic_masks
from efsolo.modeling.targets import assign_cells


@torch.no_grad()
def mask_fit(model: SOLO, batch: Batch, losses: LossSettings, step: int) -> dict:
    """The loss terms of ``batch`` (as training sees them at iteration ``step``), and over every
    positive cell: ``iou``, the mean IoU of the predicted mask (> 0.5) with its pseudo mask at
    stride 4; ``spread``, the mean standard deviation of a predicted soft mask over the image
    (0 for a constant mask, about 0.5 for a confident, balanced one); ``positives``."""
    from efsolo.modeling.solo_loss import solo_losses

    was_training = model.training
    model.eval()
    out = model(normalise(batch.images))
    terms = solo_losses(out, batch.images, batch.masks, batch.embeds, model.arch.grids, losses, step)
    fh, fw = out.mask_feat.shape[-2:]
    ious, spreads = [], []
    for i, masks in enumerate(batch.masks):
        if masks.shape[0] == 0:
            continue
        target = F.interpolate(masks.unsqueeze(0).float(), size=(fh, fw), mode="bilinear", align_corners=False)[0] >= 0.5
        for level, idx in enumerate(assign_cells(masks, model.arch.grids, losses.scale_ranges, losses.centre_sigma)):
            pos = torch.nonzero(idx >= 0).flatten()
            if pos.numel() == 0:
                continue
            soft = torch.sigmoid(dynamic_masks(out.kernels_at(level, i, pos).float(), out.mask_feat[i].float()))
            pred, t = soft > 0.5, target[idx[pos]]
            ious.append((pred & t).flatten(1).sum(1) / (pred | t).flatten(1).sum(1).clamp_min(1))
            spreads.append(soft.flatten(1).std(1))
    model.train(was_training)
    n = sum(len(x) for x in ious)
    return {**{k: float(v) for k, v in terms.items() if k != "positives"}, "positives": n,
            "iou": float(torch.cat(ious).mean()) if n else 0.0, "spread": float(torch.cat(spreads).mean()) if n else 0.0}
