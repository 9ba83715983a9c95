"""SCAFFOLD (Karimireddy et al., ICML 2020), option II: control variates correct client drift.

Down: the global model x and the server variate c. A client starts from y = x and takes K local
steps y ← y − lr·(g(y) + c − c_i), then sets its variate with the paper's option II,
c_i⁺ = c_i − c + (x − y)/(K·lr), where K is the number of steps it actually took. Up: y and
Δc_i = c_i⁺ − c_i. The server sets x ← x + η_g·mean_i(y_i − x) and c ← c + Σ_i Δc_i / N,
N being the number of clients in the federation.

Differences from PFLlib's SCAFFOLD:

- The model update averages the clients' updates uniformly, as the paper; buffers (BatchNorm
  statistics) have no variate and are averaged by sample count like FedAvg's.
- K is the count of steps taken this round, returned by training (PFLlib computes it the same
  way, from batches × epochs).
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor, nn

from .base import Client, ClientContext, HParams, Message, Reply, Server, ServerContext
from .common import shared_model_state, weighted_average
from .parts import Part
from .registry import AlgorithmError, register_algorithm


class ScaffoldHParams(HParams):
    server_lr: float = Field(1.0, gt=0.0, description="global step size η_g on the mean update")


def _param_zeros(model: nn.Module) -> dict[str, Tensor]:
    return {name: torch.zeros_like(p) for name, p in model.named_parameters()}


class ScaffoldClient(Client):
    shared = ("model", "c")
    persistent = ("ci",)

    def __init__(self, ctx: ClientContext) -> None:
        super().__init__(ctx)
        self.c = _param_zeros(self.model)  # server variate, received
        self.ci = _param_zeros(self.model)  # this client's variate, persistent

    def parts(self) -> dict[str, Part]:
        return {**super().parts(), "c": self.c, "ci": self.ci}

    def before_step(self, model: nn.Module) -> None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.grad is not None:
                    p.grad.add_(self.c[name] - self.ci[name])

    def fit(self) -> Reply:
        x = {name: p.detach().clone() for name, p in self.model.named_parameters()}
        result = self.train()
        message: Message = {
            f"model/{k}": v.detach().clone() for k, v in self.model.state_dict().items()
        }
        if result.steps:
            scale = 1.0 / (result.steps * self.ctx.settings.lr)
            for name, y in self.model.named_parameters():
                ci_new = self.ci[name] - self.c[name] + (x[name] - y.detach()) * scale
                message[f"dc/{name}"] = ci_new - self.ci[name]
                self.ci[name] = ci_new
        else:  # no data: no step, no change of the variate
            message.update({f"dc/{n}": torch.zeros_like(t) for n, t in self.ci.items()})
        return self.reply(message, result)


class ScaffoldServer(Server):
    def __init__(self, ctx: ServerContext, hparams: ScaffoldHParams) -> None:
        super().__init__(ctx, hparams)
        if len(ctx.distinct_architectures) != 1:
            raise AlgorithmError(
                "scaffold keeps one control variate per parameter of one shared model; the "
                f"clients use {ctx.distinct_architectures}: choose a single model (model.name)"
            )
        self.x = shared_model_state(ctx, ("model",))
        model = ctx.build_model(ctx.distinct_architectures[0])
        self.c = {f"c/{k}": v for k, v in _param_zeros(model).items()}

    def broadcast(self, round: int) -> Message:
        return {**self.x, **self.c}

    def evaluation_broadcast(self, round: int) -> Message:
        return self.x

    def aggregate(self, round: int, replies: dict[int, Reply]) -> None:
        if not replies:
            return
        models = [
            {k: v for k, v in r.message.items() if k.startswith("model/")} for r in replies.values()
        ]
        params = {f"model/{k[2:]}" for k in self.c}
        mean_uniform = weighted_average([(m, 1.0) for m in models])
        by_samples = weighted_average(
            [(m, r.num_samples) for m, r in zip(models, replies.values(), strict=True)]
        )
        eta = self.hp.server_lr
        new_x = {}
        for key, old in self.x.items():
            if key in params:
                new_x[key] = old + eta * (mean_uniform[key] - old)
            else:  # buffers: no variate, FedAvg's rule
                new_x[key] = by_samples[key]
        self.x = new_x
        n = self.ctx.num_clients
        for key in self.c:
            name = key[2:]
            total = sum(r.message[f"dc/{name}"] for r in replies.values())
            self.c[key] = self.c[key] + total / n

    def state_dict(self) -> dict[str, Tensor]:
        return {**self.x, **self.c}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.x = {k: v for k, v in state.items() if k.startswith("model/")}
        self.c = {k: v for k, v in state.items() if k.startswith("c/")}


register_algorithm(
    "scaffold",
    ScaffoldClient,
    ScaffoldServer,
    ScaffoldHParams,
    "SCAFFOLD: client and server control variates correct client drift (option II)",
    family="tFL",
    paper="Karimireddy et al., SCAFFOLD: Stochastic Controlled Averaging for Federated "
    "Learning, ICML 2020",
)
