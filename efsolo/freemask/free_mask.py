"""Free Mask: coarse object masks and semantic embeddings from a self-supervised backbone.

Method reference, section 1: queries are the feature map resized by each of
``query_scales``; every L2-normalised query is correlated with every key position (a 1x1
convolution), the score maps are min-max normalised per query, thresholded, scored by
maskness, decayed by class-agnostic NMS, and the best ``keep_top`` kept, upsampled to the
image and filtered. Batched over images of the same size, on CUDA when present.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from efsolo.config import FreeMaskParams, FreeMaskRuntime
from efsolo.data.coco_format import AGNOSTIC_CATEGORY, mask_annotation
from efsolo.data.datasets import load_manifest
from efsolo.data.pseudo_label_format import save_pseudo_labels
from efsolo.data.images import IMAGENET_MEAN, IMAGENET_STD, ImageReadError, file_sha256, read_image, resize_short_side
from efsolo.modeling.backbone import ResNetTrunk, load_backbone
from efsolo.modeling.matrix_nms import fast_nms, matrix_nms
from efsolo.utils import atomic


@dataclass(frozen=True)
class FreeMaskResult:
    """Per-batch Free Mask output at feature resolution, best first."""

    soft: torch.Tensor  # (B, k, H, W) normalised score maps in [0, 1]
    scores: torch.Tensor  # (B, k) decayed maskness; 0 for a slot with no valid mask
    queries: torch.Tensor  # (B, k, C) the query vector of each mask


def free_mask(features: torch.Tensor, query_scales: tuple[float, ...] = (1.0, 0.5, 0.25),
              mask_threshold: float = 0.5, min_pixels: int = 1, nms: str = "matrix", nms_sigma: float = 2.0,
              fast_nms_iou: float = 0.5, keep_top: int = 20, pre_nms_top: int = 0) -> FreeMaskResult:
    """Free Mask on a batch of feature maps.

    features: (B, C, H, W). Queries: the map resized by each scale (bilinear), N_q in total.
    Only the ``pre_nms_top`` best by maskness enter NMS (0 = all N_q; NMS cost grows as N_q^2).
    Returns the ``keep_top`` (at most N_q) best masks per image; a mask with at most
    ``min_pixels`` pixels scores 0. B = 0 gives empty tensors.
    """
    b, c, h, w = features.shape
    feats = features.float()
    query_maps = [feats if s == 1.0 else
                  F.interpolate(feats, size=(max(1, round(h * s)), max(1, round(w * s))), mode="bilinear",
                                align_corners=False)
                  for s in query_scales]
    queries = torch.cat([q.flatten(2) for q in query_maps], dim=2).transpose(1, 2)  # (B, Nq, C)
    keys = F.normalize(feats.flatten(2), dim=1)  # (B, C, HW)
    scores_map = F.normalize(queries, dim=2) @ keys  # (B, Nq, HW) cosine similarity
    scores_map = scores_map - scores_map.min(dim=2, keepdim=True).values
    scores_map = scores_map / scores_map.max(dim=2, keepdim=True).values.clamp_min(1e-6)
    masks = scores_map >= mask_threshold
    area = masks.sum(dim=2)
    maskness = (scores_map * masks).sum(dim=2) / area.clamp_min(1)
    maskness = torch.where(area > min_pixels, maskness, torch.zeros_like(maskness))
    order = maskness.argsort(dim=1, descending=True)
    if 0 < pre_nms_top < order.shape[1]:
        order = order[:, :pre_nms_top]
    sorted_masks = torch.gather(masks, 1, order.unsqueeze(-1).expand(-1, -1, h * w))
    sorted_scores = torch.gather(maskness, 1, order)
    if nms == "matrix":
        decayed = matrix_nms(sorted_masks, sorted_scores, sigma=nms_sigma)
    elif nms == "fast":
        decayed = fast_nms(sorted_masks, sorted_scores, iou_threshold=fast_nms_iou)
    else:
        raise ValueError(f"unknown freemask.nms {nms!r}")
    k = min(keep_top, decayed.shape[1])
    top_scores, top = decayed.topk(k, dim=1)
    idx = torch.gather(order, 1, top)  # indices into the unsorted queries
    soft = torch.gather(scores_map, 1, idx.unsqueeze(-1).expand(-1, -1, h * w)).view(b, k, h, w)
    q = torch.gather(queries, 1, idx.unsqueeze(-1).expand(-1, -1, c))
    return FreeMaskResult(soft=soft, scores=top_scores, queries=q)


def reduce_embedding(queries: torch.Tensor, dim: int, method: str = "linear", seed: int = 0) -> torch.Tensor:
    """Reduce query vectors (N, C) to (N, dim): linear resampling over channels (as the FreeSOLO
    release does) or a fixed seeded random projection."""
    if queries.shape[0] == 0:
        return queries.new_zeros((0, dim))
    if method == "linear":
        return F.interpolate(queries.float().unsqueeze(1), size=dim, mode="linear", align_corners=False).squeeze(1)
    if method == "random":
        g = torch.Generator().manual_seed(seed)
        proj = torch.randn(queries.shape[1], dim, generator=g) / dim**0.5
        return queries.float() @ proj.to(queries.device)
    raise ValueError(f"unknown freemask.embed_method {method!r}")


def level_features(feats: dict[str, torch.Tensor], level: str, concat_levels: tuple[str, ...] = ()) -> torch.Tensor:
    """The map Free Mask correlates: the trunk's ``level`` (B, C, H, W), or with ``concat_levels``, it and
    those levels brought to its (H, W) grid (finer ones average-pooled, coarser ones bilinear), each
    L2-normalised per position, concatenated along channels: (B, C + sum C_l, H, W), float32."""
    base = feats[level].float()
    if not concat_levels:
        return base
    size = base.shape[-2:]
    blocks = [base]
    for name in concat_levels:
        f = feats[name].float()
        if f.shape[-2] >= size[0]:
            f = F.adaptive_avg_pool2d(f, size)
        else:
            f = F.interpolate(f, size=size, mode="bilinear", align_corners=False)
        blocks.append(f)
    return torch.cat([F.normalize(b, dim=1) for b in blocks], dim=1)


def border_fractions(masks: torch.Tensor) -> torch.Tensor:
    """The share of an image's outermost pixels (its first and last rows and columns) that each
    binary mask covers: masks (..., H, W), non-zero = inside -> (...) float64, exact for any
    count (0 for a map with no pixels). Free Mask's border filter and the EEC's guide filter
    both measure with it."""
    on = masks != 0
    h, w = on.shape[-2:]
    if h == 0 or w == 0:
        return torch.zeros(on.shape[:-2], dtype=torch.float64, device=on.device)
    edge = torch.cat([on[..., 0, :], on[..., -1, :], on[..., 1:-1, 0], on[..., 1:-1, -1]], dim=-1) \
        if h > 1 else on[..., 0, :]
    return edge.sum(-1, dtype=torch.float64) / edge.shape[-1]


def border_fraction(mask: np.ndarray) -> float:
    """``border_fractions`` of one mask (H, W), as a float."""
    return float(border_fractions(torch.from_numpy(np.ascontiguousarray(mask))))


def split_components(mask: np.ndarray, min_fraction: float) -> list[np.ndarray]:
    """A binary mask (H, W) -> its 8-connected components of at least ``min_fraction`` of its area,
    largest first (each a (H, W) bool mask). An empty mask gives []; a connected one gives itself
    minus the specks below the fraction."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if n <= 1:
        return []
    areas = stats[1:, cv2.CC_STAT_AREA]
    keep = [k + 1 for k in np.argsort(-areas, kind="stable") if areas[k] >= min_fraction * areas.sum()]
    return [labels == k for k in keep]


