"""Losses shared by several algorithms: kernel MMD and the balanced softmax.

Written once here so that FedCP, FedPHP, FedKTL (MMD) and FedRoD, FedLC-style calibrations
(balanced softmax) use the same, tested definitions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


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
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(
            f"MMD needs two 2-d samples with the same feature size, got {tuple(x.shape)} and "
            f"{tuple(y.shape)}"
        )
    if kernel_num < 1 or kernel_mul <= 0:
        raise ValueError(
            f"kernel_num must be >= 1 and kernel_mul > 0, got {kernel_num}, {kernel_mul}"
        )
    z = torch.cat([x, y], dim=0)
    d2 = torch.cdist(z, z).pow(2)
    n = z.shape[0]
    if bandwidth is None:
        base = d2.detach().sum() / max(n * n - n, 1)
        base = torch.clamp(base, min=torch.finfo(z.dtype).tiny)
    else:
        if bandwidth <= 0:
            raise ValueError(f"bandwidth must be > 0, got {bandwidth}")
        base = torch.tensor(float(bandwidth), dtype=z.dtype, device=z.device)
    start = -(kernel_num // 2)
    scales = [kernel_mul ** (start + i) for i in range(kernel_num)]
    return sum(torch.exp(-d2 / (base * s)) for s in scales)


def rbf_kernel_matrix(x: Tensor, y: Tensor, bandwidths: Sequence[float]) -> Tensor:
    """``sum_a exp(-||zi - zj||^2 / a)`` over the joint sample ``[x; y]``, for fixed
    bandwidths ``a`` (FedKTL's server uses 2 x {10, 15, 20, 50})."""
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(
            f"MMD needs two 2-d samples with the same feature size, got {tuple(x.shape)} and "
            f"{tuple(y.shape)}"
        )
    if not bandwidths or any(a <= 0 for a in bandwidths):
        raise ValueError(f"bandwidths must be positive numbers, got {list(bandwidths)}")
    z = torch.cat([x, y], dim=0)
    d2 = torch.cdist(z, z).pow(2)
    return sum(torch.exp(-d2 / float(a)) for a in bandwidths)


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
