"""FedRoD (Chen & Chao, ICLR 2022): a generic model trained for balanced risk, and a personal
head on top of it.

The model's body and head (the *generic* head) are trained with the balanced softmax loss
(the logits shifted by the log of the client's own class counts, Ren et al. 2020), which
estimates the class-balanced risk from a label-skewed client; they travel and are averaged by
sample count like FedAvg's model. Each client also keeps a *personal* head of the same
architecture as the generic one; it reads the body's features with their gradient stopped and is
trained with cross-entropy on the sum of both heads' logits, the generic logits held fixed.
A client predicts with that sum. Per batch, one SGD step updates the body and generic head on the
balanced loss and the personal head on its own loss (their parameters are disjoint, so this is
the two separate steps of the paper).

Up and down per client and round: the whole model (body and generic head). The personal head
never travels; it persists in the client's state.

Differences from PFLlib's FedROD:

- None in the update. The generic head is the model's declared head (PFLlib finds it as
  ``fc``), the personal head starts as a copy of its initial value on every client, as in
  PFLlib, and buffers (BatchNorm statistics) are averaged with the model.
- PFLlib reports as train loss the cross-entropy of the summed logits; here it is the training
  objective (balanced loss plus the personal head's loss).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import Client, ClientContext, EvalReport, HParams, Reply, TrainResult
from .fedavg import FedAvgServer
from .losses import balanced_softmax_loss
from .parts import Part
from .registry import register_algorithm


class FedRoDHParams(HParams):
    """FedRoD has no hyperparameters beyond the federation's training settings."""


class FedRoDClient(Client):
    shared = ("model",)  # body + generic head, averaged
    persistent = ("personal",)  # the personal head, never sent

    def __init__(self, ctx: ClientContext) -> None:
        super().__init__(ctx)
        # the personal head: the architecture's head, at its initial value until state loads
        self.personal = ctx.extra_model("fedrod-personal").head
        self.class_counts = torch.bincount(ctx.train_y, minlength=ctx.num_classes).to(ctx.device)

    def parts(self) -> dict[str, Part]:
        return {**super().parts(), "personal": self.personal}

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        features = model.body(x)
        generic = model.head(features)
        balanced = balanced_softmax_loss(generic, y, self.class_counts)
        personal = self.personal(features.detach())
        return balanced + nn.functional.cross_entropy(generic.detach() + personal, y)

    def predict(self, model: nn.Module, x: Tensor) -> Tensor:
        features = model.body(x)
        return model.head(features) + self.personal(features)

    def train_both(self, epochs: int | None = None) -> TrainResult:
        """SGD on the body, the generic head and the personal head together."""
        self.personal.train()
        params = [*self.model.parameters(), *self.personal.parameters()]
        return self.train(params=params, epochs=epochs)

    def fit(self) -> Reply:
        result = self.train_both()
        return self.reply(self.upload(), result)

    def finetune(self, epochs: int) -> None:
        self.train_both(epochs)

    def evaluate(self, model: nn.Module | None = None, train_loss: bool = True) -> EvalReport:
        self.personal.eval()
        return super().evaluate(model, train_loss)


register_algorithm(
    "fedrod",
    FedRoDClient,
    FedAvgServer,
    FedRoDHParams,
    "FedRoD: generic model trained with balanced softmax and averaged, plus a personal head",
    family="pFL",
    paper="Chen & Chao, On Bridging Generic and Personalized Federated Learning for Image "
    "Classification, ICLR 2022",
)