def masks_to_image(soft: torch.Tensor, scores: torch.Tensor, height: int, width: int, score_threshold: float,
                   max_box_width: float, top_exclude: float, mask_threshold: float = 0.5,
                   split: bool = False, component_min_fraction: float = 0.1, max_border_fraction: float = 1.0,
                   ) -> tuple[list[np.ndarray], list[float], list[int]]:
    """Upsample one image's soft maps (k, h, w) to (height, width), binarise and filter.

    Drops masks scoring below ``score_threshold``, empty masks, boxes wider than
    ``max_box_width`` of the image, boxes whose centre is in the top ``top_exclude`` of it, and
    masks covering more than ``max_border_fraction`` of the image's outermost pixels (background
    that runs out of the picture; 1 keeps them).
    With ``split``, each mask first becomes its connected components of at least
    ``component_min_fraction`` of its area, each with the mask's score, and the box filters apply
    to each component. Returns (masks, scores, slot index of each mask; a split slot repeats).
    """
    keep = (scores >= score_threshold).nonzero().flatten()
    if keep.numel() == 0:
        return [], [], []
    up = F.interpolate(soft[keep].unsqueeze(0).float(), size=(height, width), mode="bilinear",
                       align_corners=False)[0] >= mask_threshold
    up = up.cpu().numpy()
    out_masks, out_scores, out_idx = [], [], []
    for whole, slot in zip(up, keep.tolist()):
        for m in split_components(whole, component_min_fraction) if split else [whole]:
            rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
            if rows.size == 0:
                continue
            box_w = cols[-1] - cols[0] + 1
            centre_y = (rows[0] + rows[-1] + 1) / 2
            if box_w > max_box_width * width or centre_y < top_exclude * height:
                continue
            if max_border_fraction < 1.0 and border_fraction(m) > max_border_fraction:
                continue
            out_masks.append(m)
            out_scores.append(float(scores[slot]))
            out_idx.append(slot)
    return out_masks, out_scores, out_idx


