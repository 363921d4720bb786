"""The distiller around the NCE ops: banks take no gradient, phi1/phi2 train, negatives are what they claim."""

import torch
import torch.nn.functional as F

from cmc_fast.distill import CrossModalNCE


def _distiller(negatives="uniform", n=50, k=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=g)
    labels[:2] = torch.tensor([0, 1])
    torch.manual_seed(seed)
    return CrossModalNCE(10, 14, labels, proj_dim=8, k=k, tau=0.07, momentum=0.5, negatives=negatives), labels


def test_banks_get_no_gradient_and_projections_train():
    d, _ = _distiller()
    g = torch.Generator().manual_seed(1)
    t_feat = torch.randn(6, 10, generator=g, requires_grad=True)
    v_feat = torch.randn(6, 14, generator=g, requires_grad=True)
    index = torch.tensor([3, 7, 11, 19, 23, 42])
    d.init_partition(t_feat, v_feat, index)
    assert d.z_v2t.item() > 0 and d.z_t2v.item() > 0
    bank_t_before, bank_v_before = d.memory_t.clone(), d.memory_v.clone()
    l_v2t, l_t2v = d(t_feat, v_feat, index)
    (l_v2t + l_t2v).backward()
    assert not d.memory_t.requires_grad and d.memory_t.grad is None and d.memory_v.grad is None
    for p in (d.embed_t.weight, d.embed_v.weight, t_feat, v_feat):
        assert p.grad is not None and p.grad.abs().sum() > 0
    # L_{V->T} reaches only the text side: its gradient on the image projection is exactly zero
    d.zero_grad()
    t2, v2 = t_feat.detach().requires_grad_(), v_feat.detach().requires_grad_()
    l_v2t, _ = d(t2, v2, index)
    l_v2t.backward()
    assert d.embed_v.weight.grad is None or d.embed_v.weight.grad.abs().sum() == 0
    assert d.embed_t.weight.grad.abs().sum() > 0
    # the banks took the batch: M[i] = normalize(m * M_old[i] + (1 - m) * f_i), other rows untouched
    t_proj = F.normalize(d.embed_t(t_feat), dim=1).detach()
    expected = F.normalize(0.5 * bank_t_before[index] + 0.5 * t_proj, dim=1)
    # d has taken two updates by now; replay one forward from the saved banks on a copy
    d2, _ = _distiller()
    d2.load_state_dict({**d.state_dict(), "memory_t": bank_t_before, "memory_v": bank_v_before})
    d2(t_feat, v_feat, index)
    torch.testing.assert_close(d2.memory_t[index], expected, rtol=1e-5, atol=1e-6)
    untouched = torch.ones(50, dtype=torch.bool)
    untouched[index] = False
    assert torch.equal(d2.memory_t[untouched], bank_t_before[untouched])


def test_uniform_negatives_never_take_the_positive_slot():
    d, _ = _distiller("uniform", n=20, k=200)
    index = torch.arange(20)
    idx = d.sample_indices(index)
    assert idx.shape == (20, 201)
    assert torch.equal(idx[:, 0], index)
    assert not (idx[:, 1:] == index[:, None]).any()
    assert idx.min() >= 0 and idx.max() < 20


def test_opposite_class_negatives_come_from_the_other_label():
    d, labels = _distiller("opposite-class", n=40, k=64)
    index = torch.arange(40)
    idx = d.sample_indices(index)
    assert (labels[idx[:, 1:]] == (1 - labels[index])[:, None]).all()
    # every member of the other class is reachable
    for i in (0, 1):
        drawn = idx[:, 1:][labels[index] == 1 - i].unique()
        assert set(drawn.tolist()) == set(torch.nonzero(labels == i).view(-1).tolist())


