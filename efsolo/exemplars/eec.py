"""Exemplar embedding contrastive module (paper section 3.4, method reference section 6).

Q^ = upsample(l2norm(I_u)); K^ = conv1x1(Q^); the Free Mask operations (Eq. 1) on Q^ * K^
give the guide mask(s) M^, filtered as Free Mask filters its masks; I_mu = M^-weighted average
of K^ (the transformed I_u). Exemplar embeddings I_e live in the same space: the pool stores
each exemplar's mask-weighted average of Q^ (the backbone's features of X_e), and since conv1x1
is linear, I_e = conv1x1(that average) with the current conv at every step.

Selection and loss (see ``eec_loss`` and docs/eec.md):
- positives (cosine > alpha) and negatives (cosine < beta) are chosen on detached cosines, of
  features centred on the pool's mean when ``centre`` is on (C5 features follow a ReLU: without
  centring every cosine is positive and high);
- ``logits: cosine`` is the paper's literal loss on those same cosines / tau. It is capped: a
  row with a positive and a negative has a loss of at most log(1 + exp(-(alpha - beta) / tau))
  (``literal_cap``), 1.4e-11 at the paper's 0.8 / 0.3 / 0.02, so it cannot move the network;
- ``logits: projection`` computes the loss on a small projection head's normalised outputs
  with its own temperature, where that cap does not hold.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from efsolo.data.coco_format import read_json
from efsolo.data.images import read_image, resize_short_side
from efsolo.freemask.free_mask import free_mask
from efsolo.modeling.backbone import ResNetTrunk, load_backbone
from efsolo.modeling.inference import normalise
from efsolo.utils import atomic

POOL_FORMAT = "efsolo-exemplar-pool-v1"
LOGIT_FORMS = ("cosine", "projection")
EXEMPLAR_VIEWS = ("scene", "crop")
# ImageNet mean colour: it normalises to zero, the "neutral" fill around an exemplar object
NEUTRAL_RGB = (124, 116, 104)


def literal_cap(alpha: float, beta: float, tau: float) -> float:
    """The largest loss a row can have under the paper's literal L_eec, whose logits are the very
    cosines that chose the positive (> alpha) and negatives (< beta): log(1 + exp(-(alpha - beta) / tau))."""
    return math.log1p(math.exp(-(alpha - beta) / tau))


def eec_loss(emb: torch.Tensor, pool: torch.Tensor, alpha: float, beta: float, tau: float,
             g: torch.Generator | None = None, draw_rows: torch.Tensor | None = None,
             draw_total: int | None = None,
             logits: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L_eec = -sum_n log(pos(n) / (pos(n) + neg(n))).

    emb (N, D) and pool (K, D) unit vectors: their cosines (N, K) select, for each row n, a
    positive drawn at random among the exemplars with cosine > alpha, and the negatives, the
    exemplars with cosine < beta. pos(n) = exp(l[n, pos]); neg(n) = mean over the negatives of
    exp(l[n, k]), where l = ``logits`` (N, K) when given (already divided by their temperature),
    else the cosines / tau (the paper read literally; capped, see ``literal_cap``). Selection is
    on detached cosines. A row with no positive or no negative contributes zero.
    ``draw_rows`` (N,) places each row in a global set of ``draw_total`` rows: the random draws
    are made for all of them, so the chosen positives do not depend on how rows are sharded.
    Returns (loss, diagnostics: fraction of rows with a positive, with negatives, with both; mean
    numbers of positives and negatives; over the used rows the mean positive logit, the mean
    negative logit (log of neg(n)) and their gap).
    """
    n, k = emb.shape[0], pool.shape[0]
    zero = emb.sum() * 0.0 + pool.sum() * 0.0
    if logits is not None:
        zero = zero + logits.sum() * 0.0
    z = torch.zeros((), device=emb.device)
    if n == 0 or k == 0:
        return zero, {"frac_pos": z, "frac_neg": z, "frac_used": z, "mean_pos": z, "mean_neg": z,
                      "pos_logit": z, "neg_logit": z, "logit_gap": z}
    sims = emb @ pool.T  # (N, K) cosines
    lg = sims / tau if logits is None else logits
    pos_mask, neg_mask = sims.detach() > alpha, sims.detach() < beta
    has_pos, has_neg = pos_mask.any(1), neg_mask.any(1)
    used = has_pos & has_neg
    rows = draw_total if draw_rows is not None else n
    r = torch.rand(rows, k, generator=g, device=emb.device)
    if draw_rows is not None:
        r = r[draw_rows]
    pos_idx = torch.where(pos_mask, r, torch.full_like(r, -1.0)).argmax(1)
    pos_logit = lg.gather(1, pos_idx.unsqueeze(1)).squeeze(1)
    neg_logits = torch.where(neg_mask, lg, torch.full_like(lg, -math.inf))
    log_neg = torch.logsumexp(neg_logits, dim=1) - neg_mask.sum(1).clamp_min(1).float().log()  # log mean exp
    log_neg = torch.where(has_neg, log_neg, torch.zeros_like(log_neg))
    per_row = torch.logaddexp(pos_logit, log_neg) - pos_logit  # -log(pos / (pos + neg))
    loss = torch.where(used, per_row, torch.zeros_like(per_row)).sum() + zero
    n_used = used.float().sum().clamp_min(1.0)
    mean_pos = torch.where(used, pos_logit.detach(), z).sum() / n_used
    mean_neg = torch.where(used, log_neg.detach(), z).sum() / n_used
    stats = {"frac_pos": has_pos.float().mean(), "frac_neg": has_neg.float().mean(), "frac_used": used.float().mean(),
             "mean_pos": pos_mask.sum(1).float().mean(), "mean_neg": neg_mask.sum(1).float().mean(),
             "pos_logit": mean_pos, "neg_logit": mean_neg, "logit_gap": mean_pos - mean_neg}
    return loss, stats


