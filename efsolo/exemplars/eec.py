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

from efsolo.config import EECParams
from efsolo.data.coco_format import read_json
from efsolo.data.images import read_image, resize_short_side
from efsolo.freemask.free_mask import border_fractions, free_mask
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
             draw_total: int | None = None, logits: torch.Tensor | None = None,
             slots: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L_eec = -sum_n log(pos(n) / (pos(n) + neg(n))).

    emb (N, D) and pool (K, D) unit vectors: their cosines (N, K) select, for each row n, a
    positive drawn at random among the exemplars with cosine > alpha, and the negatives, the
    exemplars with cosine < beta. pos(n) = exp(l[n, pos]); neg(n) = mean over the negatives of
    exp(l[n, k]), where l = ``logits`` (N, K) when given (already divided by their temperature),
    else the cosines / tau (the paper read literally; capped, see ``literal_cap``). Selection is
    on detached cosines. A row with no positive or no negative contributes zero.
    ``draw_rows`` (N,) places each row in a global set of ``draw_total`` rows: the random draws
    are made for all of them, so the chosen positives do not depend on how rows are sharded.
    ``slots``: how many rows there could have been (the batch's images x instances; a row is an
    image's guide mask, and the guide filter drops some); the fractions are over them (default N),
    so an image without a guide mask counts as one the loss does not act on.
    Returns (loss, diagnostics: fraction of slots with a row (``frac_embedded``), with a positive,
    with negatives, with both (``frac_used``: what the loss acts on); mean numbers of positives and
    negatives a row; over the used rows the mean positive logit, the mean negative logit (log of
    neg(n)) and their gap).
    """
    n, k = emb.shape[0], pool.shape[0]
    zero = emb.sum() * 0.0 + pool.sum() * 0.0
    if logits is not None:
        zero = zero + logits.sum() * 0.0
    z = torch.zeros((), device=emb.device)
    slots = n if slots is None else slots
    if slots < n:
        raise ValueError(f"eec_loss: {n} rows from {slots} slots")
    embedded = torch.tensor(n / slots if slots else 0.0, device=emb.device)
    if n == 0 or k == 0:
        return zero, {"frac_embedded": embedded, "frac_pos": z, "frac_neg": z, "frac_used": z, "mean_pos": z,
                      "mean_neg": z, "pos_logit": z, "neg_logit": z, "logit_gap": z}
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
    stats = {"frac_embedded": embedded, "frac_pos": has_pos.float().sum() / slots,
             "frac_neg": has_neg.float().sum() / slots, "frac_used": used.float().sum() / slots,
             "mean_pos": pos_mask.sum(1).float().mean(), "mean_neg": neg_mask.sum(1).float().mean(),
             "pos_logit": mean_pos, "neg_logit": mean_neg, "logit_gap": mean_pos - mean_neg}
    return loss, stats


def guide_filter(soft: torch.Tensor, scores: torch.Tensor, keep: int, score_threshold: float = 0.0,
                 max_box_width: float = 1.0, top_exclude: float = 0.0,
                 max_border_fraction: float = 1.0) -> torch.Tensor:
    """Free Mask's filters on candidate guide masks: soft (B, n, H, W) binary maps in score order,
    scores (B, n). A mask is valid when its score is at least ``score_threshold`` and positive, it
    is not empty, its box is at most ``max_box_width`` of the width, its centre is not in the
    top ``top_exclude`` of the height and it covers at most ``max_border_fraction`` of the map's
    outermost pixels (1 keeps them all). Returns (B, n) bool: the first ``keep`` valid masks of
    each image (none for an image with none)."""
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
    if max_border_fraction < 1.0:
        valid &= border_fractions(on) <= max_border_fraction
    return valid & (valid.long().cumsum(1) <= keep)


def upsampled_queries(feats: torch.Tensor, upsample: int) -> torch.Tensor:
    """Q^ = upsample(l2norm(I_u)): features (B, C, h, w) normalised over channels, then upsampled
    bilinearly by ``upsample`` -> (B, C, h * up, w * up)."""
    q = F.normalize(feats.float(), dim=1)
    if upsample > 1:
        q = F.interpolate(q, scale_factor=upsample, mode="bilinear", align_corners=False)
    return q


class EECModule(nn.Module):
    """The learnable part of EEC: the 1x1 convolution that makes K^ (initialised to the identity,
    so that K^ = Q^ at the start and the first masks are Free Mask's own), and, with ``proj_dim``
    > 0, a projection head (C -> C -> proj_dim MLP, seeded init) whose normalised outputs give the
    loss's logits. It holds the exemplars' pooled queries (``exemplar_queries``)."""

    def __init__(self, channels: int, upsample: int = 2, proj_dim: int = 0, seed: int = 0,
                 exemplar_queries: torch.Tensor | None = None) -> None:
        super().__init__()
        self.upsample = upsample
        # the exemplars' pooled queries (K, C): a buffer, so a training's checkpoints keep the ones
        # it last computed (eec.pool_refresh) and a resumed run selects as the uninterrupted one
        self.register_buffer("exemplar_queries", torch.zeros((0, channels)) if exemplar_queries is None
                             else exemplar_queries.detach().float().clone())
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
        return upsampled_queries(feats, self.upsample)

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


class ExemplarFeatures:
    """The exemplar objects as the trunk sees them, for the pooled queries under any state of a
    trunk that trains: each exemplar's input (``exemplar_view``) is run once through the trunk's
    first ``fixed_stages`` stages (those the training keeps fixed, ``freesolo.model.freeze_at``)
    and kept, so ``pooled`` runs only the stages that train. Exemplars of one input size are
    batched."""

    def __init__(self, objects: list[ExemplarObject], view: str, short_side: int, max_side: int,
                 fixed_stages: int = 0) -> None:
        self.fixed_stages = fixed_stages
        self._views = []
        for obj in objects:
            if not isinstance(obj, ExemplarObject):
                obj = ExemplarObject(*obj)
            self._views.append(exemplar_view(obj, view, short_side, max_side))
        self._cache: dict | None = None  # device, then per size group: (rows, trunk prefix (n, C, h, w), masks)

    def _groups(self, trunk: ResNetTrunk, device: torch.device) -> list:
        if self._cache is None or self._cache["device"] != device:
            by_size: dict[tuple[int, int], list[int]] = {}
            for i, (img, _) in enumerate(self._views):
                by_size.setdefault(img.shape[:2], []).append(i)
            groups = []
            with torch.no_grad():
                for rows in by_size.values():
                    x = torch.stack([torch.from_numpy(self._views[i][0]) for i in rows]).to(device)
                    x = normalise(x.permute(0, 3, 1, 2).float() / 255)
                    m = torch.stack([torch.from_numpy(self._views[i][1].astype(np.float32)) for i in rows])
                    groups.append((rows, trunk.prefix(x, self.fixed_stages), m.unsqueeze(1).to(device)))
            self._cache = {"device": device, "groups": groups}
        return self._cache["groups"]

    @torch.no_grad()
    def pooled(self, trunk: ResNetTrunk, feature_level: str, upsample: int) -> torch.Tensor:
        """Each exemplar's mask-weighted average of Q^ = upsample(l2norm(features)) -> (K, C). The
        trunk's first ``fixed_stages`` stages must be the ones this object was first called with."""
        c = trunk.channels[feature_level]
        if not self._views:
            return torch.zeros((0, c))
        device = next(trunk.parameters()).device
        out = torch.zeros((len(self._views), c), device=device)
        for rows, prefix, masks in self._groups(trunk, device):
            q = upsampled_queries(trunk.forward_from(prefix, self.fixed_stages)[feature_level], upsample)
            weight = F.interpolate(masks, size=q.shape[-2:], mode="area")  # (n, 1, H, W)
            out[rows] = (q * weight).sum(dim=(2, 3)) / weight.sum(dim=(2, 3)).clamp_min(1e-6)
        return out


def pooled_queries(trunk: ResNetTrunk, objects: list[ExemplarObject], feature_level: str, upsample: int,
                   short_side: int, max_side: int, device: torch.device, view: str = "crop") -> torch.Tensor:
    """Mask-weighted averages of Q^ for exemplar objects, each seen as ``exemplar_view`` makes it -> (K, C)."""
    return ExemplarFeatures(objects, view, short_side, max_side).pooled(trunk.to(device), feature_level, upsample)


def load_objects(pool_json: str | Path) -> list[ExemplarObject]:
    out = []
    for e in read_json(pool_json)["exemplars"]:
        box, size = e.get("box"), e.get("image_size")
        out.append(ExemplarObject(read_image(e["object"]), read_image(e["mask"])[:, :, 0] > 127,
                                  tuple(box) if box else None, tuple(size) if size else None))
    return out


def selection_space(module: EECModule, raw: torch.Tensor, pooled: torch.Tensor,
                    centre: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The space positives and negatives are chosen in: raw mask-weighted averages of K^ (N, C) and
    the exemplars' pooled queries (K, C) -> (images (N, C), exemplars (K, C)), through the same
    1x1 conv, both centred on the pool's mean when ``centre`` is on (not normalised)."""
    ex_raw = module.keys(pooled)
    if centre and len(pooled):
        c = module.keys(pooled.mean(0, keepdim=True))  # the pool's mean, through the same conv
        raw, ex_raw = raw - c, ex_raw - c
    return raw, ex_raw


def selection_thresholds(mode: str, alpha: float, beta: float, cosines: np.ndarray) -> tuple[float, float]:
    """The cosines that make a positive (> alpha) and a negative (< beta).

    ``absolute``: ``alpha`` and ``beta`` are those cosines (the paper: 0.8 and 0.3). ``quantile``:
    they are quantiles of the pool stage's measured cosines (``cosines`` (N, K): N training
    images' rows against K exemplars): the positive cosine is the ``alpha`` quantile of the rows'
    best cosine (so about 1 - alpha of the images find a positive at the start) and the negative
    cosine the ``beta`` quantile of all the cosines (about a fraction beta of the exemplars are an
    image's negatives). Higher alpha means fewer positives and higher beta more negatives in both
    modes. With no measured rows, quantile gives (1, -1): nothing is selected."""
    if mode == "absolute":
        return float(alpha), float(beta)
    if mode != "quantile":
        raise ValueError(f"eec thresholds must be absolute or quantile, got {mode!r}")
    if cosines.size == 0:
        return 1.0, -1.0
    return float(np.quantile(cosines.max(1), alpha)), float(np.quantile(cosines, beta))


def engaged_fraction(cosines: np.ndarray, alpha: float, beta: float, slots: int | None = None) -> float:
    """The fraction of ``slots`` (default: the rows) whose row (N, K) has a positive (> alpha) and a
    negative (< beta): those the EEC loss acts on. Rows are the images' guide masks; with ``slots``
    the number of images x instances measured, an image whose guide masks were all filtered out
    counts as not engaged. 0 for no rows."""
    slots = len(cosines) if slots is None else slots
    if cosines.size == 0 or slots == 0:
        return 0.0
    return float(((cosines > alpha).any(1) & (cosines < beta).any(1)).sum() / slots)


def percentiles(x: np.ndarray, qs: tuple[int, ...] = (10, 25, 50, 75, 90)) -> dict[str, float]:
    """{"p10": ..., ...}: the percentiles ``qs`` of ``x``, rounded (empty for an empty ``x``)."""
    return {f"p{q}": round(float(v), 4) for q, v in zip(qs, np.percentile(x, qs))} if x.size else {}


def engagement_error(where: str, fraction: float, minimum: float, mode: str, alpha: float, beta: float,
                     thresholds: tuple[float, float], cosines: np.ndarray, source: str,
                     embedded: float | None = None) -> str | None:
    """The one-line error for an EEC that engages on ``fraction`` < ``minimum`` of the images, or
    None. It names the fraction, the share of images that kept a guide mask (``embedded``, when
    known), the thresholds, the measured cosines' percentiles and what to change: the guide masks
    when at least half of those kept engage (thresholds cannot add the rest), else the thresholds."""
    if fraction >= minimum:
        return None
    if embedded is not None and fraction >= 0.5 * embedded:
        advice = ("too few images keep a guide mask: lower eec.weight (an EEC that pulls too hard empties its own "
                  "guide masks, docs/eec.md), loosen those filters, or lower eec.min_frac_used")
    else:
        advice = "lower eec.alpha or raise eec.beta" + (", use eec.thresholds: quantile" if mode == "absolute" else "") \
            + ", or lower eec.min_frac_used"
    kept = "" if embedded is None else (
        f" ({100 * embedded:.0f}% of them kept a guide mask after Free Mask's filters: freemask.score_threshold, "
        f"max_box_width, top_exclude, max_border_fraction)")
    best, worst = (cosines.max(1), cosines.min(1)) if cosines.size else (np.zeros(0), np.zeros(0))

    def pct(x: np.ndarray) -> str:
        return " / ".join(f"{v:.2f}" for v in np.percentile(x, (10, 50, 90))) if x.size else "none"

    how = (f"eec.alpha {alpha} and eec.beta {beta} (eec.thresholds: {mode}; cosines {thresholds[0]:.3f} and "
           f"{thresholds[1]:.3f})")
    return (f"{where}: the EEC engaged on {100 * fraction:.2f}% of the images{kept}, below eec.min_frac_used "
            f"({100 * minimum:.0f}%), at {how}; the images' best centred cosine to the pool is {pct(best)} and their "
            f"worst {pct(worst)} (10th / 50th / 90th percentiles, {source}): {advice}")


def training_engagement_error(where: str, round_stats: dict, minimum: float, mode: str, alpha: float, beta: float,
                              thresholds: tuple[float, float], cosines: np.ndarray, source: str) -> str | None:
    """The one-line error for a finished training whose EEC engaged on fewer than ``minimum`` of the
    images, on average over its EEC iterations (``extra_mean``) or over the training's last quarter
    (``extra_tail_mean``: an EEC that went silent late, its mean over the run still above the
    minimum), or None."""
    mean = round_stats.get("extra_mean", {})
    used = mean.get("frac_used")
    if used is not None:
        problem = engagement_error(where, used, minimum, mode, alpha, beta, thresholds, cosines, source,
                                   mean.get("frac_embedded"))
        if problem:
            return problem + " (mean over the training's EEC iterations)"
    tail = round_stats.get("extra_tail_mean", {})
    if tail.get("frac_used") is not None:
        problem = engagement_error(where, tail["frac_used"], minimum, mode, alpha, beta, thresholds, cosines, source,
                                   tail.get("frac_embedded"))
        if problem:
            return problem + (f" (mean over the training's last quarter, iterations {tail['from_iter'] + 1}-"
                              f"{round_stats['iters']}: the EEC went silent)")
    return None


def start_trunk(backbone: str | Path, start_state: str | Path | None) -> ResNetTrunk:
    """The trunk Exemplar-FreeSOLO starts from: the backbone, with the trunk weights of a training
    state (``models/freesolo_start.pt``) when one is given."""
    from efsolo.engine.train import TRAIN_STATE_FORMAT
    from efsolo.utils.errors import EfsoloError

    trunk = load_backbone(backbone)
    if start_state:
        blob = torch.load(start_state, map_location="cpu", weights_only=False)
        if not isinstance(blob, dict) or blob.get("format") != TRAIN_STATE_FORMAT:
            raise EfsoloError(f"{start_state}: not an efsolo training state file")
        trunk.load_state_dict({k[len("trunk."):]: v for k, v in blob["model"].items() if k.startswith("trunk.")})
    return trunk


@torch.no_grad()
def image_cosines(trunk: ResNetTrunk, module: EECModule, images: list[np.ndarray], pooled: torch.Tensor,
                  feature_level: str, instances: int, centre: bool, short_side: int, max_side: int,
                  free_mask_options: dict, guide_filters: dict | None, batch_size: int = 16) -> np.ndarray:
    """The centred cosines the EEC loss selects on, of training images (H, W, 3) uint8 seen as a
    training weak view (short side ``short_side``) against the exemplars' pooled queries
    (K, C) -> (rows, K): one row per guide mask (at most ``instances`` an image)."""
    from efsolo.data.pseudo_labels import make_batch

    device = next(trunk.parameters()).device
    _, ex = selection_space(module, torch.zeros((0, pooled.shape[1]), device=device), pooled.to(device), centre)
    ex = F.normalize(ex, dim=1)
    out = []
    for i in range(0, len(images), batch_size):
        chunk = images[i:i + batch_size]
        unlabelled = [(im, np.zeros((0, *im.shape[:2]), bool), np.zeros((0, 1), np.float32)) for im in chunk]
        batch = make_batch(unlabelled, short_side, max_side, [False] * len(chunk))
        feats = trunk(normalise(batch.images.to(device)))[feature_level]
        raw, _, _ = module.image_embeddings(feats, instances, filters=guide_filters, centred=True, **free_mask_options)
        emb, _ = selection_space(module, raw, pooled.to(device), centre)
        out.append((F.normalize(emb, dim=1) @ ex.T).cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, len(pooled)), np.float32)


@torch.no_grad()
def run_pool(pool_json: str | Path, backbone: str | Path, start_state: str | Path | None, train_manifest: str | Path,
             out_path: str | Path, metrics_path: str | Path, plot_path: str | Path, *, eec: EECParams,
             free_mask_options: dict, guide_filters: dict, input_short_side: int, input_max_side: int, seed: int,
             device: torch.device) -> dict:
    """Embed every exemplar object with the trunk Exemplar-FreeSOLO starts from (``start_trunk``),
    and measure, on ``eec.calibration_images`` training images (seeded; no labels read), the
    centred cosines the EEC loss selects on. Writes ``pool.pt`` (pooled queries (K, C), initial
    exemplar embeddings, the exemplars' metadata aligned by row, and the measured cosines (N, K)
    from which ``eec.thresholds: quantile`` sets the thresholds), ``metrics_path`` (percentiles of
    each image's best and worst cosine) and ``plot_path`` (their quantile functions, CSV)."""
    from efsolo.data.datasets import load_manifest

    meta = read_json(pool_json)["exemplars"]
    trunk = start_trunk(backbone, start_state).to(device).eval()
    objects = load_objects(pool_json)
    c = trunk.channels[eec.feature_level]
    pooled = pooled_queries(trunk, objects, eec.feature_level, eec.upsample, eec.exemplar_short_side,
                            eec.exemplar_max_side, device, eec.exemplar_view).cpu()
    module = EECModule(c, eec.upsample).to(device)
    initial = module.exemplar_embeddings(pooled.to(device)).cpu() if len(meta) else pooled
    records = load_manifest(train_manifest)
    g = torch.Generator().manual_seed(seed)
    chosen = sorted(torch.randperm(len(records), generator=g)[:eec.calibration_images].tolist())
    images = [read_image(records[i]["file_name"]) for i in tqdm(chosen, desc="pool: calibration", disable=None,
                                                                  leave=False)]
    instances = 1 if eec.granularity == "image" else eec.max_instances
    cosines = image_cosines(trunk, module, images, pooled, eec.feature_level, instances, eec.centre, input_short_side,
                            input_max_side, free_mask_options, guide_filters) if len(meta) else \
        np.zeros((0, 0), np.float32)
    slots = len(chosen) * instances  # the guide masks there could have been; filtered ones give no row
    atomic.torch_save({"format": POOL_FORMAT, "feature_level": eec.feature_level, "upsample": eec.upsample,
                       "short_side": eec.exemplar_short_side, "max_side": eec.exemplar_max_side,
                       "view": eec.exemplar_view, "pooled_queries": pooled, "embeddings": initial, "exemplars": meta,
                       "calibration": {"cosines": torch.from_numpy(cosines), "images": len(chosen),
                                       "granularity": eec.granularity, "centre": eec.centre, "slots": slots}},
                      out_path)
    out: dict = {"exemplars": len(meta), "channels": int(c), "trunk": str(start_state or backbone),
                 "calibration_images": len(chosen), "rows": int(cosines.shape[0]),
                 "embedded": round(cosines.shape[0] / slots, 4) if slots else 0.0}
    for name, emb in (("raw", initial), ("centred", F.normalize(pooled - pooled.mean(0), dim=1) if len(meta) else pooled)):
        sims = (emb @ emb.T).numpy() if len(meta) else np.zeros((0, 0))
        off = sims[~np.eye(len(meta), dtype=bool)] if len(meta) > 1 else np.zeros(0)
        out[f"mean_pairwise_cosine_{name}"] = round(float(off.mean()), 4) if off.size else 0.0
    if cosines.size:
        out["best_cosine"] = percentiles(cosines.max(1))
        out["worst_cosine"] = percentiles(cosines.min(1))
        out["all_cosines"] = percentiles(cosines.ravel())
        # what the paper's absolute thresholds would select on this trunk and data
        out["engaged_at_paper_thresholds"] = round(engaged_fraction(cosines, 0.8, 0.3, slots), 4)
        a, b = selection_thresholds(eec.thresholds, eec.alpha, eec.beta, cosines)
        out["thresholds"] = {"mode": eec.thresholds, "alpha": eec.alpha, "beta": eec.beta,
                             "positive_cosine": round(a, 4), "negative_cosine": round(b, 4),
                             "engaged": round(engaged_fraction(cosines, a, b, slots), 4)}
    atomic.write_json(metrics_path, out, indent=1)
    qs = np.linspace(0, 1, 51)
    best = np.quantile(cosines.max(1), qs) if cosines.size else np.zeros_like(qs)
    worst = np.quantile(cosines.min(1), qs) if cosines.size else np.zeros_like(qs)
    atomic.write_text(plot_path, "quantile,best_cosine,worst_cosine\n" +
                      "".join(f"{q:.2f},{b:.4f},{w:.4f}\n" for q, b, w in zip(qs, best, worst)))
    return out


def load_pool(path: str | Path) -> dict:
    from efsolo.utils.errors import EfsoloError

    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise EfsoloError(f"{path}: no such exemplar pool file") from None
    except Exception as err:  # noqa: BLE001 - any unpickling failure: not one of our files
        raise EfsoloError(f"{path}: not an exemplar pool file ({type(err).__name__})") from None
    if not isinstance(blob, dict) or blob.get("format") != POOL_FORMAT:
        raise EfsoloError(f"{path}: not an exemplar pool file")
    if "slots" not in blob.get("calibration", {}):
        raise EfsoloError(f"{path}: an exemplar pool written by an older efsolo (its calibration does not say how many "
                          f"guide masks it could have had); re-run the pool stage: dvc repro pool")
    return blob


def make_eec_loss(pool: dict, eec: EECParams, thresholds: tuple[float, float], seed: int, free_mask_options: dict,
                  guide_filters: dict | None = None, features: ExemplarFeatures | None = None):
    """The extra training term lambda_eec * L_eec (``eec.weight``), as a hook for ``train.train``.

    Selection is on the cosines of I_mu and I_e (``selection_space``: centred on the pool's mean
    when ``eec.centre`` is on): a positive above ``thresholds[0]``, negatives below
    ``thresholds[1]`` (cosines; ``selection_thresholds``). ``eec.logits`` picks the loss's
    logits: ``cosine`` (the same cosines / ``eec.tau``, the paper's literal form) or
    ``projection`` (the EEC module's projection head, / ``eec.proj_tau``). The positive is drawn
    with a generator seeded by (seed, step), so a resumed run draws the same. The exemplars'
    pooled queries are the EEC module's buffer; with ``eec.pool_refresh`` N > 0 and ``features``,
    they are recomputed with the current trunk every N iterations (detached), so exemplars and
    images stay in the space of one trunk.
    """
    if eec.logits not in LOGIT_FORMS:
        raise ValueError(f"eec logits must be one of {LOGIT_FORMS}, got {eec.logits!r}")
    level = pool["feature_level"]
    alpha, beta = thresholds
    instances = 1 if eec.granularity == "image" else eec.max_instances

    def extra_loss(model, out, images, masks, step, rows=None, total=None):  # noqa: ANN001, ANN202
        dev = images.device
        module = model.extra["eec"]
        if eec.pool_refresh and features is not None and step % eec.pool_refresh == 0:
            module.exemplar_queries.copy_(features.pooled(model.trunk, level, module.upsample))
        raw, owner, slot = module.image_embeddings(out.trunk[level], instances, filters=guide_filters, centred=True,
                                                   **free_mask_options)
        raw, ex_raw = selection_space(module, raw, module.exemplar_queries, eec.centre)
        emb, exemplars = F.normalize(raw, dim=1), F.normalize(ex_raw, dim=1)
        lg = None
        if eec.logits == "projection" and len(emb) and len(exemplars):
            lg = module.project(raw) @ module.project(ex_raw).T / eec.proj_tau
        g = torch.Generator(device=dev).manual_seed(seed * 1_000_003 + step)
        if rows is None:  # this process holds the whole batch
            rows, total = torch.arange(images.shape[0]), images.shape[0]
        draw_rows = rows.to(dev)[owner] * instances + slot
        loss, stats = eec_loss(emb, exemplars, alpha, beta, eec.tau, g, draw_rows, total * instances, logits=lg,
                               slots=len(rows) * instances)
        # L_eec sums over images; DDP averages gradients over processes, so scale by their number
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        return {"total": eec.weight * world * loss, "loss": loss.detach(), **stats,
                "embeddings": torch.tensor(float(emb.shape[0]), device=dev)}

    return extra_loss
