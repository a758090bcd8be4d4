import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from efsolo.modeling.backbone import ResNetTrunk
from efsolo.exemplars.eec import (POOL_FORMAT, EECModule, ExemplarFeatures, ExemplarObject, NEUTRAL_RGB, eec_loss,
                                  engaged_fraction, exemplar_view, guide_filter, image_cosines, literal_cap,
                                  pooled_queries, selection_thresholds)


def _unit(*rows):
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=1)


def test_eec_loss_matches_the_formula():
    emb = _unit([1.0, 0.0, 0.0])
    pool = _unit([1.0, 0.1, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.6, 0.8, 0.0])
    tau = 0.5
    loss, stats = eec_loss(emb, pool, alpha=0.8, beta=0.3, tau=tau)
    cos = (emb @ pool.T)[0]
    pos = math.exp(cos[0].item() / tau)  # the only exemplar above alpha
    neg = (math.exp(cos[1].item() / tau) + math.exp(cos[2].item() / tau)) / 2  # the two below beta (0.6 is neither)
    assert loss.item() == pytest.approx(-math.log(pos / (pos + neg)), rel=1e-5)
    assert stats["frac_used"].item() == 1.0 and stats["mean_pos"].item() == 1 and stats["mean_neg"].item() == 2


def test_eec_loss_sums_over_rows_and_draws_a_positive_at_random():
    emb = _unit([1.0, 0.0], [1.0, 0.0])
    pool = _unit([1.0, 0.05], [1.0, -0.05], [0.0, 1.0])
    one, _ = eec_loss(emb[:1], pool, 0.8, 0.3, 0.1, torch.Generator().manual_seed(0))
    two, _ = eec_loss(emb, pool, 0.8, 0.3, 0.1, torch.Generator().manual_seed(0))
    assert two.item() == pytest.approx(2 * one.item(), rel=1e-4)  # both positives have the same cosine
    picks = set()
    for s in range(20):
        g = torch.Generator().manual_seed(s)
        r = torch.rand(1, 3, generator=g)
        picks.add(int(torch.where(torch.tensor([[True, True, False]]), r, torch.full_like(r, -1)).argmax()))
    assert picks == {0, 1}


def test_eec_fractions_count_the_images_without_a_guide_mask():
    """Rows are the images' guide masks; with ``slots`` (the batch's images x instances) the
    fractions are of the images, so those whose guide masks were all filtered out count as not
    engaged; the loss itself does not change."""
    emb = _unit([1.0, 0.0, 0.0], [1.0, 0.0, 0.0])
    pool = _unit([1.0, 0.1, 0.0], [0.0, 1.0, 0.0])
    by_rows, stats = eec_loss(emb, pool, alpha=0.8, beta=0.3, tau=0.5)
    assert stats["frac_used"].item() == 1.0 and stats["frac_embedded"].item() == 1.0
    by_images, stats = eec_loss(emb, pool, alpha=0.8, beta=0.3, tau=0.5, slots=8)  # 2 of 8 views kept a mask
    assert by_images.item() == by_rows.item()
    assert stats["frac_embedded"].item() == 0.25 and stats["frac_used"].item() == 0.25
    assert stats["frac_pos"].item() == 0.25 and stats["frac_neg"].item() == 0.25
    assert stats["mean_pos"].item() == 1 and stats["mean_neg"].item() == 1  # counts a row, not a slot
    _, none = eec_loss(torch.zeros(0, 3), pool, 0.8, 0.3, 0.5, slots=8)  # no image kept a mask
    assert none["frac_embedded"].item() == 0.0 and none["frac_used"].item() == 0.0
    with pytest.raises(ValueError, match="2 rows from 1 slots"):
        eec_loss(emb, pool, 0.8, 0.3, 0.5, slots=1)
    cos = np.array([[0.9, 0.1], [0.9, 0.5], [0.2, 0.1]])  # row 0 alone engages at 0.8 / 0.3
    assert engaged_fraction(cos, 0.8, 0.3) == pytest.approx(1 / 3)
    assert engaged_fraction(cos, 0.8, 0.3, slots=10) == pytest.approx(0.1)  # 7 of 10 images had no guide mask
    assert engaged_fraction(np.zeros((0, 2)), 0.8, 0.3, slots=10) == 0.0


