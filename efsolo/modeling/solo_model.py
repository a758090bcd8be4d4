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

    def forward(self, feats: list[torch.Tensor], dense: bool = True) -> HeadOutput:
        """Five level features -> per level cate logits (B, 1, S, S) and the two towers' features
        (B, C, S, S); with ``dense``, also every cell's kernel (B, E, S, S) and embedding (B, D, S, S).
        Training reads kernels and embeddings at its positive cells only (a few hundred of about
        11,000 at the demo's size): ``dense=False`` leaves them to ``kernels_at`` / ``embeds_at``,
        which skips a third of the head's arithmetic."""
        cates, kernels, embeds, k_feats, c_feats = [], [], [], [], []
        for x, s in zip(feats, self.grids):
            k_in = torch.cat([x, coord_channels(x)], dim=1)
            k_in = F.interpolate(k_in, size=(s, s), mode="bilinear", align_corners=False)
            c_in = k_in[:, :-2]
            c = self.cate_tower(c_in)
            k = self.kernel_tower(k_in)
            cates.append(self.cate_pred(c))
            c_feats.append(c)
            k_feats.append(k)
            if dense:
                embeds.append(self.embed_pred(c))
                kernels.append(self.kernel_pred(k))
        return HeadOutput(cates, kernels if dense else None, embeds if dense else None, k_feats, c_feats)

    def kernels_at(self, kernel_feat: torch.Tensor, index: int, cells: torch.Tensor) -> torch.Tensor:
        """The kernels of image ``index`` at ``cells`` (K,) (flat indices into its S x S grid), from
        its kernel tower's features (B, C, S, S) -> (K, E). Equals ``kernel_pred`` over every cell,
        read at ``cells``."""
        return conv3x3_at(self.kernel_pred, kernel_feat[index], cells)

    def embeds_at(self, cate_feat: torch.Tensor, index: int, cells: torch.Tensor) -> torch.Tensor:
        """The predicted embeddings of image ``index`` at ``cells`` (K,) -> (K, D)."""
        return conv3x3_at(self.embed_pred, cate_feat[index], cells)


class HeadOutput(NamedTuple):
    cates: list[torch.Tensor]  # per level (B, 1, S, S) logits
    kernels: list[torch.Tensor] | None  # per level (B, E, S, S); None when the head ran with dense=False
    embeds: list[torch.Tensor] | None  # per level (B, D, S, S); idem
    kernel_feats: list[torch.Tensor]  # per level (B, C, S, S): the kernel tower's output
    cate_feats: list[torch.Tensor]  # per level (B, C, S, S): the category tower's output


