"""FedMRL (Yi et al., NeurIPS 2024): federated model-heterogeneous Matryoshka representation
learning.

Every client has its own (heterogeneous) model F and a copy of one small homogeneous model G
that all clients share; only G crosses the wire. For an input x a client fuses the two
feature extractors' outputs with its own lightweight projector P:

    r = P([G.body(x) ‖ F.body(x)])          P: Linear(d1 + D, D), personal and persistent
    loss = CE(G.head(r[:, :d1]), y) + CE(F.head(r), y)

so the fused representation is a Matryoshka representation: its first d1 entries (G's feature
size, ``sub_feature_dim``) are a coarse embedding read by G's head, the full D entries (the
federation's ``feature_dim``) the fine one read by the client's own head. F, P and G are trained
together with one SGD optimiser; the client uploads G; the server averages the uploaded G's
(sample-weighted by default) and broadcasts the average. Prediction is F.head(r).

G is built from the model registry as ``shared_model`` with feature size d1, the same on the
server and on every client. Its architecture must be a registered model (checked when the
config is read) and accept the federation's input size. It is not a pooled
``ctx.extra_model``: those are built at the federation's feature size D, and G's is d1. A client
builds it per participation (a small model) and the server's message overwrites all of it.

Differences from HtFLlib's FedMRL:

- HtFLlib never saves the projector after training: every round starts again from its initial
  value, and evaluation uses that initial value too. The paper's projector is personalised and
  learned; here it persists in the client's state (a bug in the reference, not reproduced).
- HtFLlib averages G uniformly over the clients of the round; the paper aggregates as FedAvg,
  by sample count. ``aggregate_by="samples"`` (default) follows the paper,
  ``aggregate_by="clients"`` HtFLlib.
- HtFLlib's G is client 0's architecture (or the group's ``global_model``, FedAvgCNN) with
  feature size ``-sfd`` 128 of the clients' 512. A client here does not know client 0's
  architecture, so G's is a hyperparameter, ``shared_model``, default ``cnn4`` (FedAvgCNN, which
  is client 0's model in HtFE-img-2/4/8 and HtM-img-10 and the HtC groups' global model).
  ``sub_feature_dim`` defaults to feature_dim // 4 (HtFLlib's 128 of 512) so that it scales
  with the federation's feature size; it must not exceed feature_dim.
- HtFLlib seeds every client's projector identically (``torch.manual_seed(0)``); here each
  client's projector is drawn from its own seeded generator.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import Tensor, nn

from fl_core.models import ModelError, build_model
from fl_core.models.registry import canonical_arch

from .base import (
    Client,
    ClientContext,
    EvalReport,
    HParams,
    Reply,
)
from .fedavg import FedAvgServer
from .parts import Part
from .registry import AlgorithmError, register_algorithm


class FedMRLHParams(HParams):
    shared_model: str = Field(
        "cnn4",
        description="architecture of the small model all clients share (a registered model; "
        "HtFLlib: FedAvgCNN = cnn4)",
    )
    sub_feature_dim: int | None = Field(
        None,
        ge=1,
        description="d1: the shared model's feature size, the nested slice its head reads; "
        "None = feature_dim // 4 (HtFLlib: 128 of 512)",
    )
    aggregate_by: Literal["samples", "clients"] = Field(
        "samples", description="average the shared model by sample count (paper) or per client"
    )

    @field_validator("shared_model")
    @classmethod
    def _registered(cls, value: str) -> str:
        try:
            return canonical_arch(value)
        except ModelError as e:
            raise ValueError(str(e)) from None


def sub_feature_dim(hp: FedMRLHParams, feature_dim: int) -> int:
    """d1 for a federation with feature size ``feature_dim``; d1 > feature_dim is an error."""
    d1 = hp.sub_feature_dim if hp.sub_feature_dim is not None else max(1, feature_dim // 4)
    if d1 > feature_dim:
        raise AlgorithmError(
            f"fedmrl: algorithm.sub_feature_dim={d1} exceeds model.feature_dim={feature_dim}; "
            "the shared model's features are the nested first d1 entries of the fused "
            "representation, so d1 must be at most feature_dim"
        )
    return d1


def build_shared_model(
    hp: FedMRLHParams,
    input_shape: tuple[int, ...],
    num_classes: int,
    feature_dim: int,
    seed: int,
) -> nn.Module:
    """The shared small model G (``shared_model`` with feature size d1), initialised from
    ``seed`` without touching the caller's global RNG."""
    d1 = sub_feature_dim(hp, feature_dim)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            return build_model(hp.shared_model, tuple(input_shape), num_classes, d1)
        except ModelError as e:
            raise AlgorithmError(
                f"fedmrl: algorithm.shared_model={hp.shared_model!r}: {e}"
            ) from None


