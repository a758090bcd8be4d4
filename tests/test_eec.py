import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from efsolo.backbone import ResNetTrunk
from efsolo.eec import EECModule, eec_loss, pooled_queries


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
