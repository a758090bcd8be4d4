import json

import numpy as np

from efsolo.config import DataParams, SyntheticParams
from efsolo.data import datasets
import pytest
import torch

from efsolo.exemplars.crops import choose_mask, contact_sheet, grabcut_crop, largest_component, run_crops, run_refine


def _one_object(h=80, w=100):
    rng = np.random.default_rng(0)
    img = (rng.normal(110, 6, (h, w, 3))).clip(0, 255).astype(np.uint8)  # grey noisy background
    img[30:60, 40:75] = (220, 40, 40)  # one red object
    return img


def test_grabcut_crop_finds_the_object():
    crop, coarse, box = grabcut_crop(_one_object(), rect_margin=0.05, iterations=5, crop_margin=0.0)
    x, y, w, h = box
    assert abs(x - 40) <= 2 and abs(y - 30) <= 2 and abs(w - 35) <= 3 and abs(h - 30) <= 3
    assert crop.shape[:2] == coarse.shape == (h, w)
    assert coarse.mean() > 0.8


def test_grabcut_without_foreground_returns_none():
    assert grabcut_crop(np.full((40, 40, 3), 128, np.uint8)) is None


def test_choose_mask_rule():
    coarse = np.zeros((10, 10), bool)
    coarse[2:8, 2:8] = True
    inside = np.zeros((10, 10), bool)
    inside[3:6, 3:6] = True
    outside = np.zeros((10, 10), bool)
    outside[0:2, :] = True
    half = np.zeros((10, 10), bool)
    half[2:8, 5:10] = True  # 18 of 30 pixels inside (0.6)
    masks = np.stack([outside, inside, half])
    assert choose_mask(masks, np.array([0.9, 0.5, 0.7]), coarse, 0.5) == 2  # best score among those inside
    assert choose_mask(masks, np.array([0.9, 0.5, 0.7]), coarse, 0.7) == 1
    assert choose_mask(masks[:1], np.array([0.9]), coarse, 0.5) is None
    assert choose_mask(np.zeros((0, 10, 10), bool), np.zeros(0), coarse, 0.5) is None


def test_run_crops_is_seeded_and_lists_what_it_writes(tmp_path):
    datasets.prepare_dataset(tmp_path / "data", DataParams(synthetic=SyntheticParams(num_train=6, num_val=1, image_size=64)), seed=0)
    a = run_crops(tmp_path / "data" / "train.json", tmp_path / "a", num_images=4, seed=3, rect_margin=0.05,
                  iterations=3, crop_margin=0.1)
    run_crops(tmp_path / "data" / "train.json", tmp_path / "b", num_images=4, seed=3, rect_margin=0.05,
              iterations=3, crop_margin=0.1)
    ja, jb = (json.loads((tmp_path / d / "crops.json").read_text()) for d in "ab")
    assert [c["image_id"] for c in ja["crops"]] == [c["image_id"] for c in jb["crops"]]
    assert a["crops"] + a["skipped"] == 4 and (tmp_path / "a" / "crops_sheet.png").exists()
    assert contact_sheet([np.zeros((5, 9, 3), np.uint8)] * 3, tile=16, columns=2).shape == (32, 32, 3)


def test_largest_component():
    m = np.zeros((8, 8), bool)
    m[0:2, 0:2] = True
    m[4:8, 4:7] = True
    assert largest_component(m).sum() == 12 and largest_component(m)[5, 5]
    assert not largest_component(np.zeros((3, 3), bool)).any()


@pytest.mark.parametrize("fallback", ["grabcut", "none"])
def test_refine_falls_back_to_the_grabcut_mask_and_reports_sources(tmp_path, fallback):
    """A FreeSOLO that predicts nothing (score threshold 1) must not empty the pool silently."""
    from efsolo.modeling.inference import TestSettings
    from efsolo.modeling.solo_model import SOLO, SOLOArch
    from efsolo.modeling.model_io import save_model

    datasets.prepare_dataset(tmp_path / "data", DataParams(synthetic=SyntheticParams(num_train=6, num_val=1, image_size=64)), seed=0)
    crops = run_crops(tmp_path / "data" / "train.json", tmp_path / "ex", num_images=4, seed=3, rect_margin=0.05,
                      iterations=3, crop_margin=0.1)["crops"]
    torch.manual_seed(0)
    arch = SOLOArch(backbone="resnet18", fpn_channels=16, head_channels=16, head_convs=1, mask_channels=16, kernel_dim=8,
                    embed_dim=4, grids=(8, 6, 4, 3, 2))
    save_model(tmp_path / "m.pt", SOLO(arch), {"input_size": [64, 64]})
    out = run_refine(tmp_path / "ex" / "crops.json", tmp_path / "m.pt", tmp_path / "ex",
                     TestSettings(short_side=64, max_side=64, score_threshold=1.0), 0.5, torch.device("cpu"), fallback=fallback)
    pool = json.loads((tmp_path / "ex" / "pool.json").read_text())
    if fallback == "grabcut":
        assert out["exemplars"] == out["from_grabcut"] == crops > 0 and out["from_freesolo"] == 0
        e = pool["exemplars"][0]
        assert e["source"] == "grabcut" and len(e["box"]) == 4 and len(e["image_size"]) == 2
    else:
        assert out["exemplars"] == 0 and out["dropped"] == crops
    assert pool["sources"] == {"freesolo": out["from_freesolo"], "grabcut": out["from_grabcut"]}
