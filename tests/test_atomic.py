import json

import pytest
import torch

from efsolo.utils import atomic


def test_equal_objects_give_identical_files(tmp_path):
    """Outputs are content-addressed by DVC: the same weights must give the same bytes, whatever
    temporary name the write went through."""
    obj = {"format": "x", "state_dict": {"w": torch.arange(6.0).view(2, 3)}, "meta": {"iters": 3}}
    a, b = atomic.torch_save(obj, tmp_path / "a.pt"), atomic.torch_save(obj, tmp_path / "sub" / "b.pt")
    assert a.read_bytes() == b.read_bytes()
    assert torch.equal(torch.load(a, weights_only=True)["state_dict"]["w"], obj["state_dict"]["w"])
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.pt", "b.pt", "sub"]  # no temporary left


def test_a_failed_write_keeps_the_previous_file(tmp_path):
    path = atomic.write_json(tmp_path / "m.json", {"ok": 1})

    def broken(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic.write_with(path, broken)
    assert json.loads(path.read_text()) == {"ok": 1} and [p.name for p in tmp_path.iterdir()] == ["m.json"]
