"""DecoupleMix's loss and SAMix's η-balanced loss against float64 re-derivations of their papers'
definitions and OpenMixup's behaviour."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dalimix.losses import DecoupledMixCrossEntropy, EtaBalancedMixLoss, MixCrossEntropy
from dalimix.mix import CompactTargets


def log_softmax(z):
    z = z - z.max()
    return z - np.log(np.exp(z).sum())


def reference(z, y_a, y_b, lam, eta, mode, thr, power, eps=0.0):
    """Per-sample float64: mixup CE + eta-weighted CE of each class without the other one."""
    total = 0.0
    for zi, a, b, l in zip(z.astype(np.float64), y_a, y_b, lam.astype(np.float64)):
        c = len(zi)
        ls = log_softmax(zi)
        smooth = lambda k, ls=ls: -((1 - eps) * ls[k] + eps * ls.mean())
        loss = l * smooth(a) + (1 - l) * smooth(b)
        if a != b:
            wa = wb = eta
            if mode != "both":
                pick_a = (l < thr) if mode == "less" else not (l < thr)
                wa, wb = (wa, 0.0) if pick_a else (0.0, wb)
            wa, wb = wa * l**power, wb * (1 - l) ** power
            keep_a = [k for k in range(c) if k != b]
            keep_b = [k for k in range(c) if k != a]
            loss += wa * -log_softmax(zi[keep_a])[keep_a.index(a)] + wb * -log_softmax(zi[keep_b])[keep_b.index(b)]
        total += loss
    return total / len(z)


@pytest.mark.parametrize("mode", ["both", "less", "more"])
@pytest.mark.parametrize("power", [0.0, 0.5])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_decoupled_loss_matches_float64_definition(mode, power, eps):
    rng = np.random.default_rng(0)
    n, c = 12, 7
    z = rng.normal(0, 2, (n, c)).astype(np.float32)
    y_a = rng.integers(0, c, n)
    y_b = rng.integers(0, c, n)
    y_b[:2] = y_a[:2]  # mixed within one class: the mixup term only
    lam = rng.uniform(0.05, 0.95, n).astype(np.float32)
    t = CompactTargets(torch.from_numpy(y_a), torch.from_numpy(y_b), torch.from_numpy(lam), eps)
    got = DecoupledMixCrossEntropy(eta=0.3, mode=mode, thr=0.5, lam_power=power)(torch.from_numpy(z), t)
    assert float(got) == pytest.approx(reference(z, y_a, y_b, lam, 0.3, mode, 0.5, power, eps), rel=1e-5)


def openmixup_soft_decouple(z, y_a, y_b, lam, eta):
    """OpenMixup's soft_mix_cross_entropy for a batch lam, distinct classes, eta_weight 'both', in float64."""
    n, c = z.shape
    label = np.zeros((n, c))
    label[np.arange(n), y_a] += lam
    label[np.arange(n), y_b] += 1 - lam
    ls = np.stack([log_softmax(r) for r in z.astype(np.float64)])
    loss = (-label * ls).sum(1)
    for value in (lam, 1 - lam):
        keep = (label == value) | ~(label > 1e-3)  # this class and the C - 2 unmixed ones
        for i in range(n):
            zi, li = z[i][keep[i]].astype(np.float64), (label[i][keep[i]] > 0).astype(np.float64)
            loss[i] += eta * (-li * log_softmax(zi)).sum()
    return loss.mean()


def test_decoupled_loss_matches_openmixup_for_a_batch_lam():
    rng = np.random.default_rng(1)
    n, c, lam = 8, 10, np.float32(0.3)
    z = rng.normal(0, 2, (n, c)).astype(np.float32)
    y_a = rng.permutation(c)[:n]
    y_b = np.roll(y_a, 1)
    t = CompactTargets(torch.from_numpy(y_a), torch.from_numpy(y_b), torch.full((n,), float(lam)))
    got = DecoupledMixCrossEntropy(eta=0.5)(torch.from_numpy(z), t)
    assert float(got) == pytest.approx(openmixup_soft_decouple(z, y_a, y_b, float(lam), 0.5), rel=1e-5)


def test_eta_zero_is_mixup_cross_entropy_and_dense_targets_are_refused():
    torch.manual_seed(0)
    z = torch.randn(5, 4, requires_grad=True)
    t = CompactTargets(torch.tensor([0, 1, 2, 3, 0]), torch.tensor([1, 2, 3, 0, 0]), torch.rand(5), 0.1)
    torch.testing.assert_close(DecoupledMixCrossEntropy(eta=0)(z, t), MixCrossEntropy()(z, t))
    DecoupledMixCrossEntropy()(z, t).backward()
    assert torch.isfinite(z.grad).all()
    with pytest.raises(ValueError, match="targets='compact'"):
        DecoupledMixCrossEntropy()(z, t.to_soft(4))
    with pytest.raises(ValueError, match="mode='all'"):
        DecoupledMixCrossEntropy(mode="all")


def log_sigmoid(z):
    return -np.logaddexp(0.0, -z)


def eta_reference(z, y_a, y_b, lam, eta, eps=0.0):
    """SAMix's η-balanced loss per its definition in float64: per sample, the binary cross-entropy
    of the two mixed classes plus eta times that of every other class (sum), mean over samples."""
    total = 0.0
    for zi, a, b, l in zip(z.astype(np.float64), y_a, y_b, lam.astype(np.float64)):
        c = len(zi)
        y = np.full(c, eps / c)
        y[a] += (1 - eps) * l
        y[b] += (1 - eps) * (1 - l)
        bce = -(y * log_sigmoid(zi) + (1 - y) * log_sigmoid(-zi))
        positive = np.zeros(c, dtype=bool)
        positive[[a, b]] = True
        total += bce[positive].sum() + eta * bce[~positive].sum()
    return total / len(z)


