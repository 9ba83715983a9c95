"""FedPHP (Li et al., ECML-PKDD 2021): federated personalisation with inherited private models.

The global model is trained and averaged as in FedAvg. Each client also keeps an inherited
private model (HPM): a temporal ensemble of its own past local models, which supervises the next
local training and is the client's personalised model. A selected client

1. starts its local model from the received global model and trains it on
   (1 - lam)·CE + lam·MMD(body features, the HPM's body features on the same batch), the HPM
   frozen (the paper's MMD knowledge transfer, with the shared `losses.mmd`);
2. updates the HPM as a moving average of the trained local model,
   HPM ← mu_i·HPM + (1 - mu_i)·local, where mu_i = min(mu·k_i / K, mu) grows with k_i, the number
   of the client's earlier participations, and K = max(1, join_ratio·rounds), its expected
   number (the authors' schedule);
3. uploads the local model.

Evaluation uses the HPM. What travels is the model, both ways, as FedAvg.

Defaults follow the authors' FedRepo code: mu = 0.9 (the HPM's final momentum), lam = 0.1
(their MMD setting).

Differences from PFLlib's FedPHP:

- PFLlib's defaults (``-mu 0``, ``-lam 1``) make the HPM a copy of the last local model and drop
  the cross-entropy entirely (weight 1 - lam = 0); ours are the authors' (mu = 0.9, lam = 0.1).
- PFLlib's moving-average rate grows with the round (mu·round/R) for every client; the authors
  count each client's own participations, which is
  what ``schedule="participations"`` (default) does; ``schedule="rounds"`` gives PFLlib's
  mu·round/R (with ``mu`` set to PFLlib's value).
- PFLlib evaluates the just-trained local model before aggregation; the paper and the authors'
  code evaluate the HPM, as here.
- PFLlib's MMD is its own 4-bandwidth RBF; here the library's multi-bandwidth Gaussian MMD.
- The HPM of a client's first participation is the received global model (the authors start it
  at the initial model, which is the same model in round 1, a random one later).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from .base import Client, ClientContext, HParams, Reply, TrainResult
from .fedavg import FedAvgServer
from .losses import mmd
from .parts import Part
from .registry import register_algorithm


class FedPHPHParams(HParams):
    mu: float = Field(0.9, ge=0.0, le=1.0, description="final momentum of the HPM's average")
    lam: float = Field(
        0.1, ge=0.0, le=1.0, description="weight of the MMD to the HPM (1 - lam on the CE)"
    )
    schedule: Literal["participations", "rounds"] = Field(
        "participations",
        description="grow the HPM momentum with the client's participations (authors) or with "
        "the round (PFLlib)",
    )


class FedPHPClient(Client):
    shared = ("model",)
    persistent = ("hpm", "php")

    def __init__(self, ctx: ClientContext) -> None:
        super().__init__(ctx)
        self.hpm = ctx.extra_model("hpm")
        self.php = {"participations": torch.zeros((), dtype=torch.int64)}
        self._has_hpm = False
        self._teaching = False

    def parts(self) -> dict[str, Part]:
        return {**super().parts(), "hpm": self.hpm, "php": self.php}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        super().load_state_dict(state)
        self._has_hpm = bool(state)

    def momentum(self) -> float:
        """mu_i for this participation."""
        hp, settings = self.hp, self.ctx.settings
        if hp.schedule == "rounds":
            return min(hp.mu * self.ctx.round / max(settings.rounds, 1), hp.mu)
        expected = max(1, int(settings.join_ratio * settings.rounds + 0.5))
        return min(hp.mu * int(self.php["participations"]) / expected, hp.mu)

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        if not self._teaching or model is not self.model:
            return super().loss(model, x, y)
        features = model.body(x)
        ce = nn.functional.cross_entropy(model.head(features), y)
        if self.hp.lam == 0.0:
            return ce
        with torch.no_grad():
            teacher = self.hpm.body(x)
        transfer = mmd(features.flatten(1), teacher.flatten(1))
        return (1.0 - self.hp.lam) * ce + self.hp.lam * transfer

    def local_update(self, epochs: int | None = None) -> TrainResult:
        if not self._has_hpm:
            self.hpm.load_state_dict(self.model.state_dict())
        self.hpm.eval()
        for p in self.hpm.parameters():
            p.requires_grad_(False)
        self._teaching = True
        try:
            result = self.train(epochs=epochs)
        finally:
            self._teaching = False
            for p in self.hpm.parameters():
                p.requires_grad_(True)
        mu = self.momentum()
        with torch.no_grad():
            local = self.model.state_dict()
            for key, h in self.hpm.state_dict().items():
                if h.is_floating_point():
                    h.mul_(mu).add_(local[key], alpha=1.0 - mu)
                else:
                    h.copy_(local[key])
        self.php["participations"] = self.php["participations"] + 1
        self._has_hpm = True
        return result

    def fit(self) -> Reply:
        result = self.local_update()
        return self.reply(self.upload(), result)

    def finetune(self, epochs: int) -> None:
        self.local_update(epochs)

    def evaluation_model(self) -> nn.Module:
        return self.hpm if self._has_hpm else self.model


register_algorithm(
    "fedphp",
    FedPHPClient,
    FedAvgServer,
    FedPHPHParams,
    "FedPHP: FedAvg plus an inherited private model (moving average) teaching by MMD",
    family="pFL",
    paper="Li et al., FedPHP: Federated Personalization with Inherited Private Models, "
    "ECML-PKDD 2021",
)
