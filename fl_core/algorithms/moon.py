"""MOON, model-contrastive federated learning (Li, He and Song, CVPR 2021).

Each round a selected client receives the global model w_g and trains its copy w on

    CE(f(x), y) + mu · l_con,   l_con = -log( e^{sim(z, z_g)/tau} / (e^{sim(z, z_g)/tau}
                                                                  + e^{sim(z, z_prev)/tau}) ),

where z, z_g and z_prev are the body features of the sample under the model being trained, the
received global model and the client's previous local model (the one it uploaded the last time
it trained), and sim is the cosine similarity: the representation is pulled toward the global
one and pushed from the previous local one. The global and previous models are frozen copies in
eval mode. The server is FedAvg's. Down and up per client per round: the whole model, as
FedAvg; the previous local model persists on the client (one model per client).

Before a client's first participation its previous model is the federation's initial model, as
in PFLlib (a copy of the initial model); ``mu=0`` is FedAvg exactly.

Differences from PFLlib's MOON:

- PFLlib's ``-mu`` default is 0, which turns the contrastive term off (FedAvg) and its ``-tau``
  default is 1.0; ours are mu = 1 and tau = 0.5, the paper's values for CIFAR-100 and
  Tiny-ImageNet (it uses mu = 5 on CIFAR-10).
- The paper's networks add a projection head (a two-layer MLP) after the encoder and contrast
  its output; like PFLlib we contrast the body's features, the representation our models share
  with the head, so MOON runs on every architecture with a body/head split unchanged.
- PFLlib's frozen models run in whatever mode they were left in (its previous model is a copy in
  train mode); here both are in eval mode, so contrasting never moves BatchNorm statistics.

On PFLlib's Fashion-MNIST protocol MOON stays below FedAvg within 20 rounds (Dir(0.1): 63.43%
against 67.90%), and so does PFLlib's own MOON code on the same clients with the same mu and
tau (62.52% against its FedAvg's 67.39%; ``benchmarks/results/pfllib_crosscheck.md``): on these
splits, within 20 rounds, the contrastive term slows training rather than helping.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from .base import Client, ClientContext, HParams, Message, Reply
from .fedavg import FedAvgServer
from .parts import Part
from .registry import register_algorithm


class MOONHParams(HParams):
    mu: float = Field(1.0, ge=0.0, description="weight of the model-contrastive loss (0 = FedAvg)")
    tau: float = Field(0.5, gt=0.0, description="temperature of the contrastive loss")


def model_contrastive_loss(z: Tensor, z_global: Tensor, z_previous: Tensor, tau: float) -> Tensor:
    """Mean over the batch of -log(e^{s_g/tau} / (e^{s_g/tau} + e^{s_p/tau})), s the cosine
    similarity of ``z`` to the global (positive) and previous (negative) representations."""
    pos = F.cosine_similarity(z, z_global, dim=1)
    neg = F.cosine_similarity(z, z_previous, dim=1)
    logits = torch.stack([pos, neg], dim=1) / tau
    # cross-entropy with the positive pair as the target class is exactly -log of the ratio
    return F.cross_entropy(logits, torch.zeros(z.shape[0], dtype=torch.long, device=z.device))


class MOONClient(Client):
    shared = ("model",)
    persistent = ("previous",)  # the model this client uploaded the last time it trained

    def __init__(self, ctx: ClientContext) -> None:
        super().__init__(ctx)
        self.previous = ctx.extra_model("previous")
        self.global_model = ctx.extra_model("global") if self.hp.mu > 0 else None

    def parts(self) -> dict[str, Part]:
        return {**super().parts(), "previous": self.previous}

    def receive(self, message: Message) -> None:
        super().receive(message)
        if self.global_model is not None:
            self.global_model.load_state_dict(self.model.state_dict())

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        if self.global_model is None or model is not self.model or not model.training:
            return F.cross_entropy(model(x), y)
        z = model.body(x)
        loss = F.cross_entropy(model.head(z), y)
        with torch.no_grad():
            self.global_model.eval()
            self.previous.eval()
            z_global = self.global_model.body(x)
            z_previous = self.previous.body(x)
        return loss + self.hp.mu * model_contrastive_loss(z, z_global, z_previous, self.hp.tau)

    def fit(self) -> Reply:
        result = self.train()
        self.previous.load_state_dict(self.model.state_dict())
        return self.reply(self.upload(), result)


register_algorithm(
    "moon",
    MOONClient,
    FedAvgServer,
    MOONHParams,
    "MOON: FedAvg with a contrastive pull of features toward the global model, away from the "
    "previous local one",
    family="tFL",
    paper="Li, He and Song, Model-Contrastive Federated Learning, CVPR 2021",
)
