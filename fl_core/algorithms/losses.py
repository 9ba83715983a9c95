"""Losses shared by several algorithms: kernel MMD and the balanced softmax.

Written once here so that FedCP, FedPHP, FedKTL (MMD) and FedRoD, FedLC-style calibrations
(balanced softmax) use the same, tested definitions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def _check_samples(x: Tensor, y: Tensor) -> None:
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(
            f"MMD needs two 2-d samples with the same feature size, got {tuple(x.shape)} and "
            f"{tuple(y.shape)}"
        )


def joint_squared_distances(x: Tensor, y: Tensor) -> Tensor:
    """``||zi - zj||^2`` over the joint sample ``z = [x; y]``, computed once for every kernel.

    By ``|a|^2 + |b|^2 - 2<a, b>`` (one matrix product) on ``z`` centred on its mean, which
    changes no distance and keeps the norms small so the subtraction stays accurate; clamped at
    zero, with an exact zero diagonal.
    """
    z = torch.cat([x, y], dim=0)
    z = z - z.mean(dim=0, keepdim=True)
    sq = z.square().sum(dim=1)
    d2 = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2.0 * (z @ z.T)).clamp(min=0.0)
    off_diagonal = ~torch.eye(z.shape[0], dtype=torch.bool, device=z.device)
    return d2 * off_diagonal


def _kernel_sum(d2: Tensor, widths: Tensor) -> Tensor:
    """``sum_a exp(-d2 / a)`` for every width ``a`` at once."""
    return torch.exp(d2.unsqueeze(0) / -widths.view(-1, 1, 1)).sum(dim=0)


def gaussian_kernel_matrix(
    x: Tensor,
    y: Tensor,
    kernel_mul: float = 2.0,
    kernel_num: int = 5,
    bandwidth: float | None = None,
) -> Tensor:
    """The sum of ``kernel_num`` Gaussian kernels over the joint sample ``[x; y]``.

    Bandwidths are ``base * kernel_mul**i`` for ``i`` centred on 0 (``i`` from
    ``-(kernel_num // 2)``), where ``base`` is ``bandwidth`` when given, else the mean pairwise
    squared distance of the joint sample (the usual median-heuristic stand-in of deep domain
    adaptation's multi-kernel MMD). The base bandwidth carries no gradient.
    """
    _check_samples(x, y)
    if kernel_num < 1 or kernel_mul <= 0:
        raise ValueError(
            f"kernel_num must be >= 1 and kernel_mul > 0, got {kernel_num}, {kernel_mul}"
        )
    d2 = joint_squared_distances(x, y)
    n = d2.shape[0]
    if bandwidth is None:
        base = d2.detach().sum() / max(n * n - n, 1)
        base = torch.clamp(base, min=torch.finfo(d2.dtype).tiny)
    else:
        if bandwidth <= 0:
            raise ValueError(f"bandwidth must be > 0, got {bandwidth}")
        base = torch.tensor(float(bandwidth), dtype=d2.dtype, device=d2.device)
    start = -(kernel_num // 2)
    scales = torch.tensor(
        [kernel_mul ** (start + i) for i in range(kernel_num)], dtype=d2.dtype, device=d2.device
    )
    return _kernel_sum(d2, base * scales)


def rbf_kernel_matrix(x: Tensor, y: Tensor, bandwidths: Sequence[float]) -> Tensor:
    """``sum_a exp(-||zi - zj||^2 / a)`` over the joint sample ``[x; y]``, for fixed
    bandwidths ``a`` (FedCP's 20, 30, 40, 100; FedKTL's server uses 2 x {10, 15, 20, 50})."""
    _check_samples(x, y)
    if not bandwidths or any(a <= 0 for a in bandwidths):
        raise ValueError(f"bandwidths must be positive numbers, got {list(bandwidths)}")
    d2 = joint_squared_distances(x, y)
    widths = torch.tensor([float(a) for a in bandwidths], dtype=d2.dtype, device=d2.device)
    return _kernel_sum(d2, widths)


def mmd(
    x: Tensor,
    y: Tensor,
    kernel_mul: float = 2.0,
    kernel_num: int = 5,
    bandwidth: float | None = None,
    bandwidths: Sequence[float] | None = None,
) -> Tensor:
    """The (biased, V-statistic) squared maximum mean discrepancy between samples ``x`` and ``y``
    under a multi-bandwidth Gaussian kernel: fixed ``bandwidths`` (:func:`rbf_kernel_matrix`)
    when given, else bandwidths scaled from the data (:func:`gaussian_kernel_matrix`).

    Samples may differ in size. It is zero when the two samples are equal and differentiable in
    both. ``mean(Kxx) + mean(Kyy) - 2 mean(Kxy)``.
    """
    if bandwidths is not None:
        k = rbf_kernel_matrix(x, y, bandwidths)
    else:
        k = gaussian_kernel_matrix(x, y, kernel_mul, kernel_num, bandwidth)
    n = x.shape[0]
    kxx, kyy, kxy = k[:n, :n], k[n:, n:], k[:n, n:]
    return kxx.mean() + kyy.mean() - 2 * kxy.mean()


def balanced_softmax_loss(logits: Tensor, target: Tensor, class_counts: Tensor) -> Tensor:
    """Balanced softmax cross-entropy (Ren et al., NeurIPS 2020): the logits shifted by the log
    of each class's sample count before the softmax. Classes with no samples get a count of
    zero, i.e. a shift of -inf clipped to a very small value, so they are never predicted during
    training yet keep finite gradients."""
    if class_counts.shape != (logits.shape[-1],):
        raise ValueError(
            f"class_counts must have one entry per class ({logits.shape[-1]}), got shape "
            f"{tuple(class_counts.shape)}"
        )
    counts = class_counts.to(device=logits.device, dtype=logits.dtype)
    shift = torch.log(torch.clamp(counts, min=torch.finfo(logits.dtype).tiny))
    return F.cross_entropy(logits + shift, target)