def guide_filter(soft: torch.Tensor, scores: torch.Tensor, keep: int, score_threshold: float = 0.0,
                 max_box_width: float = 1.0, top_exclude: float = 0.0) -> torch.Tensor:
    """Free Mask's filters on candidate guide masks: soft (B, n, H, W) binary maps in score order,
    scores (B, n). A mask is valid when its score is at least ``score_threshold`` and positive, it
    is not empty, its box is at most ``max_box_width`` of the width and its centre is not in the
    top ``top_exclude`` of the height. Returns (B, n) bool: the first ``keep`` valid masks of each
    image (none for an image with none)."""
    b, n, h, w = soft.shape
    if n == 0:
        return torch.zeros((b, 0), dtype=torch.bool, device=soft.device)
    on = soft > 0
    cols, rows = on.any(2), on.any(3)  # (B, n, W), (B, n, H)
    xs = torch.arange(w, device=soft.device)
    ys = torch.arange(h, device=soft.device)
    x0 = torch.where(cols, xs, w).amin(2)
    x1 = torch.where(cols, xs, -1).amax(2)
    y0 = torch.where(rows, ys, h).amin(2)
    y1 = torch.where(rows, ys, -1).amax(2)
    centre_y = (y0 + y1 + 1).float() / 2
    valid = (scores > 0) & (scores >= score_threshold) & cols.any(2) & \
        ((x1 - x0 + 1).float() <= max_box_width * w) & (centre_y >= top_exclude * h)
    return valid & (valid.long().cumsum(1) <= keep)


