import math

import pytest
import torch
import torch.nn.functional as F

from efsolo.config import DataParams, SyntheticParams
from efsolo.data import datasets
from efsolo.config import ParamsError, PretrainParams, PretrainRuntime
from efsolo.engine import pretrain
from efsolo.engine import resume


def test_densecl_loss_matches_formula():
    d, k, t = 4, 3, 0.5
    g = torch.eye(d)[:2]  # two unit queries, keys equal to queries
    queue = torch.zeros(d, k)
    queue[3] = 1.0  # negatives orthogonal to both queries
    f = torch.zeros(2, 2, 1, 2)
    f[:, 0, 0, 0], f[:, 1, 0, 1] = 1.0, 1.0  # position 0 matches 0, 1 matches 1
    dense = torch.zeros(2, d, 1, 2)
    dense[:, 0, 0, 0], dense[:, 1, 0, 1] = 1.0, 1.0
    total, lg, ld = pretrain.densecl_loss(g, g, dense, dense, f, f, queue, queue, t, 0.5)
    expected = -math.log(math.exp(1 / t) / (math.exp(1 / t) + k))  # positive 1/t, negatives 0
    assert lg.item() == pytest.approx(expected, rel=1e-5)
    assert ld.item() == pytest.approx(expected, rel=1e-5)
    assert total.item() == pytest.approx(expected, rel=1e-5)


def test_dense_correspondence_uses_backbone_similarity():
    d = 4
    g = torch.eye(d)[:1]
    queue = F.normalize(torch.ones(d, 2), dim=0)
    dq = torch.zeros(1, d, 1, 2)
    dq[0, 0, 0, 0], dq[0, 1, 0, 1] = 1.0, 1.0
    dk = dq.flip(-1)  # key dense vectors swapped ...
    fq = torch.zeros(1, 2, 1, 2)
    fq[0, 0, 0, 0], fq[0, 1, 0, 1] = 1.0, 1.0
    fk = fq.flip(-1)  # ... and so are the backbone features: correspondence undoes the swap
    _, _, matched = pretrain.densecl_loss(g, g, dq, dk, fq, fk, queue, queue, 0.2, 0.5)
    _, _, unmatched = pretrain.densecl_loss(g, g, dq, dk, fq, fq, queue, queue, 0.2, 0.5)
    assert matched.item() < unmatched.item()


def _colours(augment, image: torch.Tensor, draws: int) -> torch.Tensor:
    """Mean RGB (draws, 3) of ``draws`` augmented views of ``image``, back in [0, 1] units."""
    from efsolo.data.images import IMAGENET_MEAN, IMAGENET_STD

    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1) / 255
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1) / 255
    return torch.stack([(augment(image) * std + mean).mean(dim=(1, 2)) for _ in range(draws)])


def test_colour_augmentation_is_a_setting_and_off_keeps_colours():
    """A constant-colour image: crops, flips and blur keep its colour, colour jitter and grayscale
    do not. color_jitter=0, grayscale_prob=0 must leave it alone; DenseCL's setting must not."""
    torch.manual_seed(0)
    image = torch.empty(3, 64, 64, dtype=torch.uint8)
    image[0], image[1], image[2] = 200, 60, 30
    target = torch.tensor([200, 60, 30]) / 255
    plain = _colours(pretrain.make_augment(32, color_jitter=0.0, grayscale_prob=0.0), image, 20)
    assert torch.allclose(plain, target.expand_as(plain), atol=1e-3)
    densecl = _colours(pretrain.make_augment(32, color_jitter=0.4, grayscale_prob=0.2), image, 20)
    moved = (densecl - target).abs().max(dim=1).values > 0.02
    assert 8 <= int(moved.sum()) <= 20  # 1 - 0.2 * 0.8 = 84% of the views change colour
    grey = _colours(pretrain.make_augment(32, color_jitter=0.0, grayscale_prob=1.0), image, 5)
    assert torch.allclose(grey, grey[:, :1].expand_as(grey), atol=1e-3)  # R = G = B


def _tiny_run(tmp, ckpt, iters=4):
    settings = PretrainParams(iters=iters, batch_size=2, crop_size=32, lr=0.05, weight_decay=1e-4, momentum=0.9,
                              queue_size=4, temperature=0.2, dense_weight=0.5, proj_dim=8, color_jitter=0.4,
                              grayscale_prob=0.2)
    return pretrain.pretrain_backbone(tmp / "data" / "train.json", tmp / f"{ckpt}.pt", tmp / ckpt, tmp / f"live_{ckpt}",
                                      arch="resnet18", seed=0, settings=settings,
                                      runtime=PretrainRuntime(log_every=1, checkpoint_every=2), device=torch.device("cpu"))


def test_resume_after_interrupt_matches_uninterrupted_run(tmp_path, monkeypatch):
    datasets.prepare_dataset(tmp_path / "data", DataParams(synthetic=SyntheticParams(num_train=4, num_val=1, image_size=48)), seed=0)
    _tiny_run(tmp_path, "straight")
    straight = torch.load(tmp_path / "straight.pt", weights_only=True)["state_dict"]

    saved = resume.save_checkpoint

    def save_then_die(*args, **kwargs):
        saved(*args, **kwargs)
        raise KeyboardInterrupt  # killed right after the checkpoint at iteration 2

    monkeypatch.setattr(resume, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        _tiny_run(tmp_path, "resumed")
    monkeypatch.setattr(resume, "save_checkpoint", saved)
    assert torch.load(tmp_path / "resumed" / "last.pt", weights_only=False)["step"] == 2
    _tiny_run(tmp_path, "resumed")
    resumed = torch.load(tmp_path / "resumed.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_zero_iterations_writes_seeded_random_init(tmp_path):
    datasets.prepare_dataset(tmp_path / "data", DataParams(synthetic=SyntheticParams(num_train=2, num_val=1, image_size=48)), seed=0)
    for name in ("a", "b"):
        _tiny_run(tmp_path, name, iters=0)
    a = torch.load(tmp_path / "a.pt", weights_only=True)
    b = torch.load(tmp_path / "b.pt", weights_only=True)
    assert a["source"].startswith("random-init")
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])


def test_dense_level_moves_the_dense_head_and_its_correspondence():
    """``dense_level``: the dense projections, and the backbone features their correspondence is
    matched on, come from that level (C5 stride 32, C4 16, C3 8); the global projection from pooled C5."""
    x = torch.randn(2, 3, 64, 64)
    for level, grid in (("c5", 2), ("c4", 4), ("c3", 8)):
        enc = pretrain.DenseCLEncoder("resnet18", 8, dense_level=level)
        f, g, d = enc(x)
        assert f.shape == (2, enc.trunk.channels[level], grid, grid)
        assert g.shape == (2, 8) and d.shape == (2, 8, grid, grid)
    with pytest.raises(ParamsError, match="backbone.pretrain.dense_level must be c3, c4 or c5, got 'c2'"):
        PretrainParams(dense_level="c2")