def test_no_positive_or_no_negative_gives_zero_with_gradient():
    emb = _unit([1.0, 0.0]).requires_grad_()
    only_neg = _unit([0.0, 1.0])
    loss, stats = eec_loss(emb, only_neg, 0.8, 0.3, 0.02)
    assert loss.item() == 0.0 and stats["frac_pos"].item() == 0.0 and stats["frac_neg"].item() == 1.0
    loss.backward()
    assert emb.grad is not None
    only_pos = _unit([1.0, 0.01])
    assert eec_loss(emb, only_pos, 0.8, 0.3, 0.02)[0].item() == 0.0
    empty, stats = eec_loss(torch.zeros(0, 2), only_pos, 0.8, 0.3, 0.02)
    assert empty.item() == 0.0 and stats["frac_used"].item() == 0.0


def test_module_starts_as_identity_and_embeddings_are_unit():
    m = EECModule(4, upsample=2)
    f = torch.randn(2, 4, 5, 5)
    q = m.queries(f)
    assert q.shape == (2, 4, 10, 10) and torch.allclose(m.conv(q), q, atol=1e-6)
    p = torch.randn(3, 4)
    assert torch.allclose(m.exemplar_embeddings(p), F.normalize(p, dim=1), atol=1e-6)
    emb, owner, slot = m.image_embeddings(f, 1, query_scales=(0.5,), mask_threshold=0.5)
    assert emb.shape[1] == 4 and torch.allclose(emb.norm(dim=1), torch.ones(len(emb)), atol=1e-5)
    assert set(owner.tolist()) <= {0, 1} and set(slot.tolist()) == {0}
    emb3, owner3, _ = m.image_embeddings(f, 3, query_scales=(0.5,), mask_threshold=0.5)
    assert len(emb3) >= len(emb)


def test_pooled_queries_shape_and_alignment():
    torch.manual_seed(0)
    trunk = ResNetTrunk("resnet18").eval()
    rng = np.random.default_rng(0)
    objs = [(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8), np.ones((40, 50), bool)) for _ in range(3)]
    with torch.no_grad():
        pooled = pooled_queries(trunk, objs, "c4", 2, 64, 96, torch.device("cpu"))
        alone = pooled_queries(trunk, objs[1:2], "c4", 2, 64, 96, torch.device("cpu"))
    assert pooled.shape == (3, 256)
    assert torch.allclose(pooled[1], alone[0], atol=1e-5)  # row k is exemplar k


def test_positive_draw_does_not_depend_on_sharding():
    emb = _unit([1.0, 0.0], [0.9, 0.1], [1.0, 0.05], [0.95, 0.0])
    pool = _unit([1.0, 0.02], [1.0, -0.02], [1.0, 0.04], [0.0, 1.0])
    whole, _ = eec_loss(emb, pool, 0.8, 0.3, 0.1, torch.Generator().manual_seed(5), torch.arange(4), 4)
    parts = sum(eec_loss(emb[r], pool, 0.8, 0.3, 0.1, torch.Generator().manual_seed(5), r, 4)[0]
                for r in (torch.tensor([0, 2]), torch.tensor([1, 3])))
    assert whole.item() == pytest.approx(parts.item(), rel=1e-6)


