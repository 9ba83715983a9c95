"""FedCP (Zhang et al., KDD 2023): a conditional policy splits each sample's features between a
personal head and a frozen global head.

A client holds the model (its body and its *personal* head), a copy of the received *global*
head (frozen), a copy of the received body (frozen) and the conditional policy network (CPN):
Linear(D, 2D), LayerNorm, ReLU, whose 2D outputs are read as D pairs and passed through a
Gumbel-softmax over each pair (temperature ``tau``). For a sample with features h the CPN reads
h ⊙ v, where v is the client's vector: the rows of its personal head's weight (the product of
the weights for a multi-layer head) summed and L2-normalised, fixed for the round. It returns
(r, s) with r + s = 1 element-wise, and the output is

    personal_head(h ⊙ r) + global_head(h ⊙ s).

The loss is cross-entropy plus ``lam``·MMD²(h, h_g), h_g being the features of the frozen
received body, which keeps the trained body close to the global one. Body, personal head and CPN
are trained; the global head and received body are not.

Up per client and round: the body, the CPN and a head ``head_mix``·personal + (1 −
``head_mix``)·global. The server averages each by sample count; down: the body, the global head
and the CPN. The personal head persists on the client and never travels.

Differences from PFLlib's FedCP (which is the authors' code):

- ``lam`` defaults to 5, the value of the authors' run script (``-lam 5``); PFLlib's generic
  ``-lam`` default is 1.
- The client vector comes from the personal head from round 1 on; PFLlib starts from a uniform
  random vector until the client first receives a global head.
- Gumbel noise is drawn from the client's seeded generator (PFLlib: torch's global one), at
  training and, as in PFLlib, at evaluation.
- The MMD uses the shared `mmd`; with ``mmd_bandwidths`` (default 20, 30, 40, 100) it is the
  sum of single Gaussian kernels exp(−d²/b), which is exactly PFLlib's "rbf" MMD (its widths
  10, 15, 20, 50 in exp(−d²/2a)); ``mmd_bandwidths=null`` uses the adaptive multi-kernel.
- Every client receives the latest global head and CPN (PFLlib sends them only to the clients
  that trained in the round, so with partial participation an idle client evaluates with stale
  ones). Body buffers (BatchNorm statistics) are averaged with the body.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from .base import Client, ClientContext, HParams, Message, Reply, TrainResult
from .common import shared_model_state
from .fedavg import FedAvgServer
from .losses import mmd
from .parts import Part, select_state
from .registry import register_algorithm


class FedCPHParams(HParams):
    lam: float = Field(5.0, ge=0.0, description="weight of the MMD to the received body's features")
    head_mix: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="weight of the personal head in the head a client uploads (the rest is the "
        "received global head)",
    )
    tau: float = Field(1.0, gt=0.0, description="temperature of the policy's Gumbel-softmax")
    mmd_bandwidths: tuple[float, ...] | None = Field(
        (20.0, 30.0, 40.0, 100.0),
        min_length=1,
        description="widths b of the Gaussian kernels exp(-d²/b) summed in the MMD (PFLlib's); "
        "null = the adaptive multi-bandwidth kernel",
    )


class ConditionalPolicy(nn.Module):
    """FedCP's CPN: (n, D) conditional input -> (personal, global) weights, each (n, D), summing
    to one element-wise."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, 2 * dim)
        self.norm = nn.LayerNorm(2 * dim)

    def forward(self, x: Tensor, tau: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        logits = F.relu(self.norm(self.fc(x))).view(x.shape[0], 2, -1)
        # Gumbel(0, 1) noise -log(-log U), drawn from the client's seeded generator
        u = torch.rand(logits.shape, generator=generator).to(logits.device, logits.dtype)
        tiny = torch.finfo(logits.dtype).tiny
        exponential = (-torch.log(u.clamp(min=tiny))).clamp(min=tiny)  # Exp(1)
        gumbel = -torch.log(exponential)
        policy = torch.softmax((logits + gumbel) / tau, dim=1)
        return policy[:, 0], policy[:, 1]


def head_vector(head: nn.Module) -> Tensor:
    """The client vector: the head's weight (the product of its Linear weights, last first, for
    a deeper head) summed over classes, L2-normalised, without gradient: shape (1, D)."""
    weights = [m.weight for m in head.modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        w = weights[-1]
        for earlier in reversed(weights[:-1]):
            w = w @ earlier
        return F.normalize(w.sum(0, keepdim=True), dim=1)


def fedcp_mmd(x: Tensor, y: Tensor, bandwidths: tuple[float, ...] | None) -> Tensor:
    """MMD² under the sum of the kernels exp(−d²/b) (the sum of the single-kernel MMDs, as the
    MMD is linear in the kernel), with the distances computed once; the adaptive multi-kernel
    when ``bandwidths`` is None."""
    return mmd(x, y, bandwidths=bandwidths)


class FedCPClient(Client):
    shared = ("model/body", "ghead", "cpn")
    persistent = ("model/head",)  # the personal head

    def __init__(self, ctx: ClientContext) -> None:
        super().__init__(ctx)
        self.ghead = ctx.extra_model("fedcp-global-head").head  # frozen, received
        self.received_body = ctx.extra_model("fedcp-received-body").body  # frozen copy
        for p in [*self.ghead.parameters(), *self.received_body.parameters()]:
            p.requires_grad_(False)
        with torch.random.fork_rng(devices=[]):  # overwritten on receipt; keep torch's stream
            self.cpn = ConditionalPolicy(self.model.feature_dim).to(ctx.device)
        self._vector: Tensor | None = None

    def parts(self) -> dict[str, Part]:
        return {**super().parts(), "ghead": self.ghead, "cpn": self.cpn}

    def receive(self, message: Message) -> None:
        super().receive(message)
        self.received_body.load_state_dict(self.model.body.state_dict())
        self._vector = head_vector(self.model.head)  # fixed for the participation

    def vector(self) -> Tensor:
        if self._vector is None:
            self._vector = head_vector(self.model.head)
        return self._vector

    def outputs(self, model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
        """(logits, features): the personal and global heads on the policy's split features."""
        features = model.body(x)
        r, s = self.cpn(features * self.vector(), self.hp.tau, self.ctx.rng)
        return model.head(features * r) + self.ghead(features * s), features

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        logits, features = self.outputs(model, x)
        loss = F.cross_entropy(logits, y)
        if self.hp.lam > 0:
            self.received_body.train(model.training)
            with torch.no_grad():
                target = self.received_body(x)
            loss = loss + self.hp.lam * fedcp_mmd(features, target, self.hp.mmd_bandwidths)
        return loss

    def predict(self, model: nn.Module, x: Tensor) -> Tensor:
        return self.outputs(model, x)[0]

    def train_local(self, epochs: int | None = None) -> TrainResult:
        """SGD on the body, the personal head and the CPN (the global head stays frozen)."""
        self.cpn.train()
        return self.train(params=[*self.model.parameters(), *self.cpn.parameters()], epochs=epochs)

    def fit(self) -> Reply:
        result = self.train_local()
        message = select_state(self.parts(), ("model/body", "cpn"))
        mix = self.hp.head_mix
        received = self.ghead.state_dict()
        for key, personal in self.model.head.state_dict().items():
            message[f"ghead/{key}"] = mix * personal.detach() + (1 - mix) * received[key]
        return self.reply(message, result)

    def finetune(self, epochs: int) -> None:
        self.train_local(epochs)

    def evaluate(self, model=None, train_loss=True):
        self.cpn.eval()
        return super().evaluate(model, train_loss)


class FedCPServer(FedAvgServer):
    """Averages bodies, uploaded heads and CPNs by sample count."""

    def initial_state(self) -> dict[str, Tensor]:
        state = shared_model_state(self.ctx, ("model/body",))  # refuses mixed bodies
        model = self.ctx.build_model(self.ctx.distinct_architectures[0])
        state.update({f"ghead/{k}": v.detach().clone() for k, v in model.head.state_dict().items()})
        seed = torch.randint(0, 2**62, (1,), generator=self.ctx.rng(0, "fedcp-cpn-init"))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            cpn = ConditionalPolicy(model.feature_dim)
        state.update({f"cpn/{k}": v.to(self.ctx.device) for k, v in cpn.state_dict().items()})
        return state


register_algorithm(
    "fedcp",
    FedCPClient,
    FedCPServer,
    FedCPHParams,
    "FedCP: a conditional policy splits features between a personal and a frozen global head",
    family="pFL",
    paper="Zhang et al., FedCP: Separating Feature Information for Personalized Federated "
    "Learning via Conditional Policy, KDD 2023",
)
