"""The pieces of FedKTL's knowledge transfer, each usable and testable on its own.

- :func:`simplex_etf`: the fixed classifier every client shares.
- :func:`angular_margin_logits`: the additive angular margin (ArcFace) logits against it.
- :func:`normalized_class_prototypes`: what a client uploads.
- :class:`FeatureTransformer` and :func:`align`: the server's map from prototypes into the
  generator's latent space, trained with MMD against the generator's prior plus lambda times the
  distance to class centroids.
- :func:`to_client_inputs` and :func:`client_latents`: generated images and latents in the
  shape, channels and normalisation the clients train on.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fl_core.algorithms.base import LossSum
from fl_core.algorithms.losses import mmd


def simplex_etf(num_classes: int, generator: torch.Generator) -> Tensor:
    """A simplex equiangular tight frame: ``num_classes`` unit vectors of dimension
    ``num_classes`` whose pairwise cosines all equal ``-1 / (num_classes - 1)`` (rows).

    ``sqrt(K / (K - 1)) · U (I - 11ᵀ / K)`` with U a random orthogonal matrix (the Q of a QR
    decomposition of a uniform random matrix drawn from ``generator``), columns taken as the
    class vectors and normalised.
    """
    if num_classes < 2:
        raise ValueError(f"a simplex ETF needs at least 2 classes, got {num_classes}")
    k = num_classes
    q, r = torch.linalg.qr(torch.rand(k, k, generator=generator, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)  # a unique Q for the drawn matrix
    centre = torch.eye(k, dtype=torch.float64) - torch.full((k, k), 1.0 / k, dtype=torch.float64)
    etf = math.sqrt(k / (k - 1)) * q @ centre
    return F.normalize(etf.t(), dim=1).float()


def angular_margin_logits(
    embeddings: Tensor, etf: Tensor, labels: Tensor | None, margin: float, scale: float
) -> Tensor:
    """``scale · cos θ`` between L2-normalised ``embeddings`` and the ETF rows, with the target
    class's ``cos θ_y`` replaced by ``cos(θ_y + margin)`` when ``labels`` are given (ArcFace's
    additive angular margin)."""
    cos = F.normalize(embeddings, dim=1) @ etf.t()
    if labels is None or margin == 0:
        return scale * cos
    eps = 1e-7
    theta = torch.acos(cos.gather(1, labels.unsqueeze(1)).clamp(-1 + eps, 1 - eps))
    target = torch.cos(theta + margin)
    return scale * cos.scatter(1, labels.unsqueeze(1), target)


@torch.no_grad()
def normalized_class_prototypes(
    embed: Callable[[Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    num_classes: int,
    batch_size: int,
    device: torch.device,
) -> Tensor:
    """Per class, the mean of the L2-normalised embeddings ``embed(x)`` of its samples,
    normalised again: shape (classes, embedding size), a zero row for a class with no sample."""
    sums: Tensor | None = None
    counts = torch.zeros(num_classes, dtype=torch.float64, device=device)
    for start in range(0, x.shape[0], batch_size):
        xb = x[start : start + batch_size].to(device)
        yb = y[start : start + batch_size].to(device)
        e = F.normalize(embed(xb).double(), dim=1)
        if sums is None:
            sums = torch.zeros(num_classes, e.shape[1], dtype=torch.float64, device=device)
        sums.index_add_(0, yb, e)
        counts += torch.bincount(yb, minlength=num_classes).double()
    if sums is None:
        raise ValueError("a client without training samples has no prototypes")
    means = sums / counts.clamp(min=1).unsqueeze(1)
    return F.normalize(means, dim=1).float()  # zero rows stay zero


class FeatureTransformer(nn.Module):
    """Prototype (K) -> latent: Linear(K, K) -> BatchNorm1d -> ReLU -> Linear(K, latent_dim).

    Its width is the number of classes, so its size is about K · latent_dim whatever the
    generator: 1.6 M parameters for 100 classes and Stable Diffusion's 16,384-value latent."""

    def __init__(self, in_dim: int, latent_dim: int, generator: torch.Generator) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, in_dim),
            nn.BatchNorm1d(in_dim),
            nn.ReLU(),
            nn.Linear(in_dim, latent_dim),
        )
        with torch.no_grad():  # PyTorch's default init, from the server's generator
            for layer in (self.net[0], self.net[3]):
                bound = 1.0 / math.sqrt(layer.in_features)
                layer.weight.uniform_(-bound, bound, generator=generator)
                layer.bias.uniform_(-bound, bound, generator=generator)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


