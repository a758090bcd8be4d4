import pytest
import numpy as np
import torch

from efsolo.freemask.free_mask import (border_fraction, border_fractions, free_mask, level_features, masks_to_image, reduce_embedding,
                                       split_components)


def _two_region_features():
    """(1, 2, 4, 4): left half points along e0, right half along e1."""
    f = torch.zeros(1, 2, 4, 4)
    f[0, 0, :, :2] = 1.0
    f[0, 1, :, 2:] = 1.0
    return f


def test_free_mask_finds_the_two_regions():
    res = free_mask(_two_region_features(), query_scales=(1.0,), keep_top=20)
    assert res.soft.shape[:2] == res.scores.shape == (1, 16)
    # Every query is one of two orthogonal directions: two distinct masks with maskness 1;
    # the other 14 are exact duplicates and Matrix NMS decays them to exp(-2) of their score.
    top = res.scores[0]
    assert torch.allclose(top[:2], torch.ones(2))
    assert torch.allclose(top[2:], torch.full((14,), float(np.exp(-2.0))), atol=1e-5)
    masks = {tuple((res.soft[0, i] >= 0.5).flatten().int().tolist()) for i in range(2)}
    left = tuple([1, 1, 0, 0] * 4)
    right = tuple([0, 0, 1, 1] * 4)
    assert masks == {left, right}
    # the query vector of each mask is its region's feature
    q = res.queries[0, :2]
    assert {tuple(v.tolist()) for v in q} == {(1.0, 0.0), (0.0, 1.0)}


def test_free_mask_multi_scale_query_count_and_fast_nms():
    f = torch.randn(2, 8, 8, 8)
    res = free_mask(f, query_scales=(1.0, 0.5, 0.25), keep_top=1000, nms="fast")
    assert res.scores.shape == (2, 64 + 16 + 4)


def test_min_pixels_zeroes_tiny_masks():
    f = torch.zeros(1, 2, 2, 2)
    f[0, 0] = 1.0
    f[0, 1, 0, 0] = 5.0  # one odd pixel
    f[0, 0, 0, 0] = 0.0
    res = free_mask(f, query_scales=(1.0,), min_pixels=1, keep_top=4)
    # the single-pixel mask of the odd query scores 0
    odd = [i for i in range(4) if (res.soft[0, i] >= 0.5).sum() == 1]
    assert all(res.scores[0, i] == 0 for i in odd)


def test_masks_to_image_filters():
    soft = torch.zeros(3, 4, 4)
    soft[0, 2:, 1:3] = 1.0  # bottom centre: kept
    soft[1, 0, 1:3] = 1.0  # centre in the top 20%: dropped
    soft[2, 2:, :] = 1.0  # full width: dropped
    scores = torch.tensor([0.9, 0.9, 0.9])
    masks, kept, slots = masks_to_image(soft, scores, 8, 8, 0.7, 0.95, 0.2)
    assert slots == [0] and kept == pytest.approx([0.9])
    assert masks[0].shape == (8, 8) and masks[0][4:, 2:6].all() and masks[0].sum() == 16
    assert masks_to_image(soft, torch.tensor([0.5, 0.5, 0.5]), 8, 8, 0.7, 0.95, 0.2) == ([], [], [])


def test_split_components_largest_first_and_specks_dropped():
    m = np.zeros((6, 8), bool)
    m[0:2, 0:2] = True  # 4 px
    m[3:6, 4:8] = True  # 12 px
    m[0, 7] = True  # 1 px: below 0.1 of 17
    parts = split_components(m, 0.1)
    assert [int(p.sum()) for p in parts] == [12, 4]
    assert parts[0][3:6, 4:8].all() and parts[1][0:2, 0:2].all()
    diagonal = np.eye(3, dtype=bool)  # 8-connected: one part
    assert len(split_components(diagonal, 0.1)) == 1
    assert split_components(np.zeros((3, 3), bool), 0.1) == []


def test_masks_to_image_split_filters_each_part():
    soft = torch.zeros(1, 4, 4)
    soft[0, 2:, 0] = 1.0  # bottom left
    soft[0, 2:, 3] = 1.0  # bottom right: a second part of the same mask
    soft[0, 0, 1:3] = 1.0  # a third part in the top 20%: dropped by the box filter
    scores = torch.tensor([0.9])
    whole, _, slots = masks_to_image(soft, scores, 4, 4, 0.7, 0.95, 0.2)
    assert slots == [] and whole == []  # unsplit, the three parts' box spans the width
    parts, kept, slots = masks_to_image(soft, scores, 4, 4, 0.7, 0.95, 0.2, split=True)
    assert slots == [0, 0] and kept == pytest.approx([0.9, 0.9])
    assert [int(p.sum()) for p in parts] == [2, 2] and parts[0][2:, 0].all() and parts[1][2:, 3].all()


