"""FedProto (Tan et al., AAAI 2022): no model crosses the wire, only class prototypes.

A client trains its whole (private) model on CE + lambda·MSE(feature, global prototype of its
label), then uploads, per class, the mean feature of its training samples (computed in eval mode
after training) and the class's sample count: exactly classes × feature size floats plus
classes counts, zeros for classes it lacks. The server averages each class's prototypes weighted
by those counts (the paper's |D_i,j| / N_j) and broadcasts them with the pooled counts. A client
predicts the class of the nearest global prototype (squared Euclidean distance).

Differences from PFLlib's FedProto:

- PFLlib averages a class's prototypes uniformly over the clients holding it; the paper weights
  them by sample count. ``aggregate_by="samples"`` (default) follows the paper,
  ``aggregate_by="clients"`` PFLlib.
- Before any global prototype exists (the round-0 evaluation) PFLlib reports accuracy 0; here a
  client predicts with its own head until then.
- Classes that no client has seen have no global prototype and are never predicted. With
  partial participation a class no selected client holds keeps its last global prototype (PFLlib
  rebuilds the set from the round's uploads alone, so such a class disappears for a round).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from .base import Client, ClientContext, HParams, Message, Reply, Server, ServerContext
from .common import class_means
from .parts import Part
from .registry import register_algorithm


class FedProtoHParams(HParams):
    lam: float = Field(1.0, ge=0.0, description="weight of the MSE to the global prototypes")
    aggregate_by: Literal["samples", "clients"] = Field(
        "samples", description="weight class prototypes by sample count (paper) or per client"
    )


class FedProtoClient(Client):
    shared = ("proto",)
    persistent = ("model",)

    def __init__(self, ctx: ClientContext) -> None:
        super().__init__(ctx)
        feature_dim = self.model.feature_dim
        self.proto = {
            "global": torch.zeros(ctx.num_classes, feature_dim, device=ctx.device),
            "count": torch.zeros(ctx.num_classes, dtype=torch.int64, device=ctx.device),
        }

    def parts(self) -> dict[str, Part]:
        return {**super().parts(), "proto": self.proto}

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        features = model.body(x)
        loss = nn.functional.cross_entropy(model.head(features), y)
        if self.hp.lam > 0 and bool((self.proto["count"] > 0).any()):
            # samples whose class has no global prototype are their own target (zero error)
            has = (self.proto["count"][y] > 0).unsqueeze(1)
            target = torch.where(has, self.proto["global"][y], features.detach())
            loss = loss + self.hp.lam * nn.functional.mse_loss(features, target)
        return loss

    def fit(self) -> Reply:
        result = self.train()
        means, counts = class_means(self.model, self.ctx)
        return self.reply({"proto/local": means, "proto/local_count": counts}, result)

    def predict(self, model: nn.Module, x: Tensor) -> Tensor:
        known = self.proto["count"] > 0
        if not bool(known.any()):
            return model(x)
        features = model.body(x)
        dist = torch.cdist(features.float(), self.proto["global"].float()).pow(2)
        return -dist.masked_fill(~known.unsqueeze(0), float("inf"))


class FedProtoServer(Server):
    def __init__(self, ctx: ServerContext, hparams: FedProtoHParams) -> None:
        super().__init__(ctx, hparams)
        self.global_proto = torch.zeros(ctx.num_classes, ctx.feature_dim)
        self.count = torch.zeros(ctx.num_classes, dtype=torch.int64)

    def broadcast(self, round: int) -> Message:
        return {"proto/global": self.global_proto, "proto/count": self.count}

    def aggregate(self, round: int, replies: dict[int, Reply]) -> None:
        if not replies:
            return
        total = torch.zeros(self.ctx.num_classes, self.ctx.feature_dim, dtype=torch.float64)
        weight = torch.zeros(self.ctx.num_classes, dtype=torch.float64)
        count = torch.zeros(self.ctx.num_classes, dtype=torch.int64)
        for reply in replies.values():
            means = reply.message["proto/local"].double().cpu()
            n = reply.message["proto/local_count"].cpu()
            w = n.double() if self.hp.aggregate_by == "samples" else (n > 0).double()
            total += means * w.unsqueeze(1)
            weight += w
            count += n
        seen = weight > 0
        new = self.global_proto.clone()
        new[seen] = (total[seen] / weight[seen].unsqueeze(1)).float()
        # a class absent this round keeps its last prototype
        self.global_proto = new
        self.count = torch.where(seen, count, self.count)

    def state_dict(self) -> dict[str, Tensor]:
        return {"proto/global": self.global_proto, "proto/count": self.count}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.global_proto = state["proto/global"]
        self.count = state["proto/count"]


register_algorithm(
    "fedproto",
    FedProtoClient,
    FedProtoServer,
    FedProtoHParams,
    "FedProto: class prototypes up, global prototypes down; nearest-prototype prediction",
    family="HtFL",
    paper="Tan et al., FedProto: Federated Prototype Learning across Heterogeneous Clients, "
    "AAAI 2022",
    heterogeneous=True,
)
