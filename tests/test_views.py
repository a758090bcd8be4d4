import torch

from efsolo.data.views import copy_paste, strong_view


def test_strong_view_is_deterministic_bounded_and_independent_of_sharding():
    x = torch.rand(4, 3, 16, 16)
    a = strong_view(x, torch.Generator().manual_seed(0))
    b = strong_view(x, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == x.shape and a.min() >= 0 and a.max() <= 1
    rows = torch.tensor([1, 3])  # the share of process 1 of 2
    part = strong_view(x[rows], torch.Generator().manual_seed(0), total=4, rows=rows)
    assert torch.allclose(part, a[rows], atol=1e-6)


def test_copy_paste_cuts_occluded_masks_and_drops_overlapping_pastes():
    img = torch.zeros(2, 3, 8, 8)
    img[1] = 1.0
    m0 = torch.zeros(1, 8, 8, dtype=torch.bool)
    m0[0, 0:4, 0:4] = True
    m1 = torch.zeros(2, 8, 8, dtype=torch.bool)
    m1[0, 2:6, 2:6] = True  # overlaps image 0's mask by 4/16 < 0.5: pasted
    m1[1, 0:3, 0:3] = True  # inside image 0's mask (9/9 >= 0.5): dropped
    e0, e1 = torch.zeros(1, 2), torch.tensor([[1.0, 1.0], [2.0, 2.0]])
    images, masks, embeds = copy_paste(img, [m0, m1], [e0, e1], torch.Generator().manual_seed(0), prob=1.0)
    assert masks[0].shape[0] == 2 and torch.equal(embeds[0], torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
    assert masks[0][0].sum() == 16 - 4  # cut where the paste covers it
    assert torch.equal(masks[0][1], m1[0])
    assert (images[0][:, 2:6, 2:6] == 1).all() and images[0][:, 0, 0].sum() == 0
    # and nothing changes when nothing is pasted
    images, masks, embeds = copy_paste(img, [m0, m1], [e0, e1], torch.Generator().manual_seed(0), prob=0.0)
    assert torch.equal(images, img) and torch.equal(masks[0], m0)


def test_copy_paste_drops_what_pastes_mostly_hide():
    img = torch.zeros(2, 3, 10, 10)
    own = torch.zeros(1, 10, 10, dtype=torch.bool)
    own[0, 0:5, 0:2] = True  # 10 pixels
    src = torch.zeros(3, 10, 10, dtype=torch.bool)
    src[0, 0:2, 0:6] = True  # covers 4 of 10 (< 0.5): pasted
    src[1, 3:5, 0:6] = True  # covers 4 of 10: pasted; together they hide 8 of 10 -> the existing one goes
    src[2, 6:10, 6:10] = True  # elsewhere
    src[2, 6:10, 5] = True
    images, masks, embeds = copy_paste(img, [own, src], [torch.zeros(1, 2), torch.arange(6.0).view(3, 2)],
                                       torch.Generator().manual_seed(0), prob=1.0)
    assert masks[0].shape[0] == 3  # the existing sliver is no longer a target; the three pastes are
    assert torch.equal(embeds[0], torch.arange(6.0).view(3, 2))
    assert not (masks[0] & own).any(1).any(1)[2] and masks[0][0].sum() == 12
