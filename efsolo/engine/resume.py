"""Resumable long stages: RNG snapshots and fingerprinted checkpoints.

A checkpoint carries a fingerprint of everything that determines the run (params, inputs);
a run resumes only from a checkpoint with the same fingerprint, so a stale one from other
params is ignored rather than silently continued.
"""
from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from efsolo.utils import atomic


def fingerprint(**parts: Any) -> str:
    """A stable hash of JSON-serialisable parts (params, input hashes)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | Path, fp: str, step: int, state: dict) -> None:
    """Atomically write ``{fingerprint, step, rng, **state}``."""
    atomic.torch_save({"fingerprint": fp, "step": step, "rng": rng_state(), **state}, path)


def load_checkpoint(path: str | Path, fp: str) -> dict | None:
    """The checkpoint at ``path`` if it exists and matches ``fp``; otherwise ``None``.

    Only our own files are read here (a persisted stage output), so full unpickling of the
    RNG states is acceptable; user-supplied weights never go through this function.
    """
    path = Path(path)
    if not path.is_file():
        return None
    blob = torch.load(path, map_location="cpu", weights_only=False)
    if blob.get("fingerprint") != fp:
        print(f"{path}: checkpoint is from other params or inputs; starting afresh")
        return None
    return blob