def openmixup_neg_weight(z, y_a, y_b, lam, neg_weight):
    """OpenMixup's ClsMixupHead(multi_label=True, neg_weight=w) with a sigmoid CrossEntropyLoss, as
    read from its source and rewritten: mixed one-hot labels, class weights max(y > 0, w) on the
    elementwise binary cross-entropy with logits, summed and divided by the batch size."""
    z = torch.as_tensor(z, dtype=torch.float64)
    c = z.shape[1]
    lam = torch.as_tensor(lam, dtype=torch.float64).view(-1, 1)
    y = lam * F.one_hot(torch.as_tensor(y_a), c) + (1 - lam) * F.one_hot(torch.as_tensor(y_b), c)
    weight = (y > 0).double().clamp(min=neg_weight)
    return float((F.binary_cross_entropy_with_logits(z, y, weight=weight, reduction="none")).sum() / len(z))


@pytest.mark.parametrize("eta", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_eta_balanced_loss_matches_float64_definition(eta, eps):
    rng = np.random.default_rng(int(eta * 10) + int(eps * 100))
    n, c = 12, 9
    z = rng.normal(0, 3, (n, c)).astype(np.float32)
    y_a, y_b = rng.integers(0, c, n), rng.integers(0, c, n)
    y_b[:2] = y_a[:2]  # mixed within one class: one positive
    lam = rng.uniform(0.05, 0.95, n).astype(np.float32)
    t = CompactTargets(torch.from_numpy(y_a), torch.from_numpy(y_b), torch.from_numpy(lam), eps)
    got = EtaBalancedMixLoss(eta=eta)(torch.from_numpy(z), t)
    assert got.item() == pytest.approx(eta_reference(z, y_a, y_b, lam, eta, eps), rel=1e-5)
    # dense soft targets (positives where t > 0) agree when nothing is smoothed
    if eps == 0:
        dense = EtaBalancedMixLoss(eta=eta)(torch.from_numpy(z), t.to_soft(c))
        assert dense.item() == pytest.approx(got.item(), rel=1e-6)
        assert got.item() == pytest.approx(openmixup_neg_weight(z, y_a, y_b, lam, eta), rel=1e-5)


def test_eta_balanced_limits_and_gradients():
    """eta=1: the plain mixup BCE; eta=0: the two mixed classes alone; the gradient on a class not
    mixed is eta times its BCE gradient sigmoid(z)."""
    rng = np.random.default_rng(0)
    n, c = 8, 6
    z = torch.from_numpy(rng.normal(0, 2, (n, c))).requires_grad_(True)
    y_a, y_b = torch.from_numpy(rng.integers(0, c, n)), torch.from_numpy(rng.integers(0, c, n))
    lam = torch.from_numpy(rng.uniform(0.1, 0.9, n))
    t = CompactTargets(y_a, y_b, lam)
    soft = t.to_soft(c).double()
    plain = F.binary_cross_entropy_with_logits(z, soft, reduction="sum") / n
    torch.testing.assert_close(EtaBalancedMixLoss(eta=1.0)(z, t), plain.float(), rtol=1e-6, atol=0)
    positive = (F.one_hot(y_a, c) + F.one_hot(y_b, c)) > 0
    local = (F.binary_cross_entropy_with_logits(z, soft, reduction="none") * positive).sum() / n
    torch.testing.assert_close(EtaBalancedMixLoss(eta=0.0)(z, t), local.float(), rtol=1e-6, atol=0)
    EtaBalancedMixLoss(eta=0.25)(z, t).backward()
    negative = ~positive
    want = 0.25 * torch.sigmoid(z.detach())[negative] / n
    torch.testing.assert_close(z.grad[negative], want, rtol=1e-5, atol=1e-7)
    # int64 labels: one-hot, one positive per sample
    y = torch.from_numpy(rng.integers(0, c, n))
    onehot = CompactTargets(y, y, torch.ones(n))
    torch.testing.assert_close(EtaBalancedMixLoss(eta=0.4)(z, y), EtaBalancedMixLoss(eta=0.4)(z, onehot))
    with pytest.raises(ValueError, match="eta"):
        EtaBalancedMixLoss(eta=1.5)
    with pytest.raises(ValueError, match="soft targets"):
        EtaBalancedMixLoss()(z, torch.zeros(n, c + 1))


def test_openmixups_released_samix_head_ignores_neg_weight():
    """OpenMixup's released SAMix configs put neg_weight on a SOFTMAX soft cross-entropy: the class
    weights max(y > 0, w) only touch zero targets, so the Mix Block is trained with the plain
    mixup cross-entropy whatever w is, which is AutoMix(mix_block_loss="ce")."""
    rng = np.random.default_rng(3)
    n, c = 10, 7
    z = torch.from_numpy(rng.normal(0, 2, (n, c))).float()
    t = CompactTargets(torch.from_numpy(rng.integers(0, c, n)), torch.from_numpy(rng.integers(0, c, n)), torch.rand(n))
    y = t.to_soft(c)
    for w in (0.5, 1.0):
        weighted = (-y * F.log_softmax(z, dim=-1) * (y > 0).float().clamp(min=w)).sum(-1).mean()
        torch.testing.assert_close(weighted, MixCrossEntropy()(z, t))
