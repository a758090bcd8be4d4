"""FreeSOLO's loss of one batch of views (method reference, section 3), next to the network it trains.

The terms themselves are pure functions in :mod:`efsolo.modeling.losses`; this module assigns the
pseudo-labels to grid cells and combines the terms, with DDP-global normalisers.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from efsolo.config import LossSettings
from efsolo.modeling.losses import (avg_projection_loss, colour_similarity, drop_loss_weights, focal_loss,
                           max_projection_loss, pairwise_loss, semantic_loss)
from efsolo.modeling.solo_model import SOLOOutput, dynamic_masks
from efsolo.modeling.targets import assign_cells


def _global_count(x: torch.Tensor) -> torch.Tensor:
    """A count summed over DDP processes, times the number of processes (DDP averages gradients),
    so that per-process losses normalised by it give the single-process gradient."""
    if dist.is_available() and dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x)
        return x / dist.get_world_size()
    return x


def _per_level_terms(logits: list, targets: list, boxes: list, sims: list, pred_emb: list, tgt_emb: list,
                     levels: list[int], ls: LossSettings) -> tuple[torch.Tensor, ...]:
    """The mask and semantic terms as the FreeSOLO release combines them: each term's mean within an
    FPN level, then the mean over the levels that have positives, so a level with few (large)
    objects weighs as much as a crowded one. Per-process means, as the release's: under DDP the
    gradients are averaged over processes rather than normalised by global counts."""
    terms = []
    for level in sorted(set(levels)):
        at = [j for j, lv in enumerate(levels) if lv == level]
        lg, tg = torch.cat([logits[j] for j in at]), torch.cat([targets[j] for j in at])
        probs = torch.sigmoid(lg)
        terms.append(torch.stack([
            max_projection_loss(probs, tg), avg_projection_loss(probs, tg),
            pairwise_loss(lg, torch.cat([sims[j] for j in at]), torch.cat([boxes[j] for j in at]),
                          ls.pairwise_colour_threshold, ls.pairwise_dilation),
            semantic_loss(torch.cat([pred_emb[j] for j in at]), torch.cat([tgt_emb[j] for j in at]))]))
    return tuple(torch.stack(terms).mean(0))


def solo_losses(out: SOLOOutput, images: torch.Tensor, masks: list[torch.Tensor], embeds: list[torch.Tensor],
                grids: tuple[int, ...], ls: LossSettings, step: int) -> dict[str, torch.Tensor]:
    """FreeSOLO losses of one batch of views.

    out: network outputs for B views; images (B, 3, H, W) RGB in [0, 1]; masks[b] (N_b, H, W)
    bool and embeds[b] (N_b, D) the pseudo-labels of view b. Returns the named terms and
    ``total`` = gamma * avg_proj + max_proj + warm-up * pairwise + focal + mu * sem. The mask and
    semantic terms average over every positive cell, or per level first (``ls.level_average``). Under DDP
    the normalisers (positives, pairwise weights) are summed over processes, as detection
    frameworks do, so the gradients equal those of one process holding the whole batch.
    """
    b, dev = images.shape[0], images.device
    fh, fw = out.mask_feat.shape[-2:]
    sim = colour_similarity(F.avg_pool2d(images.float(), out.mask_stride)[..., :fh, :fw], ls.pairwise_dilation)  # (B, 8, h, w)
    cate_logits, cate_targets, cate_weights = [], [], []
    logits, targets, boxes, sims, pred_emb, tgt_emb, levels = [], [], [], [], [], [], []
    for i in range(b):
        # target assignment on the CPU copy of the masks: one transfer per view, then no
        # host-device synchronisation (.item(), nonzero) on the training device
        cells = assign_cells(masks[i].cpu(), grids, ls.scale_ranges, ls.centre_sigma)
        if masks[i].shape[0]:
            m4 = F.interpolate(masks[i].unsqueeze(0).float(), size=(fh, fw), mode="bilinear",
                               align_corners=False)[0] >= 0.5
        for level, idx in enumerate(cells):
            cate_logits.append(out.cates[level][i].flatten())
            is_pos = (idx >= 0).to(dev, non_blocking=True)
            cate_targets.append(is_pos.float())
            if ls.drop_loss_iou > 0:
                with torch.no_grad():
                    every = dynamic_masks(out.dense_kernels(level)[i].flatten(1).T.float(), out.mask_feat[i].float())
                    pseudo = m4 if masks[i].shape[0] else every.new_zeros((0, fh, fw), dtype=torch.bool)
                    cate_weights.append(drop_loss_weights(every, pseudo, is_pos, ls.drop_loss_iou))
            pos = torch.nonzero(idx >= 0).flatten()
            if pos.numel() == 0:
                continue
            inst = idx[pos].to(dev, non_blocking=True)
            pos = pos.to(dev, non_blocking=True)
            kernels = out.kernels_at(level, i, pos)
            logits.append(dynamic_masks(kernels.float(), out.mask_feat[i].float()))
            levels.append(level)
            t = m4[inst]
            targets.append(t)
            rows, cols = t.any(2), t.any(1)  # (K, h), (K, w): the pseudo mask's box at the mask features' stride
            ys = torch.arange(fh, device=dev)
            xs = torch.arange(fw, device=dev)
            y0 = torch.where(rows, ys, fh).amin(1)
            y1 = torch.where(rows, ys, -1).amax(1)
            x0 = torch.where(cols, xs, fw).amin(1)
            x1 = torch.where(cols, xs, -1).amax(1)
            boxes.append((ys.view(1, -1, 1) >= y0.view(-1, 1, 1)) & (ys.view(1, -1, 1) <= y1.view(-1, 1, 1)) &
                         (xs.view(1, 1, -1) >= x0.view(-1, 1, 1)) & (xs.view(1, 1, -1) <= x1.view(-1, 1, 1)))
            sims.append(sim[i].unsqueeze(0).expand(len(pos), -1, -1, -1))
            pred_emb.append(out.embeds_at(level, i, pos).float())
            tgt_emb.append(embeds[i][inst])
    ref = out.mask_feat
    # the normalisers first, on every process and in every branch, so the collective calls match
    n_local = torch.tensor(float(sum(t.shape[0] for t in targets)), device=dev)
    w_local = sum((torch.count_nonzero((sm >= ls.pairwise_colour_threshold) & bx.unsqueeze(1))
                   for sm, bx in zip(sims, boxes)), torch.zeros((), dtype=torch.long, device=dev)).float()
    n_global = _global_count(n_local).clamp_min(1.0)
    w_global = _global_count(w_local).clamp_min(1.0)
    if logits and ls.level_average == "per_level":
        l_max, l_avg, l_pair, l_sem = _per_level_terms(logits, targets, boxes, sims, pred_emb, tgt_emb, levels, ls)
    elif logits:
        lg, tg = torch.cat(logits), torch.cat(targets)
        probs = torch.sigmoid(lg)
        # the pure losses are means; scale them back to sums and normalise by the global counts
        l_max = max_projection_loss(probs, tg) * n_local / n_global
        l_avg = avg_projection_loss(probs, tg) * n_local / n_global
        l_pair = pairwise_loss(lg, torch.cat(sims), torch.cat(boxes), ls.pairwise_colour_threshold,
                               ls.pairwise_dilation) * w_local.clamp_min(1.0) / w_global
        l_sem = semantic_loss(torch.cat(pred_emb), torch.cat(tgt_emb)) * n_local / n_global
    else:
        l_max = l_avg = l_pair = l_sem = ref.sum() * 0.0
    cate_t = torch.cat(cate_targets)
    cate_w = torch.cat(cate_weights) if cate_weights else None
    l_focal = focal_loss(torch.cat(cate_logits).float(), cate_t, ls.focal_alpha, ls.focal_gamma, cate_w) * \
        (cate_t.sum() + 1) / (_global_count(cate_t.sum()) + 1)
    warm = min(1.0, (step + 1) / max(1, ls.pairwise_warmup))
    l_mask = ls.gamma * l_avg + l_max + ls.pairwise_weight * warm * l_pair
    l_cate = l_focal + ls.mu * l_sem
    return {"total": l_mask + l_cate, "mask": l_mask, "max_proj": l_max, "avg_proj": l_avg, "pairwise": l_pair,
            "cate": l_cate, "focal": l_focal, "sem": l_sem, "positives": n_local}
