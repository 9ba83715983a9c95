"""``--evaluate``: the same classifier trained on the synthetic set and on the private few shots
alone, both tested on real held-out images."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _shift(x: torch.Tensor, generator: torch.Generator, pixels: int = 2) -> torch.Tensor:
    """Random translation by up to ``pixels`` (zero padding), one offset per batch."""
    if pixels == 0:
        return x
    dx, dy = (int(v) for v in torch.randint(-pixels, pixels + 1, (2,), generator=generator))
    padded = F.pad(x, (pixels, pixels, pixels, pixels))
    h, w = x.shape[-2:]
    return padded[..., pixels + dy : pixels + dy + h, pixels + dx : pixels + dx + w]


def train_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    model: str = "cnn4",
    steps: int = 400,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
) -> torch.nn.Module:
    """Adam for a fixed number of steps (so a 50-image and a 5,000-image training set get the
    same optimisation effort), random shifts of up to 2 pixels, inputs scaled to [-1, 1]."""
    from fl_core.models import build_model

    torch.manual_seed(seed)
    net = build_model(model, tuple(images.shape[1:]), num_classes, 128)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    n = images.shape[0]
    net.train()
    for _ in range(steps):
        idx = torch.randint(n, (min(batch_size, n),), generator=generator)
        x = _shift(images[idx], generator) * 2 - 1
        loss = F.cross_entropy(net(x), labels[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return net.eval()


@torch.no_grad()
def accuracy(net: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    predictions = torch.cat([net(c * 2 - 1).argmax(1) for c in images.split(500)])
    return float((predictions == labels).float().mean())


def evaluate_downstream(
    synthetic: tuple[torch.Tensor, torch.Tensor],
    few_shot: tuple[torch.Tensor, torch.Tensor],
    heldout: tuple[torch.Tensor, torch.Tensor],
    num_classes: int,
    *,
    model: str = "cnn4",
    steps: int = 400,
    seed: int = 0,
) -> dict:
    """Held-out accuracy of the classifier trained on the synthetic set and on the few shots."""
    out = {"model": model, "steps": steps, "heldout_images": int(heldout[1].shape[0])}
    for key, (x, y) in (("synthetic", synthetic), ("few_shot", few_shot)):
        net = train_classifier(x, y, num_classes, model=model, steps=steps, seed=seed)
        out[f"{key}_accuracy"] = round(accuracy(net, *heldout), 4)
        out[f"{key}_images"] = int(y.shape[0])
    return out
