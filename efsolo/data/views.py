"""Strong views and copy-paste (method reference, section 4), as batched tensor operations.

Images are RGB floats in [0, 1], shape (B, 3, H, W), already on the training device; the
geometric part of both views (resize, flip) is done by the loader, so a weak view is the
loaded batch itself. Randomness comes from an explicit ``torch.Generator`` on the device. Copy-paste pairs images
within a process's share of the batch.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class Draws:
    """Random numbers for a global batch of ``total`` images, of which this process holds ``rows``.

    Every process draws the same numbers for the whole global batch and keeps its rows, so a
    view does not depend on how the batch is split across DDP processes.
    """

    def __init__(self, g: torch.Generator, total: int | None = None, rows: torch.Tensor | None = None) -> None:
        self.g, self.total, self.rows = g, total, rows

    def rand(self, b: int, *shape: int, device: torch.device) -> torch.Tensor:
        if self.total is None:
            return torch.rand((b, *shape), generator=self.g, device=device)
        return torch.rand((self.total, *shape), generator=self.g, device=device)[self.rows.to(device)]

    def uniform(self, b: int, lo: float, hi: float, device: torch.device) -> torch.Tensor:
        return lo + (hi - lo) * self.rand(b, device=device)


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def colour_jitter(x: torch.Tensor, g: Draws, strength: float = 0.4, hue: float = 0.1,
                  p: float = 0.8) -> torch.Tensor:
    """Per-image brightness, contrast, saturation (factors in [1 - s, 1 + s]) and hue (YIQ rotation
    by up to ``hue`` of a turn), each image jittered with probability ``p``. (B, 3, H, W) -> same."""
    b, dev = x.shape[0], x.device
    v = lambda: g.uniform(b, 1 - strength, 1 + strength, dev).view(b, 1, 1, 1)  # noqa: E731
    y = (x * v()).clamp(0, 1)
    mean = _gray(y).mean(dim=(2, 3), keepdim=True)
    y = ((y - mean) * v() + mean).clamp(0, 1)
    gray = _gray(y)
    y = ((y - gray) * v() + gray).clamp(0, 1)
    theta = g.uniform(b, -hue, hue, dev) * 2 * math.pi
    to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], device=dev)
    yiq = torch.einsum("ij,bjhw->bihw", to_yiq, y)
    cos, sin = torch.cos(theta).view(b, 1, 1), torch.sin(theta).view(b, 1, 1)
    i, q = yiq[:, 1], yiq[:, 2]
    yiq = torch.stack([yiq[:, 0], cos * i - sin * q, sin * i + cos * q], dim=1)
    y = torch.einsum("ij,bjhw->bihw", torch.linalg.inv(to_yiq), yiq).clamp(0, 1)
    apply = (g.rand(b, device=dev) < p).view(b, 1, 1, 1)
    return torch.where(apply, y, x)


def random_grayscale(x: torch.Tensor, g: Draws, p: float = 0.2) -> torch.Tensor:
    apply = (g.rand(x.shape[0], device=x.device) < p).view(-1, 1, 1, 1)
    return torch.where(apply, _gray(x).expand_as(x), x)


def random_blur(x: torch.Tensor, g: Draws, sigma: tuple[float, float] = (0.1, 2.0), p: float = 0.5,
                kernel: int = 9) -> torch.Tensor:
    """Per-image separable Gaussian blur (sigma uniform in the range) with probability ``p``."""
    b, c, h, w = x.shape
    s = g.uniform(b, *sigma, x.device).view(b, 1)
    r = torch.arange(kernel, device=x.device, dtype=x.dtype) - kernel // 2
    k = torch.exp(-(r.view(1, -1) ** 2) / (2 * s**2))
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, dim=0)  # (B*C, k)
    y = x.reshape(1, b * c, h, w)
    y = F.conv2d(F.pad(y, (kernel // 2,) * 2 + (0, 0), mode="replicate"), k.view(b * c, 1, 1, kernel), groups=b * c)
    y = F.conv2d(F.pad(y, (0, 0) + (kernel // 2,) * 2, mode="replicate"), k.view(b * c, 1, kernel, 1), groups=b * c)
    apply = (g.rand(b, device=x.device) < p).view(b, 1, 1, 1)
    return torch.where(apply, y.view(b, c, h, w), x)


def random_erasing(x: torch.Tensor, g: Draws, p: float = 0.5, scale: tuple[float, float] = (0.02, 0.2),
                   ratio: tuple[float, float] = (0.3, 3.3)) -> torch.Tensor:
    """Fill one random rectangle per image (probability ``p``) with uniform noise."""
    b, c, h, w = x.shape
    dev = x.device
    area = g.uniform(b, *scale, dev) * h * w
    log_r = g.uniform(b, math.log(ratio[0]), math.log(ratio[1]), dev)
    eh = (area * torch.exp(log_r)).sqrt().clamp(1, h)
    ew = (area / torch.exp(log_r)).sqrt().clamp(1, w)
    y0 = g.rand(b, device=dev) * (h - eh)
    x0 = g.rand(b, device=dev) * (w - ew)
    ys = torch.arange(h, device=dev).view(1, h, 1)
    xs = torch.arange(w, device=dev).view(1, 1, w)
    rect = ((ys >= y0.view(b, 1, 1)) & (ys < (y0 + eh).view(b, 1, 1)) &
            (xs >= x0.view(b, 1, 1)) & (xs < (x0 + ew).view(b, 1, 1)))
    rect &= (g.rand(b, device=dev) < p).view(b, 1, 1)
    noise = g.rand(b, c, h, w, device=dev)
    return torch.where(rect.unsqueeze(1), noise, x)


def strong_view(x: torch.Tensor, g: torch.Generator, total: int | None = None,
                rows: torch.Tensor | None = None) -> torch.Tensor:
    """Colour jitter (0.4/0.4/0.4/0.1, p 0.8), grayscale (p 0.2), blur (sigma 0.1-2, p 0.5), erasing.

    x (B, 3, H, W) holds ``rows`` of a global batch of ``total`` images (default: all of it).
    """
    d = Draws(g, total, rows)
    return random_erasing(random_blur(random_grayscale(colour_jitter(x, d), d), d), d)


def copy_paste(images: torch.Tensor, masks: list[torch.Tensor], embeds: list[torch.Tensor], g: torch.Generator,
               prob: float = 0.5, max_overlap: float = 0.5) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Paste instances of image (b + 1) mod B into image b, in place on the same canvas.

    images (B, 3, H, W); masks[b] (N_b, H, W) bool; embeds[b] (N_b, D). Each source instance is
    drawn with probability ``prob``; as in the FreeSOLO release, a drawn instance that would cover
    ``max_overlap`` or more of an existing instance is not pasted. Masks are cut by what is
    painted over them (existing ones by the pastes, pasted ones by later pastes), and a mask
    left with less than ``1 - max_overlap`` of its area is no longer a target: a sliver of a
    hidden object is not an instance to learn. Returns new images, masks and embeddings
    (pasted instances appended).
    """
    b = images.shape[0]
    if b < 2 or prob <= 0:
        return images, masks, embeds
    out_images, out_masks, out_embeds = images.clone(), [], []
    for i in range(b):
        j = (i + 1) % b
        src_m, src_e = masks[j], embeds[j]
        own_m, own_e = masks[i], embeds[i]
        if src_m.shape[0] == 0:
            out_masks.append(own_m)
            out_embeds.append(own_e)
            continue
        drawn = torch.rand(src_m.shape[0], generator=g, device=src_m.device) < prob
        if own_m.shape[0]:
            # (S, N): the share of each existing instance that each source instance would cover
            inter = torch.einsum("shw,nhw->sn", src_m.float(), own_m.float())
            covers = inter / own_m.flatten(1).sum(1).clamp_min(1).float()
            drawn &= covers.amax(1) < max_overlap
        pasted_m, pasted_e = src_m[drawn], src_e[drawn]
        if pasted_m.shape[0] == 0:
            out_masks.append(own_m)
            out_embeds.append(own_e)
            continue
        union = pasted_m.any(0)
        out_images[i] = torch.where(union.unsqueeze(0), images[j], images[i])
        # later pasted instances occlude earlier pasted ones, as painted
        occl = torch.flip(torch.cumsum(torch.flip(pasted_m.int(), [0]), 0), [0]) - pasted_m.int()
        cut_p = pasted_m & (occl == 0)
        cut = own_m & ~union
        keep = _mostly_visible(cut, own_m, max_overlap)
        keep_p = _mostly_visible(cut_p, pasted_m, max_overlap)
        out_masks.append(torch.cat([cut[keep], cut_p[keep_p]]))
        out_embeds.append(torch.cat([own_e[keep], pasted_e[keep_p]]))
    return out_images, out_masks, out_embeds


def _mostly_visible(cut: torch.Tensor, whole: torch.Tensor, max_overlap: float) -> torch.Tensor:
    """(N,) True where a cut mask keeps more than ``1 - max_overlap`` of its whole (and is not empty).
    cut, whole (N, H, W) bool."""
    left = cut.flatten(1).sum(1).float()
    return (left > 0) & (left > (1 - max_overlap) * whole.flatten(1).sum(1).float())
