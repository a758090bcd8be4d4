import os
import pickle

import pytest
import torch

from efsolo.modeling.backbone import ResNetTrunk, load_backbone, save_backbone, trunk_state_keys
from efsolo.modeling.checkpoint import CheckpointError, detectron2_to_torchvision, load_densecl


def _reference_state(arch="resnet18", seed=0):
    torch.manual_seed(seed)
    sd = ResNetTrunk(arch).state_dict()
    return {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}


def _torchvision_to_detectron2(name: str) -> str:
    """The inverse mapping, written independently, to build a detectron2-style file."""
    if name.startswith("conv1."):
        return "stem.conv1." + name.split(".", 1)[1]
    if name.startswith("bn1."):
        return "stem.conv1.norm." + name.split(".", 1)[1]
    layer, block, rest = name.split(".", 2)
    stage = f"res{int(layer[-1]) + 1}.{block}"
    if rest.startswith("downsample.0."):
        return f"{stage}.shortcut.{rest.split('.', 2)[2]}"
    if rest.startswith("downsample.1."):
        return f"{stage}.shortcut.norm.{rest.split('.', 2)[2]}"
    part, leaf = rest.split(".", 1)
    if part.startswith("bn"):
        return f"{stage}.conv{part[2:]}.norm.{leaf}"
    return f"{stage}.{part}.{leaf}"


def test_pth_with_prefixes_and_fc_is_converted(tmp_path):
    ref = _reference_state()
    blob = {"state_dict": {**{f"module.{k}": v for k, v in ref.items()}, "module.fc.weight": torch.zeros(10, 512)},
            "meta": {"epoch": 200}}
    torch.save(blob, tmp_path / "densecl.pth")
    sd = load_densecl(tmp_path / "densecl.pth", "resnet18")
    assert set(sd) == set(ref) and all(torch.equal(sd[k], ref[k]) for k in ref)


def test_detectron2_pkl_is_converted(tmp_path):
    ref = _reference_state()
    model = {_torchvision_to_detectron2(k): v.numpy() for k, v in ref.items()}
    assert all(detectron2_to_torchvision(k) == tv for k, tv in zip(model, ref))
    with open(tmp_path / "densecl.pkl", "wb") as f:
        pickle.dump({"model": model, "__author__": "DenseCL", "matching_heuristics": True}, f)
    sd = load_densecl(tmp_path / "densecl.pkl", "resnet18")
    assert all(torch.equal(sd[k], ref[k]) for k in ref)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_malicious_pickle_is_refused(tmp_path):
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump({"model": {"stem.conv1.weight": _Evil()}}, f)
    with pytest.raises(CheckpointError, match="refused to load.*system"):
        load_densecl(tmp_path / "evil.pkl", "resnet18")
    torch.save({"state_dict": {"conv1.weight": _Evil()}}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="weights_only"):
        load_densecl(tmp_path / "evil.pth", "resnet18")
    assert not (tmp_path / "pwned").exists() and not os.path.exists("pwned")


def test_missing_and_mismatched_keys_are_named(tmp_path):
    ref = _reference_state()
    ref.pop("layer4.1.bn2.running_var")
    ref["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    torch.save({"state_dict": ref}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as err:
        load_densecl(tmp_path / "bad.pth", "resnet18")
    msg = str(err.value)
    assert "layer4.1.bn2.running_var" in msg and "conv1.weight" in msg and "(64, 3, 7, 7)" in msg
    with pytest.raises(CheckpointError, match="resnet50"):
        load_densecl(tmp_path / "bad.pth", "resnet50")
    with pytest.raises(CheckpointError, match="no such file"):
        load_densecl(tmp_path / "none.pth", "resnet18")


def test_backbone_file_roundtrip_and_dilation(tmp_path):
    ref = _reference_state()
    save_backbone(tmp_path / "b.pt", "resnet18", ref, source="test")
    trunk = load_backbone(tmp_path / "b.pt", output_stride=16).eval()
    assert all(torch.equal(trunk.state_dict()[k], v) for k, v in ref.items())
    with torch.no_grad():
        out = trunk(torch.randn(1, 3, 64, 64))
    assert out["c5"].shape == (1, 512, 4, 4) and out["c4"].shape == (1, 256, 4, 4)
    assert set(trunk_state_keys("resnet18")) == set(ref)
