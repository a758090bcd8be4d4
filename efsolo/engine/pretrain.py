"""DenseCL-style self-supervised pretraining of a ResNet trunk (for when no checkpoint is given).

Two augmented views per image; a query encoder and a momentum key encoder, each with a
global projection head (MLP on pooled C5) and a dense projection head (1x1 convs on C5);
two queues of negatives. The dense positive of a query position is the key position whose
backbone feature is most similar (DenseCL's correspondence); the dense queue holds pooled
dense keys. Loss = (1 - w) * global InfoNCE + w * dense InfoNCE. ``dense_level`` moves the dense head and
its correspondence from C5 (DenseCL) to a finer level (C4, C3), whose grid holds more positions
at the demo's small crops (96 px: C5 3x3, C3 12x12).
"""
from __future__ import annotations

import copy
from dataclasses import asdict
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import v2 as T
from tqdm import tqdm

from efsolo.config import PretrainParams, PretrainRuntime
from efsolo.data.datasets import load_manifest
from efsolo.data.images import IMAGENET_MEAN, IMAGENET_STD, read_image
from efsolo.engine import resume
from efsolo.engine.live import make_live
from efsolo.modeling.backbone import ResNetTrunk, save_backbone
from efsolo.utils.seeding import seed_everything
from efsolo.utils.errors import TrainingError


class DenseCLEncoder(nn.Module):
    """Trunk + global and dense projection heads."""

    def __init__(self, arch: str, proj_dim: int, dense_level: str = "c5") -> None:
        super().__init__()
        self.trunk = ResNetTrunk(arch, 32)
        self.dense_level = dense_level
        c, c_dense = self.trunk.channels["c5"], self.trunk.channels[dense_level]
        hidden = min(2048, c)
        self.global_head = nn.Sequential(nn.Linear(c, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, proj_dim))
        self.dense_head = nn.Sequential(nn.Conv2d(c_dense, hidden, 1), nn.ReLU(inplace=True),
                                        nn.Conv2d(hidden, proj_dim, 1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, 3, H, W) -> the dense level's backbone features (B, C, h, w), on which the dense
        correspondence is matched; global (B, D), from pooled C5; dense (B, D, h, w), from the dense level."""
        feats = self.trunk(x)
        f = feats[self.dense_level]
        return f, self.global_head(feats["c5"].mean(dim=(2, 3))), self.dense_head(f)


def densecl_loss(g_q: torch.Tensor, g_k: torch.Tensor, d_q: torch.Tensor, d_k: torch.Tensor,
                 f_q: torch.Tensor, f_k: torch.Tensor, queue_g: torch.Tensor, queue_d: torch.Tensor,
                 temperature: float, dense_weight: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DenseCL objective.

    Shapes: g_q, g_k (B, D); d_q, d_k (B, D, h, w); f_q, f_k (B, C, h, w) backbone features used
    for correspondence; queue_g, queue_d (D, K) unit columns. Returns (total, global, dense).
    """
    b, d = g_q.shape
    g_q, g_k = F.normalize(g_q, dim=1), F.normalize(g_k, dim=1)
    logits_g = torch.cat([(g_q * g_k).sum(1, keepdim=True), g_q @ queue_g], dim=1) / temperature
    loss_g = F.cross_entropy(logits_g, torch.zeros(b, dtype=torch.long, device=g_q.device))

    d_q = F.normalize(d_q.flatten(2), dim=1)  # (B, D, S)
    d_k = F.normalize(d_k.flatten(2), dim=1)
    f_q = F.normalize(f_q.flatten(2), dim=1)  # (B, C, S)
    f_k = F.normalize(f_k.flatten(2), dim=1)
    match = torch.einsum("bcs,bct->bst", f_q, f_k).argmax(dim=2)  # (B, S): key position per query position
    k_pos = torch.gather(d_k, 2, match.unsqueeze(1).expand(-1, d, -1))  # (B, D, S)
    pos = (d_q * k_pos).sum(1)  # (B, S)
    neg = torch.einsum("bds,dk->bsk", d_q, queue_d)  # (B, S, K)
    logits_d = torch.cat([pos.unsqueeze(-1), neg], dim=-1).flatten(0, 1) / temperature
    loss_d = F.cross_entropy(logits_d, torch.zeros(logits_d.shape[0], dtype=torch.long, device=g_q.device))
    return (1 - dense_weight) * loss_g + dense_weight * loss_d, loss_g, loss_d


def make_augment(crop_size: int, color_jitter: float, grayscale_prob: float) -> T.Compose:
    """Two-view augmentation of a uint8 (3, H, W) tensor to a normalised float crop.

    ``color_jitter`` is the brightness, contrast and saturation jitter (hue: a quarter of it),
    applied with probability 0.8; 0 leaves colours alone, so the trunk may keep colour in its
    features. DenseCL's (MoCo v2's) augmentation is ``color_jitter=0.4, grayscale_prob=0.2``.
    """
    colour = []
    if color_jitter > 0:
        colour.append(T.RandomApply([T.ColorJitter(color_jitter, color_jitter, color_jitter, color_jitter / 4)],
                                    p=0.8))
    if grayscale_prob > 0:
        colour.append(T.RandomGrayscale(p=grayscale_prob))
    return T.Compose([
        T.RandomResizedCrop(crop_size, scale=(0.2, 1.0), antialias=True),
        T.RandomHorizontalFlip(),
        *colour,
        T.RandomApply([T.GaussianBlur(kernel_size=9, sigma=(0.1, 2.0))], p=0.5),
        T.ToDtype(torch.float32, scale=True),
        T.Normalize([m / 255 for m in IMAGENET_MEAN], [s / 255 for s in IMAGENET_STD]),
    ])


class _ImageSource:
    """Training images as uint8 (3, H, W) tensors; kept in memory when small enough."""

    def __init__(self, records: list[dict], cache_bytes: int = 1 << 30) -> None:
        self.paths = [r["file_name"] for r in records]
        total = sum(r["width"] * r["height"] * 3 for r in records)
        self.cache: dict[int, torch.Tensor] | None = {} if total <= cache_bytes else None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        if self.cache is not None and i in self.cache:
            return self.cache[i]
        t = torch.from_numpy(read_image(self.paths[i])).permute(2, 0, 1).contiguous()
        if self.cache is not None:
            self.cache[i] = t
        return t


def _lr_at(step: int, iters: int, base_lr: float) -> float:
    warm = max(1, iters // 20)
    if step < warm:
        return base_lr * (step + 1) / warm
    return base_lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, iters - warm)))


