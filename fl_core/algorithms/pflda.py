"""PFL-DA (Technometrics 2023): personalized federated learning via domain adaptation.

Each client holds a personal model (body + personal head) that never travels, and a copy of the
*global head*, the only thing that is shared. A selected client, each round:

1. receives the global head w_g;
2. trains its personal head for the federation's local epochs with its body frozen, on
   CE(personal head(body(x)), y) + lam·||w_p - w_g||₂ (a pull of the personal head toward the
   received global head, unsquared L2 norm over all head parameters);
3. trains its body together with the global head for the same number of epochs, on
   CE(global head(body(x)), y), the personal head frozen;
4. uploads the global head; the server averages the heads by sample count.

A client is evaluated with its personal model (body + personal head). Only a head crosses the
wire, so clients may have different bodies (declared ``heterogeneous``) as long as their heads
have one shape.

Differences from PFLlib's PFL-DA:

- PFLlib builds the proximity term from ``.data`` copies of both heads, so it carries no
  gradient and phase 1 is plain CE: the pull toward the global head never acts. Here the term is
  differentiable in the personal head (the global head is the fixed anchor), as the paper's
  regularised objective requires. ``proximal_gradient=false`` reproduces PFLlib (the term is
  then reported in the loss but has no effect on training).
- The form of the term (lam times the unsquared L2 norm) and its default weight (1.0) are
  PFLlib's ``-lam``.
- A client that has never trained (a held-out new client) starts its body from the
  federation's initial weights, as in PFLlib; its fine-tuning runs both phases.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor, nn

from .base import Client, ClientContext, HParams, Message, Reply
from .common import shared_model_state
from .fedavg import FedAvgServer
from .parts import Part
from .registry import register_algorithm


class PflDaHParams(HParams):
    lam: float = Field(
        1.0, ge=0.0, description="weight of the personal head's pull to the global head"
    )
    proximal_gradient: bool = Field(
        True,
        description="the pull carries gradient (paper); false reproduces PFLlib, whose term is "
        "a constant",
    )


def head_distance(personal: nn.Module, anchor: list[Tensor]) -> Tensor:
    """||w_p - w_g||₂ over all head parameters (differentiable in ``personal``)."""
    diffs = [(p - a).flatten() for p, a in zip(personal.parameters(), anchor, strict=True)]
    return torch.cat(diffs).norm(p=2)


class PflDaClient(Client):
    shared = ("ghead",)
    persistent = ("model",)

    def __init__(self, ctx: ClientContext) -> None:
        super().__init__(ctx)
        # a head of this architecture at its initial weights; the received global head fills it
        self.ghead = ctx.extra_model("ghead").head
        self._phase = "eval"  # "personal" / "global" while training; plain CE otherwise

    def parts(self) -> dict[str, Part]:
        return {**super().parts(), "ghead": self.ghead}

    def receive(self, message: Message) -> None:
        super().receive(message)
        self._anchor = [p.detach().clone() for p in self.ghead.parameters()]

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        features = model.body(x)
        if self._phase == "global":
            return nn.functional.cross_entropy(self.ghead(features), y)
        loss = nn.functional.cross_entropy(model.head(features), y)
        if self._phase == "personal" and self.hp.lam > 0:
            distance = head_distance(model.head, self._anchor)
            if not self.hp.proximal_gradient:
                distance = distance.detach()
            loss = loss + self.hp.lam * distance
        return loss

    def _train_both_phases(self, epochs: int | None = None):
        self._phase = "personal"
        personal = self.train(params=self.model.head.parameters(), epochs=epochs)
        self._phase = "global"
        # the model's head is frozen by leaving it out; the global head is trained beside the body
        params = [*self.model.body.parameters(), *self.ghead.parameters()]
        result = self.train(params=params, epochs=epochs)
        self._phase = "eval"
        return personal, result

    def fit(self) -> Reply:
        personal, result = self._train_both_phases()
        reply = self.reply(self.upload(), result)
        reply.metrics["personal_loss"] = personal.loss
        return reply

    def finetune(self, epochs: int) -> None:
        self._train_both_phases(epochs)


class PflDaServer(FedAvgServer):
    """Averages the global heads by sample count."""

    def initial_state(self) -> dict[str, Tensor]:
        # the heads must agree in shape across architectures (checked as for a shared head)
        heads = shared_model_state(self.ctx, ("model/head",))
        return {"ghead/" + k.removeprefix("model/head."): v for k, v in heads.items()}


register_algorithm(
    "pflda",
    PflDaClient,
    PflDaServer,
    PflDaHParams,
    "PFL-DA: a shared global head trained with each local body; personal heads pulled toward it",
    family="pFL",
    paper="Personalized Federated Learning via Domain Adaptation with an Application to "
    "Distributed 3D Printing, Technometrics 2023",
    heterogeneous=True,
)
