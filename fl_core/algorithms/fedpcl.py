"""FedPCL (Tan et al., NeurIPS 2022): prototype-wise contrastive learning; only class
prototypes cross the wire, and a client predicts by its nearest local prototype.

PFLlib's variant without pre-trained backbones, which this follows: the model's body is trained
and its features are L2-normalised; the head is never used. After training, a client computes
its *local prototypes* (per class, the mean of its normalised training features, in eval mode)
and uploads them with class counts. The server keeps every client's latest set, averages them
per class over the clients holding the class (the *global prototypes*), and broadcasts the
global set plus every client's set, a class a client lacks filled with the global prototype.
A client trains its body on

    CE(⟨z, G⟩/τ, y) + (1/N)·Σ_j CE(⟨z, P_j⟩/τ, y),   z = normalise(body(x)),

contrastive losses against the global prototypes G and each client's prototypes P_j, and
predicts the class whose *local* prototype has the largest dot product with z.

What travels, per selected client and round: down, (N + 1)×C×d prototypes and C class counts
(one broadcast); up, C×d prototypes and C counts. The model never travels, so clients may use
different architectures with one feature size (registered as heterogeneous).

Differences from PFLlib's FedPCL:

- τ defaults to 0.07, the temperature of the paper's code; PFLlib's default is 1.0
  (``tau=1.0`` reproduces it).
- PFLlib stacks the global prototypes in dictionary order, so when a class has no prototype
  the similarity columns no longer match the labels; here classes nobody holds are masked out
  of every softmax (and a sample of such a class adds no loss). A class a client lacks is never
  predicted by it (PFLlib leaves its score at 0, so it can win).
- PFLlib averages the global prototypes over this round's uploads; ours average every client's
  latest set (the same with full participation), so a class held only by an unselected client
  keeps its prototype, as in the paper's code.
- PFLlib clips the gradient norm at 10 on every step; so do we by default
  (``max_grad_norm``; the paper's code does not clip).
- Like PFLlib (and the paper's code, whose loss is zero then), a client does not train before
  any global prototype exists: in round 1 it only uploads its prototypes.
- Evaluation receives the same prototypes, so the reported train loss is the training
  objective; a client still predicts with its own local prototypes. A held-out new client
  fine-tunes its body on that loss and predicts with the prototypes of its own training data.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor, nn

from .base import Client, ClientContext, HParams, Message, Reply, Server, ServerContext
from .parts import Part, PartError
from .registry import register_algorithm


class FedPCLHParams(HParams):
    tau: float = Field(0.07, gt=0.0, description="τ: temperature of the contrastive losses")
    max_grad_norm: float | None = Field(
        10.0, gt=0.0, description="clip each step's gradient norm to this (null = no clipping)"
    )


def normalized_features(model: nn.Module, x: Tensor) -> Tensor:
    return nn.functional.normalize(model.body(x), dim=1)


class FedPCLClient(Client):
    shared = ("proto",)  # the global prototypes; every client's set is unpacked by `receive`
    persistent = ("model/body", "local")

    def __init__(self, ctx: ClientContext) -> None:
        super().__init__(ctx)
        c, d = ctx.num_classes, self.model.feature_dim
        self.proto = {
            "global": torch.zeros(c, d, device=ctx.device),
            "known": torch.zeros(c, dtype=torch.int64, device=ctx.device),
        }
        self.local = {
            "proto": torch.zeros(c, d, device=ctx.device),
            "count": torch.zeros(c, dtype=torch.int64, device=ctx.device),
        }
        self.client_protos = torch.zeros(0, c, d, device=ctx.device)
        self.contrast_protos = self.proto["global"].unsqueeze(0)  # global set, then clients'

    def parts(self) -> dict[str, Part]:
        return {**super().parts(), "proto": self.proto, "local": self.local}

    def receive(self, message: Message) -> None:
        rest = dict(message)
        clients = rest.pop("proto/clients", None)
        if clients is not None:
            c, d = self.proto["global"].shape
            if clients.dim() != 3 or tuple(clients.shape[1:]) != (c, d):
                raise PartError(
                    f"message key 'proto/clients' has shape {tuple(clients.shape)}, but the "
                    f"client expects (clients, {c}, {d})"
                )
            self.client_protos = clients.to(self.ctx.device)
        super().receive(rest)
        # every loss of this round contrasts with the same sets: stacked once, not per batch
        self.contrast_protos = torch.cat([self.proto["global"].unsqueeze(0), self.client_protos])

    @property
    def has_global(self) -> bool:
        return bool((self.proto["known"] > 0).any())

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """The mean over samples of a known class of CE against the global prototypes plus the
        mean CE against each client's, all prototype sets in one batched softmax with no read
        back to the host (on an H200 no faster than one softmax per set: shared_gpu.md)."""
        z = normalized_features(model, x)
        known = self.proto["known"] > 0
        protos = self.contrast_protos.to(z.dtype)  # (1+N, C, d)
        logits = torch.einsum("bd,ncd->bcn", z, protos) / self.hp.tau
        # a class nobody holds takes no part in any softmax (the most negative finite value,
        # so that a row with no known class stays finite; its weight below is zero)
        logits = logits.masked_fill(~known.view(1, -1, 1), torch.finfo(logits.dtype).min)
        target = y.unsqueeze(1).expand(-1, logits.shape[2])
        ce = nn.functional.cross_entropy(logits, target, reduction="none")  # (batch, 1+N)
        per_sample = ce[:, 0] + (ce[:, 1:].mean(1) if ce.shape[1] > 1 else 0.0)
        keep = known[y]  # a sample of a class nobody holds has no target: no loss, no gradient
        per_sample = torch.where(keep, per_sample, torch.zeros_like(per_sample))
        return per_sample.sum() / keep.sum().clamp(min=1)

    def before_step(self, model: nn.Module) -> None:
        if self.hp.max_grad_norm is not None:
            nn.utils.clip_grad_norm_(model.parameters(), self.hp.max_grad_norm)

    @torch.no_grad()
    def local_prototypes(self) -> None:
        """Per class, the mean normalised feature of the training data (eval mode)."""
        ctx = self.ctx
        self.model.eval()
        sums = torch.zeros_like(self.local["proto"])
        bs = ctx.settings.eval_batch_size
        for start in range(0, ctx.num_train, bs):
            z = normalized_features(self.model, ctx.train_x[start : start + bs].to(ctx.device))
            sums.index_add_(0, ctx.train_y[start : start + bs].to(ctx.device), z.float())
        counts = torch.bincount(ctx.train_y.to(ctx.device), minlength=ctx.num_classes)
        self.local = {"proto": sums / counts.clamp(min=1).unsqueeze(1), "count": counts}

    def fit(self) -> Reply:
        result = None
        if self.has_global:  # before any global prototype there is nothing to contrast with
            result = self.train(params=self.model.body.parameters())
        self.local_prototypes()
        message = {"proto/local": self.local["proto"], "proto/local_count": self.local["count"]}
        return self.reply(message, result)

    def finetune(self, epochs: int) -> None:
        if self.has_global:
            self.train(params=self.model.body.parameters(), epochs=epochs)
        self.local_prototypes()

    def predict(self, model: nn.Module, x: Tensor) -> Tensor:
        if not bool((self.local["count"] > 0).any()):  # never trained: its own data's prototypes
            self.local_prototypes()
        scores = normalized_features(model, x) @ self.local["proto"].T
        return scores.masked_fill(~(self.local["count"] > 0), float("-inf"))


class FedPCLServer(Server):
    def __init__(self, ctx: ServerContext, hparams: FedPCLHParams) -> None:
        super().__init__(ctx, hparams)
        n, c, d = ctx.num_clients, ctx.num_classes, ctx.feature_dim
        self.client_protos = torch.zeros(n, c, d)
        self.client_has = torch.zeros(n, c, dtype=torch.int64)  # 1 where client j holds class k

    def global_prototypes(self) -> tuple[Tensor, Tensor]:
        """The per-class mean of the clients' latest prototypes, and how many clients hold each."""
        known = self.client_has.sum(0)
        total = (self.client_protos * self.client_has.unsqueeze(2)).sum(0)
        return total / known.clamp(min=1).unsqueeze(1), known

    def broadcast(self, round: int) -> Message:
        glob, known = self.global_prototypes()
        has = self.client_has.bool().unsqueeze(2)
        padded = torch.where(has, self.client_protos, glob.unsqueeze(0))
        return {"proto/global": glob, "proto/known": known, "proto/clients": padded}

    def aggregate(self, round: int, replies: dict[int, Reply]) -> None:
        for cid, reply in replies.items():
            self.client_protos[cid] = reply.message["proto/local"].float().cpu()
            self.client_has[cid] = (reply.message["proto/local_count"].cpu() > 0).long()

    def state_dict(self) -> dict[str, Tensor]:
        return {"proto/clients": self.client_protos, "proto/client_has": self.client_has}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.client_protos = state["proto/clients"].clone()
        self.client_has = state["proto/client_has"].clone()


register_algorithm(
    "fedpcl",
    FedPCLClient,
    FedPCLServer,
    FedPCLHParams,
    "FedPCL: prototype-wise contrastive learning, nearest local prototype prediction",
    family="pFL",
    paper="Tan et al., Federated Learning from Pre-Trained Models: A Contrastive Learning "
    "Approach, NeurIPS 2022",
    heterogeneous=True,
)