def normalise(images: list[np.ndarray], device: torch.device) -> torch.Tensor:
    """RGB uint8 images of one size -> normalised (B, 3, H, W) float tensor on ``device``."""
    x = torch.from_numpy(np.stack(images)).to(device).permute(0, 3, 1, 2).float()
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    return (x - mean) / std


def _batches(records: list[dict], short_side: int, max_side: int, batch_size: int) -> list[tuple[tuple[int, int], list[dict]]]:
    """Group records by their resized size, then cut into batches (order is deterministic)."""
    groups: dict[tuple[int, int], list[dict]] = {}
    for r in records:
        groups.setdefault(resize_short_side(r["height"], r["width"], short_side, max_side), []).append(r)
    return [(size, recs[i:i + batch_size]) for size, recs in sorted(groups.items())
            for i in range(0, len(recs), batch_size)]


def _load(batch: tuple[tuple[int, int], list[dict]]) -> tuple[tuple[int, int], list[dict], list, list[dict]]:
    (h, w), recs = batch
    imgs, ok, bad = [], [], []
    for r in recs:
        try:
            img = read_image(r["file_name"])
        except ImageReadError as err:
            bad.append({"file": r["file_name"], "reason": str(err)})
            continue
        imgs.append(cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR))
        ok.append(r)
    return (h, w), ok, imgs, bad