def pretrain_backbone(manifest: str | Path, out_path: str | Path, ckpt_dir: str | Path, live_dir: str | Path, *,
                      arch: str, seed: int, settings: PretrainParams, runtime: PretrainRuntime, device: torch.device,
                      precision: str = "float32") -> dict:
    """Pretrain and write ``out_path``, with ``settings`` (``backbone.pretrain``) and ``runtime``
    (``runtime.pretrain``: logging and checkpoint intervals). ``settings.iters == 0`` writes the
    seeded random initialisation. ``color_jitter`` and ``grayscale_prob``: see :func:`make_augment`. With
    ``precision`` bfloat16 the encoders run under bf16 autocast (the loss and the optimiser in float32)."""
    seed_everything(seed)
    records = load_manifest(manifest)
    enc_q = DenseCLEncoder(arch, settings.proj_dim, settings.dense_level).to(device)
    if settings.iters == 0:
        make_live(live_dir).end()
        save_backbone(out_path, arch, enc_q.trunk.state_dict(), source=f"random-init(seed={seed})")
        return {"iters": 0}
    enc_k = copy.deepcopy(enc_q).requires_grad_(False)
    queue_g = F.normalize(torch.randn(settings.proj_dim, settings.queue_size, device=device), dim=0)
    queue_d = F.normalize(torch.randn(settings.proj_dim, settings.queue_size, device=device), dim=0)
    opt = torch.optim.SGD(enc_q.parameters(), lr=settings.lr, momentum=0.9, weight_decay=settings.weight_decay)
    fp = resume.fingerprint(arch=arch, seed=seed, precision=precision, images=[r["sha256"] for r in records],
                            **asdict(settings))  # the same hash as when each setting was its own argument
    ckpt_path = Path(ckpt_dir) / "last.pt"
    start, ptr = 0, 0
    if (ck := resume.load_checkpoint(ckpt_path, fp)) is not None:
        enc_q.load_state_dict(ck["enc_q"])
        enc_k.load_state_dict(ck["enc_k"])
        opt.load_state_dict(ck["opt"])
        queue_g, queue_d, ptr = ck["queue_g"].to(device), ck["queue_d"].to(device), ck["ptr"]
        start = ck["step"]
        resume.set_rng_state(ck["rng"])
        print(f"resuming pretraining from iteration {start} ({ckpt_path})")
    live = make_live(live_dir, resume_at=start if start > 0 else None)
    source = _ImageSource(records)
    augment = make_augment(settings.crop_size, settings.color_jitter, settings.grayscale_prob)
    use_amp = precision == "bfloat16"
    enc_q.train()
    enc_k.train()
    t0 = time.time()
    bar = tqdm(range(start, settings.iters), desc="pretraining", initial=start, total=settings.iters, disable=None)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, settings.iters, settings.lr)
        idx = torch.randint(len(source), (settings.batch_size,))
        imgs = [source[int(i)] for i in idx]
        v1 = torch.stack([augment(im) for im in imgs]).to(device, non_blocking=True)
        v2 = torch.stack([augment(im) for im in imgs]).to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            f_q, g_q, d_q = enc_q(v1)
            with torch.no_grad():
                for p_k, p_q in zip(enc_k.parameters(), enc_q.parameters()):
                    p_k.mul_(settings.momentum).add_(p_q.detach(), alpha=1 - settings.momentum)
                f_k, g_k, d_k = enc_k(v2)
        loss, loss_g, loss_d = densecl_loss(g_q.float(), g_k.float(), d_q.float(), d_k.float(), f_q.float(),
                                            f_k.float(), queue_g, queue_d, settings.temperature, settings.dense_weight)
        if not torch.isfinite(loss):
            raise TrainingError(f"pretraining loss is {loss.item()} at iteration {step}; the last good checkpoint "
                               f"is kept in {ckpt_path}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():  # enqueue the keys, overwriting the oldest
            keys_g = F.normalize(g_k.float(), dim=1)
            keys_d = F.normalize(F.normalize(d_k.float().flatten(2), dim=1).mean(2), dim=1)
            cols = (torch.arange(settings.batch_size, device=device) + ptr) % settings.queue_size
            queue_g[:, cols] = keys_g.T
            queue_d[:, cols] = keys_d.T
            ptr = (ptr + settings.batch_size) % settings.queue_size
        if (step + 1) % runtime.log_every == 0 or step + 1 == settings.iters:
            live.step = step + 1
            live.log_metric("pretrain/loss", loss.item())
            live.log_metric("pretrain/loss_global", loss_g.item())
            live.log_metric("pretrain/loss_dense", loss_d.item())
            live.log_metric("pretrain/lr", opt.param_groups[0]["lr"])
            live.next_step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % runtime.checkpoint_every == 0 or step + 1 == settings.iters:
            resume.save_checkpoint(ckpt_path, fp, step + 1, {
                "enc_q": enc_q.state_dict(), "enc_k": enc_k.state_dict(), "opt": opt.state_dict(),
                "queue_g": queue_g.cpu(), "queue_d": queue_d.cpu(), "ptr": ptr})
    live.end()
    save_backbone(out_path, arch, enc_q.trunk.state_dict(),
                  source=f"densecl-pretrain(iters={settings.iters}, seed={seed}, precision={precision})")
    return {"iters": settings.iters, "seconds": time.time() - t0, "precision": precision}
