"""The shared losses against brute-force computations."""

import math

import pytest
import torch
import torch.nn.functional as F

from fl_core.algorithms.losses import balanced_softmax_loss, mmd


def brute_mmd(x, y, mul=2.0, num=5):
    z = torch.cat([x, y]).double()
    n = len(z)
    d2 = [[float(((z[i] - z[j]) ** 2).sum()) for j in range(n)] for i in range(n)]
    base = sum(sum(r) for r in d2) / (n * n - n)
    scales = [mul ** (-(num // 2) + i) for i in range(num)]

    def k(i, j):
        return sum(math.exp(-d2[i][j] / (base * s)) for s in scales)

    a = len(x)
    xx = sum(k(i, j) for i in range(a) for j in range(a)) / a**2
    yy = sum(k(i, j) for i in range(a, n) for j in range(a, n)) / (n - a) ** 2
    xy = sum(k(i, j) for i in range(a) for j in range(a, n)) / (a * (n - a))
    return xx + yy - 2 * xy


def test_mmd_zero_for_equal_samples_and_positive_otherwise():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 4, generator=g)
    assert abs(float(mmd(x, x.clone()))) < 1e-6
    assert float(mmd(x, torch.randn(12, 4, generator=g) + 2.0)) > 0.1


def test_mmd_matches_brute_force():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(7, 3, generator=g), torch.randn(5, 3, generator=g) * 1.5 + 0.3
    assert float(mmd(x.double(), y.double())) == pytest.approx(brute_mmd(x, y), rel=1e-9)


def test_mmd_rejects_mismatched_features():
    with pytest.raises(ValueError, match="same feature size"):
        mmd(torch.zeros(3, 2), torch.zeros(3, 4))


def test_balanced_softmax_reduces_to_cross_entropy_with_equal_counts():
    g = torch.Generator().manual_seed(2)
    logits, y = torch.randn(9, 4, generator=g), torch.randint(0, 4, (9,), generator=g)
    assert float(balanced_softmax_loss(logits, y, torch.full((4,), 7.0))) == pytest.approx(
        float(F.cross_entropy(logits, y)), rel=1e-6
    )
    counts = torch.tensor([1.0, 10.0, 100.0, 0.0])
    ref = F.cross_entropy(logits + torch.log(counts.clamp(min=torch.finfo(torch.float32).tiny)), y)
    assert float(balanced_softmax_loss(logits, y, counts)) == pytest.approx(float(ref), rel=1e-6)
