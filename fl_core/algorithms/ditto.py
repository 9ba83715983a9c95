"""Ditto (Li et al., ICML 2021): a global model trained as in FedAvg, and a personal model
trained with a proximal pull of weight mu toward the received global model.

Each round a selected client trains two models: the personal model ``v`` for
``personal_epochs`` epochs on CE + (mu/2)·||v - w_t||², where w_t is the global model it
received, and a copy of w_t for the federation's local epochs with plain SGD; the latter is
uploaded and averaged by sample count. Only the personal model persists, and only it is
evaluated.

Differences from PFLlib's Ditto:

- PFLlib appends both the global and the personal model's accuracy to one list, so its "best
  accuracy" mixes the two; here evaluation reports the personal model only.
- PFLlib's default mu is 0 (the personal model is plain local training); ours is 0.1, one of the
  values the paper sweeps.
- A client that has never trained (a held-out new client) has no personal model: it is
  evaluated with the global model, and fine-tuning starts its personal model from it.
"""

from __future__ import annotations

from pydantic import Field
from torch import nn

from .base import HParams, Message, Reply
from .common import PersonalModelClient
from .fedavg import FedAvgServer
from .fedprox import add_proximal_gradient
from .registry import register_algorithm


class DittoHParams(HParams):
    mu: float = Field(
        0.1, ge=0.0, description="weight of the personal model's pull to the global one"
    )
    personal_epochs: int = Field(
        1, ge=0, description="local epochs of the personal model per round"
    )


class DittoClient(PersonalModelClient):
    shared = ("model",)
    persistent = ("personal",)

    def receive(self, message: Message) -> None:
        super().receive(message)
        self._anchor = [p.detach().clone() for p in self.model.parameters()]

    def before_step(self, model: nn.Module) -> None:
        if model is self.personal:
            add_proximal_gradient(model, self._anchor, self.hp.mu)

    def fit(self) -> Reply:
        personal = self.train(self.personal, epochs=self.hp.personal_epochs)
        result = self.train(self.model)
        reply = self.reply(self.upload(), result)
        reply.metrics["personal_loss"] = personal.loss
        return reply


register_algorithm(
    "ditto",
    DittoClient,
    FedAvgServer,
    DittoHParams,
    "Ditto: a personal model pulled toward the FedAvg global model (evaluates the personal one)",
    family="pFL",
    paper="Li et al., Ditto: Fair and Robust Federated Learning Through Personalization, ICML 2021",
)