def test_the_literal_loss_is_capped_and_the_projection_loss_is_not():
    """Paper read literally: logits = the selecting cosines / tau, so a used row's loss is at most
    log(1 + exp(-(alpha - beta) / tau)): 1.4e-11 at 0.8 / 0.3 / 0.02."""
    assert literal_cap(0.8, 0.3, 0.02) == pytest.approx(1.3888e-11, rel=1e-3)
    assert literal_cap(0.6, 0.35, 0.02) == pytest.approx(3.73e-6, rel=1e-2)
    g = torch.Generator().manual_seed(0)
    emb = F.normalize(torch.randn(64, 8, generator=g), dim=1)
    pool = F.normalize(torch.randn(16, 8, generator=g), dim=1)
    loss, stats = eec_loss(emb, pool, 0.5, 0.0, 0.02)
    used = stats["frac_used"].item() * 64
    assert used > 0 and loss.item() <= used * literal_cap(0.5, 0.0, 0.02) + 1e-9
    # the same selection with logits from elsewhere (a projection) is not capped
    logits = torch.zeros(64, 16)
    loss2, stats2 = eec_loss(emb, pool, 0.5, 0.0, 0.02, logits=logits)
    assert loss2.item() == pytest.approx(used * math.log(2), rel=1e-5)
    assert stats2["logit_gap"].item() == pytest.approx(0.0, abs=1e-6)


def test_projection_loss_starts_near_log2_and_training_raises_positive_similarity():
    """Images and exemplars in general position, where positives (cosine > 0.2) and negatives
    (< -0.2) exist for every image. With a projection head at temperature 1 the loss of a used row
    starts of order log 2; a few optimiser steps raise the positive's similarity in the projection
    space against the negatives' (the logit gap), and the loss falls."""
    torch.manual_seed(0)
    c = 16
    pool_q = torch.randn(12, c)
    images = torch.randn(6, c).requires_grad_()
    m = EECModule(c, 1, proj_dim=8, seed=0)
    opt = torch.optim.SGD([images, *m.parameters()], lr=0.2)
    history = []
    for step in range(25):
        centre = m.keys(pool_q.mean(0, keepdim=True))
        raw, ex = m.keys(images) - centre, m.keys(pool_q) - centre
        emb, exn = F.normalize(raw, dim=1), F.normalize(ex, dim=1)
        logits = m.project(raw) @ m.project(ex).T / 1.0
        loss, stats = eec_loss(emb, exn, 0.2, -0.2, 1.0, torch.Generator().manual_seed(0), logits=logits)
        used = stats["frac_used"].item() * 6
        history.append((loss.item() / used, stats["logit_gap"].item()))
        if step == 0:
            assert used >= 4
        opt.zero_grad()
        loss.backward()
        opt.step()
    first, last = history[0], history[-1]
    print(history[0], history[-1])
    assert 0.3 < first[0] < 1.2  # of order log 2 (0.69)
    assert last[0] < 0.7 * first[0] and last[1] > first[1] + 0.3


def test_guide_filter_applies_free_masks_filters():
    soft = torch.zeros(1, 4, 10, 10)
    soft[0, 0] = 1.0  # the whole image: too wide
    soft[0, 1, 0:2, 2:5] = 1.0  # centre in the top 20%
    soft[0, 2, 5:8, 2:5] = 1.0  # fine
    soft[0, 3, 6:9, 6:9] = 1.0  # fine, second
    scores = torch.tensor([[0.95, 0.9, 0.8, 0.75]])
    keep = guide_filter(soft, scores, 1, score_threshold=0.7, max_box_width=0.95, top_exclude=0.2)
    assert keep.tolist() == [[False, False, True, False]]
    assert guide_filter(soft, scores, 2, 0.7, 0.95, 0.2).tolist() == [[False, False, True, True]]
    assert not guide_filter(soft, scores, 1, score_threshold=0.99).any()
    assert guide_filter(soft[:, :0], scores[:, :0], 1).shape == (1, 0)