def test_border_fraction_counts_each_outermost_pixel_once():
    m = np.zeros((4, 5), bool)  # 14 outermost pixels: 5 + 5 on the rows, 2 + 2 on the columns
    assert border_fraction(m) == 0.0
    m[:, 0] = True  # the left column: 4 of them (its corners once)
    assert border_fraction(m) == pytest.approx(4 / 14)
    m[1:3, 1:4] = True  # inside: no change
    assert border_fraction(m) == pytest.approx(4 / 14)
    assert border_fraction(np.ones((3, 3), bool)) == 1.0


def test_border_fractions_batched_equal_each_mask_and_handle_empty_maps():
    g = torch.Generator().manual_seed(0)
    masks = torch.rand((2, 3, 4, 5), generator=g) > 0.5
    shares = border_fractions(masks)
    assert shares.shape == (2, 3) and shares.dtype == torch.float64
    for i in range(2):
        for k in range(3):
            m = masks[i, k]
            edge = torch.cat([m[0], m[-1], m[1:-1, 0], m[1:-1, -1]])
            assert shares[i, k].item() == edge.sum().item() / 14  # exact: a count over 14
            assert border_fraction(m.numpy()) == shares[i, k].item()
    assert border_fractions(torch.ones((1, 6))).item() == 1.0  # one row: its pixels, once
    assert border_fractions(torch.zeros((2, 0, 5))).tolist() == [0.0, 0.0]  # no pixels: nothing covered
    assert border_fractions(torch.zeros((0, 4, 4))).shape == (0,)  # no masks


def test_masks_to_image_drops_masks_that_run_out_of_the_picture():
    soft = torch.zeros(2, 8, 8)
    soft[0, 3:6, 3:6] = 1.0  # inside: kept
    soft[1, 4:, :3] = 1.0  # the bottom-left corner: 3 + 3 of the 28 outermost pixels (0.21)
    scores = torch.tensor([0.9, 0.8])
    _, _, slots = masks_to_image(soft, scores, 8, 8, 0.7, 0.95, 0.2)
    assert slots == [0, 1]  # off (1.0) by default
    _, _, slots = masks_to_image(soft, scores, 8, 8, 0.7, 0.95, 0.2, max_border_fraction=0.2)
    assert slots == [0]
    _, _, slots = masks_to_image(soft, scores, 8, 8, 0.7, 0.95, 0.2, max_border_fraction=0.25)
    assert slots == [0, 1]  # 0.21 is within 0.25: kept


def test_level_features_concatenates_normalised_levels_on_the_base_grid():
    g = torch.Generator().manual_seed(0)
    feats = {"c2": torch.rand(2, 4, 8, 8, generator=g), "c3": torch.rand(2, 6, 4, 4, generator=g) * 5,
             "c4": torch.rand(2, 3, 2, 2, generator=g)}
    assert torch.equal(level_features(feats, "c3"), feats["c3"])  # alone: the level as it is
    out = level_features(feats, "c3", ("c2", "c4"))
    assert out.shape == (2, 6 + 4 + 3, 4, 4)
    for block in (out[:, :6], out[:, 6:10], out[:, 10:]):  # each block unit length at every position
        assert torch.allclose(block.norm(dim=1), torch.ones(2, 4, 4), atol=1e-6)
    pooled = torch.nn.functional.avg_pool2d(feats["c2"], 2)  # the finer level: averaged over its 2x2 cells
    assert torch.allclose(out[:, 6:10], torch.nn.functional.normalize(pooled, dim=1), atol=1e-6)


def test_reduce_embedding():
    q = torch.arange(16.0).view(2, 8)
    lin = reduce_embedding(q, 4, "linear")
    assert lin.shape == (2, 4)
    assert torch.allclose(lin[0], torch.tensor([0.5, 2.5, 4.5, 6.5]))
    r1, r2 = reduce_embedding(q, 4, "random", seed=3), reduce_embedding(q, 4, "random", seed=3)
    assert torch.equal(r1, r2)
    assert reduce_embedding(torch.zeros(0, 8), 4).shape == (0, 4)
