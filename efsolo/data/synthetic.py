"""The embedded demo dataset: multi-object scenes built from images that ship with scikit-image.

An object's hidden kind is (shape, texture family): 3 shapes x 4 families = 12 kinds.
Objects occlude each other (painted in order; ground-truth masks are the visible parts),
and their sizes span COCO's small, medium and large ranges. Two looks:

- ``gradient`` (the demo's): backgrounds are tinted, low-contrast crops of other shipped
  images under a colour gradient; objects carry their family's texture.
- ``photo``: backgrounds are colour crops of the shipped photographs; half of the objects
  are cut from elsewhere in the same photograph (a texture like their surroundings), the
  rest carry their family's texture; then a lighting gradient, and blur on half the images.

Everything is a deterministic function of (seed, split, index, look).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import cv2
import numpy as np

SHAPES = ("ellipse", "rectangle", "triangle")
FAMILIES = ("brick", "grass", "photo", "cells")
NUM_KINDS = len(SHAPES) * len(FAMILIES)
_BACKGROUND_SOURCES = ("gravel", "moon", "camera", "clock", "page", "coins", "text")
_PHOTO_SOURCES = ("astronaut", "coffee", "chelsea", "rocket")
_SCENE_SOURCES = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "retina")
_SPLIT_IDS = {"train": 0, "val": 1}
LOOKS = ("gradient", "photo")


@functools.lru_cache(maxsize=None)
def _source(name: str) -> np.ndarray:
    """A scikit-image sample as float32 RGB in [0, 1] (bundled with the package, no download)."""
    import skimage.data

    img = getattr(skimage.data, name)()
    img = img.astype(np.float32) / 255.0
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    return np.ascontiguousarray(img[:, :, :3])


def _crop(rng: np.random.Generator, src: np.ndarray, h: int, w: int) -> np.ndarray:
    """A random crop of ``src`` covering a random fraction of it, resized to (h, w)."""
    sh, sw = src.shape[:2]
    frac = rng.uniform(0.3, 0.8)
    ch, cw = max(8, int(sh * frac)), max(8, int(sw * frac))
    y, x = rng.integers(0, sh - ch + 1), rng.integers(0, sw - cw + 1)
    return cv2.resize(src[y:y + ch, x:x + cw], (w, h), interpolation=cv2.INTER_AREA)


_FAMILY_TINTS = {
    "brick": ((0.95, 0.45, 0.30), (0.85, 0.30, 0.15)),
    "grass": ((0.35, 0.85, 0.30), (0.55, 0.95, 0.25)),
}


def _texture(rng: np.random.Generator, family: str, h: int, w: int) -> np.ndarray:
    if family in _FAMILY_TINTS:
        gray = _crop(rng, _source(family), h, w)[:, :, :1]
        lo, hi = (np.array(t, np.float32) for t in _FAMILY_TINTS[family])
        tint = lo + (hi - lo) * rng.uniform()
        return np.clip((0.35 + 0.9 * gray) * tint, 0, 1)
    if family == "photo":
        tex = _crop(rng, _source(_PHOTO_SOURCES[rng.integers(len(_PHOTO_SOURCES))]), h, w)
        mean = tex.mean(axis=2, keepdims=True)
        return np.clip(mean + 1.6 * (tex - mean), 0, 1)  # more saturated than backgrounds
    if family == "cells":
        tex = _crop(rng, _source("immunohistochemistry"), h, w)
        return np.clip(tex[:, :, [2, 0, 1]] * 1.1, 0, 1)  # purple/blue tissue
    raise ValueError(f"unknown texture family {family!r}")


def _ramp(angle: float, size: int) -> np.ndarray:
    """(size, size, 1) float32 in [0, 1], rising linearly across the image in direction ``angle``."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    return np.clip(0.5 + (xx - 0.5) * np.cos(angle) + (yy - 0.5) * np.sin(angle), 0, 1)[:, :, None]


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    gray = _crop(rng, _source(_BACKGROUND_SOURCES[rng.integers(len(_BACKGROUND_SOURCES))]), size, size)
    gray = gray.mean(axis=2, keepdims=True)
    c0, c1 = rng.uniform(0.25, 0.75, size=3), rng.uniform(0.25, 0.75, size=3)
    t = _ramp(rng.uniform(0, 2 * np.pi), size)
    colour = (1 - t) * c0 + t * c1
    return np.clip(colour * (0.7 + 0.45 * gray), 0, 1).astype(np.float32)


