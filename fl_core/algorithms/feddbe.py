"""FedDBE (Zhang et al., NeurIPS 2023): domain bias elimination in representation space.

The whole model is shared and averaged by sample count, as in FedAvg, with two additions on each
client:

- *Personalized representation bias memorization (PRBM)*: a learnable vector z_p of the feature
  size, added to the body's features before the head (``head(body(x) + z_p)``), trained with the
  model and never shared;
- *Mean regularization (MR)*: during local training the client keeps a running mean of its
  features over the mini-batches, r ← (1 - momentum)·r + momentum·mean_batch(body(x)) (reset at
  the start of each round, gradient through the current batch only), and adds
  kl_weight·mean_k ½(r_k - z̄_k)² to the loss, pulling it toward the fixed *global* feature mean z̄.

z̄ comes from an initialization period: the first round is plain FedAvg (no PRBM, no MR) in
which each client also uploads its running mean at the end of training; the server takes their
sample-weighted average as z̄, broadcasts it from then on and never changes it. A client is
evaluated with ``head(body(x) + z_p)``.

Differences from PFLlib's FedDBE:

- PFLlib's initialization period is an extra pass of local training by every client inside the
  server's constructor whose models are then thrown away; here it is the first round (its models
  are averaged as in FedAvg, and z̄ averages the clients selected in it: all of them with
  ``join_ratio`` 1, PFLlib's protocol).
- PFLlib's defaults ``-klw 0 -mo 0.1`` switch mean regularization off; ours are the authors'
  published setting for the 4-layer CNN on Fashion-MNIST (``-klw 50 -mo 1``, the run script of
  the official DBE repository).
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor, nn

from .base import Client, ClientContext, HParams, Message, Reply, ServerContext
from .common import weighted_average
from .fedavg import FedAvgServer
from .parts import Part
from .registry import AlgorithmError, register_algorithm


class FedDbeHParams(HParams):
    kl_weight: float = Field(
        50.0, ge=0.0, description="weight κ of the mean regularization (0 = PRBM only)"
    )
    momentum: float = Field(
        1.0, gt=0.0, le=1.0, description="weight of the current batch in the running feature mean"
    )


class FeatureShift(nn.Module):
    """The personalized representation bias z_p (PRBM): one learnable vector of feature size."""

    def __init__(self, feature_dim: int, device: torch.device) -> None:
        super().__init__()
        self.shift = nn.Parameter(torch.zeros(feature_dim, device=device))


class FedDbeClient(Client):
    shared = ("model", "dbe")
    persistent = ("pbias",)

    def __init__(self, ctx: ClientContext) -> None:
        super().__init__(ctx)
        dim = self.model.feature_dim
        self.pbias = FeatureShift(dim, ctx.device)
        self.dbe = {"global_mean": torch.zeros(dim, device=ctx.device)}
        self._ready = False  # whether the global mean z̄ was received
        self._training = False
        self._running: Tensor | None = None

    def parts(self) -> dict[str, Part]:
        return {**super().parts(), "pbias": self.pbias, "dbe": self.dbe}

    def receive(self, message: Message) -> None:
        super().receive(message)
        self._ready = "dbe/global_mean" in message

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        features = model.body(x)
        if not self._training:
            return nn.functional.cross_entropy(model.head(features + self.pbias.shift), y)
        rho = self.hp.momentum
        batch_mean = features.mean(dim=0)
        self._running = (
            batch_mean * rho
            if self._running is None
            else (1 - rho) * self._running.detach() + rho * batch_mean
        )
        if not self._ready:  # initialization period: plain FedAvg
            return nn.functional.cross_entropy(model.head(features), y)
        loss = nn.functional.cross_entropy(model.head(features + self.pbias.shift), y)
        mr = (0.5 * (self._running - self.dbe["global_mean"]).pow(2)).mean()
        return loss + self.hp.kl_weight * mr

    def fit(self) -> Reply:
        self._training, self._running = True, None
        try:
            params = [*self.model.parameters(), *self.pbias.parameters()]
            result = self.train(params=params if self._ready else None)
        finally:
            self._training = False
        message = select_model(self.upload())
        if not self._ready:
            running = self._running
            dim = self.model.feature_dim
            mean = torch.zeros(dim, device=self.ctx.device) if running is None else running
            message["dbe/local_mean"] = mean.detach().clone()
        return self.reply(message, result)

    def predict(self, model: nn.Module, x: Tensor) -> Tensor:
        return model.head(model.body(x) + self.pbias.shift)


def select_model(message: Message) -> Message:
    return {k: v for k, v in message.items() if k.startswith("model/")}


class FedDbeServer(FedAvgServer):
    """FedAvg of the model; the global feature mean is fixed after the first round with replies."""

    def __init__(self, ctx: ServerContext, hparams: HParams) -> None:
        super().__init__(ctx, hparams)
        self.global_mean: Tensor | None = None

    def broadcast(self, round: int) -> Message:
        if self.global_mean is None:
            return self.global_state
        return {**self.global_state, "dbe/global_mean": self.global_mean}

    def aggregate(self, round: int, replies: dict[int, Reply]) -> None:
        if not replies:
            return
        means = []
        models = {}
        for cid, reply in replies.items():
            models[cid] = Reply(select_model(reply.message), reply.num_samples)
            if "dbe/local_mean" in reply.message:
                means.append(({"m": reply.message["dbe/local_mean"]}, float(reply.num_samples)))
            elif self.global_mean is None:
                raise AlgorithmError(f"client {cid} sent no feature mean in the first round")
        super().aggregate(round, models)
        if self.global_mean is None:
            self.global_mean = weighted_average(means)["m"]

    def state_dict(self) -> dict[str, Tensor]:
        extra = {} if self.global_mean is None else {"dbe/global_mean": self.global_mean}
        return {**self.global_state, **extra}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.global_mean = state.get("dbe/global_mean")
        self.global_state = {k: v for k, v in state.items() if k.startswith("model/")}


register_algorithm(
    "feddbe",
    FedDbeClient,
    FedDbeServer,
    FedDbeHParams,
    "FedDBE: FedAvg with a personal feature shift and a pull of the feature mean to a global one",
    family="pFL",
    paper="Zhang et al., Eliminating Domain Bias for Federated Learning in Representation "
    "Space, NeurIPS 2023",
)
