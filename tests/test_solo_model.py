import pytest
import torch
import torch.nn.functional as F

from efsolo.config import LossSettings
from efsolo.modeling.solo_loss import solo_losses
from efsolo.modeling.solo_model import SOLO, SOLOArch, conv3x3_at

ARCH = SOLOArch(backbone="resnet18", fpn_channels=16, head_channels=16, head_convs=1, mask_channels=16, kernel_dim=8,
                grids=(8, 6, 4, 3, 2), freeze_at=4, embed_dim=12)


def test_conv_at_cells_equals_the_convolution_read_there():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(5, 7, 3, padding=1)
    feat = torch.randn(2, 5, 4, 6)
    dense = conv(feat)  # (2, 7, 4, 6)
    cells = torch.tensor([0, 5, 6, 11, 18, 23])  # corners, edges and the inside of the 4 x 6 grid
    got = conv3x3_at(conv, feat[1], cells)
    assert got.shape == (6, 7)
    assert torch.allclose(got, dense[1].flatten(1)[:, cells].T, atol=1e-6)
    assert conv3x3_at(conv, feat[0], torch.tensor([], dtype=torch.long)).shape == (0, 7)


def _batch():
    images = torch.rand(2, 3, 64, 64)
    masks = [torch.zeros(3, 64, 64, dtype=torch.bool), torch.zeros(0, 64, 64, dtype=torch.bool)]
    masks[0][0, 8:30, 8:30] = True
    masks[0][1, 36:60, 30:58] = True
    masks[0][2, 2:62, 4:60] = True  # a large object: a coarse level
    embeds = [torch.randn(3, ARCH.embed_dim), torch.zeros(0, ARCH.embed_dim)]
    return images, masks, embeds


@pytest.mark.parametrize("drop_loss_iou", [0.0, 0.01])
def test_training_outputs_at_positive_cells_give_the_dense_losses_and_gradients(drop_loss_iou):
    """Training computes kernels and embeddings at the positive cells only: every loss term and
    every parameter's gradient equal those of the dense head."""
    torch.manual_seed(0)
    model = SOLO(ARCH).train()
    for p in model.head.parameters():  # away from the init's near-zero outputs, so that a mistake shows
        p.data.normal_(0, 0.3)
    images, masks, embeds = _batch()
    ls = LossSettings(drop_loss_iou=drop_loss_iou, scale_ranges=((1, 32), (16, 64), (32, 128), (64, 256), (128, 512)))
    results = []
    for sparse in (True, False):
        model.sparse_training_outputs = sparse
        model.zero_grad(set_to_none=True)
        out = model(images)
        assert (out.kernels is None) == sparse
        terms = solo_losses(out, images, masks, embeds, ARCH.grids, ls, step=1000)
        terms["total"].backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((terms, grads))
    (t_sparse, g_sparse), (t_dense, g_dense) = results
    assert t_dense["positives"] > 0 and t_dense["sem"] > 0
    for k in t_dense:
        assert torch.allclose(t_sparse[k], t_dense[k], rtol=1e-5, atol=1e-7), k
    assert g_sparse.keys() == g_dense.keys() and "head.kernel_pred.weight" in g_dense and "head.embed_pred.weight" in g_dense
    for n in g_dense:
        assert torch.allclose(g_sparse[n], g_dense[n], rtol=1e-4, atol=1e-6), n


def test_evaluation_keeps_every_cells_outputs():
    torch.manual_seed(0)
    model = SOLO(ARCH).eval()
    with torch.no_grad():
        out = model(torch.rand(1, 3, 64, 64))
    assert [k.shape[-1] for k in out.kernels] == list(ARCH.grids)
    cells = torch.tensor([0, 3, 7])
    assert torch.allclose(out.kernels_at(1, 0, cells), model.head.kernels_at(out.kernel_feats[1], 0, cells), atol=1e-6)
    assert torch.allclose(out.dense_embeds(2), F.conv2d(out.cate_feats[2], model.head.embed_pred.weight,
                                                       model.head.embed_pred.bias, padding=1), atol=1e-6)


def test_drop_loss_under_bf16_autocast_reads_the_dense_kernels_in_the_features_dtype():
    """The training forward runs under bf16 autocast and the loss outside it: DropLoss's every-cell
    kernels (computed from the bf16 kernel features after the forward) must come out as the dense
    head's would under autocast, not fail on the float weights."""
    torch.manual_seed(0)
    model = SOLO(ARCH).train()
    for p in model.head.parameters():
        p.data.normal_(0, 0.3)
    images, masks, embeds = _batch()
    ls = LossSettings(drop_loss_iou=0.01, scale_ranges=((1, 32), (16, 64), (32, 128), (64, 256), (128, 512)))
    kernels = {}
    for sparse in (True, False):
        model.sparse_training_outputs = sparse
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(images)
        kernels[sparse] = out.dense_kernels(1)
        terms = solo_losses(out, images, masks, embeds, ARCH.grids, ls, step=1000)
        assert torch.isfinite(terms["total"]) and terms["positives"] > 0
        terms["total"].backward()
    assert kernels[True].dtype == kernels[False].dtype == torch.bfloat16
    assert torch.allclose(kernels[True].float(), kernels[False].float(), rtol=2e-2, atol=2e-2)
