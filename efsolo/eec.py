"""Exemplar embedding contrastive module (paper section 3.4, method reference section 6).

Q^ = upsample(l2norm(I_u)); K^ = conv1x1(Q^); the Free Mask operations (Eq. 1) on Q^ * K^
give the predicted mask(s) M^; I_mu = M^-weighted average of K^ (the transformed I_u),
normalised. Exemplar embeddings I_e live in the same space: the pool stores each exemplar's
mask-weighted average of Q^ (the backbone's features of X_e), and since conv1x1 is linear,
I_e = l2norm(conv1x1(that average)) with the current conv at every step.
"""
from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from efsolo import atomic
from efsolo.backbone import ResNetTrunk, load_backbone
from efsolo.coco_format import read_json
from efsolo.free_mask import free_mask
from efsolo.images import read_image, resize_short_side
from efsolo.inference import normalise

POOL_FORMAT = "efsolo-exemplar-pool-v1"


def eec_loss(emb: torch.Tensor, pool: torch.Tensor, alpha: float, beta: float, tau: float,
             g: torch.Generator | None = None, draw_rows: torch.Tensor | None = None,
             draw_total: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L_eec = -sum_n log(pos(n) / (pos(n) + neg(n))).

    emb (N, D) and pool (K, D) unit vectors. For each n a positive is drawn at random among the
    exemplars with cosine > alpha; pos(n) = exp(<I_mu, I_e,pos> / tau); neg(n) = mean over the
    exemplars with cosine < beta of exp(<I_mu, I_e> / tau). A row with no positive or no
    negative contributes zero. Returns (loss, diagnostics: fraction of rows with a positive,
    with negatives, with both, and the mean numbers of positives and negatives).
    ``draw_rows`` (N,) places each row in a global set of ``draw_total`` rows: the random draws
    are made for all of them, so the chosen positives do not depend on how rows are sharded.
    """
    n, k = emb.shape[0], pool.shape[0]
    zero = emb.sum() * 0.0 + pool.sum() * 0.0
    if n == 0 or k == 0:
        z = torch.zeros((), device=emb.device)
        return zero, {"frac_pos": z, "frac_neg": z, "frac_used": z, "mean_pos": z, "mean_neg": z}
    sims = emb @ pool.T  # (N, K) cosines
    pos_mask, neg_mask = sims.detach() > alpha, sims.detach() < beta
    has_pos, has_neg = pos_mask.any(1), neg_mask.any(1)
    used = has_pos & has_neg
    rows = draw_total if draw_rows is not None else n
    r = torch.rand(rows, k, generator=g, device=emb.device)
    if draw_rows is not None:
        r = r[draw_rows]
    pos_idx = torch.where(pos_mask, r, torch.full_like(r, -1.0)).argmax(1)
    pos_logit = sims.gather(1, pos_idx.unsqueeze(1)).squeeze(1) / tau
    neg_logits = torch.where(neg_mask, sims / tau, torch.full_like(sims, -math.inf))
    log_neg = torch.logsumexp(neg_logits, dim=1) - neg_mask.sum(1).clamp_min(1).float().log()  # log mean exp
    log_neg = torch.where(has_neg, log_neg, torch.zeros_like(log_neg))
    per_row = torch.logaddexp(pos_logit, log_neg) - pos_logit  # -log(pos / (pos + neg))
    loss = torch.where(used, per_row, torch.zeros_like(per_row)).sum() + zero
    stats = {"frac_pos": has_pos.float().mean(), "frac_neg": has_neg.float().mean(), "frac_used": used.float().mean(),
             "mean_pos": pos_mask.sum(1).float().mean(), "mean_neg": neg_mask.sum(1).float().mean()}
    return loss, stats


class EECModule(nn.Module):
    """The learnable part of EEC: the 1x1 convolution that makes K^ (initialised to the identity,
    so that K^ = Q^ at the start and the first masks are Free Mask's own)."""

    def __init__(self, channels: int, upsample: int = 2) -> None:
        super().__init__()
        self.upsample = upsample
        self.conv = nn.Conv2d(channels, channels, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(channels).view(channels, channels, 1, 1))
            self.conv.bias.zero_()

    def queries(self, feats: torch.Tensor) -> torch.Tensor:
        """Q^ = upsample(l2norm(I_u)). (B, C, h, w) -> (B, C, h * up, w * up)."""
        q = F.normalize(feats.float(), dim=1)
        if self.upsample > 1:
            q = F.interpolate(q, scale_factor=self.upsample, mode="bilinear", align_corners=False)
        return q

    def exemplar_embeddings(self, pooled_queries: torch.Tensor) -> torch.Tensor:
        """I_e = l2norm(conv1x1(pooled Q^)). (K, C) -> (K, C)."""
        w = self.conv.weight.view(self.conv.out_channels, -1)
        return F.normalize(pooled_queries.float() @ w.T + self.conv.bias, dim=1)

    def image_embeddings(self, feats: torch.Tensor, instances: int,
                         **free_mask_options) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mask-guided embeddings I_mu of a batch of backbone features (B, C, h, w).

        ``instances`` = 1 gives one embedding per image (the best Free Mask mask of Q^ * K^);
        more gives up to that many per image (one per predicted instance). Returns (embeddings
        (N, C) unit vectors, image index (N,), instance slot within its image (N,))."""
        q = self.queries(feats)
        k = self.conv(q)
        res = free_mask(q * k, keep_top=instances, **free_mask_options)
        soft = res.soft * (res.soft >= free_mask_options.get("mask_threshold", 0.5))  # (B, n, H, W)
        valid = res.scores > 0
        pooled = torch.einsum("bnhw,bchw->bnc", soft, k) / soft.sum(dim=(2, 3)).clamp_min(1e-6).unsqueeze(-1)
        owner = torch.arange(feats.shape[0], device=feats.device).unsqueeze(1).expand_as(valid)
        slot = torch.arange(valid.shape[1], device=feats.device).unsqueeze(0).expand_as(valid)
        return F.normalize(pooled[valid], dim=1), owner[valid], slot[valid]


def pooled_queries(trunk: ResNetTrunk, objects: list[tuple[np.ndarray, np.ndarray]], feature_level: str,
                   upsample: int, short_side: int, max_side: int, device: torch.device) -> torch.Tensor:
    """Mask-weighted averages of Q^ for exemplar objects [(RGB uint8 image, bool mask)] -> (K, C)."""
    module = EECModule(trunk.channels[feature_level], upsample).to(device)
    out = []
    for img, mask in objects:
        h, w = resize_short_side(img.shape[0], img.shape[1], short_side, max_side)
        x = torch.from_numpy(cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR)).to(device)
        x = normalise(x.permute(2, 0, 1).unsqueeze(0).float() / 255)
        q = module.queries(trunk(x)[feature_level])[0]  # (C, H, W)
        m = torch.from_numpy(mask.astype(np.float32)).to(device)[None, None]
        weight = F.interpolate(m, size=q.shape[-2:], mode="area")[0, 0]
        out.append((q * weight).sum(dim=(1, 2)) / weight.sum().clamp_min(1e-6))
    c = trunk.channels[feature_level]
    return torch.stack(out) if out else torch.zeros((0, c), device=device)


def load_objects(pool_json: str | Path) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(read_image(e["object"]), read_image(e["mask"])[:, :, 0] > 127)
            for e in read_json(pool_json)["exemplars"]]


@torch.inference_mode()
def run_pool(pool_json: str | Path, backbone: str | Path, out_path: str | Path, feature_level: str, upsample: int,
             short_side: int, max_side: int, device: torch.device) -> dict:
    """Embed every exemplar object with the backbone: ``pool.pt`` with the pooled queries (K, C),
    the initial exemplar embeddings I_e (K, C) and the exemplars' metadata, aligned by row."""
    meta = read_json(pool_json)["exemplars"]
    trunk = load_backbone(backbone).to(device).eval()
    objects = load_objects(pool_json)
    pooled = pooled_queries(trunk, list(tqdm(objects, desc="exemplar pool", disable=None, leave=False)), feature_level,
                            upsample, short_side, max_side, device).cpu()
    initial = EECModule(pooled.shape[1], upsample).exemplar_embeddings(pooled) if len(meta) else pooled
    atomic.torch_save({"format": POOL_FORMAT, "feature_level": feature_level, "upsample": upsample,
                       "short_side": short_side, "max_side": max_side, "pooled_queries": pooled,
                       "embeddings": initial, "exemplars": meta}, out_path)
    sims = (initial @ initial.T).numpy() if len(meta) else np.zeros((0, 0))
    off = sims[~np.eye(len(meta), dtype=bool)] if len(meta) > 1 else np.zeros(0)
    return {"exemplars": len(meta), "channels": int(pooled.shape[1]),
            "mean_pairwise_cosine": float(off.mean()) if off.size else 0.0}


def load_pool(path: str | Path) -> dict:
    from efsolo.errors import EfsoloError

    blob = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != POOL_FORMAT:
        raise EfsoloError(f"{path}: not an exemplar pool file")
    return blob


def make_eec_loss(pool: dict, alpha: float, beta: float, tau: float, weight: float, granularity: str,
                  max_instances: int, seed: int, free_mask_options: dict, pool_refresh: int = 0,
                  objects: list[tuple[np.ndarray, np.ndarray]] | None = None):
    """The extra training term lambda_eec * L_eec, as a hook for ``train.train``.

    The positive is drawn with a generator seeded by (seed, step), so a resumed run draws the
    same. With ``pool_refresh`` > 0 the exemplars' pooled queries are recomputed with the
    current trunk every ``pool_refresh`` iterations (else the pool stage's backbone's are used).
    """
    level, upsample = pool["feature_level"], pool["upsample"]
    state = {"pooled": pool["pooled_queries"]}
    instances = 1 if granularity == "image" else max_instances

    def extra_loss(model, out, images, masks, step, rows=None, total=None):  # noqa: ANN001, ANN202
        dev = images.device
        if pool_refresh and step % pool_refresh == 0 and objects:
            with torch.no_grad():
                was_training = model.training
                model.eval()
                state["pooled"] = pooled_queries(model.trunk, objects, level, upsample, pool["short_side"],
                                                 pool["max_side"], dev).cpu()
                model.train(was_training)
        module = model.extra["eec"]
        emb, owner, slot = module.image_embeddings(out.trunk[level], instances, **free_mask_options)
        exemplars = module.exemplar_embeddings(state["pooled"].to(dev))
        g = torch.Generator(device=dev).manual_seed(seed * 1_000_003 + step)
        if rows is None:  # this process holds the whole batch
            rows, total = torch.arange(images.shape[0]), images.shape[0]
        draw_rows = rows.to(dev)[owner] * instances + slot
        loss, stats = eec_loss(emb, exemplars, alpha, beta, tau, g, draw_rows, total * instances)
        # L_eec sums over images; DDP averages gradients over processes, so scale by their number
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        return {"total": weight * world * loss, "loss": loss.detach(), **stats,
                "embeddings": torch.tensor(float(emb.shape[0]), device=dev)}

    return extra_loss
