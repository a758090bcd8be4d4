"""Reading images of any common kind into RGB uint8 arrays, with one-line errors."""
from __future__ import annotations

from efsolo.utils.errors import EfsoloError

import hashlib
from pathlib import Path

import cv2
import numpy as np

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


class ImageReadError(EfsoloError):
    """A file that is missing, unreadable or not an image (one-line message naming it)."""


def to_rgb_uint8(img: np.ndarray, path: str | Path = "<array>") -> np.ndarray:
    """Convert a decoded OpenCV image (gray, BGR, BGRA; 8/16-bit or float) to RGB uint8 (H, W, 3)."""
    if img.dtype == np.uint16:
        img = (img >> 8).astype(np.uint8)
    elif img.dtype in (np.float32, np.float64):
        img = np.clip(img * (255.0 if img.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    elif img.dtype != np.uint8:
        raise ImageReadError(f"{path}: unsupported pixel type {img.dtype}")
    if img.ndim == 2:
        return np.ascontiguousarray(np.repeat(img[:, :, None], 3, axis=2))
    if img.ndim == 3 and img.shape[2] == 1:
        return np.ascontiguousarray(np.repeat(img, 3, axis=2))
    if img.ndim == 3 and img.shape[2] == 3:
        return np.ascontiguousarray(img[:, :, ::-1])
    if img.ndim == 3 and img.shape[2] == 4:
        return np.ascontiguousarray(img[:, :, 2::-1])
    raise ImageReadError(f"{path}: unsupported image shape {img.shape}")


def read_image(path: str | Path) -> np.ndarray:
    """Read an image as RGB uint8 (H, W, 3). Grayscale, RGBA and 16-bit images are converted."""
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: no such file")
    data = np.fromfile(str(path), dtype=np.uint8)
    if data.size == 0:
        raise ImageReadError(f"{path}: empty file")
    img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if img is None or img.size == 0:
        raise ImageReadError(f"{path}: not a readable image (corrupt or unsupported format)")
    return to_rgb_uint8(img, path)


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def list_images(folders: tuple[str, ...] | list[str]) -> list[Path]:
    """All image files (by suffix) under the given folders, sorted; a missing folder is an error."""
    out: list[Path] = []
    for folder in folders:
        p = Path(folder)
        if not p.is_dir():
            raise ImageReadError(f"{p}: no such folder")
        out.extend(sorted(q for q in p.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES and q.is_file()))
    return out


def resize_short_side(h: int, w: int, short_side: int, max_side: int) -> tuple[int, int]:
    """Target (h, w) with the short side at ``short_side`` and the long side at most ``max_side``."""
    scale = short_side / min(h, w)
    if max(h, w) * scale > max_side:
        scale = max_side / max(h, w)
    return max(1, int(round(h * scale))), max(1, int(round(w * scale)))


IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