class FedMRLClient(Client):
    shared = ("global",)
    persistent = ("model", "proj")

    def __init__(self, ctx: ClientContext) -> None:
        super().__init__(ctx)
        dim = self.model.feature_dim
        self.d1 = sub_feature_dim(self.hp, dim)
        # every entry is overwritten by the server's message before it is used
        self.global_model = build_shared_model(
            self.hp, tuple(ctx.train_x.shape[1:]), ctx.num_classes, dim, seed=0
        ).to(ctx.device)
        self.proj = nn.Linear(self.d1 + dim, dim).to(ctx.device)

    def parts(self) -> dict[str, Part]:
        return {**super().parts(), "global": self.global_model, "proj": self.proj}

    def fuse(self, model: nn.Module, x: Tensor) -> Tensor:
        """The Matryoshka representation P([G.body(x) ‖ F.body(x)]) of size D."""
        return self.proj(torch.cat([self.global_model.body(x), model.body(x)], dim=1))

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        fused = self.fuse(model, x)
        local = nn.functional.cross_entropy(model.head(fused), y)
        coarse = nn.functional.cross_entropy(self.global_model.head(fused[:, : self.d1]), y)
        return local + coarse

    def predict(self, model: nn.Module, x: Tensor) -> Tensor:
        return model.head(self.fuse(model, x))

    def _train_all(self, epochs: int | None = None):
        self.global_model.train()
        self.proj.train()
        params = [
            *self.model.parameters(),
            *self.proj.parameters(),
            *self.global_model.parameters(),
        ]
        return self.train(params=params, epochs=epochs)

    def fit(self) -> Reply:
        result = self._train_all()
        return self.reply(self.upload(), result)

    def finetune(self, epochs: int) -> None:
        self._train_all(epochs)

    def evaluate(self, model: nn.Module | None = None, train_loss: bool = True) -> EvalReport:
        self.global_model.eval()
        self.proj.eval()
        return super().evaluate(model, train_loss)


class FedMRLServer(FedAvgServer):
    """Holds the shared small model and averages the clients' copies."""

    def initial_state(self) -> dict[str, Tensor]:
        model = build_shared_model(
            self.hp,
            self.ctx.input_shape,
            self.ctx.num_classes,
            self.ctx.feature_dim,
            seed=int(torch.randint(2**62, (1,), generator=self.ctx.rng(0, "global-init"))),
        )
        return {f"global/{k}": v.detach().clone() for k, v in model.state_dict().items()}

    def weight(self, reply: Reply) -> float:
        return float(reply.num_samples) if self.hp.aggregate_by == "samples" else 1.0


register_algorithm(
    "fedmrl",
    FedMRLClient,
    FedMRLServer,
    FedMRLHParams,
    "FedMRL: a shared small model fused with each client's own through a personal projector "
    "(Matryoshka representations); only the small model is averaged",
    family="HtFL",
    paper="Yi et al., Federated Model Heterogeneous Matryoshka Representation Learning, "
    "NeurIPS 2024",
    heterogeneous=True,
)
