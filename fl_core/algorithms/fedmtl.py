"""FedMTL: federated multi-task learning with MOCHA's mean-regularised objective (Smith et al.,
NeurIPS 2017), as PFLlib names it.

Every client t keeps its own model w_t (its task); nothing is averaged. The federation minimises

    sum_t f_t(w_t) + lam_mean · tr(W Ω Wᵀ) + lam_norm · ||W||²_F,   Ω = (I - 11ᵀ/m)²,

with W = [w_1 … w_m] the models of all m training clients. Ω is MOCHA's mean-regularised task
relationship; it is a matrix square of the centring matrix, which is idempotent, so
tr(W Ω Wᵀ) = sum_t ||w_t - w̄||². A client trains its own model with SGD on its loss plus the
gradient of the regulariser with the other clients' models held fixed:
2·lam_mean·(w_t - w̄) + 2·lam_norm·w_t, where w̄ = (S_others + w_t)/m follows w_t as it trains.

What travels: down, S = sum of every training client's latest model parameters (one model's
worth of floats, ``mtl/<param>``); up, the change of the client's own parameters this round
(``delta/<param>``). The server adds the deltas to S, so it never holds a model per client.
Buffers (BatchNorm statistics) stay local.

Differences from PFLlib's FedMTL:

- PFLlib squares Ω element-wise, keeps only its [0][0] entry and scales the regulariser by
  10^-(digits of the model size + 1); its regulariser is ||W||² + (1-1/m)²·||sum_t w_t||², which
  pulls the sum of the models toward zero, not the models toward each other. Here Ω is the
  matrix square, as MOCHA's mean-regularised formulation defines it, and both weights are
  explicit hyperparameters.
- PFLlib's W holds only the models of the round's selected clients, so the regulariser changes
  with the selection; here W holds every training client's latest model (all MOCHA tasks), with
  clients that have not trained yet at the initial model.
- MOCHA learns Ω and solves the dual with CoCoA-style local solvers (convex models only); here Ω
  is fixed to the mean-regularised structure and the primal is trained with SGD, which works for
  neural networks (PFLlib does the same).
- MOCHA tunes λ per dataset and gives no default; lam_mean = 0.005 makes the pull
  2·lam_mean·(w - w̄) as strong as FedProx's default mu = 0.01; set both to 0 for Local.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor, nn

from .base import Client, ClientContext, HParams, Message, Reply, Server, ServerContext
from .common import shared_model_state
from .parts import Part
from .registry import AlgorithmError, register_algorithm


class FedMTLHParams(HParams):
    lam_mean: float = Field(
        0.005, ge=0.0, description="weight of tr(W Ω Wᵀ) = sum_t ||w_t - mean||² (0 = Local)"
    )
    lam_norm: float = Field(0.0, ge=0.0, description="weight of ||W||²_F (weight decay)")


def _param_names(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_parameters()]


class FedMTLClient(Client):
    shared = ("mtl",)
    persistent = ("model",)

    def __init__(self, ctx: ClientContext) -> None:
        super().__init__(ctx)
        # the sum of every training client's parameters, received each round
        self.mtl = {n: torch.zeros_like(p) for n, p in self.model.named_parameters()}
        self._num_tasks = 0

    def parts(self) -> dict[str, Part]:
        return {**super().parts(), "mtl": self.mtl}

    def receive(self, message: Message) -> None:
        count = message.get("count/tasks")
        if count is not None:
            self._num_tasks = int(count)
            message = {k: v for k, v in message.items() if k != "count/tasks"}
        super().receive(message)
        # what the server counts for this client: its model before this round's training
        self._start = {n: p.detach().clone() for n, p in self.model.named_parameters()}

    def before_step(self, model: nn.Module) -> None:
        hp = self.hp
        if hp.lam_mean == 0.0 and hp.lam_norm == 0.0:
            return
        m = max(self._num_tasks, 1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.grad is None:
                    continue
                others = self.mtl[name] - self._start[name]
                mean = (others + p.detach()) / m
                p.grad.add_(p.detach() - mean, alpha=2.0 * hp.lam_mean)
                if hp.lam_norm:
                    p.grad.add_(p.detach(), alpha=2.0 * hp.lam_norm)

    def fit(self) -> Reply:
        result = self.train()
        delta = {
            f"delta/{n}": p.detach() - self._start[n] for n, p in self.model.named_parameters()
        }
        return self.reply(delta, result)


class FedMTLServer(Server):
    """Holds S, the sum of every training client's latest parameters, and the task count."""

    def __init__(self, ctx: ServerContext, hparams: FedMTLHParams) -> None:
        super().__init__(ctx, hparams)
        initial = shared_model_state(ctx, ("model",))  # refuses mixed architectures
        model = ctx.build_model(ctx.distinct_architectures[0])
        names = _param_names(model)
        n = ctx.num_clients
        self.total = {f"mtl/{k}": initial[f"model/{k}"].double() * n for k in names}
        self.count = torch.tensor(n, dtype=torch.int64)

    def broadcast(self, round: int) -> Message:
        return {**{k: v.float() for k, v in self.total.items()}, "count/tasks": self.count}

    def aggregate(self, round: int, replies: dict[int, Reply]) -> None:
        for cid, reply in replies.items():
            for key, delta in reply.message.items():
                target = "mtl/" + key.removeprefix("delta/")
                if not key.startswith("delta/") or target not in self.total:
                    raise AlgorithmError(
                        f"client {cid} uploaded {key!r}, which fedmtl does not use"
                    )
                self.total[target] = self.total[target] + delta.double()

    def state_dict(self) -> dict[str, Tensor]:
        return {**self.total, "count/tasks": self.count}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.total = {k: v for k, v in state.items() if k.startswith("mtl/")}
        self.count = state["count/tasks"]


register_algorithm(
    "fedmtl",
    FedMTLClient,
    FedMTLServer,
    FedMTLHParams,
    "FedMTL: personal models with MOCHA's mean-regularised multi-task penalty",
    family="pFL",
    paper="Smith et al., Federated Multi-Task Learning, NeurIPS 2017",
)