class EECModule(nn.Module):
    """The learnable part of EEC: the 1x1 convolution that makes K^ (initialised to the identity,
    so that K^ = Q^ at the start and the first masks are Free Mask's own), and, with ``proj_dim``
    > 0, a projection head (C -> C -> proj_dim MLP, seeded init) whose normalised outputs give the
    loss's logits."""

    def __init__(self, channels: int, upsample: int = 2, proj_dim: int = 0, seed: int = 0) -> None:
        super().__init__()
        self.upsample = upsample
        self.conv = nn.Conv2d(channels, channels, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(channels).view(channels, channels, 1, 1))
            self.conv.bias.zero_()
        self.head = None
        if proj_dim > 0:
            g = torch.Generator().manual_seed(seed)
            self.head = nn.Sequential(nn.Linear(channels, channels), nn.ReLU(), nn.Linear(channels, proj_dim))
            with torch.no_grad():
                for layer in (self.head[0], self.head[2]):
                    bound = 1 / math.sqrt(layer.in_features)
                    layer.weight.uniform_(-bound, bound, generator=g)
                    layer.bias.zero_()

    def queries(self, feats: torch.Tensor) -> torch.Tensor:
        """Q^ = upsample(l2norm(I_u)). (B, C, h, w) -> (B, C, h * up, w * up)."""
        q = F.normalize(feats.float(), dim=1)
        if self.upsample > 1:
            q = F.interpolate(q, scale_factor=self.upsample, mode="bilinear", align_corners=False)
        return q

    def keys(self, pooled_queries: torch.Tensor) -> torch.Tensor:
        """conv1x1 applied to pooled queries: (K, C) -> (K, C), not normalised."""
        w = self.conv.weight.view(self.conv.out_channels, -1)
        return pooled_queries.float() @ w.T + self.conv.bias

    def exemplar_embeddings(self, pooled_queries: torch.Tensor) -> torch.Tensor:
        """I_e = l2norm(conv1x1(pooled Q^)). (K, C) -> (K, C)."""
        return F.normalize(self.keys(pooled_queries), dim=1)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """The projection head's unit outputs: (N, C) -> (N, proj_dim)."""
        if self.head is None:
            raise ValueError("this EEC module has no projection head (proj_dim 0)")
        return F.normalize(self.head(x), dim=1)

    def image_embeddings(self, feats: torch.Tensor, instances: int, candidates: int = 10,
                         filters: dict | None = None, centred: bool = False,
                         **free_mask_options) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mask-guided embeddings I_mu of a batch of backbone features (B, C, h, w).

        Free Mask on Q^ * K^ gives ``candidates`` masks per image; ``filters`` (score_threshold,
        max_box_width, top_exclude: Free Mask's own) drop some; the first ``instances`` left give
        the embeddings (``instances`` = 1: one per image, the paper's). Returns (embeddings (N, C):
        unit vectors, or with ``centred`` the raw mask-weighted averages of K^ for the caller to
        centre; image index (N,); slot within its image (N,)). An image whose candidates are all
        filtered out gives no row."""
        q = self.queries(feats)
        k = self.conv(q)
        res = free_mask(q * k, keep_top=max(instances, candidates), **free_mask_options)
        soft = res.soft * (res.soft >= free_mask_options.get("mask_threshold", 0.5))  # (B, n, H, W)
        valid = guide_filter(soft, res.scores, instances, **(filters or {}))
        pooled = torch.einsum("bnhw,bchw->bnc", soft, k) / soft.sum(dim=(2, 3)).clamp_min(1e-6).unsqueeze(-1)
        owner = torch.arange(feats.shape[0], device=feats.device).unsqueeze(1).expand_as(valid)
        slot = (valid.long().cumsum(1) - 1).clamp_min(0)
        out = pooled[valid]
        return (out if centred else F.normalize(out, dim=1)), owner[valid], slot[valid]


@dataclass(frozen=True)
class ExemplarObject:
    """An exemplar object X_e: its crop (h, w, 3) RGB uint8, its mask (h, w) bool, and where the
    crop lies in its source image (box [x, y, w, h], image_size (H, W)), when known."""

    image: np.ndarray
    mask: np.ndarray
    box: tuple[int, int, int, int] | None = None
    image_size: tuple[int, int] | None = None


def exemplar_view(obj: ExemplarObject, view: str, short_side: int, max_side: int) -> tuple[np.ndarray, np.ndarray]:
    """The image (H', W', 3) and mask (H', W') an exemplar is embedded from.

    ``crop``: the masked-out crop on black, its short side resized to ``short_side`` (the paper's
    X_e as it reads). ``scene``: the object pasted at its place in a canvas of its source image's
    size filled with the neutral (ImageNet mean) colour, the canvas resized like a training image,
    so the object is seen at the scale and position scene objects are seen at."""
    if view not in EXEMPLAR_VIEWS:
        raise ValueError(f"exemplar view must be one of {EXEMPLAR_VIEWS}, got {view!r}")
    img, mask = obj.image, obj.mask
    if view == "scene" and obj.box is not None and obj.image_size is not None:
        hh, ww = obj.image_size
        x, y, w, h = obj.box
        canvas = np.empty((hh, ww, 3), np.uint8)
        canvas[:] = NEUTRAL_RGB
        full = np.zeros((hh, ww), bool)
        region = canvas[y:y + h, x:x + w]
        region[mask] = img[mask]
        full[y:y + h, x:x + w] = mask
        img, mask = canvas, full
    elif view == "scene":  # no placement recorded: neutral fill around the crop
        img = img.copy()
        img[~mask] = NEUTRAL_RGB
    else:
        img = img.copy()
        img[~mask] = 0
    h, w = resize_short_side(img.shape[0], img.shape[1], short_side, max_side)
    img = cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR)
    mask = cv2.resize(mask.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST) > 0
    return img, mask


def pooled_queries(trunk: ResNetTrunk, objects: list[ExemplarObject], feature_level: str, upsample: int,
                   short_side: int, max_side: int, device: torch.device, view: str = "crop") -> torch.Tensor:
    """Mask-weighted averages of Q^ for exemplar objects, each seen as ``exemplar_view`` makes it -> (K, C)."""
    module = EECModule(trunk.channels[feature_level], upsample).to(device)
    out = []
    for obj in objects:
        if not isinstance(obj, ExemplarObject):
            obj = ExemplarObject(*obj)
        img, mask = exemplar_view(obj, view, short_side, max_side)
        x = normalise(torch.from_numpy(img).to(device).permute(2, 0, 1).unsqueeze(0).float() / 255)
        q = module.queries(trunk(x)[feature_level])[0]  # (C, H, W)
        m = torch.from_numpy(mask.astype(np.float32)).to(device)[None, None]
        weight = F.interpolate(m, size=q.shape[-2:], mode="area")[0, 0]
        out.append((q * weight).sum(dim=(1, 2)) / weight.sum().clamp_min(1e-6))
    c = trunk.channels[feature_level]
    return torch.stack(out) if out else torch.zeros((0, c), device=device)


def load_objects(pool_json: str | Path) -> list[ExemplarObject]:
    out = []
    for e in read_json(pool_json)["exemplars"]:
        box, size = e.get("box"), e.get("image_size")
        out.append(ExemplarObject(read_image(e["object"]), read_image(e["mask"])[:, :, 0] > 127,
                                  tuple(box) if box else None, tuple(size) if size else None))
    return out


@torch.inference_mode()
def run_pool(pool_json: str | Path, backbone: str | Path, out_path: str | Path, feature_level: str, upsample: int,
             short_side: int, max_side: int, device: torch.device, view: str = "scene") -> dict:
    """Embed every exemplar object with the backbone: ``pool.pt`` with the pooled queries (K, C),
    the initial exemplar embeddings I_e (K, C) and the exemplars' metadata, aligned by row."""
    meta = read_json(pool_json)["exemplars"]
    trunk = load_backbone(backbone).to(device).eval()
    objects = load_objects(pool_json)
    pooled = pooled_queries(trunk, list(tqdm(objects, desc="exemplar pool", disable=None, leave=False)), feature_level,
                            upsample, short_side, max_side, device, view).cpu()
    initial = EECModule(pooled.shape[1], upsample).exemplar_embeddings(pooled) if len(meta) else pooled
    atomic.torch_save({"format": POOL_FORMAT, "feature_level": feature_level, "upsample": upsample,
                       "short_side": short_side, "max_side": max_side, "view": view, "pooled_queries": pooled,
                       "embeddings": initial, "exemplars": meta}, out_path)
    out = {"exemplars": len(meta), "channels": int(pooled.shape[1])}
    for name, emb in (("raw", initial), ("centred", F.normalize(pooled - pooled.mean(0), dim=1) if len(meta) else pooled)):
        sims = (emb @ emb.T).numpy() if len(meta) else np.zeros((0, 0))
        off = sims[~np.eye(len(meta), dtype=bool)] if len(meta) > 1 else np.zeros(0)
        out[f"mean_pairwise_cosine_{name}"] = float(off.mean()) if off.size else 0.0
    return out


def load_pool(path: str | Path) -> dict:
    from efsolo.utils.errors import EfsoloError

    blob = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != POOL_FORMAT:
        raise EfsoloError(f"{path}: not an exemplar pool file")
    return blob


def make_eec_loss(pool: dict, alpha: float, beta: float, tau: float, weight: float, granularity: str,
                  max_instances: int, seed: int, free_mask_options: dict, pool_refresh: int = 0,
                  objects: list[ExemplarObject] | None = None, logits: str = "cosine", centre: bool = False,
                  proj_tau: float = 0.2, guide_filters: dict | None = None):
    """The extra training term lambda_eec * L_eec, as a hook for ``train.train``.

    Selection is on the cosines of I_mu and I_e, centred first on the pool's mean (in K^ space)
    when ``centre`` is on; ``logits`` picks the loss's logits: ``cosine`` (the same cosines / tau,
    the paper's literal form) or ``projection`` (the EEC module's projection head, / ``proj_tau``).
    The positive is drawn with a generator seeded by (seed, step), so a resumed run draws the
    same. With ``pool_refresh`` > 0 the exemplars' pooled queries are recomputed with the
    current trunk every ``pool_refresh`` iterations (else the pool stage's backbone's are used).
    """
    if logits not in LOGIT_FORMS:
        raise ValueError(f"eec logits must be one of {LOGIT_FORMS}, got {logits!r}")
    level, upsample = pool["feature_level"], pool["upsample"]
    view = pool.get("view", "crop")
    state = {"pooled": pool["pooled_queries"]}
    instances = 1 if granularity == "image" else max_instances

    def extra_loss(model, out, images, masks, step, rows=None, total=None):  # noqa: ANN001, ANN202
        dev = images.device
        if pool_refresh and step % pool_refresh == 0 and objects:
            with torch.no_grad():
                was_training = model.training
                model.eval()
                state["pooled"] = pooled_queries(model.trunk, objects, level, upsample, pool["short_side"],
                                                 pool["max_side"], dev, view).cpu()
                model.train(was_training)
        module = model.extra["eec"]
        pooled = state["pooled"].to(dev)
        raw, owner, slot = module.image_embeddings(out.trunk[level], instances, filters=guide_filters, centred=True,
                                                   **free_mask_options)
        ex_raw = module.keys(pooled)
        if centre and len(pooled):
            c = module.keys(pooled.mean(0, keepdim=True))  # the pool's mean, through the same conv
            raw, ex_raw = raw - c, ex_raw - c
        emb, exemplars = F.normalize(raw, dim=1), F.normalize(ex_raw, dim=1)
        lg = None
        if logits == "projection" and len(emb) and len(exemplars):
            lg = module.project(raw) @ module.project(ex_raw).T / proj_tau
        g = torch.Generator(device=dev).manual_seed(seed * 1_000_003 + step)
        if rows is None:  # this process holds the whole batch
            rows, total = torch.arange(images.shape[0]), images.shape[0]
        draw_rows = rows.to(dev)[owner] * instances + slot
        loss, stats = eec_loss(emb, exemplars, alpha, beta, tau, g, draw_rows, total * instances, logits=lg)
        # L_eec sums over images; DDP averages gradients over processes, so scale by their number
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        return {"total": weight * world * loss, "loss": loss.detach(), **stats,
                "embeddings": torch.tensor(float(emb.shape[0]), device=dev)}

    return extra_loss
