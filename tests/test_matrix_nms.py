import math

import torch

from efsolo.modeling.matrix_nms import fast_nms, mask_iou_upper, matrix_nms


def _masks(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_iou_upper_triangle():
    m = _masks([1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 1, 1])
    iou = mask_iou_upper(m)
    assert torch.allclose(iou, torch.tensor([[0, 0.5, 0], [0, 0, 0.5], [0, 0, 0]]))


def test_matrix_nms_gaussian_known_decays():
    # mask 1 overlaps mask 0 with IoU 0.5; mask 2 is disjoint from 0 and has IoU 0.5 with 1
    m = _masks([1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 1, 1])
    s = torch.tensor([0.9, 0.8, 0.7])
    out = matrix_nms(m, s, sigma=2.0)
    d1 = math.exp(-2 * 0.25)  # decayed by mask 0 (compensate_0 = 0)
    # mask 2: by mask 0 -> exp(0)/exp(0)=1; by mask 1 -> exp(-2*.25)/exp(-2*.25)=1
    assert torch.allclose(out, torch.tensor([0.9, 0.8 * d1, 0.7]), atol=1e-6)


def test_matrix_nms_duplicate_is_suppressed_and_linear_kernel():
    m = _masks([1, 1, 0, 0], [1, 1, 0, 0])
    s = torch.tensor([0.9, 0.8])
    assert torch.allclose(matrix_nms(m, s, sigma=2.0), torch.tensor([0.9, 0.8 * math.exp(-2)]))
    assert torch.allclose(matrix_nms(m, s, kernel="linear"), torch.tensor([0.9, 0.0]))


def test_matrix_nms_batched_and_empty():
    m = _masks([1, 1, 0, 0], [1, 1, 0, 0])
    s = torch.tensor([0.9, 0.8])
    batched = matrix_nms(torch.stack([m, m]), torch.stack([s, s]))
    assert batched.shape == (2, 2)
    assert torch.allclose(batched[0], matrix_nms(m, s))
    empty = matrix_nms(torch.zeros(0, 4), torch.zeros(0))
    assert empty.shape == (0,)


def test_fast_nms():
    m = _masks([1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 0, 1])
    s = torch.tensor([0.9, 0.8, 0.7])
    assert torch.equal(fast_nms(m, s, 0.5), torch.tensor([0.9, 0.0, 0.7]))
    assert fast_nms(torch.zeros(0, 3), torch.zeros(0)).shape == (0,)
