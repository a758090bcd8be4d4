"""Sharded labelling of a large image set: fixed shards, one file each, merged in shard order.

A split's records are cut into shards of ``shard_size`` images (shard k holds records
``k * size .. (k + 1) * size - 1``), so the shards, and the merged result, do not depend on
how many processes ran them. Under ``torchrun`` process r takes shards r, r + W, r + 2W, ...
Each finished shard is written atomically with a fingerprint of its inputs and settings; a
re-run skips every shard whose file exists with the same fingerprint, so an interrupted
labelling of 241k images resumes shard by shard.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from efsolo.data.coco_format import AGNOSTIC_CATEGORY, read_json
from efsolo.utils import atomic


def shard_slices(n: int, shard_size: int) -> list[slice]:
    """Consecutive slices of ``shard_size`` covering ``range(n)`` (one slice for ``shard_size <= 0``)."""
    if shard_size <= 0 or n <= shard_size:
        return [slice(0, n)]
    return [slice(i, min(n, i + shard_size)) for i in range(0, n, shard_size)]


def mine(num_shards: int, rank: int, world: int) -> list[int]:
    """The shard indices process ``rank`` of ``world`` labels."""
    return list(range(rank, num_shards, world))


def shard_fingerprint(records: list[dict], settings: dict) -> str:
    """Digest of a shard's images (ids, paths, content hashes) and the settings that label them."""
    blob = json.dumps({"images": [[r["id"], r["file_name"], r.get("sha256", "")] for r in records],
                       "settings": settings}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def shard_paths(shard_dir: str | Path, split: str, index: int) -> tuple[Path, Path]:
    base = Path(shard_dir) / f"{split}-{index:05d}"
    return base.with_suffix(".json"), base.with_suffix(".npz")


def shard_done(shard_dir: str | Path, split: str, index: int, fingerprint: str) -> bool:
    js, npz = shard_paths(shard_dir, split, index)
    if not (js.is_file() and npz.is_file()):
        return False
    try:
        return read_json(js).get("fingerprint") == fingerprint
    except ValueError:
        return False


def write_shard(shard_dir: str | Path, split: str, index: int, fingerprint: str, dataset: dict,
                embeddings: np.ndarray, skipped: list[dict], seconds: float) -> None:
    """The embeddings first, then the json (the json's presence marks the shard finished)."""
    js, npz = shard_paths(shard_dir, split, index)

    def write_npz(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, embeddings=embeddings)

    atomic.write_with(npz, write_npz)
    atomic.write_json(js, {"fingerprint": fingerprint, "images": dataset["images"],
                           "annotations": dataset["annotations"], "skipped": skipped, "seconds": seconds})


def merge_shards(shard_dir: str | Path, split: str, num_shards: int, embed_dim: int,
                 description: str) -> tuple[dict, np.ndarray, list[dict], float]:
    """Concatenate shards 0..n-1 in order; annotation ids are renumbered 1..N across shards, the
    embeddings stay aligned with them. Returns (dataset, embeddings, skipped, seconds summed)."""
    images, anns, embeds, skipped, seconds = [], [], [], [], 0.0
    for k in range(num_shards):
        js, npz = shard_paths(shard_dir, split, k)
        shard = read_json(js)
        with np.load(npz) as z:
            e = z["embeddings"]
        if len(e) != len(shard["annotations"]):
            raise ValueError(f"{npz}: {len(e)} embeddings for {len(shard['annotations'])} annotations")
        images += shard["images"]
        for a in shard["annotations"]:
            anns.append({**a, "id": len(anns) + 1})
        embeds.append(e)
        skipped += shard["skipped"]
        seconds += shard["seconds"]
    emb = np.concatenate(embeds) if embeds else np.zeros((0, embed_dim), np.float16)
    dataset = {"info": {"description": description}, "images": images, "annotations": anns,
               "categories": [AGNOSTIC_CATEGORY]}
    return dataset, emb.astype(np.float16), skipped, seconds
