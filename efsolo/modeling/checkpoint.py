"""Loading DenseCL ResNet checkpoints in either format, without executing code from the file.

- torchvision-style ``.pth``: ``{'state_dict': {conv1.weight, layer1.0.bn1.weight, ...}}``,
  read with ``torch.load(..., weights_only=True)``.
- detectron2-style ``.pkl``: a pickled ``{'model': {stem.conv1.weight, res2.0.conv1.norm.weight,
  ...}}`` of numpy arrays, read with a restricted unpickler that admits only dicts, lists,
  numbers, strings and numpy arrays.

Both are converted to torchvision names and checked key by key and shape by shape.
"""
from __future__ import annotations

from efsolo.utils.errors import EfsoloError

import io
import pickle
import re
from pathlib import Path

import numpy as np
import torch

from efsolo.modeling.backbone import trunk_state_keys


class CheckpointError(EfsoloError):
    """A checkpoint that is unsafe, unreadable or does not fit the architecture (one line)."""


_SAFE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("collections", "OrderedDict"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BufferedIOBase, path: Path) -> None:
        super().__init__(file, encoding="latin1")
        self._path = path

    def find_class(self, module: str, name: str):  # noqa: ANN201
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        raise CheckpointError(
            f"{self._path}: refused to load: the pickle references {module}.{name}; only dicts, lists, "
            "numbers, strings and numpy arrays are allowed"
        )


def safe_unpickle(path: str | Path) -> object:
    """Unpickle a file admitting only plain containers, numbers, strings and numpy arrays."""
    path = Path(path)
    with open(path, "rb") as f:
        try:
            return _RestrictedUnpickler(f, path).load()
        except CheckpointError:
            raise
        except Exception as err:  # noqa: BLE001
            raise CheckpointError(f"{path}: not a readable pickle ({type(err).__name__}: {err})") from None


def detectron2_to_torchvision(name: str) -> str | None:
    """Map a detectron2 ResNet key to its torchvision name; ``None`` for keys outside the trunk."""
    if m := re.match(r"^stem\.conv1\.norm\.(.*)$", name):
        return f"bn1.{m[1]}"
    if m := re.match(r"^stem\.conv1\.weight$", name):
        return "conv1.weight"
    if m := re.match(r"^res(\d)\.(\d+)\.shortcut\.norm\.(.*)$", name):
        return f"layer{int(m[1]) - 1}.{m[2]}.downsample.1.{m[3]}"
    if m := re.match(r"^res(\d)\.(\d+)\.shortcut\.weight$", name):
        return f"layer{int(m[1]) - 1}.{m[2]}.downsample.0.weight"
    if m := re.match(r"^res(\d)\.(\d+)\.conv(\d)\.norm\.(.*)$", name):
        return f"layer{int(m[1]) - 1}.{m[2]}.bn{m[3]}.{m[4]}"
    if m := re.match(r"^res(\d)\.(\d+)\.conv(\d)\.weight$", name):
        return f"layer{int(m[1]) - 1}.{m[2]}.conv{m[3]}.weight"
    return None


_PREFIXES = ("module.", "encoder_q.0.", "encoder_q.", "backbone.", "model.")


def _strip_prefixes(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        for p in _PREFIXES:
            if k.startswith(p):
                k = k[len(p):]
        out[k] = v
    return out


def _to_tensor(path: Path, key: str, value: object) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    raise CheckpointError(f"{path}: value of {key} is a {type(value).__name__}, not an array")


def read_densecl(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a DenseCL checkpoint (``.pth`` or detectron2 ``.pkl``) as a torchvision-named state dict."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file (backbone.weights)")
    if path.suffix == ".pkl":
        blob = safe_unpickle(path)
        model = blob.get("model", blob) if isinstance(blob, dict) else None
        if not isinstance(model, dict):
            raise CheckpointError(f"{path}: expected a dict with a 'model' dict of arrays")
        sd = {}
        for k, v in model.items():
            tv = detectron2_to_torchvision(k)
            if tv is not None:
                sd[tv] = _to_tensor(path, k, v)
        return sd
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - weights_only refuses code; report it plainly
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: refused or unreadable with weights_only=True ({first[:200]})") from None
    sd = blob.get("state_dict", blob) if isinstance(blob, dict) else None
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path}: expected a dict with a 'state_dict' dict of tensors")
    sd = _strip_prefixes(sd)
    return {k: _to_tensor(path, k, v) for k, v in sd.items()
            if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}


def check_state_dict(sd: dict[str, torch.Tensor], arch: str, path: str | Path) -> dict[str, torch.Tensor]:
    """Verify every key and shape against ``arch``; one line naming what is missing or mismatched."""
    expected = trunk_state_keys(arch)
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    mismatched = sorted(k for k in set(sd) & set(expected) if tuple(sd[k].shape) != tuple(expected[k]))
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
    if mismatched:
        k = mismatched[0]
        problems.append(f"{len(mismatched)} with wrong shape (e.g. {k}: {tuple(sd[k].shape)} in file, "
                        f"{tuple(expected[k])} for {arch})")
    if problems:
        raise CheckpointError(f"{path}: does not fit backbone.arch={arch}: " + "; ".join(problems))
    return {k: sd[k].float() if sd[k].is_floating_point() else sd[k] for k in expected}


def load_densecl(path: str | Path, arch: str) -> dict[str, torch.Tensor]:
    """Read, convert and check a DenseCL checkpoint for ``arch``."""
    return check_state_dict(read_densecl(path), arch, path)
