"""Trained SOLO model files: build a network on a pretrained trunk, save and load weights (never
code), and the inference settings a file records. Kept apart from the training loop, so that
inference (``predict``, exemplar refinement) does not import training."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from efsolo.config import TestSettings
from efsolo.modeling.backbone import load_backbone
from efsolo.modeling.solo_model import SOLO, SOLOArch
from efsolo.utils.errors import EfsoloError, TrainingError

MODEL_FORMAT = "efsolo-solo-v1"


def build_model(arch: SOLOArch, backbone: str | Path) -> SOLO:
    """A SOLO network whose trunk is initialised from ``models/backbone.pt``."""
    model = SOLO(arch)
    trunk = load_backbone(backbone)
    if trunk.arch != arch.backbone:
        raise TrainingError(f"{backbone}: backbone is {trunk.arch}, the network wants {arch.backbone}")
    model.trunk.load_state_dict(trunk.state_dict())
    return model


def save_model(path: str | Path, model: SOLO, meta: dict) -> None:
    from efsolo.utils import atomic

    sd = {k: v.detach().cpu() for k, v in model.state_dict().items() if not k.startswith("extra.")}
    atomic.torch_save({"format": MODEL_FORMAT, "arch": asdict(model.arch), "state_dict": sd, "meta": meta}, path)


def _read(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """A model file's contents (weights only; never executes code from the file)."""
    path = Path(path)
    if not path.is_file():
        raise EfsoloError(f"{path}: no such model file")
    try:
        blob = torch.load(path, map_location=map_location, weights_only=True)
    except Exception:  # noqa: BLE001 - any unpickling failure: not one of our files
        raise EfsoloError(f"{path}: not an efsolo model file (not a torch file)") from None
    if not isinstance(blob, dict) or blob.get("format") != MODEL_FORMAT:
        raise EfsoloError(f"{path}: not an efsolo model file")
    return blob


def _network(blob: dict) -> SOLO:
    a = blob["arch"]
    if "arch" in a:  # files written before SOLOArch.arch was named backbone
        a = {**{k: v for k, v in a.items() if k != "arch"}, "backbone": a["arch"]}
    model = SOLO(SOLOArch(**{**a, "grids": tuple(a["grids"])}))
    model.load_state_dict(blob["state_dict"])
    return model.eval()


def _test_settings(blob: dict) -> TestSettings:
    meta = blob.get("meta", {})
    recorded = meta.get("test")
    if recorded is None:
        size = meta.get("input_size")
        recorded = {"short_side": int(size[0]), "max_side": int(size[1])} if size else {}
    known = set(TestSettings.__dataclass_fields__)
    return TestSettings(**{k: v for k, v in recorded.items() if k in known})


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> SOLO:
    """Load a trained model file (weights only; never executes code from the file)."""
    return _network(_read(path, map_location))


def model_test_settings(path: str | Path) -> TestSettings:
    """The inference settings a model file records (those its stage evaluated it with); for a file
    that records none, the defaults at the model's training input size."""
    return _test_settings(_read(path))


def load_model_and_settings(path: str | Path,
                            map_location: str | torch.device = "cpu") -> tuple[SOLO, TestSettings]:
    """``load_model`` and ``model_test_settings`` from one read of the file (a paper-size model is
    about 200 MB)."""
    blob = _read(path, map_location)
    return _network(blob), _test_settings(blob)
