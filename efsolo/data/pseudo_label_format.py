"""The pseudo-label files every labeller writes and every training reads.

``{split}.json`` is a COCO dataset whose annotations are scored RLE masks (ids 1..N), and
``{split}_embeddings.npz`` holds ``ann_ids`` (int64) and ``embeddings`` (N, D) float16, aligned by
annotation id. Free Mask writes them, and so does a self-training round that relabels its images.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from efsolo.utils import atomic


def save_pseudo_labels(out_dir: Path, split: str, dataset: dict, embeddings: np.ndarray) -> None:
    """``{split}.json`` (COCO) and ``{split}_embeddings.npz`` (ann_ids, embeddings float16), aligned by id."""
    ann_ids = np.array([a["id"] for a in dataset["annotations"]], dtype=np.int64)
    atomic.write_json(out_dir / f"{split}.json", dataset)

    def write_npz(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, ann_ids=ann_ids, embeddings=embeddings)

    atomic.write_with(out_dir / f"{split}_embeddings.npz", write_npz)


def load_embeddings(path: str | Path) -> dict[int, np.ndarray]:
    """Annotation id -> embedding vector, from a ``*_embeddings.npz`` file."""
    with np.load(path) as z:
        return {int(i): e for i, e in zip(z["ann_ids"], z["embeddings"])}