def test_guide_filter_drops_masks_along_the_border_as_free_mask_does():
    soft = torch.zeros(1, 3, 8, 8)
    soft[0, 0, 5:, :] = 1.0  # the bottom three rows: 8 + 2 * 2 of the 28 outermost pixels (0.43)
    soft[0, 1, 0:2, 0:2] = 1.0  # a corner: 2 + 1 + 1 of 28 (0.14)
    soft[0, 2, 3:5, 3:5] = 1.0  # inside: none
    scores = torch.tensor([[0.9, 0.8, 0.7]])
    assert guide_filter(soft, scores, 3).tolist() == [[True, True, True]]  # 1: off
    assert guide_filter(soft, scores, 3, max_border_fraction=0.25).tolist() == [[False, True, True]]
    assert guide_filter(soft, scores, 3, max_border_fraction=0.1).tolist() == [[False, False, True]]
    assert guide_filter(soft, scores, 1, max_border_fraction=0.25).tolist() == [[False, True, False]]
    from efsolo.freemask.free_mask import border_fraction
    for limit in (0.0, 0.1, 0.14, 0.2, 0.43, 0.5, 0.99):  # the same decision as Free Mask's own filter
        kept = guide_filter(soft, scores, 3, max_border_fraction=limit)[0].tolist()
        assert kept == [border_fraction(soft[0, k].numpy() > 0) <= limit for k in range(3)]


def test_exemplar_views():
    crop = np.full((4, 6, 3), 200, np.uint8)
    mask = np.zeros((4, 6), bool)
    mask[1:3, 1:5] = True
    obj = ExemplarObject(crop, mask, box=(10, 20, 6, 4), image_size=(40, 80))
    img, m = exemplar_view(ExemplarObject(crop, np.ones((4, 6), bool), obj.box, obj.image_size), "scene", 20, 100)
    assert img.shape == (20, 40, 3) and m.sum() == 2 * 3  # the source image's size, halved
    assert tuple(img[0, 0]) == NEUTRAL_RGB and m[10:12, 5:8].all()  # at its place: rows 20..23, cols 10..15, / 2
    _, m = exemplar_view(obj, "scene", 40, 100)
    assert m.sum() == mask.sum() and m[21:23, 11:15].all()
    img, m = exemplar_view(obj, "crop", 8, 100)
    assert img.shape == (8, 12, 3) and tuple(img[0, 0]) == (0, 0, 0) and m.sum() == 4 * 8
    img, _ = exemplar_view(ExemplarObject(crop, mask), "scene", 8, 100)  # placement unknown: neutral fill
    assert img.shape == (8, 12, 3) and tuple(img[0, 0]) == NEUTRAL_RGB


def test_exemplar_features_follow_the_trunk_with_its_fixed_stages_computed_once():
    """eec.pool_refresh: the exemplars' pooled queries under a trunk whose last stage trained equal
    those computed from scratch, with the fixed stages' output computed once (two input sizes)."""
    torch.manual_seed(0)
    trunk = ResNetTrunk("resnet18").eval()
    rng = np.random.default_rng(0)
    objs = [ExemplarObject(rng.integers(0, 255, shape + (3,), dtype=np.uint8), rng.random(shape) > 0.3)
            for shape in ((40, 50), (40, 50), (60, 40))]
    cpu = torch.device("cpu")
    features = ExemplarFeatures(objs, "crop", 64, 96, fixed_stages=4)
    before = features.pooled(trunk, "c5", 2)
    assert torch.allclose(before, pooled_queries(trunk, objs, "c5", 2, 64, 96, cpu, "crop"), atol=1e-5)
    with torch.no_grad():
        for p in trunk.layer4.parameters():
            p.add_(0.05 * torch.randn_like(p))
    after = features.pooled(trunk, "c5", 2)
    assert torch.allclose(after, pooled_queries(trunk, objs, "c5", 2, 64, 96, cpu, "crop"), atol=1e-5)
    assert not torch.allclose(after, before, atol=1e-3)


