import numpy as np
import torch

from efsolo.modeling.inference import TestSettings as Settings, point_nms, postprocess, predict_image, to_image_masks
from efsolo.modeling.solo_model import SOLO, SOLOArch, SOLOOutput


def _known_output():
    """One confident cell on level 2 whose kernel selects mask channel 0, which holds a square."""
    grids = (4, 4, 4, 4, 4)
    cates = [torch.full((1, 1, s, s), -10.0) for s in grids]
    cates[2][0, 0, 1, 2] = 4.0  # sigmoid ~ 0.982
    kernels = [torch.zeros(1, 2, s, s) for s in grids]
    kernels[2][0, 0, 1, 2] = 1.0
    embeds = [torch.zeros(1, 3, s, s) for s in grids]
    embeds[2][0, :, 1, 2] = torch.tensor([1.0, 2.0, 3.0])
    feat = torch.full((1, 2, 16, 16), -20.0)
    feat[0, 0, 4:10, 6:12] = 20.0
    return SOLOOutput(cates, kernels, embeds, feat)


def test_postprocess_recovers_the_known_mask():
    soft, scores, emb = postprocess(_known_output(), 0, Settings())
    assert soft.shape == (1, 16, 16) and scores.shape == (1,)
    assert torch.equal(soft[0] > 0.5, _known_output().mask_feat[0, 0] > 0)
    assert scores.item() == torch.sigmoid(torch.tensor(4.0)).item()  # maskness 1 for a saturated mask
    assert torch.equal(emb[0], torch.tensor([1.0, 2.0, 3.0]))
    masks = to_image_masks(soft, (64, 64), (64, 64), (32, 32))
    assert masks.shape == (1, 32, 32) and masks[0, 8:20, 12:24].all() and masks[0].sum() == 144


def test_maskness_power_reorders_a_confident_loose_mask_below_a_crisp_one():
    """Two disjoint masks: A (category 0.95, soft values 0.75) and B (category 0.7, soft 0.95).
    Score = category x maskness ** k: A leads at k = 1 (0.71 vs 0.67), B at k = 4 (0.30 vs 0.57)."""
    logit = lambda p: float(np.log(p / (1 - p)))  # noqa: E731
    grids = (4, 4, 4, 4, 4)
    cates = [torch.full((1, 1, s, s), -10.0) for s in grids]
    cates[2][0, 0, 0, 0], cates[2][0, 0, 3, 3] = logit(0.95), logit(0.7)
    kernels = [torch.zeros(1, 2, s, s) for s in grids]
    kernels[2][0, 0, 0, 0] = kernels[2][0, 1, 3, 3] = 1.0
    embeds = [torch.zeros(1, 3, s, s) for s in grids]
    embeds[2][0, 0, 0, 0], embeds[2][0, 0, 3, 3] = 1.0, 2.0
    feat = torch.full((1, 2, 16, 16), -20.0)
    feat[0, 0, 0:6, 0:6], feat[0, 1, 9:15, 9:15] = logit(0.75), logit(0.95)
    out = SOLOOutput(cates, kernels, embeds, feat)
    for k, first, expected in ((1.0, 1.0, (0.95 * 0.75, 0.7 * 0.95)), (4.0, 2.0, (0.7 * 0.95 ** 4, 0.95 * 0.75 ** 4))):
        _, scores, emb = postprocess(out, 0, Settings(maskness_power=k))
        assert emb[0, 0].item() == first
        assert torch.allclose(scores, torch.tensor(expected), atol=1e-5)


def test_point_nms_keeps_local_maxima():
    # SOLO's point NMS: a cell survives if it is the maximum of the 2x2 window ending at it
    heat = torch.tensor([[[[0.1, 0.9], [0.8, 0.2]]]])
    assert torch.equal(point_nms(heat), torch.tensor([[[[0.1, 0.9], [0.8, 0.0]]]]))


def test_low_scores_give_no_instances_and_predict_image_runs():
    out = _known_output()
    out.cates[2][0, 0, 1, 2] = -3.0
    soft, scores, emb = postprocess(out, 0, Settings())
    assert soft.shape[0] == scores.shape[0] == emb.shape[0] == 0
    torch.manual_seed(0)
    model = SOLO(SOLOArch(backbone="resnet18", fpn_channels=16, head_channels=16, head_convs=1, mask_channels=16,
                          kernel_dim=8, embed_dim=4, grids=(8, 6, 4, 3, 2))).eval()
    masks, scores, emb = predict_image(model, np.zeros((40, 50, 3), np.uint8), 64, 96, Settings(),
                                       torch.device("cpu"))
    assert masks.shape[1:] == (40, 50) and len(scores) == len(masks) == len(emb)
