"""FD, federated distillation (Jeong et al., 2018): only per-class mean logits cross the wire.

A client trains its whole (private) model on CE + lam·CE(output, soft target), where the soft
target of a sample of class y is the softmax of the global mean logit vector of class y.
While it trains it sums its outputs per label; it uploads, per class, the mean logit vector of
its training samples and the class's sample count: exactly classes × classes floats plus
classes counts, zeros for classes it lacks. The server averages each class's logit vectors over
the clients that hold it and broadcasts them with the pooled counts. Any architecture works: a
logit vector has one size, the number of classes.

Differences from HtFLlib's FD:

- Since commit ca3e29a (Nov 2025) HtFLlib's soft target is the *raw* global logit vector fed to
  a cross-entropy that expects probabilities (negative, unnormalised "probabilities"); before
  that it was the softmax. The paper distils from the softmax of the global logits, and so do
  we: ``soft_target="softmax"`` (default); ``soft_target="raw"`` reproduces HtFLlib now.
- A sample whose class has no global logit yet is its own target, as in HtFLlib: with the
  softmax target that term has zero gradient, and it is left out of the reported loss.
- The global average includes each client's own logits (as HtFLlib). The paper's devices take
  their own contribution out of the average; with partial participation and drop-outs a client
  cannot know whether its last upload is in the average it receives.
- HtFLlib rebuilds the global logits from one round's uploads, so a class that no selected
  client holds disappears for a round; here it keeps its last global logit.
- Logit vectors are averaged per client holding the class (paper and HtFLlib);
  ``aggregate_by="samples"`` weights them by the clients' sample counts instead.
- Logits are collected during local training (paper and HtFLlib), in train mode, over every
  local epoch.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from .base import Client, ClientContext, HParams, Message, Reply, Server, ServerContext
from .parts import Part
from .registry import AlgorithmError, register_algorithm


class FDHParams(HParams):
    lam: float = Field(
        1.0, ge=0.0, description="weight of the distillation term toward the global logits"
    )
    soft_target: Literal["softmax", "raw"] = Field(
        "softmax",
        description="distil toward softmax(global logits) (paper) or the raw logit vector "
        "(HtFLlib since Nov 2025)",
    )
    aggregate_by: Literal["clients", "samples"] = Field(
        "clients",
        description="average a class's logits over the clients holding it (paper, HtFLlib) or "
        "weight them by sample count",
    )


class FDClient(Client):
    shared = ("logits",)
    persistent = ("model",)

    def __init__(self, ctx: ClientContext) -> None:
        super().__init__(ctx)
        c = ctx.num_classes
        self.logits = {
            "global": torch.zeros(c, c, device=ctx.device),
            "count": torch.zeros(c, dtype=torch.int64, device=ctx.device),
        }
        # per-class sums of outputs and sample counts, collected only while fit() trains
        self._sums: Tensor | None = None
        self._seen: Tensor | None = None

    def parts(self) -> dict[str, Part]:
        return {**super().parts(), "logits": self.logits}

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        output = model(x)
        if self._sums is not None and self._seen is not None:
            self._sums.index_add_(0, y, output.detach().float())
            self._seen += torch.bincount(y, minlength=self._seen.shape[0])
        loss = nn.functional.cross_entropy(output, y)
        if self.hp.lam > 0 and bool((self.logits["count"] > 0).any()):
            loss = loss + self.hp.lam * self.distillation(output, y)
        return loss

    def distillation(self, output: Tensor, y: Tensor) -> Tensor:
        """Mean over the batch of CE(output, soft target of the sample's class)."""
        has = self.logits["count"][y] > 0
        target = torch.where(has.unsqueeze(1), self.logits["global"][y], output.detach())
        if self.hp.soft_target == "softmax":
            target = torch.softmax(target, dim=1)
        per_sample = -(target * torch.log_softmax(output, dim=1)).sum(1)
        if self.hp.soft_target == "softmax":
            per_sample = per_sample * has  # own-output targets: zero gradient, no loss
        return per_sample.mean()

    def fit(self) -> Reply:
        ctx = self.ctx
        c = ctx.num_classes
        sums = self._sums = torch.zeros(c, c, device=ctx.device)
        seen = self._seen = torch.zeros(c, dtype=torch.int64, device=ctx.device)
        try:
            result = self.train()
        finally:
            self._sums = self._seen = None
        means = sums / seen.clamp(min=1).unsqueeze(1)
        # samples per class the means were taken over (the last batch may be dropped)
        return self.reply({"logits/local": means, "logits/local_count": seen}, result)


class FDServer(Server):
    def __init__(self, ctx: ServerContext, hparams: FDHParams) -> None:
        super().__init__(ctx, hparams)
        c = ctx.num_classes
        self.global_logits = torch.zeros(c, c)
        self.count = torch.zeros(c, dtype=torch.int64)

    def broadcast(self, round: int) -> Message:
        return {"logits/global": self.global_logits, "logits/count": self.count}

    def aggregate(self, round: int, replies: dict[int, Reply]) -> None:
        if not replies:
            return
        c = self.ctx.num_classes
        total = torch.zeros(c, c, dtype=torch.float64)
        weight = torch.zeros(c, dtype=torch.float64)
        count = torch.zeros(c, dtype=torch.int64)
        for cid, reply in replies.items():
            unknown = set(reply.message) - {"logits/local", "logits/local_count"}
            if unknown:
                raise AlgorithmError(
                    f"client {cid} uploaded {sorted(unknown)[:3]}; FD expects "
                    "'logits/local' and 'logits/local_count'"
                )
            means = reply.message["logits/local"].double().cpu()
            n = reply.message["logits/local_count"].cpu()
            w = n.double() if self.hp.aggregate_by == "samples" else (n > 0).double()
            total += means * w.unsqueeze(1)
            weight += w
            count += n
        seen = weight > 0
        new = self.global_logits.clone()
        new[seen] = (total[seen] / weight[seen].unsqueeze(1)).float()
        self.global_logits = new  # a class absent this round keeps its last logits
        self.count = torch.where(seen, count, self.count)

    def state_dict(self) -> dict[str, Tensor]:
        return {"logits/global": self.global_logits, "logits/count": self.count}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.global_logits = state["logits/global"]
        self.count = state["logits/count"]


register_algorithm(
    "fd",
    FDClient,
    FDServer,
    FDHParams,
    "FD (FedDistill): per-class mean logits up, global ones down; distil toward them",
    family="HtFL",
    paper="Jeong et al., Communication-Efficient On-Device Machine Learning: Federated "
    "Distillation and Augmentation under Non-IID Private Data, NeurIPS-W 2018",
    heterogeneous=True,
)