def test_selection_thresholds_absolute_and_quantile():
    cos = np.array([[0.9, 0.1, -0.2], [0.5, 0.4, 0.3], [0.2, 0.0, -0.5], [0.7, 0.6, 0.1]])
    assert selection_thresholds("absolute", 0.8, 0.3, cos) == (0.8, 0.3)
    assert engaged_fraction(cos, 0.8, 0.3) == 0.25  # row 0 alone has a cosine above 0.8
    a, b = selection_thresholds("quantile", 0.5, 0.25, cos)
    assert a == pytest.approx(0.6)  # the median of the rows' best: 0.9, 0.5, 0.2, 0.7
    assert b == pytest.approx(0.075)  # the 0.25 quantile of the 12 cosines (between 0.0 and 0.1)
    # rows 0 and 3 have a positive (> 0.6); row 0 alone also has a negative (< 0.075)
    assert engaged_fraction(cos, a, b) == 0.25
    assert selection_thresholds("quantile", 0.5, 0.3, np.zeros((0, 3))) == (1.0, -1.0)
    assert engaged_fraction(np.zeros((0, 3)), 0.5, 0.3) == 0.0


def _far_pool_cosines(centre=True):
    """Cosines of random images to a pool far from every one of them: eight exemplars bunched
    around one channel that no image's features single out."""
    torch.manual_seed(0)
    trunk = ResNetTrunk("resnet18").eval()
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (64, 64, 3), dtype=np.uint8) for _ in range(6)]
    pooled = torch.zeros(8, 512)
    pooled[:, 7] = 1.0
    pooled += 0.01 * torch.rand(8, 512, generator=torch.Generator().manual_seed(1))
    cos = image_cosines(trunk, EECModule(512, 2), images, pooled, "c5", 1, centre, 64, 64,
                        {"query_scales": (0.5,)}, None)
    return pooled, cos


def _refusal(tmp_path, monkeypatch, capsys, pooled, calibration, params) -> str:
    """Write a pool of ``pooled`` queries with ``calibration`` and ``params.yaml``, run the
    ``exemplar_freesolo`` stage, check it stops with exit code 1 and one line, and return the line."""
    import yaml

    from efsolo.pipeline import entry_point, exemplar_freesolo
    from efsolo.utils import atomic

    monkeypatch.chdir(tmp_path)
    atomic.torch_save({"format": POOL_FORMAT, "feature_level": "c5", "upsample": 2, "short_side": 64, "max_side": 64,
                       "view": "scene", "pooled_queries": pooled, "embeddings": F.normalize(pooled, dim=1),
                       "exemplars": [{}] * len(pooled), "calibration": calibration}, tmp_path / "exemplars" / "pool.pt")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(SystemExit) as stop:
        entry_point(exemplar_freesolo)("params.yaml")
    assert stop.value.code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    return err


def test_a_pool_far_from_every_image_stops_exemplar_freesolo(tmp_path, monkeypatch, capsys):
    """The paper's absolute thresholds on a pool far from every image engage the EEC on no image:
    the stage stops before training with one line naming the fraction, the cosines and the params.
    The quantile thresholds on the same cosines engage on about 1 - alpha of the images."""
    pooled, cos = _far_pool_cosines()
    assert cos.shape == (6, 8) and cos.max() < 0.8
    params = {"exemplar": {"min_pool": 1}, "eec": {"thresholds": "absolute", "alpha": 0.8, "beta": 0.3}}
    err = _refusal(tmp_path, monkeypatch, capsys, pooled, {"cosines": torch.from_numpy(cos), "images": 6, "slots": 6}, params)
    assert "engaged on 0.00% of the images" in err and "eec.min_frac_used (10%)" in err
    assert "eec.alpha 0.8" in err and "eec.thresholds: quantile" in err and "percentiles" in err
    a, b = selection_thresholds("quantile", 0.5, 0.3, cos)
    assert 0.3 <= engaged_fraction(cos, a, b) <= 0.7