def _shape_mask(rng: np.random.Generator, shape: str, size: int, cx: float, cy: float, s: float) -> np.ndarray:
    """Binary mask (size, size) of a shape of linear size ``s`` centred at (cx, cy), randomly rotated."""
    mask = np.zeros((size, size), np.uint8)
    aspect = rng.uniform(0.6, 1.6)
    a, b = s * np.sqrt(aspect) / 2, s / np.sqrt(aspect) / 2
    angle = rng.uniform(0, 180)
    if shape == "ellipse":
        cv2.ellipse(mask, (int(cx), int(cy)), (max(1, int(a)), max(1, int(b))), angle, 0, 360, 1, -1)
    else:
        if shape == "rectangle":
            pts = np.array([[-a, -b], [a, -b], [a, b], [-a, b]])
        else:  # triangle with the same area scale
            pts = np.array([[0, -1.3 * b], [1.2 * a, 1.0 * b], [-1.2 * a, 1.0 * b]])
        th = np.deg2rad(angle)
        rot = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
        pts = pts @ rot.T + [cx, cy]
        cv2.fillPoly(mask, [np.round(pts).astype(np.int32)], 1)
    return mask.astype(bool)


def _photo_background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, str]:
    """A colour crop of a shipped photograph, and the photograph's name."""
    name = _SCENE_SOURCES[rng.integers(len(_SCENE_SOURCES))]
    return _crop(rng, _source(name), size, size), name


def _camouflage(rng: np.random.Generator, source: str, h: int, w: int) -> np.ndarray:
    """A texture cut from elsewhere in the background's photograph, slightly re-coloured."""
    return np.clip(_crop(rng, _source(source), h, w) * rng.uniform(0.8, 1.2, size=3).astype(np.float32), 0, 1)


def _lighting(rng: np.random.Generator, canvas: np.ndarray) -> np.ndarray:
    """A linear lighting gradient (gain 0.55 to 1.3 across the image), and blur on half the images."""
    size = canvas.shape[0]
    g0, g1 = rng.uniform(0.55, 1.0), rng.uniform(0.9, 1.3)
    out = np.clip(canvas * (g0 + (g1 - g0) * _ramp(rng.uniform(0, 2 * np.pi), size)), 0, 1)
    if rng.uniform() < 0.5:
        out = cv2.GaussianBlur(out, (0, 0), rng.uniform(0.5, 1.5))
    return out.astype(np.float32)


@dataclass(frozen=True)
class Scene:
    image: np.ndarray  # (H, W, 3) uint8 RGB
    masks: list[np.ndarray]  # visible masks (H, W) bool, painting order
    kinds: list[int]  # hidden kind of each object: family * len(SHAPES) + shape
    camouflaged: list[bool]  # textured with a cut of the background's own photograph (photo look)


# An object nobody can see is not ground truth to score against: an object whose visible pixels
# cannot be told from a ring of the same area around them is an ignore region (COCO iscrowd 1: a
# prediction on it is neither rewarded nor punished). The statistic reads only the pixels: the
# separability d' (distance of the means over the pooled standard deviation) of the CIE Lab colours
# and of the texture energy (Sobel gradient magnitude of the gray image), each region at least 2 px
# from the boundary. An object is indistinct when both are below these: its colours' means lie less
# than one standard deviation apart, and its texture energy's less than half of one. Measured on
# development seed 3's training images: 3% of the gradient look's objects, 44% of the photo look's
# objects cut from their own photograph and 7% of its family-textured ones.
IGNORE_MAX_COLOUR_D = 1.0
IGNORE_MAX_TEXTURE_D = 0.5