def conv3x3_at(conv: nn.Conv2d, feat: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    """A 3x3, stride-1, padding-1 convolution of one feature map (C, H, W) evaluated at ``cells`` (K,)
    (flat indices y * W + x) only -> (K, out). Zero padding, as ``conv``'s; under autocast's bf16
    the product runs in the features' dtype, as the convolution would."""
    c, h, w = feat.shape
    if cells.numel() == 0:
        return feat.new_zeros((0, conv.out_channels))
    ys, xs = cells // w, cells % w
    offs = torch.arange(3, device=feat.device)
    padded = F.pad(feat, (1, 1, 1, 1))
    patches = padded[:, (ys.view(-1, 1, 1) + offs.view(1, 3, 1)), (xs.view(-1, 1, 1) + offs.view(1, 1, 3))]  # (C, K, 3, 3)
    patches = patches.transpose(0, 1).reshape(len(cells), c * 9)
    weight = conv.weight.reshape(conv.out_channels, c * 9).to(patches.dtype)
    bias = conv.bias.to(patches.dtype) if conv.bias is not None else None
    return F.linear(patches, weight, bias)


def conv_like(conv: nn.Conv2d, feat: torch.Tensor) -> torch.Tensor:
    """``conv`` applied to ``feat`` (B, C, H, W) in the features' dtype, as under the autocast that made
    them (bf16 features from a bf16-autocast forward, read by the loss outside autocast)."""
    bias = conv.bias.to(feat.dtype) if conv.bias is not None else None
    return F.conv2d(feat, conv.weight.to(feat.dtype), bias, conv.stride, conv.padding, conv.dilation, conv.groups)


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
    kernels: list[torch.Tensor] | None  # per level (B, E, S, S); None: read them with kernels_at (head set)
    embeds: list[torch.Tensor] | None  # per level (B, D, S, S); None: embeds_at
    mask_feat: torch.Tensor  # (B, E, H/s, W/s), s = mask_stride
    trunk: dict[str, torch.Tensor] | None = None  # the backbone embeddings C2..C5 (used by the EEC module)
    mask_stride: int = 4
    head: "SOLOHead | None" = None  # with the towers' features: kernels and embeddings where they are read
    kernel_feats: list[torch.Tensor] | None = None
    cate_feats: list[torch.Tensor] | None = None

    def kernels_at(self, level: int, index: int, cells: torch.Tensor) -> torch.Tensor:
        """The kernels (K, E) of image ``index`` at level ``level``'s ``cells`` (K,) (flat indices)."""
        if self.kernels is not None:
            return self.kernels[level][index].flatten(1)[:, cells].T
        return self.head.kernels_at(self.kernel_feats[level], index, cells)

    def embeds_at(self, level: int, index: int, cells: torch.Tensor) -> torch.Tensor:
        """The predicted embeddings (K, D) of image ``index`` at level ``level``'s ``cells`` (K,)."""
        if self.embeds is not None:
            return self.embeds[level][index].flatten(1)[:, cells].T
        return self.head.embeds_at(self.cate_feats[level], index, cells)

    def dense_kernels(self, level: int) -> torch.Tensor:
        """Every cell's kernel at level ``level``: (B, E, S, S)."""
        if self.kernels is not None:
            return self.kernels[level]
        return conv_like(self.head.kernel_pred, self.kernel_feats[level])

    def dense_embeds(self, level: int) -> torch.Tensor:
        """Every cell's predicted embedding at level ``level``: (B, D, S, S)."""
        if self.embeds is not None:
            return self.embeds[level]
        return conv_like(self.head.embed_pred, self.cate_feats[level])


class SOLO(nn.Module):
    def __init__(self, a: SOLOArch) -> None:
        super().__init__()
        self.arch = a
        self.trunk = ResNetTrunk(a.backbone, 32)
        ch = self.trunk.channels
        self.fpn = FPN([ch["c2"], ch["c3"], ch["c4"], ch["c5"]], a.fpn_channels)
        self.head = SOLOHead(a.fpn_channels, a)
        self.mask_branch = MaskBranch(a.fpn_channels, a)
        # in training, compute kernels and embeddings only where the loss reads them (SOLOHead.forward);
        # the training loop turns it off under DDP, whose unused-parameter search sees the forward only
        self.sparse_training_outputs = True
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
        h = self.head(level_features(ps), dense=not (self.training and self.sparse_training_outputs))
        return SOLOOutput(h.cates, h.kernels, h.embeds, self.mask_branch(ps[:4], image), c, self.mask_branch.stride,
                          self.head, h.kernel_feats, h.cate_feats)


def level_features(ps: list[torch.Tensor]) -> list[torch.Tensor]:
    """P2..P6 -> the five instance levels' features: P2 at stride 8, P3, P4, P5, P6 at P5's size."""
    return [F.interpolate(ps[0], scale_factor=0.5, mode="bilinear", align_corners=False), ps[1], ps[2], ps[3],
            F.interpolate(ps[4], size=ps[3].shape[-2:], mode="bilinear", align_corners=False)]


def dynamic_masks(kernels: torch.Tensor, mask_feat: torch.Tensor) -> torch.Tensor:
    """Apply K dynamic 1x1 kernels (K, E) to one image's mask features (E, H, W) -> logits (K, H, W)."""
    if kernels.shape[0] == 0:
        return mask_feat.new_zeros((0, *mask_feat.shape[-2:]))
    return torch.einsum("ke,ehw->khw", kernels, mask_feat)
