"""Atomic file writes: write to a temporary file in the same folder, then rename.

A reader (or a resumed run) never sees a half-written output, and an interrupted
write leaves the previous file intact.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_with(path: str | Path, writer: Callable[[Path], Any]) -> Path:
    """Call ``writer(tmp_path)`` and atomically move the result to ``path``."""
    with atomic_path(path) as tmp:
        writer(tmp)
    return Path(path)


def write_json(path: str | Path, obj: Any, indent: int | None = None) -> Path:
    return write_with(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=indent)))


def write_text(path: str | Path, text: str) -> Path:
    return write_with(path, lambda tmp: tmp.write_text(text))


def torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` through a temporary file. Saved through a file object, not a path: torch
    names the records inside its zip after the file it writes, which here is a random temporary
    name, so equal objects would give different bytes and DVC would see a changed output (and
    re-run what depends on it) when nothing changed."""
    import torch

    def _w(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)

    return write_with(path, _w)


def write_image(path: str | Path, rgb: Any) -> Path:
    """Write an RGB uint8 array as an image (format from the suffix)."""
    import cv2

    def _w(tmp: Path) -> None:
        ok, buf = cv2.imencode(Path(path).suffix, rgb[..., ::-1] if rgb.ndim == 3 else rgb)
        if not ok:
            raise OSError(f"{path}: could not encode image")
        tmp.write_bytes(buf.tobytes())

    return write_with(path, _w)
