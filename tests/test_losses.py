"""DecoupleMix's loss against a float64 re-derivation of the paper's definition and OpenMixup's
soft decoupled cross-entropy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dalimix.losses import DecoupledMixCrossEntropy, MixCrossEntropy
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
