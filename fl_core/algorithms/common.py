"""Pieces shared by many algorithms: weighted averaging of tensor dicts."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Message


def weighted_average(messages: list[tuple[Message, float]]) -> dict[str, Tensor]:
    """Average each key over the messages that carry it, weighted by the given weights.

    Floating tensors are averaged in float64 and cast back; integer tensors (e.g. BatchNorm's
    ``num_batches_tracked``) take the maximum, which is what a counter means after merging.
    """
    if not messages:
        return {}
    keys: dict[str, None] = {}
    for msg, _ in messages:
        keys.update(dict.fromkeys(msg))
    out: dict[str, Tensor] = {}
    for key in keys:
        present = [(m[key], float(w)) for m, w in messages if key in m]
        first = present[0][0]
        if not first.is_floating_point():
            out[key] = torch.stack([t for t, _ in present]).max(dim=0).values
            continue
        total = sum(w for _, w in present)
        if total <= 0:
            total, present = float(len(present)), [(t, 1.0) for t, _ in present]
        acc = torch.zeros_like(first, dtype=torch.float64)
        for t, w in present:
            acc.add_(t.to(torch.float64), alpha=w / total)
        out[key] = acc.to(first.dtype)
    return out