def test_the_noise_prior_counts_the_pool_the_negatives_come_from():
    labels = torch.tensor([0] * 30 + [1] * 20)
    torch.manual_seed(0)
    uniform = CrossModalNCE(10, 14, labels, proj_dim=8, k=12, negatives="uniform")
    opposite = CrossModalNCE(10, 14, labels, proj_dim=8, k=12, negatives="opposite-class")
    assert uniform.noise_pool == 50
    assert opposite.noise_pool == 24  # 2 * 30 * 20 / 50: the other class's size, averaged over the anchors
    # Z and the loss use it: recompute both from the formula (DESIGN section 1) in float64
    g = torch.Generator().manual_seed(2)
    t_feat, v_feat = torch.randn(6, 10, generator=g), torch.randn(6, 14, generator=g)
    index = torch.tensor([1, 5, 33, 40, 2, 49])
    opposite.eval()  # no bank update, so the banks the loss read are the ones below
    torch.manual_seed(3)
    opposite.init_partition(t_feat, v_feat, index)
    torch.manual_seed(4)
    l_v2t, _ = opposite(t_feat, v_feat, index)
    torch.manual_seed(3)
    t, _ = opposite.project(t_feat, v_feat)
    idx = opposite.sample_indices(index)
    e = torch.exp((t.double()[:, None, :] * opposite.memory_v.double()[idx]).sum(-1) / 0.07)
    z = e.mean() * 24
    torch.testing.assert_close(opposite.z_v2t.double(), z, rtol=1e-5, atol=0)
    torch.manual_seed(4)
    t, _ = opposite.project(t_feat, v_feat)
    idx = opposite.sample_indices(index)
    p = torch.exp((t.double()[:, None, :] * opposite.memory_v.double()[idx]).sum(-1) / 0.07) / opposite.z_v2t.double()
    noise, eps = 12 / 24, 1e-7
    expected = -(torch.log(p[:, 0] / (p[:, 0] + noise + eps)) + torch.log(noise / (p[:, 1:] + noise + eps)).sum(1))
    torch.testing.assert_close(l_v2t.double(), expected.mean(), rtol=1e-5, atol=1e-6)


def _draw_as_before(d, index, seed):
    """The sampling as the distiller drew it with int64 indices (before they became int32), written out here."""
    torch.manual_seed(seed)
    b, n = index.shape[0], d.n_data
    if d.negatives == "uniform":
        neg = torch.randint(0, n, (b, d.k))
        shift = torch.randint(1, n, (b, d.k))
        neg = torch.where(neg == index[:, None], (neg + shift) % n, neg)
    else:
        other = 1 - d.labels[index]
        u = torch.rand(b, d.k)
        pos = (u * d.label_count[other][:, None]).long().clamp_max(d.label_count[other][:, None] - 1)
        neg = d.by_label[d.label_start[other][:, None] + pos]
    return torch.cat([index[:, None], neg], dim=1)


def test_indices_are_int32_with_the_same_values_from_the_same_rng_stream():
    """The kernels take int32 idx; the draw is unchanged, so a seeded run samples the very same negatives (its
    history is the same to float32 rounding) and the RNG is left where it was."""
    for negatives in ("uniform", "opposite-class"):
        d, _ = _distiller(negatives, n=97, k=300, seed=5)
        index = torch.tensor([0, 3, 96, 41, 41])
        want = _draw_as_before(d, index, seed=11)
        after_want = torch.rand(3)
        torch.manual_seed(11)
        idx = d.sample_indices(index)
        assert idx.dtype == torch.int32
        assert torch.equal(idx.long(), want), negatives
        assert torch.equal(torch.rand(3), after_want)  # the same number of draws


def test_one_histogram_serves_both_directions(monkeypatch):
    """Forced to the dense form, the distiller builds the negatives' histogram once per step and both losses equal
    the gather form's on the same idx (same RNG state)."""
    from cmc_fast.kernels import nce as nce_mod

    calls = []
    real = nce_mod._nce_counts_op
    monkeypatch.setattr(nce_mod, "_nce_counts_op", lambda idx, n: calls.append(n) or real(idx, n))
    g = torch.Generator().manual_seed(2)
    t_feat, v_feat = torch.randn(6, 10, generator=g), torch.randn(6, 14, generator=g)
    index = torch.tensor([3, 7, 11, 19, 23, 42])
    losses = {}
    for path in ("dense", "gather"):
        monkeypatch.setenv("CMC_FAST_NCE", path)
        d, _ = _distiller(k=40)
        d.init_partition(t_feat, v_feat, index)
        torch.manual_seed(9)
        losses[path] = d(t_feat, v_feat, index)
    assert calls == [50]  # one histogram, in the dense step only
    for dense, gather in zip(losses["dense"], losses["gather"]):
        torch.testing.assert_close(dense, gather, rtol=2e-6, atol=0)
