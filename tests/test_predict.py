import json

import cv2
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from efsolo.cli import app
from efsolo.data.coco_format import decode_mask, mask_box
from efsolo.utils.errors import EfsoloError
from efsolo.evaluation.predict import collect_images, predict_folder
from efsolo.modeling.solo_model import SOLO, SOLOArch
from efsolo.modeling.inference import TestSettings as Settings
from efsolo.modeling.model_io import model_test_settings, save_model


@pytest.fixture()
def model_file(tmp_path):
    """A tiny network whose every cell is confident and whose kernels all pick mask channel 0."""
    torch.manual_seed(0)
    model = SOLO(SOLOArch(backbone="resnet18", fpn_channels=16, head_channels=16, head_convs=1, mask_channels=16,
                          kernel_dim=8, embed_dim=4, grids=(8, 6, 4, 3, 2)))
    with torch.no_grad():
        model.head.cate_pred.bias.fill_(5.0)
        model.head.kernel_pred.weight.zero_()
        model.head.kernel_pred.bias.copy_(torch.tensor([8.0, 0, 0, 0, 0, 0, 0, 0]))
    path = tmp_path / "model.pt"
    save_model(path, model, {"input_size": [64, 96]})
    return path


def _images(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "a" / "sub").mkdir(parents=True)
    (tmp_path / "b").mkdir()
    cv2.imwrite(str(tmp_path / "a" / "x.png"), rng.integers(0, 255, (40, 50, 3), dtype=np.uint8))
    cv2.imwrite(str(tmp_path / "a" / "sub" / "y.jpg"), rng.integers(0, 255, (30, 30, 3), dtype=np.uint8))
    cv2.imwrite(str(tmp_path / "b" / "x.png"), rng.integers(0, 255, (20, 60), dtype=np.uint8))  # gray, same stem
    (tmp_path / "a" / "broken.jpg").write_bytes(b"\xff\xd8 not really")


def test_predict_writes_coco_results_overlays_and_skips_corrupt_files(tmp_path, model_file):
    _images(tmp_path)
    out = tmp_path / "out"
    summary = predict_folder(model_file, [str(tmp_path / "a"), str(tmp_path / "b" / "x.png")], out)
    assert summary["images"] == 3 and summary["skipped"] == 1 and summary["instances"] > 0
    skipped = json.loads((out / "skipped.json").read_text())
    assert skipped[0]["file"].endswith("broken.jpg") and "not a readable image" in skipped[0]["reason"]
    images = json.loads((out / "images.json").read_text())["images"]
    assert [i["overlay"] for i in images] == ["overlays/y.png", "overlays/x.png", "overlays/x-2.png"]
    sizes = {i["id"]: (i["height"], i["width"]) for i in images}
    results = json.loads((out / "results.json").read_text())
    for r in results:
        m = decode_mask(r["segmentation"])
        assert m.shape == sizes[r["image_id"]] and r["bbox"] == mask_box(m) and 0 < r["score"] <= 1
    for i in images:
        ov = cv2.imread(str(out / i["overlay"]))
        assert ov.shape[:2] == (i["height"], i["width"])
    from pycocotools.coco import COCO  # the results load as COCO results against images.json
    gt = COCO()
    gt.dataset = {"images": images, "annotations": [], "categories": [{"id": 1, "name": "object"}]}
    gt.createIndex()
    assert len(gt.loadRes(results).getAnnIds()) == len(results)


def test_predict_cli_and_input_errors(tmp_path, model_file):
    _images(tmp_path)
    res = CliRunner().invoke(app, ["predict", str(tmp_path / "b"), "--model", str(model_file), "--out",
                                   str(tmp_path / "o"), "--no-overlays", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "1 images" in res.output and not (tmp_path / "o" / "overlays").exists()
    res = CliRunner().invoke(app, ["predict", str(tmp_path / "nope"), "--model", str(model_file), "--out", "o"])
    assert res.exit_code == 1 and "nope: no such file or folder" in res.output
    with pytest.raises(EfsoloError, match="no images"):
        collect_images([])
    # a model that is not a torch file (params.yaml given by mistake): one line naming it
    not_torch = tmp_path / "params.yaml"
    not_torch.write_text("seed: 0\n")
    res = CliRunner().invoke(app, ["predict", str(tmp_path / "b"), "--model", str(not_torch), "--out", "o"])
    assert res.exit_code == 1
    assert res.output.strip() == f"error: {not_torch}: not an efsolo model file (not a torch file)"


def test_predict_defaults_to_the_inference_settings_the_model_records(tmp_path, model_file):
    """A model file that records none gets the defaults at its training input size; one that
    records its stage's settings gets those, and the CLI's options override single fields."""
    assert model_test_settings(model_file) == Settings(short_side=64, max_side=96)
    blob = torch.load(model_file, weights_only=True)
    blob["meta"]["test"] = {"short_side": 48, "max_side": 96, "max_per_image": 2, "maskness_power": 4.0}
    recorded = tmp_path / "recorded.pt"
    torch.save(blob, recorded)
    assert model_test_settings(recorded) == Settings(short_side=48, max_side=96, max_per_image=2, maskness_power=4.0)
    _images(tmp_path)
    scores = {}
    for name, extra in (("own", []), ("override", ["--max-per-image", "100", "--maskness-power", "1"])):
        res = CliRunner().invoke(app, ["predict", str(tmp_path / "b"), "--model", str(recorded), "--out",
                                       str(tmp_path / name), "--no-overlays", "--device", "cpu", *extra])
        assert res.exit_code == 0, res.output
        scores[name] = [r["score"] for r in json.loads((tmp_path / name / "results.json").read_text())]
    assert len(scores["own"]) == 2 and len(scores["override"]) > 2
    assert max(scores["own"]) < max(scores["override"])  # maskness < 1, so its 4th power lowers scores


def test_a_model_file_from_before_the_backbone_key_loads(tmp_path, model_file):
    """Files written when SOLOArch named its trunk ``arch`` (before ``backbone``) load unchanged."""
    from efsolo.modeling.model_io import load_model

    blob = torch.load(model_file, weights_only=True)
    blob["arch"] = {("arch" if k == "backbone" else k): v for k, v in blob["arch"].items()}
    old = tmp_path / "old.pt"
    torch.save(blob, old)
    model = load_model(old)
    assert model.arch.backbone == "resnet18"
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), load_model(model_file).state_dict().values()))
