"""FedProx (Li et al., 2020): FedAvg whose local objective adds (mu/2)·||w - w_global||².

PFLlib's default ``mu`` is 0, which silently makes FedProx FedAvg; ours is 0.01.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from .base import HParams, Message
from .fedavg import FedAvgClient, FedAvgServer
from .registry import register_algorithm


class FedProxHParams(HParams):
    mu: float = Field(0.01, ge=0.0, description="weight of the proximal term (0 = FedAvg)")


def add_proximal_gradient(model: nn.Module, anchor: list[torch.Tensor], mu: float) -> None:
    """Add the gradient of (mu/2)·||w - anchor||², i.e. mu·(w - anchor), to each parameter."""
    if mu == 0.0:
        return
    with torch.no_grad():
        for p, a in zip(model.parameters(), anchor, strict=True):
            if p.grad is not None:
                p.grad.add_(p.detach() - a, alpha=mu)


class FedProxClient(FedAvgClient):
    def receive(self, message: Message) -> None:
        super().receive(message)
        # the anchor is the received global model, one tensor per trainable parameter
        self._anchor = [p.detach().clone() for p in self.model.parameters()]

    def before_step(self, model: nn.Module) -> None:
        add_proximal_gradient(model, self._anchor, self.hp.mu)


register_algorithm(
    "fedprox",
    FedProxClient,
    FedAvgServer,
    FedProxHParams,
    "FedProx: FedAvg with a proximal term mu/2·||w - w_global||²",
    family="tFL",
    paper="Li et al., Federated Optimization in Heterogeneous Networks, MLSys 2020",
)