def test_the_guard_counts_the_calibration_images_that_kept_no_guide_mask(tmp_path, monkeypatch, capsys):
    """The same cosines engage about half of their rows at the quantile thresholds; when the pool
    stage measured 100 images and only these 6 kept a guide mask, the EEC engages on at most 6% of
    the images: the stage stops, and its line says how many images kept a guide mask."""
    pooled, cos = _far_pool_cosines()
    calibration = {"cosines": torch.from_numpy(cos), "images": 100, "granularity": "image", "slots": 100}
    err = _refusal(tmp_path, monkeypatch, capsys, pooled, calibration, {"exemplar": {"min_pool": 1}})  # quantile
    assert "6% of them kept a guide mask" in err and "100 training images, 6 with a guide mask" in err
    a, b = selection_thresholds("quantile", 0.5, 0.3, cos)
    assert 0.3 <= engaged_fraction(cos, a, b) and engaged_fraction(cos, a, b, slots=100) <= 0.06


def test_a_pool_from_an_older_efsolo_is_refused_with_the_stage_to_rerun(tmp_path, monkeypatch, capsys):
    """A pool whose calibration does not record its slots (written before they were recorded) is
    refused with one line that names the file and the stage to re-run, not a KeyError."""
    pooled, cos = _far_pool_cosines()
    calibration = {"cosines": torch.from_numpy(cos), "images": 6, "granularity": "image"}
    err = _refusal(tmp_path, monkeypatch, capsys, pooled, calibration, {"exemplar": {"min_pool": 1}})
    assert "exemplars/pool.pt: an exemplar pool written by an older efsolo" in err and "dvc repro pool" in err


def test_the_guard_refuses_an_eec_that_went_silent_late():
    """A training whose EEC engaged early and then on no image: its mean over the run (0.2) passes
    eec.min_frac_used 0.1, its mean over the last quarter (0.0) does not; one line says which."""
    from efsolo.exemplars.eec import training_engagement_error

    cos = np.array([[0.9, 0.1], [0.2, 0.1]])
    args = ("stats.json", 0.1, "absolute", 0.8, 0.3, (0.8, 0.3), cos, "2 images")
    silent = {"iters": 900, "extra_mean": {"frac_used": 0.2}, "extra_tail_mean": {"from_iter": 675, "frac_used": 0.0}}
    err = training_engagement_error(args[0], silent, *args[1:])
    assert err is not None and "\n" not in err
    assert err.startswith("stats.json: the EEC engaged on 0.00% of the images") and "iterations 676-900" in err
    assert "went silent" in err and "eec.min_frac_used (10%)" in err
    alive = {**silent, "extra_tail_mean": {"from_iter": 675, "frac_used": 0.15}}
    assert training_engagement_error(args[0], alive, *args[1:]) is None
    never = {"iters": 900, "extra_mean": {"frac_used": 0.05}, "extra_tail_mean": {"from_iter": 675, "frac_used": 0.0}}
    assert "mean over the training's EEC iterations" in training_engagement_error(args[0], never, *args[1:])
    assert training_engagement_error(args[0], {"iters": 900}, *args[1:]) is None  # no EEC iterations: nothing to judge
    assert "lower eec.alpha" in err and "eec.weight" not in err  # no guide mask share known: the thresholds


def test_the_guard_points_at_the_weight_when_the_guide_masks_were_lost():
    """When most views lost their guide mask and most of those kept engage, no threshold can lift
    the fraction: the line says so and names eec.weight instead of the thresholds; when the guide
    masks stayed and the thresholds engage few of them, it names the thresholds (quantile mode:
    without advising the mode it already uses)."""
    from efsolo.exemplars.eec import engagement_error

    cos = np.array([[0.9, 0.1], [0.2, 0.1]])
    args = ("stats.json", 0.1, "quantile", 0.5, 0.3, (0.6, -0.2), cos, "2 images")
    lost = engagement_error(args[0], 0.0856, *args[1:], embedded=0.0869)
    assert "9% of them kept a guide mask" in lost and "too few images keep a guide mask: lower eec.weight" in lost
    assert "lower eec.alpha" not in lost
    kept = engagement_error(args[0], 0.05, *args[1:], embedded=0.9)
    assert "lower eec.alpha or raise eec.beta, or lower eec.min_frac_used" in kept and "eec.weight" not in kept
