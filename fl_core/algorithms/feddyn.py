"""FedDyn (Acar et al., ICLR 2021): federated learning with dynamic regularization.

Each client k keeps a linear state g_k (the gradient of its loss at its last local model,
zero at first). In round t it receives the global model θ^{t-1} and trains its copy θ on

    L_k(θ) - <g_k, θ> + (alpha/2)·||θ - θ^{t-1}||²,

then updates g_k ← g_k - alpha·(θ_k^t - θ^{t-1}) and uploads θ_k^t. The server keeps a state h
(zero at first) and, over the participating clients P_t out of m,

    h ← h - alpha·(1/m)·Σ_{k∈P_t} (θ_k^t - θ^{t-1}),    θ^t = mean_{k∈P_t} θ_k^t - h/alpha.

The regularizer acts on the parameters; buffers (BatchNorm statistics) are averaged like the
parameters, with no correction. The two terms are added to the gradient between backward and
the step (the loss reported is the cross-entropy). Down and up per client per round: the whole
model, as FedAvg; g_k persists on the client (one tensor per parameter), h on the server.
``alpha=0`` with ``aggregate_by="samples"`` is FedAvg exactly.

Differences from PFLlib's FedDyn:

- PFLlib's penalty is (alpha/2)·||θ - θ^{t-1}|| with the norm *not squared*, a pull of constant
  size alpha/2 whatever the distance, which does not match its own state update (derived from
  the squared one). We use the paper's squared norm; ``penalty="unsquared"`` is PFLlib's.
- PFLlib's ``-al`` default is alpha = 1.0; ours is 0.01, the paper's value (it searches
  {0.1, 0.01, 0.001}) and its code's default.
- The average over the participating clients is uniform, as in the paper and PFLlib;
  ``aggregate_by="samples"`` weights it by sample count instead, as FedAvg.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from .base import ClientContext, HParams, Message, Reply, ServerContext
from .fedavg import FedAvgClient, FedAvgServer
from .parts import Part
from .registry import AlgorithmError, register_algorithm


class FedDynHParams(HParams):
    alpha: float = Field(
        0.01, ge=0.0, description="weight of the dynamic regularizer (0 = FedAvg's update)"
    )
    penalty: Literal["squared", "unsquared"] = Field(
        "squared",
        description="(alpha/2)·||θ - θ_global||² as in the paper, or the unsquared norm "
        "PFLlib uses",
    )
    aggregate_by: Literal["clients", "samples"] = Field(
        "clients", description="average the models uniformly (paper, PFLlib) or by sample count"
    )


def add_dynamic_gradient(
    model: nn.Module, anchor: dict[str, Tensor], state: dict[str, Tensor], hp: FedDynHParams
) -> None:
    """Add the gradient of (alpha/2)·||θ - anchor||^(2 or 1) - <state, θ> to each parameter."""
    with torch.no_grad():
        params = [(n, p) for n, p in model.named_parameters() if p.grad is not None]
        scale = hp.alpha
        if hp.penalty == "unsquared":
            # d/dθ (alpha/2)·||v|| = (alpha/2)·v/||v||, taken as 0 where v = 0
            norm = torch.sqrt(sum(((p - anchor[n]) ** 2).sum() for n, p in params))
            scale = hp.alpha / 2 / float(norm) if float(norm) > 0 else 0.0
        for name, p in params:
            p.grad.add_(p - anchor[name], alpha=scale)
            p.grad.sub_(state[name])


class FedDynClient(FedAvgClient):
    shared = ("model",)
    persistent = ("grad",)  # g_k, one tensor per parameter

    def __init__(self, ctx: ClientContext) -> None:
        super().__init__(ctx)
        self.grad = {n: torch.zeros_like(p) for n, p in self.model.named_parameters()}

    def parts(self) -> dict[str, Part]:
        return {**super().parts(), "grad": self.grad}

    def receive(self, message: Message) -> None:
        super().receive(message)
        self._anchor = {n: p.detach().clone() for n, p in self.model.named_parameters()}

    def before_step(self, model: nn.Module) -> None:
        if model is self.model and self.hp.alpha > 0:
            add_dynamic_gradient(model, self._anchor, self.grad, self.hp)

    def fit(self) -> Reply:
        result = self.train()
        if self.hp.alpha > 0:
            with torch.no_grad():
                for name, p in self.model.named_parameters():
                    self.grad[name] = self.grad[name] - self.hp.alpha * (p - self._anchor[name])
        return self.reply(self.upload(), result)


class FedDynServer(FedAvgServer):
    """Holds the global model and the state h (``h/…``, one tensor per parameter)."""

    def __init__(self, ctx: ServerContext, hparams: FedDynHParams) -> None:
        super().__init__(ctx, hparams)
        if len(ctx.distinct_architectures) != 1:
            raise AlgorithmError(
                "feddyn keeps one state per parameter of one shared model; the clients use "
                f"{ctx.distinct_architectures}: choose a single model (model.name)"
            )
        model = ctx.build_model(ctx.distinct_architectures[0])
        self.h = {f"model/{n}": torch.zeros_like(p.detach()) for n, p in model.named_parameters()}

    def weight(self, reply: Reply) -> float:
        return float(reply.num_samples) if self.hp.aggregate_by == "samples" else 1.0

    def aggregate(self, round: int, replies: dict[int, Reply]) -> None:
        if not replies:
            return
        old = self.global_state
        super().aggregate(round, replies)  # global_state = the (weighted) mean of the models
        alpha = self.hp.alpha
        if alpha == 0:
            return
        m = self.ctx.num_clients
        for key in self.h:
            drift = sum(r.message[key].double() - old[key].double() for r in replies.values())
            h = self.h[key].double() - alpha * drift / m
            self.h[key] = h.to(self.h[key].dtype)
            mean = self.global_state[key].double()
            self.global_state[key] = (mean - h / alpha).to(old[key].dtype)

    def state_dict(self) -> dict[str, Tensor]:
        return {**self.global_state, **{f"h/{k}": v for k, v in self.h.items()}}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.global_state = {k: v for k, v in state.items() if not k.startswith("h/")}
        self.h = {k.removeprefix("h/"): v for k, v in state.items() if k.startswith("h/")}


register_algorithm(
    "feddyn",
    FedDynClient,
    FedDynServer,
    FedDynHParams,
    "FedDyn: a dynamic linear + quadratic regularizer aligns local and global optima",
    family="tFL",
    paper="Acar et al., Federated Learning Based on Dynamic Regularization, ICLR 2021",
)
