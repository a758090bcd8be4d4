import json
import os
import socket
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from efsolo.config import FreeMaskParams, FreeMaskRuntime
from efsolo.freemask import free_mask
from efsolo.modeling.backbone import ResNetTrunk, save_backbone
from efsolo.freemask.sharding import merge_shards, mine, shard_slices

SETTINGS = FreeMaskParams(feature_level="c3", trunk_output_stride=32, short_side=64, max_side=96, query_scales=(0.5,),
                          mask_threshold=0.5, min_pixels=1, nms="matrix", nms_sigma=2.0, fast_nms_iou=0.5, keep_top=5,
                          pre_nms_top=0, score_threshold=0.0, max_box_width=1.0, top_exclude=0.0, embed_dim=8,
                          embed_method="linear")


def test_shard_slices_and_ownership():
    assert shard_slices(5, 2) == [slice(0, 2), slice(2, 4), slice(4, 5)]
    assert shard_slices(5, 0) == shard_slices(5, 9) == [slice(0, 5)]
    assert mine(5, 0, 2) == [0, 2, 4] and mine(5, 1, 2) == [1, 3] and mine(1, 1, 2) == []


def _setup(tmp_path):
    rng = np.random.default_rng(0)
    records = []
    for i in range(5):
        p = tmp_path / "img" / f"{i}.png"
        p.parent.mkdir(exist_ok=True)
        h, w = (48, 64) if i % 2 else (64, 64)
        cv2.imwrite(str(p), rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        records.append({"id": i + 1, "file_name": str(p), "width": w, "height": h, "sha256": str(i)})
    (tmp_path / "img" / "3.png").write_bytes(b"broken")
    for split in ("train", "val"):
        (tmp_path / f"{split}.json").write_text(json.dumps({"images": records}))
    torch.manual_seed(0)
    save_backbone(tmp_path / "backbone.pt", "resnet18", ResNetTrunk("resnet18").state_dict(), source="test")
    return tmp_path


def _label(root, out, shard_size, **kw):
    return free_mask.label_dataset(root / "train.json", root / "val.json", root / "backbone.pt", out,
                                   settings=SETTINGS, runtime=FreeMaskRuntime(batch_size=2, shard_size=shard_size),
                                   seed=0, device=torch.device("cpu"), shard_dir=out / "shards", **kw)


def _outputs(out):
    with np.load(out / "train_embeddings.npz") as z:
        return json.loads((out / "train.json").read_text()), z["ann_ids"], z["embeddings"]


def test_shards_merge_like_one_pass_and_resume_shard_by_shard(tmp_path, monkeypatch):
    root = _setup(tmp_path)
    whole = _label(root, tmp_path / "whole", 0)
    assert whole["train"]["shards"] == 1 and len(whole["train"]["skipped"]) == 1
    assert whole["feature_level"] == SETTINGS.feature_level and whole["concat_levels"] == []
    sharded = _label(root, tmp_path / "sharded", 2)
    assert sharded["train"]["shards"] == 3 and sharded["train"]["masks"] == whole["train"]["masks"] > 0
    a, ids_a, emb_a = _outputs(tmp_path / "whole")
    b, ids_b, emb_b = _outputs(tmp_path / "sharded")
    # batches differ between shardings: scores agree to float rounding, masks exactly
    key = lambda ann: (ann["image_id"], round(ann["score"], 4), ann["segmentation"]["counts"])  # noqa: E731
    assert sorted(map(key, a["annotations"])) == sorted(map(key, b["annotations"]))
    assert [x["id"] for x in b["annotations"]] == list(ids_b) == list(range(1, len(ids_b) + 1))
    order = {key(x): i for i, x in enumerate(a["annotations"])}  # embeddings follow their annotations
    assert np.allclose(emb_b, emb_a[[order[key(x)] for x in b["annotations"]]], atol=2e-3)
    # an interrupted run: one train shard missing -> only that shard is labelled again
    (tmp_path / "sharded" / "shards" / "train-00001.json").unlink()
    calls = []
    real = free_mask.label_split
    monkeypatch.setattr(free_mask, "label_split", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    _label(root, tmp_path / "sharded", 2)
    assert calls == ["free mask train shard 2/3"]
    assert _outputs(tmp_path / "sharded")[0] == b
    # other settings: every shard again
    calls.clear()
    free_mask.label_dataset(root / "train.json", root / "val.json", root / "backbone.pt", tmp_path / "sharded",
                            settings=replace(SETTINGS, keep_top=3), runtime=FreeMaskRuntime(batch_size=2, shard_size=2),
                            seed=0, device=torch.device("cpu"), shard_dir=tmp_path / "sharded" / "shards")
    assert len(calls) == 6


def test_processes_share_the_shards(tmp_path, monkeypatch):
    """Two processes (rank 1 first, then rank 0, which merges) give the single-process result."""
    root = _setup(tmp_path)
    _label(root, tmp_path / "one", 2)
    monkeypatch.setattr(torch.distributed, "barrier", lambda: None)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    for rank in (1, 0):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        stats = _label(root, tmp_path / "two", 2)
        assert ("train" in stats) == (rank == 0)
    assert sorted(p.name for p in (tmp_path / "two" / "shards").glob("train-*.json")) == [
        "train-00000.json", "train-00001.json", "train-00002.json"]
    assert _outputs(tmp_path / "two")[0] == _outputs(tmp_path / "one")[0]


def _worker(rank, port, root):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    _label(Path(root), Path(root) / "two", 2)
    torch.distributed.destroy_process_group()


def test_two_processes_label_and_merge_like_one(tmp_path):
    """Two real processes (gloo barrier between labelling and merging), as under torchrun."""
    root = _setup(tmp_path)
    _label(root, tmp_path / "one", 2)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_worker, args=(port, str(root)), nprocs=2, join=True)
    two, one = _outputs(tmp_path / "two")[0], _outputs(tmp_path / "one")[0]
    # the workers run 1 thread each: on CPUs where oneDNN splits reductions by thread (avx512), scores
    # differ in the 7th digit; everything else, masks included, is exact
    scores = lambda d: np.array([a.pop("score") for a in d["annotations"]])  # noqa: E731
    assert np.allclose(scores(two), scores(one), rtol=0, atol=1e-5)
    assert two == one
