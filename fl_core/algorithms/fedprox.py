"""FedProx (Li et al., 2020): FedAvg whose local objective adds (mu/2)·||w - w_global||²."""

from __future__ import annotations

import torch
from pydantic import Field

from .base import HParams, Message
from .fedavg import FedAvgClient, FedAvgServer
from .registry import register_algorithm


class FedProxHParams(HParams):
    mu: float = Field(0.01, ge=0.0, description="weight of the proximal term (0 = FedAvg)")


class FedProxClient(FedAvgClient):
    def receive(self, message: Message) -> None:
        super().receive(message)
        # the anchor is the received global model, one tensor per trainable parameter
        self._anchor = [p.detach().clone() for p in self.model.parameters()]

    def before_step(self) -> None:
        # gradient of (mu/2)·||w - w_g||² is mu·(w - w_g)
        mu = self.hp.mu
        if mu == 0.0:
            return
        with torch.no_grad():
            for p, a in zip(self.model.parameters(), self._anchor, strict=True):
                if p.grad is not None:
                    p.grad.add_(p.detach() - a, alpha=mu)


register_algorithm(
    "fedprox",
    FedProxClient,
    FedAvgServer,
    FedProxHParams,
    "FedProx: FedAvg with a proximal term mu/2·||w - w_global||² (Li et al., 2020)",
)
