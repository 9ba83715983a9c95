"""FedNTD (Lee et al., NeurIPS 2022): FedAvg whose local loss distils the global model's
knowledge of the *not-true* classes.

Each round a selected client receives the global model w_g, keeps a frozen copy of it, and
trains its copy on

    CE(f(x), y) + beta · tau² · KL(q̃_g ‖ q̃),

where q̃ and q̃_g are the softmax at temperature ``tau`` of the local and the global model's
logits with the true class's logit removed (C - 1 entries per sample), the KL averaged over the
batch. The true class is left to the cross-entropy, so the local model is free to fit its labels
while keeping the global model's view of the other classes. The server is FedAvg's. Down and
up per client per round: the whole model, as FedAvg.

Differences from PFLlib's FedNTD:

- PFLlib's ``-bt`` default is 0, which turns the distillation off and makes FedNTD FedAvg; ours
  is the paper's beta = 1 (with its tau = 1). ``beta=0`` is FedAvg exactly.
- The frozen global model is a copy in eval mode (no BatchNorm statistics move, no dropout),
  as in PFLlib; buffers travel and are averaged as in our FedAvg.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from .base import ClientContext, HParams, Message
from .fedavg import FedAvgClient, FedAvgServer
from .registry import register_algorithm


class FedNTDHParams(HParams):
    beta: float = Field(
        1.0, ge=0.0, description="weight of the not-true distillation loss (0 = FedAvg)"
    )
    tau: float = Field(1.0, gt=0.0, description="softmax temperature of the distillation")


def not_true_logits(logits: Tensor, target: Tensor) -> Tensor:
    """The logits without the true class's entry: shape (n, C - 1), classes in order."""
    n, c = logits.shape
    keep = torch.ones_like(logits, dtype=torch.bool)
    keep[torch.arange(n, device=logits.device), target] = False
    return logits[keep].view(n, c - 1)


def not_true_distillation(logits: Tensor, teacher: Tensor, target: Tensor, tau: float) -> Tensor:
    """tau² · KL(softmax(teacher_nt / tau) ‖ softmax(logits_nt / tau)), averaged per sample,
    over the not-true classes; the teacher carries no gradient."""
    student = F.log_softmax(not_true_logits(logits, target) / tau, dim=1)
    with torch.no_grad():
        teacher_p = F.softmax(not_true_logits(teacher, target) / tau, dim=1)
    return (tau**2) * F.kl_div(student, teacher_p, reduction="batchmean")


class FedNTDClient(FedAvgClient):
    def __init__(self, ctx: ClientContext) -> None:
        super().__init__(ctx)
        # a frozen copy of the received global model (pooled, not part of any state)
        self.global_model = ctx.extra_model("global") if self.hp.beta > 0 else None

    def receive(self, message: Message) -> None:
        super().receive(message)
        if self.global_model is not None:
            self.global_model.load_state_dict(self.model.state_dict())
            self.global_model.eval()

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        if self.global_model is not None and model is self.model and model.training:
            with torch.no_grad():
                teacher = self.global_model(x)
            loss = loss + self.hp.beta * not_true_distillation(logits, teacher, y, self.hp.tau)
        return loss


register_algorithm(
    "fedntd",
    FedNTDClient,
    FedAvgServer,
    FedNTDHParams,
    "FedNTD: FedAvg with distillation of the global model's not-true-class predictions",
    family="tFL",
    paper="Lee et al., Preservation of the Global Knowledge by Not-True Distillation in "
    "Federated Learning, NeurIPS 2022",
)
