"""APPLE (Luo & Wu, IJCAI 2022): each client learns how much of every client's core model to use.

Every client i has a *core model* w_i, which it shares, and a directed-relationship (DR)
vector p_i with one weight per client. Its personalized model is the mix
w̃_i = Σ_j p_ij·w_j of all N core models. Each round a client downloads every core model, then
for each mini-batch takes an SGD step on

    CE(w̃_i) + μ·λ(r)·‖p_i − p_0‖²

with respect to its own core w_i (learning rate ``lr``; its gradient is p_ii·∇_w̃) and to p_i
(learning rate ``dr_lr``; ∂/∂p_ij = ⟨∇_w̃, w_j⟩ + 2μλ(r)(p_ij − p_0j)); the other cores stay
fixed. p_0 = (n_1/n, …, n_N/n) is the sample share of each client: p_i starts there, so the first
personalized model is the FedAvg average, and the proximal pull toward it fades as λ(r) goes
from 1 to 0 over the first ``anneal_fraction`` of the rounds (cosine, or exponential). p_i is
not projected: its weights start summing to one and then move freely, as in the paper's code.
The client uploads its core; it is evaluated with its personalized model.

What travels: down, all N core models plus p_0 (one broadcast, the same for every client);
up, the client's core. Every core is kept on the server in a `ModelStore` (memory up to the
federation's ``state_memory_mb``, then disk); the broadcast itself holds all N, as the paper's
full-download variant requires.

Differences from PFLlib's APPLE:

- PFLlib's default DR learning rate is 0 (``-dlr 0``), which freezes the weights at 1/N; ours
  is the official code's 0.001 (with μ = 0.1, annealing over the first 10% of rounds).
- PFLlib starts p_i at 1/N but pulls it toward the sample shares; the paper starts and pulls at
  the sample shares. The server learns the sample counts from the first replies, so in round 1
  (no count known) p_0 is uniform; a client starts p_i at the p_0 of its first round.
- PFLlib approximates ∂/∂p_ij by the mean over tensors of each tensor's mean of grad·w_j; we
  use the exact gradient. PFLlib also multiplies the core's learning rate by N; the paper's
  code does not (it uses momentum 0.9 instead), and neither do we by default:
  ``scale_core_lr=True`` gives PFLlib's rate. With plain SGD and the paper's rate the core
  learns slowly (its gradient is p_ii ≈ 1/N of the personalized model's): on digits with 10
  clients, 5 rounds reach 15% test accuracy at the default and 81% with ``scale_core_lr``.
- PFLlib trains every client every round whatever the join ratio; here the engine's selected
  clients train (join_ratio = 1 is the paper's cross-silo setting).
- Held-out new clients receive no cores; they fine-tune the initial model.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn
from torch.func import functional_call

from ._model_store import ModelStore, pack_models, unpack_models
from .base import (
    ClientContext,
    HParams,
    LossSum,
    Message,
    Reply,
    Server,
    ServerContext,
    TrainResult,
)
from .common import PersonalModelClient, shared_model_state
from .parts import Part, PartError, select_state
from .registry import register_algorithm


class APPLEHParams(HParams):
    dr_lr: float = Field(
        0.001, ge=0.0, description="learning rate of the DR weights (0 freezes them: PFLlib)"
    )
    mu: float = Field(0.1, ge=0.0, description="μ: weight of the pull ‖p_i − p_0‖² of DR weights")
    anneal_fraction: float = Field(
        0.1, gt=0.0, le=1.0, description="share of the rounds over which λ(r) decays from 1 to 0"
    )
    schedule: Literal["cosine", "exponential"] = Field(
        "cosine", description="shape of λ(r): (cos(πr/L)+1)/2, or 0.001^(r/L)"
    )
    scale_core_lr: bool = Field(
        False,
        description="multiply the core model's learning rate by N, as PFLlib does (the core's "
        "gradient is p_ii ≈ 1/N of the personalized model's)",
    )


def pull_weight(hp: APPLEHParams, round: int, rounds: int) -> float:
    """μ·λ(r) for round ``round`` (1-based) of ``rounds``."""
    r, last = round - 1, int(hp.anneal_fraction * rounds)
    if hp.mu == 0 or r >= last:
        return 0.0
    if hp.schedule == "cosine":
        return hp.mu * (math.cos(math.pi * r / last) + 1) / 2
    return hp.mu * 0.001 ** (r / last)


class APPLEClient(PersonalModelClient):
    shared = ()  # the cores and p_0 are unpacked by `receive`
    persistent = ("personal", "dr")

    def __init__(self, ctx: ClientContext) -> None:
        super().__init__(ctx)
        self.dr = {"p": torch.zeros(0)}  # sized on first use: the client does not know N
        self.cores: list[dict[str, Tensor]] = []
        self.p0: Tensor | None = None

    def parts(self) -> dict[str, Part]:
        return {**super().parts(), "dr": self.dr}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if "dr/p" in state:
            self.dr["p"] = torch.zeros_like(state["dr/p"])
        super().load_state_dict(state)

    def receive(self, message: Message) -> None:
        rest, self.cores = unpack_models(message, "cores", self.model.state_dict())
        p0 = rest.pop("dr/p0", None)
        if p0 is not None:
            if len(self.cores) != p0.numel() or not 0 <= self.ctx.client_id < p0.numel():
                raise PartError(f"message has {len(self.cores)} cores but p_0 of {p0.numel()}")
            self.p0 = p0.double()
        super().receive(rest)

    def fit(self) -> Reply:
        if self.p0 is None:  # no cores: nothing to personalise with
            result = self.train()
            self.personal.load_state_dict(self.model.state_dict())
            return self.reply(select_state(self.parts(), ("model",)), result)
        result = self.train_apple()
        return self.reply(select_state(self.parts(), ("model",)), result)

    def train_apple(self) -> TrainResult:
        ctx, i = self.ctx, self.ctx.client_id
        self.model.load_state_dict(self.cores[i])  # own core, and its buffers
        names = [n for n, _ in self.model.named_parameters()]
        stacked = {n: torch.stack([c[n] for c in self.cores]) for n in names}
        own = {n: stacked[n][i].clone().requires_grad_(True) for n in names}
        if self.dr["p"].numel() != self.p0.numel():  # first participation: start at p_0
            self.dr["p"] = self.p0.float().clone()
        p = self.dr["p"].to(ctx.device).clone().requires_grad_(True)
        p0 = self.p0.float().to(ctx.device)
        pull = pull_weight(self.hp, ctx.round, ctx.settings.rounds)

        def mixed() -> dict[str, Tensor]:
            # Σ_j p_j·w_j with the own core as the live (trainable) tensor
            return {
                n: torch.tensordot(p, stacked[n], dims=1) + p[i] * (own[n] - stacked[n][i])
                for n in names
            }

        core_lr = ctx.settings.lr * (p.numel() if self.hp.scale_core_lr else 1)
        opt = torch.optim.SGD(
            [{"params": list(own.values())}, {"params": [p], "lr": self.hp.dr_lr}], lr=core_lr
        )
        self.model.train()
        total, steps, samples = LossSum(), 0, 0
        for x, y in self.batches():
            opt.zero_grad(set_to_none=True)
            out = functional_call(self.model, mixed(), (x,))
            loss = nn.functional.cross_entropy(out, y) + pull * ((p - p0) ** 2).sum()
            loss.backward()
            opt.step()
            total.add(loss)
            steps += 1
            samples += int(y.shape[0])
        with torch.no_grad():
            final = mixed()
            for n, param in self.model.named_parameters():
                param.copy_(own[n])
            self.personal.load_state_dict(self.model.state_dict())  # buffers of the own core
            for n, param in self.personal.named_parameters():
                param.copy_(final[n])
        self.dr["p"] = p.detach().cpu()
        self._has_personal = True
        return TrainResult(total.mean(steps), steps, samples)


class APPLEServer(Server):
    def __init__(self, ctx: ServerContext, hparams: APPLEHParams) -> None:
        super().__init__(ctx, hparams)
        initial = shared_model_state(ctx, ("model",))  # one architecture: refuses a mixed group
        self.store = ModelStore(int(ctx.settings.state_memory_mb * 2**20), initial)
        self.counts = torch.zeros(ctx.num_clients, dtype=torch.float64)  # 0 = not known yet

    def p0(self) -> Tensor:
        """The clients' sample shares; a count not known yet counts as the mean known one."""
        known = self.counts > 0
        if not bool(known.any()):
            return torch.full((self.ctx.num_clients,), 1.0 / self.ctx.num_clients)
        filled = torch.where(known, self.counts, self.counts[known].mean())
        return (filled / filled.sum()).float()

    def broadcast(self, round: int) -> Message:
        cores = [
            {k.removeprefix("model/"): v for k, v in state.items()}
            for _, state in self.store.items(list(range(self.ctx.num_clients)))
        ]
        return {**pack_models("cores", cores), "dr/p0": self.p0()}

    def evaluation_broadcast(self, round: int) -> Message:
        return {}  # a client is evaluated with its personalized model

    def aggregate(self, round: int, replies: dict[int, Reply]) -> None:
        for cid, reply in replies.items():
            self.store.put(cid, reply.message)
            self.counts[cid] = float(reply.num_samples)

    def state_dict(self) -> dict[str, Tensor]:
        return {"dr/counts": self.counts, **self.store.state_dict("models/")}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.counts = state["dr/counts"].clone()
        self.store.load_state_dict(state, "models/")


register_algorithm(
    "apple",
    APPLEClient,
    APPLEServer,
    APPLEHParams,
    "APPLE: personalized models mix every client's core model with learned DR weights",
    family="pFL",
    paper="Luo and Wu, Adapt to Adaptation: Learning Personalization for Cross-Silo Federated "
    "Learning, IJCAI 2022",
)
