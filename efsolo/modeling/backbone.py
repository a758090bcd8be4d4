"""ResNet trunks (torchvision layout, no classifier) and the ``models/backbone.pt`` file format."""
from __future__ import annotations

from efsolo.utils.errors import EfsoloError

from pathlib import Path

import torch
import torchvision
from torch import nn

from efsolo.utils import atomic

BACKBONE_FORMAT = "efsolo-backbone-v1"
ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101")


class BackboneError(EfsoloError):
    """A backbone file that cannot be used (one-line message naming it)."""


def feature_channels(arch: str) -> dict[str, int]:
    """Channels of C2..C5 for a ResNet architecture."""
    if arch in ("resnet18", "resnet34"):
        return {"c2": 64, "c3": 128, "c4": 256, "c5": 512}
    return {"c2": 256, "c3": 512, "c4": 1024, "c5": 2048}


def _dilate(layer: nn.Sequential, dilation: int) -> None:
    """Turn a strided ResNet stage into a dilated one (same weights, output stride halved)."""
    for m in layer.modules():
        if isinstance(m, nn.Conv2d):
            if m.stride == (2, 2):
                m.stride = (1, 1)
            if m.kernel_size == (3, 3):
                m.dilation = (dilation, dilation)
                m.padding = (dilation, dilation)


class ResNetTrunk(nn.Module):
    """A torchvision ResNet without ``fc``; returns the feature maps C2..C5.

    ``output_stride`` 32 is the plain network; 16 dilates the last stage and 8 the last two,
    which keeps the C5 weights but gives a finer map (useful at small image sizes).
    """

    def __init__(self, arch: str = "resnet50", output_stride: int = 32) -> None:
        super().__init__()
        if arch not in ARCHS:
            raise BackboneError(f"unknown backbone.arch {arch!r}; one of {list(ARCHS)}")
        net = getattr(torchvision.models, arch)(weights=None)
        self.arch = arch
        self.channels = feature_channels(arch)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        if output_stride not in (8, 16, 32):
            raise BackboneError(f"output stride must be 8, 16 or 32, got {output_stride}")
        if output_stride <= 16:
            _dilate(self.layer4, 2 if output_stride == 16 else 4)
        if output_stride == 8:
            _dilate(self.layer3, 2)
        self.output_stride = output_stride

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x (B, 3, H, W) normalised -> {"c2": (B, C2, H/4, W/4), ..., "c5": (B, C5, H/s, W/s)}."""
        return self.forward_from(x, 0)

    def _stages(self) -> list[nn.Module]:
        """The five stages in order: the stem (conv1, bn1, relu, max-pool), then res2 .. res5."""
        stem = nn.Sequential(self.conv1, self.bn1, self.relu, self.maxpool)
        return [stem, self.layer1, self.layer2, self.layer3, self.layer4]

    def prefix(self, x: torch.Tensor, stages: int) -> torch.Tensor:
        """The output of the first ``stages`` stages (0: x itself; 1: the stem; 2: C2; ... 5: C5).
        With the stages a training keeps fixed, it can be computed once and reused."""
        for stage in self._stages()[:stages]:
            x = stage(x)
        return x

    def forward_from(self, x: torch.Tensor, stages: int) -> dict[str, torch.Tensor]:
        """The feature maps from ``x``, the output of the first ``stages`` stages (``prefix``):
        ``forward_from(prefix(img, s), s)`` has the levels of ``forward(img)`` from C(s+1) on
        (every level for s <= 1)."""
        out = {}
        for i, stage in enumerate(self._stages()[stages:], start=stages):
            x = stage(x)
            if i >= 1:
                out[f"c{i + 1}"] = x
        return out


def trunk_state_keys(arch: str) -> dict[str, torch.Size]:
    """Expected parameter/buffer names and shapes of a trunk (torchvision names, no fc)."""
    sd = ResNetTrunk(arch).state_dict()
    return {k: v.shape for k, v in sd.items() if not k.endswith("num_batches_tracked")}


def save_backbone(path: str | Path, arch: str, state_dict: dict[str, torch.Tensor], source: str) -> Path:
    sd = {k: v.detach().cpu().contiguous() for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    return atomic.torch_save({"format": BACKBONE_FORMAT, "arch": arch, "source": source, "state_dict": sd}, path)


def load_backbone(path: str | Path, output_stride: int = 32, map_location: str | torch.device = "cpu") -> ResNetTrunk:
    """Load ``models/backbone.pt`` (never executes code from the file) into a trunk."""
    path = Path(path)
    if not path.is_file():
        raise BackboneError(f"{path}: no such file")
    try:
        blob = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure is a bad file
        raise BackboneError(f"{path}: not a backbone file ({type(err).__name__})") from None
    if not isinstance(blob, dict) or blob.get("format") != BACKBONE_FORMAT:
        raise BackboneError(f"{path}: not an efsolo backbone file (format {BACKBONE_FORMAT} expected)")
    trunk = ResNetTrunk(blob["arch"], output_stride)
    missing, unexpected = trunk.load_state_dict(blob["state_dict"], strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise BackboneError(f"{path}: missing {missing[:3]} unexpected {unexpected[:3]}")
    return trunk


PRECISIONS = ("float32", "bfloat16")


def cpu_has_bf16_instructions(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """Whether the CPU computes bf16 dot products natively (flags avx512_bf16 or amx_bf16); without
    them bf16 on the CPU is emulated, and slower than float32 (13x measured on an AVX2 EPYC)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> str:
    """``precision`` (auto | float32 | bfloat16) for ``device``: ``auto`` is bfloat16 on CUDA and on
    CPUs with bf16 instructions, float32 elsewhere. The networks run under bf16 autocast (losses
    and optimiser in float32); the result differs from float32, so stages record the precision
    they used."""
    if precision == "auto":
        return "bfloat16" if device.type == "cuda" or cpu_has_bf16_instructions() else "float32"
    if precision not in PRECISIONS:
        raise BackboneError(f"precision must be auto, float32 or bfloat16, got {precision!r}")
    return precision


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA when present, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise BackboneError("device: cuda was asked for but CUDA is not available")
    return torch.device(device)
