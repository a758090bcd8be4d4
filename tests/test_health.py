"""The training health check: with the demo's own settings (params.yaml), training fits one fixed
batch of demo images and their Free Mask pseudo-labels. Every mask term must fall by a margin,
the predicted masks' IoU with the pseudo masks must rise, and the masks must not collapse to
constants (which satisfy the pairwise term trivially while the projection terms get worse).
It must hold at the demo's learning rate and at twice it: a schedule on the edge of
divergence gives a different outcome on every machine and seed (the committed lr of 0.01
fitted the batch, but at 0.02 the average projection did not move).

The images, the backbone and the pseudo-labels come from the pipeline's own stages at the
demo's settings, on the demo's 320 training images (4 val images): a random trunk with
ground-truth masks does not show the failure; the self-supervised one with Free Mask's large
masks does. The trunk must be the demo's: pretrained on 32 images instead, 300 iterations are
300 epochs, and on that over-fitted trunk the fit collapses at the demo's lr where the demo's
own trunk fits at 1x, 2x and fails at 10x (the lr of 0.01 at twice it).

A fixed batch does not show every failure: on the photo look's whole training set the pairwise
term, at full weight too early, made every mask a constant, so a second check trains on the
whole set and requires the masks to keep their shape.
"""
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from efsolo import pipeline
from efsolo.utils.seeding import seed_everything
from efsolo.config import params_from_dict
from efsolo.engine.health import mask_fit
from efsolo.data.pseudo_labels import PseudoLabelSet, make_batch
from efsolo.engine.train import train
from efsolo.modeling.model_io import build_model, load_model

REPO = Path(__file__).resolve().parents[1]
ITERS = 60
IMAGES = 4


def _build(tmp_path_factory, look: str, seed: int | None = None, trunk: Path | None = None):
    """(params, working folder) after the data, backbone and freemask stages of the demo, with
    ``look``'s synthetic images (4 val images), at ``seed`` (None: the demo's); with ``trunk``,
    that backbone file instead of a pretraining (the expensive stage: one for the module)."""
    root = tmp_path_factory.mktemp(f"health_{look}")
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["runtime"]["device"] = "cpu"
    raw["data"]["synthetic"].update(num_val=4, look=look)
    if seed is not None:
        raw["seed"] = seed
    p = params_from_dict(raw)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        pipeline.data(p)
        if trunk is None:
            pipeline.backbone(p)
        else:
            target = pipeline.Layout(p.paths).model("backbone")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(trunk, target)
        pipeline.freemask(p)
    return p, root


@pytest.fixture(scope="module")
def demo_like(tmp_path_factory):
    """The default look's demo up to Free Mask."""
    return _build(tmp_path_factory, "gradient")


@pytest.fixture(scope="module")
def photo_like(tmp_path_factory, demo_like):
    """The photo look's demo up to Free Mask, at development seed 3: the seed whose training
    collapsed (seed 0's did not within these iterations; no reported seed is used). Its Free Mask
    runs on the default look's demo trunk: the collapse comes from the photographs' colour-similar
    neighbours in the pairwise term, and this check still fails with the old warm-up of 40 on it."""
    p, root = demo_like
    return _build(tmp_path_factory, "photo", seed=3, trunk=root / pipeline.Layout(p.paths).model("backbone"))


def _pseudo_labels(p, count: int) -> tuple[Path, Path, PseudoLabelSet, list[int]]:
    """Free Mask's training labels and embeddings (paths, relative to the working folder), the
    label set, and its first ``count`` images with at least one label."""
    pseudo = pipeline.Layout(p.paths).freemask
    labels, emb = pseudo / "train.json", pseudo / "train_embeddings.npz"
    data = PseudoLabelSet(labels, emb)
    chosen = [i for i in range(len(data)) if data.load(i)[1].shape[0]][:count]
    assert len(chosen) == count, "Free Mask found objects on too few images"
    return labels, emb, data, chosen