@torch.no_grad()
def class_means_of(values: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """(per-class means of ``values``, bool mask of classes present)."""
    sums = torch.zeros(num_classes, values.shape[1], dtype=values.dtype, device=values.device)
    sums.index_add_(0, labels, values)
    counts = torch.bincount(labels, minlength=num_classes)
    present = counts > 0
    return sums / counts.clamp(min=1).unsqueeze(1).to(values.dtype), present


def prior_bandwidths(w: Tensor, kernel_mul: float = 2.0, kernel_num: int = 5) -> list[float]:
    """Gaussian-kernel bandwidths scaled to the prior sample ``w`` alone: its mean pairwise
    squared distance times ``kernel_mul**i`` for ``i`` centred on 0. Scaled to the target and not
    to the joint sample, the kernel cannot grow with the transformed prototypes, so the MMD keeps
    pulling them to the prior's scale instead of letting both drift (they diverged round after
    round when the bandwidth followed the joint sample)."""
    n = w.shape[0]
    d2 = torch.cdist(w.detach().double(), w.detach().double()).pow(2)
    base = float(d2.sum() / max(n * n - n, 1)) if n > 1 else float(w.detach().pow(2).sum())
    base = max(base, 1e-12)
    start = -(kernel_num // 2)
    return [base * kernel_mul ** (start + i) for i in range(kernel_num)]


def align(
    transformer: FeatureTransformer,
    centroids: nn.Parameter,
    prototypes: Tensor,
    labels: Tensor,
    sample_prior: Callable[[int], Tensor],
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    lam: float,
    generator: torch.Generator,
    bandwidths: Sequence[float] | None = None,
    clip: float = 100.0,
    prior_norm: bool = True,
) -> list[float]:
    """Train ``transformer`` (and the class ``centroids``) so that the transformed prototypes
    match the generator's latent prior in distribution (MMD against ``sample_prior(n)``, as many
    prior draws as prototypes in the batch) while staying near their class centroid:
    ``MMD(F(P), W) + lam · MSE(F(P), centroid[y])``, Adam, gradient norm clipped at ``clip``.

    Centroids of the classes present start at, and end as, the class means of F(P) in eval
    mode; other classes keep theirs. With ``prior_norm`` the final centroids are rescaled to the
    mean norm of prior draws, so the latents handed to the generator lie where its prior puts
    its mass (and a transformer that drifted cannot carry the centroids away round after round).
    A trailing batch of one prototype is skipped (BatchNorm cannot train on it). Returns the
    mean loss of each epoch.
    """
    num_classes = centroids.shape[0]

    def reset_centroids() -> None:
        transformer.eval()
        with torch.no_grad():
            means, present = class_means_of(transformer(prototypes), labels, num_classes)
            centroids.data[present] = means[present]

    reset_centroids()
    n = prototypes.shape[0]
    losses: list[float] = []
    if n < 2 or epochs == 0:
        epochs = 0
    params = [*transformer.parameters(), centroids]
    opt = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999))
    transformer.train()
    for _ in range(epochs):
        total, steps = LossSum(), 0  # (no epochs: fewer than two prototypes, or epochs == 0)
        for idx in torch.randperm(n, generator=generator).split(batch_size):
            if idx.numel() < 2:
                continue
            idx = idx.to(prototypes.device)
            q = transformer(prototypes[idx])
            w = sample_prior(idx.numel()).reshape(idx.numel(), -1).to(q)
            loss = mmd(q, w, bandwidths=bandwidths or prior_bandwidths(w))
            loss = loss + lam * F.mse_loss(q, centroids[labels[idx]])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(params, clip)
            opt.step()
            total.add(loss)
            steps += 1
        losses.append(total.mean(steps))
    reset_centroids()
    if prior_norm:
        with torch.no_grad():
            target = sample_prior(256).reshape(256, -1).to(centroids).norm(dim=1).mean()
            norms = centroids.data.norm(dim=1, keepdim=True).clamp(min=1e-12)
            centroids.data.mul_(target / norms)
    return losses


def to_client_inputs(
    images: Tensor, input_shape: Sequence[int], normalization: dict | None
) -> Tensor:
    """Generated images (n, C', H', W') in [0, 1] -> the clients' inputs (n, C, H, W).

    Resized (bilinear, antialiased) so that they cover H x W, centre-cropped to it; RGB becomes
    grey by luminance (0.299, 0.587, 0.114), grey becomes RGB by repetition; then normalised as
    the clients' data was: ``(x - mean) / std`` with the dataset's per-channel mean and std
    (exact for image datasets stored as bytes, whose formula is ``(x/255 - mean)/std``; for a
    float-valued source the generated [0, 1] image is taken to be in the source's units)."""
    c, h, w = (int(v) for v in input_shape)
    x = images.float()
    if x.dim() != 4:
        raise ValueError(f"generated images must be (n, C, H, W), got {tuple(x.shape)}")
    if x.shape[1] != c:
        if c == 1 and x.shape[1] == 3:
            weights = torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)
            x = (x * weights).sum(1, keepdim=True)
        elif x.shape[1] == 1:
            x = x.expand(-1, c, -1, -1)
        else:
            raise ValueError(
                f"cannot turn {x.shape[1]}-channel generated images into the clients' {c} "
                "channels (supported: 1 <-> 3, 1 -> any)"
            )
    if (x.shape[2], x.shape[3]) != (h, w):
        scale = max(h / x.shape[2], w / x.shape[3])
        size = (max(h, round(x.shape[2] * scale)), max(w, round(x.shape[3] * scale)))
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        top, left = (x.shape[2] - h) // 2, (x.shape[3] - w) // 2
        x = x[:, :, top : top + h, left : left + w]
    x = x.clamp(0.0, 1.0)
    if normalization:
        mean = torch.tensor(normalization["mean"], dtype=x.dtype, device=x.device)
        std = torch.tensor(normalization["std"], dtype=x.dtype, device=x.device)
        x = (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
    return x.contiguous()


def client_latents(latents: Tensor, latent_shape: Sequence[int], max_dim: int) -> Tensor:
    """The regression targets clients learn: the flattened latents, or, when a spatial latent
    (C, H, W) has more than ``max_dim`` values (Stable Diffusion's initial noise: 16,384),
    its spatial average pooling to the largest size within ``max_dim``."""
    n = latents.shape[0]
    numel = math.prod(latent_shape)
    if numel <= max_dim or len(latent_shape) != 3:
        return latents.reshape(n, numel)
    c, h, w = latent_shape
    side = max(1, int(math.sqrt(max_dim / c)))
    pooled = F.adaptive_avg_pool2d(latents.reshape(n, c, h, w), (min(side, h), min(side, w)))
    return pooled.reshape(n, -1)
