import math

import pytest
import torch

from efsolo.modeling.losses import (avg_projection_loss, colour_similarity, dice_distance, drop_loss_weights, focal_loss,
                           max_projection_loss, pairwise_loss, rgb_to_lab, semantic_loss)


def _square(k=2, size=12):
    m = torch.zeros(k, size, size)
    m[:, 3:8, 4:9] = 1.0
    return m


def test_perfect_prediction_gives_about_zero():
    t = _square()
    assert max_projection_loss(t, t.bool()).item() == pytest.approx(0.0, abs=1e-4)  # 1e-5 smoothing
    assert avg_projection_loss(t, t.bool()).item() == pytest.approx(0.0, abs=1e-4)
    assert dice_distance(t.flatten(1), t.flatten(1)).abs().max().item() < 1e-5


def test_projection_losses_known_values():
    t = _square(1)
    empty = torch.zeros_like(t)
    assert max_projection_loss(empty, t.bool()).item() == pytest.approx(2.0)  # two axes, dice distance 1 each
    half = t * 0.5  # max projections are 0.5 where the target is 1: D = 1 - 2*0.5n/(0.25n + n) = 0.2
    assert max_projection_loss(half, t.bool()).item() == pytest.approx(0.4, abs=1e-4)


def test_pairwise_weights_vanish_outside_the_box_and_known_value():
    logits = torch.zeros(1, 12, 12)  # p = 0.5 everywhere: -log(0.5*0.5 + 0.5*0.5) = log 2
    sim = torch.ones(1, 8, 12, 12)
    box = torch.zeros(1, 12, 12, dtype=torch.bool)
    assert pairwise_loss(logits, sim, box).item() == 0.0  # no weight anywhere
    box[:, 4:8, 4:8] = True  # interior: every neighbour at dilation 2 is inside the image
    assert pairwise_loss(logits, sim, box).item() == pytest.approx(math.log(2), rel=1e-5)
    assert pairwise_loss(logits, sim * 0.2, box).item() == 0.0  # colour similarity below 0.3
    confident = torch.full((1, 12, 12), 20.0)
    assert pairwise_loss(confident, sim, box).item() == pytest.approx(0.0, abs=1e-6)


def test_colour_similarity_and_lab():
    white = torch.ones(1, 3, 1, 1)
    assert torch.allclose(rgb_to_lab(white).flatten(), torch.tensor([100.0, 0.0, 0.0]), atol=0.05)
    img = torch.zeros(1, 3, 8, 8)
    img[:, :, :, 4:] = 1.0
    sim = colour_similarity(img, dilation=2)
    assert sim.shape == (1, 8, 8, 8)
    assert sim[0, 4, 3, 1].item() == pytest.approx(1.0)  # right neighbour (x=3) of a black pixel is black
    assert sim[0, 4, 3, 2].item() < 1e-10  # right neighbour (x=4) of x=2 is white


def test_focal_and_semantic_known_values():
    assert focal_loss(torch.zeros(1), torch.ones(1)).item() == pytest.approx(0.25 * 0.25 * math.log(2) / 2)
    assert focal_loss(torch.zeros(4), torch.zeros(4)).item() == pytest.approx(4 * 0.75 * 0.25 * math.log(2))
    v = torch.tensor([[1.0, 2.0, 3.0]])
    assert semantic_loss(v, v).item() == pytest.approx(0.0, abs=1e-6)
    assert semantic_loss(v, -v).item() == pytest.approx(2.0)
    # weights drop terms: two of four negatives kept is half the loss
    w = torch.tensor([1.0, 0.0, 1.0, 0.0])
    assert focal_loss(torch.zeros(4), torch.zeros(4), weights=w).item() == pytest.approx(2 * 0.75 * 0.25 * math.log(2))


def test_drop_loss_keeps_positives_and_negatives_that_overlap_a_pseudo_mask():
    target = torch.zeros(1, 4, 4, dtype=torch.bool)
    target[0, :2, :2] = True  # 4 px
    cells = torch.full((4, 4, 4), -5.0)
    cells[0, :2, :2] = 5.0  # cell 0: the pseudo mask itself, but a negative: kept
    cells[1, 2:, 2:] = 5.0  # cell 1: an object the pseudo-labels missed: dropped
    cells[2, 1, 1:3] = 5.0  # cell 2: overlaps by 1 px (IoU 1/5): kept
    # cell 3: an empty mask, assigned as a positive: kept
    positive = torch.tensor([False, False, False, True])
    assert drop_loss_weights(cells, target, positive, 0.01).tolist() == [1.0, 0.0, 1.0, 1.0]
    assert drop_loss_weights(cells, target, positive, 0.25).tolist() == [1.0, 0.0, 0.0, 1.0]
    # no pseudo masks: only positives are kept
    none = torch.zeros(0, 4, 4, dtype=torch.bool)
    assert drop_loss_weights(cells, none, positive, 0.01).tolist() == [0.0, 0.0, 0.0, 1.0]


@pytest.mark.parametrize("fn", [max_projection_loss, avg_projection_loss])
def test_empty_case_is_zero_with_gradient(fn):
    logits = torch.zeros(0, 6, 6, requires_grad=True)
    loss = fn(torch.sigmoid(logits), torch.zeros(0, 6, 6, dtype=torch.bool))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert logits.grad is not None and logits.grad.shape == (0, 6, 6)


def test_empty_pairwise_and_semantic():
    logits = torch.zeros(0, 6, 6, requires_grad=True)
    loss = pairwise_loss(logits, torch.ones(0, 8, 6, 6), torch.ones(0, 6, 6, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and logits.grad is not None
    emb = torch.zeros(0, 4, requires_grad=True)
    s = semantic_loss(emb, torch.zeros(0, 4))
    s.backward()
    assert s.item() == 0.0 and emb.grad is not None


def test_pairwise_loss_equals_its_definition_pixel_by_pixel():
    """The loss (each unordered pair computed once, with both directions' weights) equals the sum,
    over every pixel inside the box and each of its 8 neighbours at the dilation whose colour
    similarity passes the threshold, of -log(p_i p_j + (1 - p_i)(1 - p_j)), a neighbour outside
    the image adding 0, divided by the number of such (pixel, neighbour) weights; and so does its
    gradient's sum of terms."""
    g = torch.Generator().manual_seed(0)
    k, h, w, d = 2, 5, 6, 2
    logits = (torch.randn(k, h, w, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    sim = torch.rand(k, 8, h, w, generator=g, dtype=torch.float64)
    box = torch.rand(k, h, w, generator=g) > 0.3
    offsets = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]
    p = torch.sigmoid(logits)
    total, count = 0.0, 0
    for n in range(k):
        for y in range(h):
            for x in range(w):
                for o, (dy, dx) in enumerate(offsets):
                    if not (box[n, y, x] and sim[n, o, y, x] >= 0.3):
                        continue
                    count += 1
                    yy, xx = y + dy * d, x + dx * d
                    if 0 <= yy < h and 0 <= xx < w:
                        total = total - torch.log(p[n, y, x] * p[n, yy, xx] + (1 - p[n, y, x]) * (1 - p[n, yy, xx]))
    expected = total / count
    got = pairwise_loss(logits, sim, box, 0.3, d)
    assert got.item() == pytest.approx(expected.item(), rel=1e-12)
    (g_got,) = torch.autograd.grad(got, logits)
    (g_exp,) = torch.autograd.grad(expected, logits)
    assert torch.allclose(g_got, g_exp, atol=1e-12)
