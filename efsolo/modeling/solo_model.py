"""The SOLOv2-style class-agnostic instance segmentation network (method reference, section 2).

ResNet trunk -> FPN (P2..P6) -> a head shared over five instance levels (P2 at stride 8,
P3, P4, P5, P6 at P5's size) giving, per grid cell, a foreground logit, a dynamic kernel and
a semantic embedding; and a mask-feature branch at stride 4 (or 2: ``mask_stride``). A cell's
mask logits are its kernel applied as a 1x1 convolution to the mask features.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from efsolo.config import ModelSettings
from efsolo.modeling.backbone import ResNetTrunk

LEVEL_STRIDES = (8, 8, 16, 32, 32)


@dataclass(frozen=True)
class SOLOArch(ModelSettings):
    """The whole network: the sizes of ``freesolo.model`` (``config.ModelSettings``, the paper's by
    default), the backbone, and the width of the predicted semantic embeddings."""

    backbone: str = "resnet50"  # the trunk: resnet18 | resnet34 | resnet50 | resnet101
    embed_dim: int = 128


def _gn(channels: int) -> nn.GroupNorm:
    groups = 32
    while channels % groups:
        groups //= 2
    return nn.GroupNorm(groups, channels)


def _conv_gn_relu(cin: int, cout: int, k: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), _gn(cout), nn.ReLU(inplace=True))


def coord_channels(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 2, H, W) normalised x and y coordinates in [-1, 1] (CoordConv)."""
    b, _, h, w = x.shape
    ys = torch.linspace(-1, 1, h, device=x.device, dtype=x.dtype)
    xs = torch.linspace(-1, 1, w, device=x.device, dtype=x.dtype)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([xx, yy]).unsqueeze(0).expand(b, -1, -1, -1)


class FPN(nn.Module):
    """C2..C5 -> P2..P6 (P6 = max-pool of P5, as detectron2's LastLevelMaxPool)."""

    def __init__(self, in_channels: list[int], out: int) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, out, 1) for c in in_channels)
        self.output = nn.ModuleList(nn.Conv2d(out, out, 3, padding=1) for _ in in_channels)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        lat = [l(f) for l, f in zip(self.lateral, feats)]
        outs = [lat[-1]]
        for x in reversed(lat[:-1]):
            outs.insert(0, x + F.interpolate(outs[0], size=x.shape[-2:], mode="nearest"))
        ps = [o(x) for o, x in zip(self.output, outs)]
        return ps + [F.max_pool2d(ps[-1], 1, stride=2)]