def contrast_with_surroundings(image: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """(colour d', texture d') between an object's visible pixels (``mask`` (H, W) bool, eroded by
    2 px) and a ring around them of about the same area (grown from the mask, 2 px away from it,
    inside the image); image (H, W, 3) uint8 RGB. d' = |mean_in - mean_ring| / sqrt((var_in +
    var_ring) / 2), the colours' over the three Lab channels. (inf, inf) when the ring is empty."""
    m = mask.astype(np.uint8)
    k = np.ones((3, 3), np.uint8)
    inner = cv2.erode(m, k, iterations=2).astype(bool)
    if not inner.any():
        inner = mask
    near = cv2.dilate(m, k, iterations=2).astype(bool)
    grown, ring = near, np.zeros_like(mask)
    for _ in range(max(image.shape[:2])):
        grown = cv2.dilate(grown.astype(np.uint8), k).astype(bool)
        ring = grown & ~near
        if ring.sum() >= mask.sum() or grown.all():
            break
    if not ring.any():
        return float("inf"), float("inf")

    def separability(a: np.ndarray, b: np.ndarray) -> float:
        spread = np.sqrt((a.var(0).sum() + b.var(0).sum()) / 2) + 1e-6
        return float(np.linalg.norm(np.atleast_1d(a.mean(0) - b.mean(0))) / spread)

    lab = cv2.cvtColor(image.astype(np.float32) / 255, cv2.COLOR_RGB2Lab)
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32)
    energy = np.hypot(cv2.Sobel(gray, cv2.CV_32F, 1, 0), cv2.Sobel(gray, cv2.CV_32F, 0, 1))
    return separability(lab[inner], lab[ring]), separability(energy[inner], energy[ring])


def indistinct(image: np.ndarray, mask: np.ndarray) -> bool:
    """Whether an object cannot be told from its surroundings (the ignore rule above)."""
    colour, texture = contrast_with_surroundings(image, mask)
    return colour < IGNORE_MAX_COLOUR_D and texture < IGNORE_MAX_TEXTURE_D


def make_scene(seed: int, split: str, index: int, size: int, min_objects: int, max_objects: int,
               look: str = "gradient") -> Scene:
    """One deterministic multi-object scene. Objects too occluded to be visible are not drawn."""
    if look not in LOOKS:
        raise ValueError(f"unknown look {look!r}: one of {', '.join(LOOKS)}")
    if look == "gradient":  # the demo's look: its random stream is unchanged by the other looks
        rng = np.random.default_rng([seed, _SPLIT_IDS[split], index])
        canvas, scene_source = _background(rng, size), ""
    else:
        rng = np.random.default_rng([seed, _SPLIT_IDS[split], index, LOOKS.index(look)])
        canvas, scene_source = _photo_background(rng, size)
    n = int(rng.integers(min_objects, max_objects + 1))
    objs = []
    for _ in range(n):
        shape_i, family_i = int(rng.integers(len(SHAPES))), int(rng.integers(len(FAMILIES)))
        # linear size log-uniform from ~8% to ~65% of the image: COCO small, medium and large
        s = float(np.exp(rng.uniform(np.log(0.08 * size), np.log(0.65 * size))))
        cx, cy = rng.uniform(0.1 * size, 0.9 * size), rng.uniform(0.1 * size, 0.9 * size)
        mask = _shape_mask(rng, SHAPES[shape_i], size, cx, cy, s)
        if mask.sum() < 16:
            continue
        objs.append((mask, family_i * len(SHAPES) + shape_i, FAMILIES[family_i]))
    # visibility, from the top-most (last painted) object down
    occluder = np.zeros((size, size), bool)
    keep: list[tuple[np.ndarray, np.ndarray, int, str]] = []
    for mask, kind, family in reversed(objs):
        visible = mask & ~occluder
        if visible.sum() < max(16, 0.35 * mask.sum()):
            continue
        occluder |= mask
        keep.append((mask, visible, kind, family))
    keep.reverse()
    camouflaged = []
    for mask, _visible, _kind, family in keep:
        ys, xs = np.nonzero(mask)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        camouflaged.append(bool(scene_source) and rng.uniform() < 0.5)
        if camouflaged[-1]:
            tex = _camouflage(rng, scene_source, y1 - y0, x1 - x0)
        else:
            tex = _texture(rng, family, y1 - y0, x1 - x0)
        shade = rng.uniform(0.85, 1.15)
        region = canvas[y0:y1, x0:x1]
        m = mask[y0:y1, x0:x1]
        region[m] = np.clip(tex[m] * shade, 0, 1)
    if look == "photo":
        canvas = _lighting(rng, canvas)
    image = (canvas * 255 + 0.5).astype(np.uint8)
    return Scene(image=image, masks=[v for _, v, _, _ in keep], kinds=[k for _, _, k, _ in keep],
                 camouflaged=camouflaged)