@torch.inference_mode()
def label_split(trunk: ResNetTrunk, records: list[dict], device: torch.device, desc: str, *, settings: FreeMaskParams,
                batch_size: int, seed: int, precision: str = "float32") -> tuple[dict, np.ndarray, list[dict]]:
    """Free Mask pseudo-labels for a list of manifest records; the trunk runs under bf16 autocast
    when ``precision`` is bfloat16 (Free Mask's own operations in float32).

    Returns (COCO dataset with scored RLE annotations, embeddings (N_ann, embed_dim) float16
    aligned with the annotations' order and ids 1..N_ann, skipped files).
    """
    f = settings
    images, anns, embeds, skipped = [], [], [], []
    batches = _batches(records, f.short_side, f.max_side, batch_size)
    use_amp = precision == "bfloat16"
    with ThreadPoolExecutor(1) as pool:  # decode the next batch while this one runs
        loaded = pool.map(_load, batches)
        for (h, w), recs, imgs, bad in tqdm(loaded, total=len(batches), desc=desc, disable=None, leave=False):
            skipped += bad
            if not recs:
                continue
            x = normalise(imgs, device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                levels = trunk(x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else x)
            feats = level_features(levels, f.feature_level, f.concat_levels)
            res = free_mask(feats, f.query_scales, f.mask_threshold, f.min_pixels, f.nms, f.nms_sigma, f.fast_nms_iou,
                            f.keep_top, f.pre_nms_top)
            for i, r in enumerate(recs):
                images.append({"id": r["id"], "file_name": r["file_name"], "width": r["width"],
                               "height": r["height"]})
                masks, scores, slots = masks_to_image(res.soft[i], res.scores[i], r["height"], r["width"],
                                                      f.score_threshold, f.max_box_width, f.top_exclude, f.mask_threshold,
                                                      f.split_components, f.component_min_fraction,
                                                      f.max_border_fraction)
                for m, s in zip(masks, scores):
                    anns.append(mask_annotation(m, len(anns) + 1, r["id"], score=s))
                if slots:
                    embeds.append(reduce_embedding(res.queries[i, slots].cpu(), f.embed_dim, f.embed_method, seed))
    emb = torch.cat(embeds).numpy().astype(np.float16) if embeds else np.zeros((0, f.embed_dim), np.float16)
    dataset = {"info": {"description": "Free Mask pseudo-labels"}, "images": images, "annotations": anns,
               "categories": [AGNOSTIC_CATEGORY]}
    return dataset, emb, skipped


def label_dataset(train_manifest: str | Path, val_manifest: str | Path, backbone: str | Path, out_dir: str | Path, *,
                  settings: FreeMaskParams, runtime: FreeMaskRuntime, seed: int, device: torch.device,
                  shard_dir: str | Path | None = None, val_dir: str | Path | None = None,
                  precision: str = "float32") -> dict:
    """Label the train and val splits; write pseudo-labels, embeddings and ``stats.json`` to
    ``out_dir`` (the val split's to ``val_dir`` when given: they are Free Mask's val predictions).

    ``settings`` is ``freemask``; ``runtime`` (``runtime.freemask``) sets the inference batch and the
    shard size. Each split is labelled in shards of ``runtime.shard_size`` images (0: one shard), written to
    ``shard_dir`` and merged (see :mod:`efsolo.freemask.sharding`); under ``torchrun`` the processes
    share the shards (one GPU each) and rank 0 merges. Finished shards are not labelled again.
    """
    from efsolo.freemask import sharding
    from efsolo.utils.distributed import dist_env

    out_dir = Path(out_dir)
    stride, shard_size = settings.trunk_output_stride, runtime.shard_size
    # what determines the labels (a shard's fingerprint); the precision is recorded in the stats
    options = {k: v for k, v in asdict(settings).items() if k != "trunk_output_stride"}
    options.update(batch_size=runtime.batch_size, precision=precision)
    shard_dir = Path(shard_dir) if shard_dir is not None else out_dir / "shards"
    rank, world, local = dist_env()
    if world > 1:
        import datetime

        import torch.distributed as dist

        if not dist.is_initialized():  # a barrier between labelling and merging is all it is used for
            dist.init_process_group("gloo", timeout=datetime.timedelta(days=7))
        if device.type == "cuda":
            device = torch.device("cuda", local)
            torch.cuda.set_device(device)
    trunk = load_backbone(backbone, output_stride=stride).to(device).eval()
    if device.type == "cuda":
        trunk = trunk.to(memory_format=torch.channels_last)
    identity = {"backbone": file_sha256(backbone), "trunk_output_stride": stride, "seed": seed, **options}
    stats: dict = {"feature_level": settings.feature_level, "concat_levels": list(settings.concat_levels),
                   "trunk_output_stride": stride,
                   "device": device.type, "precision": precision, "processes": world}
    for split, manifest in (("train", train_manifest), ("val", val_manifest)):
        records = load_manifest(manifest)
        slices = sharding.shard_slices(len(records), shard_size)
        prints = [sharding.shard_fingerprint(records[sl], identity) for sl in slices]
        for k in sharding.mine(len(slices), rank, world):
            if sharding.shard_done(shard_dir, split, k, prints[k]):
                continue
            t0 = time.time()
            desc = f"free mask {split}" + (f" shard {k + 1}/{len(slices)}" if len(slices) > 1 else "")
            dataset, emb, skipped = label_split(trunk, records[slices[k]], device, desc, settings=settings,
                                                batch_size=runtime.batch_size, seed=seed, precision=precision)
            sharding.write_shard(shard_dir, split, k, prints[k], dataset, emb, skipped, round(time.time() - t0, 2))
        if world > 1:
            dist.barrier()
        if rank != 0:
            continue
        dataset, emb, skipped, seconds = sharding.merge_shards(shard_dir, split, len(slices), settings.embed_dim,
                                                               "Free Mask pseudo-labels")
        save_pseudo_labels(Path(val_dir) if split == "val" and val_dir is not None else out_dir, split, dataset, emb)
        n_img = max(1, len(dataset["images"]))
        stats[split] = {"images": len(dataset["images"]), "masks": len(dataset["annotations"]),
                        "masks_per_image": len(dataset["annotations"]) / n_img, "shards": len(slices),
                        "seconds": round(seconds, 2), "skipped": skipped}
        for s in skipped:
            print(f"skipped: {s['reason']}")
    if rank == 0:
        atomic.write_json(out_dir / "stats.json", stats, indent=1)
    return stats
