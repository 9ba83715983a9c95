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


def brute_rbf(x, y, bandwidths):
    """Autograd-capable brute force: explicit differences, one kernel matrix per bandwidth."""
    z = torch.cat([x, y])
    d2 = ((z[:, None] - z[None]) ** 2).sum(-1)
    k = sum(torch.exp(-d2 / b) for b in bandwidths)
    n = len(x)
    return k[:n, :n].mean() + k[n:, n:].mean() - 2 * k[:n, n:].mean()


def test_fixed_bandwidths_are_one_kernel_sum_with_the_brute_force_value_and_gradient():
    g = torch.Generator().manual_seed(5)
    bw = (20.0, 30.0, 40.0, 100.0)
    x = (torch.randn(9, 6, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    y = (torch.randn(7, 6, generator=g, dtype=torch.float64) * 3 + 1).requires_grad_(True)
    got = mmd(x, y, bandwidths=bw)
    # the MMD is linear in the kernel: the sum of the single-bandwidth MMDs
    singles = sum(mmd(x, y, kernel_num=1, bandwidth=b) for b in bw)
    assert float(got.detach()) == pytest.approx(float(singles.detach()), rel=1e-12)
    ref = brute_rbf(x, y, bw)
    assert float(got.detach()) == pytest.approx(float(ref.detach()), rel=1e-10)
    gx, gy = torch.autograd.grad(got, (x, y))
    rx, ry = torch.autograd.grad(ref, (x, y))
    assert torch.allclose(gx, rx, rtol=1e-8, atol=1e-12)
    assert torch.allclose(gy, ry, rtol=1e-8, atol=1e-12)


def test_mmd_stays_accurate_in_float32_far_from_the_origin():
    # features offset by 100: computing |a|^2 + |b|^2 - 2<a, b> on uncentred float32 vectors
    # (as torch.cdist does for 40 rows) is off by about 1e-3 here
    g = torch.Generator().manual_seed(4)
    x = torch.randn(20, 64, generator=g) + 100.0
    y = torch.randn(20, 64, generator=g) * 1.2 + 100.3
    bw = [20.0, 30.0, 40.0, 100.0]
    exact = float(mmd(x.double(), y.double(), bandwidths=bw))
    assert float(mmd(x, y, bandwidths=bw)) == pytest.approx(exact, rel=1e-5)
    assert float(mmd(x, y)) == pytest.approx(float(mmd(x.double(), y.double())), rel=1e-5)