class SOLOHead(nn.Module):
    def __init__(self, cin: int, a: SOLOArch) -> None:
        super().__init__()
        self.grids = a.grids
        self.cate_tower = nn.Sequential(*[_conv_gn_relu(cin if i == 0 else a.head_channels, a.head_channels)
                                          for i in range(a.head_convs)])
        self.kernel_tower = nn.Sequential(*[_conv_gn_relu(cin + 2 if i == 0 else a.head_channels, a.head_channels)
                                            for i in range(a.head_convs)])
        self.cate_pred = nn.Conv2d(a.head_channels, 1, 3, padding=1)
        self.kernel_pred = nn.Conv2d(a.head_channels, a.kernel_dim, 3, padding=1)
        self.embed_pred = nn.Conv2d(a.head_channels, a.embed_dim, 3, padding=1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.constant_(self.cate_pred.bias, -4.59511985)  # focal-loss prior 0.01: -log((1 - p) / p)

    def forward(self, feats: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """Five level features -> per level cate (B, 1, S, S), kernels (B, E, S, S), embeddings (B, D, S, S)."""
        cates, kernels, embeds = [], [], []
        for x, s in zip(feats, self.grids):
            k_in = torch.cat([x, coord_channels(x)], dim=1)
            k_in = F.interpolate(k_in, size=(s, s), mode="bilinear", align_corners=False)
            c_in = k_in[:, :-2]
            c = self.cate_tower(c_in)
            cates.append(self.cate_pred(c))
            embeds.append(self.embed_pred(c))
            kernels.append(self.kernel_pred(self.kernel_tower(k_in)))
        return cates, kernels, embeds


class MaskBranch(nn.Module):
    """P2..P5 -> mask features (B, E, H/s, W/s), s = ``mask_stride``: each level to stride 4 and
    summed (P5 with coordinates). At stride 2 the sum is upsampled and fused with a convolution of
    the image itself at stride 2: the only input finer than P2, so that masks can follow edges
    finer than the labels' grid (the pairwise term rewards that)."""

    IMAGE_CHANNELS = 16

    def __init__(self, cin: int, a: SOLOArch) -> None:
        super().__init__()
        self.levels = nn.ModuleList()
        for i in range(4):
            layers: list[nn.Module] = [_conv_gn_relu(cin + (2 if i == 3 else 0), a.mask_channels)]
            for _ in range(i):
                layers += [nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                           _conv_gn_relu(a.mask_channels, a.mask_channels)]
            self.levels.append(nn.Sequential(*layers))
        self.stride = a.mask_stride
        if self.stride == 2:
            self.image = nn.Sequential(nn.Conv2d(3, self.IMAGE_CHANNELS, 3, stride=2, padding=1, bias=False),
                                       _gn(self.IMAGE_CHANNELS), nn.ReLU(inplace=True))
            self.fine = _conv_gn_relu(a.mask_channels + self.IMAGE_CHANNELS, a.mask_channels)
        self.out = _conv_gn_relu(a.mask_channels, a.kernel_dim, k=1)

    def forward(self, ps: list[torch.Tensor], image: torch.Tensor | None = None) -> torch.Tensor:
        """ps: P2..P5 (B, C, H/4, W/4) .. (B, C, H/32, W/32); image (B, 3, H, W), read at stride 2 only."""
        size = ps[0].shape[-2:]
        total = 0
        for i, (level, p) in enumerate(zip(self.levels, ps[:4])):
            if i == 3:
                p = torch.cat([p, coord_channels(p)], dim=1)
            y = level(p)
            if y.shape[-2:] != size:
                y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
            total = total + y
        if self.stride == 2:
            if image is None:
                raise ValueError("a mask branch at stride 2 reads the image: pass it")
            fine = self.image(image)
            total = F.interpolate(total, size=fine.shape[-2:], mode="bilinear", align_corners=False)
            total = self.fine(torch.cat([total, fine], dim=1))
        return self.out(total)


class SOLOOutput(NamedTuple):
    cates: list[torch.Tensor]  # per level (B, 1, S, S) logits
    kernels: list[torch.Tensor]  # per level (B, E, S, S)
    embeds: list[torch.Tensor]  # per level (B, D, S, S)
    mask_feat: torch.Tensor  # (B, E, H/s, W/s), s = mask_stride
    trunk: dict[str, torch.Tensor] | None = None  # the backbone embeddings C2..C5 (used by the EEC module)
    mask_stride: int = 4


class SOLO(nn.Module):
    def __init__(self, a: SOLOArch) -> None:
        super().__init__()
        self.arch = a
        self.trunk = ResNetTrunk(a.backbone, 32)
        ch = self.trunk.channels
        self.fpn = FPN([ch["c2"], ch["c3"], ch["c4"], ch["c5"]], a.fpn_channels)
        self.head = SOLOHead(a.fpn_channels, a)
        self.mask_branch = MaskBranch(a.fpn_channels, a)
        self._freeze(a.freeze_at)

    def _freeze(self, freeze_at: int) -> None:
        t = self.trunk
        stages = [[t.conv1, t.bn1], [t.layer1], [t.layer2], [t.layer3], [t.layer4]]
        frozen = [m for stage in stages[:freeze_at] for m in stage]
        for m in frozen:
            m.requires_grad_(False)
        self._frozen = frozen

    def train(self, mode: bool = True) -> "SOLO":
        super().train(mode)
        for m in self.trunk.modules():  # BatchNorm stays frozen (small batches): running stats are kept
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
                m.requires_grad_(False)
        return self

    def forward(self, x: torch.Tensor) -> SOLOOutput:
        """x (B, 3, H, W) normalised, H and W multiples of 32."""
        return self.forward_from_trunk(self.trunk(x), x)

    def forward_from_trunk(self, c: dict[str, torch.Tensor], image: torch.Tensor | None = None) -> SOLOOutput:
        """The FPN, heads and mask branch over the trunk's features C2..C5 (and the normalised
        image, which a mask branch at stride 2 reads)."""
        ps = self.fpn([c["c2"], c["c3"], c["c4"], c["c5"]])
        cates, kernels, embeds = self.head(level_features(ps))
        return SOLOOutput(cates, kernels, embeds, self.mask_branch(ps[:4], image), c, self.mask_branch.stride)


def level_features(ps: list[torch.Tensor]) -> list[torch.Tensor]:
    """P2..P6 -> the five instance levels' features: P2 at stride 8, P3, P4, P5, P6 at P5's size."""
    return [F.interpolate(ps[0], scale_factor=0.5, mode="bilinear", align_corners=False), ps[1], ps[2], ps[3],
            F.interpolate(ps[4], size=ps[3].shape[-2:], mode="bilinear", align_corners=False)]


def dynamic_masks(kernels: torch.Tensor, mask_feat: torch.Tensor) -> torch.Tensor:
    """Apply K dynamic 1x1 kernels (K, E) to one image's mask features (E, H, W) -> logits (K, H, W)."""
    if kernels.shape[0] == 0:
        return mask_feat.new_zeros((0, *mask_feat.shape[-2:]))
    return torch.einsum("ke,ehw->khw", kernels, mask_feat)