@pytest.mark.parametrize("lr_factor", [1, 2])
def test_demo_training_settings_fit_one_fixed_batch(demo_like, monkeypatch, lr_factor):
    p, root = demo_like
    monkeypatch.chdir(root)
    labels, emb, data, chosen = _pseudo_labels(p, IMAGES)
    # the batch is the whole training set: every iteration trains on the same images (views vary)
    subset = root / "subset.json"
    full = json.loads(labels.read_text())
    ids = {data.images[i]["id"] for i in chosen}
    full["images"] = [r for r in full["images"] if r["id"] in ids]
    full["annotations"] = [a for a in full["annotations"] if a["image_id"] in ids]
    subset.write_text(json.dumps(full))
    kw = pipeline.solo_training_kwargs(p, emb)
    kw.update(solver=replace(kw["solver"], iters=ITERS, batch_size=IMAGES, lr=kw["solver"].lr * lr_factor),
              runtime=replace(kw["runtime"], log_every=ITERS, checkpoint_every=ITERS))
    batch = make_batch([data.load(i) for i in chosen], max(kw["inputs"].train_short_sides), kw["inputs"].max_side, [False] * IMAGES)
    seed_everything(kw["seed"])  # the initial network train() starts from
    before = mask_fit(build_model(kw["arch"], kw["backbone"]), batch, kw["losses"], 10**9)
    out = root / f"fit_lr{lr_factor}"
    train(labels=subset, embeddings=emb, out_path=out / "model.pt", ckpt_dir=out / "ckpt", live_dir=out / "live",
          device=torch.device("cpu"), **kw)
    after = mask_fit(load_model(out / "model.pt"), batch, kw["losses"], 10**9)

    report = {k: (round(before[k], 3), round(after[k], 3)) for k in ("max_proj", "avg_proj", "pairwise", "iou", "spread")}
    print(f"health check at {lr_factor} x lr (before, after):", report)
    assert before["positives"] > 0, report
    assert after["max_proj"] < 0.7 * before["max_proj"], report
    assert after["avg_proj"] < 0.7 * before["avg_proj"], report
    assert after["pairwise"] < 0.9 * before["pairwise"], report
    assert after["iou"] > before["iou"] + 0.15, report
    assert after["spread"] > 0.15, report  # not near-constant masks


def test_demo_training_settings_do_not_collapse_on_the_photo_look(photo_like, monkeypatch):
    """The first iterations of the demo's training on the photo look's whole training set (not one
    batch): the masks must keep their shape. With the pairwise term at full weight after 40
    iterations (it was the demo's warm-up), photographs' many colour-similar neighbours made every
    mask a constant within 30 iterations (spread 0.16 -> 0.00, max projection 0.91 -> 0.93, IoU
    0.09 -> 0.09), and the self-trained model scored 0 val AP at 200 and 400 iterations; with the
    warm-up of 500: spread 0.37, max projection 0.59, IoU 0.20."""
    p, root = photo_like
    monkeypatch.chdir(root)
    labels, emb, data, chosen = _pseudo_labels(p, IMAGES)
    kw = pipeline.solo_training_kwargs(p, emb)
    kw.update(solver=replace(kw["solver"], iters=ITERS), runtime=replace(kw["runtime"], log_every=ITERS, checkpoint_every=ITERS))
    batch = make_batch([data.load(i) for i in chosen], max(kw["inputs"].train_short_sides), kw["inputs"].max_side, [False] * IMAGES)
    seed_everything(kw["seed"])
    before = mask_fit(build_model(kw["arch"], kw["backbone"]), batch, kw["losses"], 10**9)
    out = root / "fit_full"
    train(labels=labels, embeddings=emb, out_path=out / "model.pt", ckpt_dir=out / "ckpt", live_dir=out / "live",
          device=torch.device("cpu"), **kw)
    after = mask_fit(load_model(out / "model.pt"), batch, kw["losses"], 10**9)

    report = {k: (round(before[k], 3), round(after[k], 3)) for k in ("max_proj", "avg_proj", "pairwise", "iou", "spread")}
    print("photo look, whole training set (before, after):", report)
    assert before["positives"] > 0, report
    assert after["spread"] > 0.15, report  # not near-constant masks
    assert after["max_proj"] < 0.8 * before["max_proj"], report
    assert after["iou"] > before["iou"] + 0.05, report
