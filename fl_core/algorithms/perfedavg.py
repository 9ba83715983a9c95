"""Per-FedAvg (Fallah et al., NeurIPS 2020): FedAvg on the MAML objective, so that one local
gradient step from the global model gives a good personalised model.

The objective is F(w) = mean_i f_i(w - alpha·∇f_i(w)). Each local step draws batches D, D' (and
D'' for the Hessian-free variant) and

    w̃ = w - alpha·∇f(w; D)                                  (the one-step personalisation)
    FO: w ← w - beta·∇f(w̃; D')                              (first-order: Hessian dropped)
    HF: w ← w - beta·(I - alpha·∇²f(w; D''))·∇f(w̃; D')      (Hessian-free)

where beta is the federation's learning rate. The server averages w by sample count, as FedAvg.
A client is evaluated with its personalised model: the global model after one SGD step of size
alpha on one mini-batch of its training data. Consecutive mini-batches of one shuffled pass are
D, D' (and D''), so one local epoch takes n / (2·batch) steps for FO (n / (3·batch) for HF), as
PFLlib's batches of 2B split in halves.

``variant="fo"`` (default) is Per-FedAvg (FO); ``variant="hf"`` is Per-FedAvg (HF), whose
Hessian-vector product is computed exactly by double back-propagation instead of the paper's
finite-difference approximation with step delta (the quantity the paper approximates).

Differences from PFLlib's Per-FedAvg:

- PFLlib's server calls ``client.train()`` twice per round, so every client runs twice the
  protocol's local epochs. Here the local procedure runs once; ``passes=2`` reproduces PFLlib.
- PFLlib uses the federation's learning rate for both steps (alpha = beta = lr); the paper's
  inner step alpha is a hyperparameter of its own (default 0.001, the paper's setting; set
  ``alpha`` to the learning rate for PFLlib's).
- PFLlib evaluates after one step on the first batch of an unshuffled loader; here the batch is
  drawn from the client's seeded evaluation generator.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from .base import Client, ClientContext, EvalReport, HParams, LossSum, Reply, TrainResult
from .fedavg import FedAvgServer
from .registry import register_algorithm


class PerFedAvgHParams(HParams):
    alpha: float = Field(0.001, gt=0.0, description="inner (personalisation) step size alpha")
    variant: Literal["fo", "hf"] = Field(
        "fo", description="first-order (fo) or Hessian-free (hf) meta-gradient"
    )
    passes: int = Field(
        1, ge=1, description="runs of the local procedure per round (PFLlib calls it twice)"
    )


class PerFedAvgClient(Client):
    shared = ("model",)
    persistent = ()

    def __init__(self, ctx: ClientContext) -> None:
        super().__init__(ctx)
        self._adapted = ctx.extra_model("adapted")

    def fit(self) -> Reply:
        results = [self.meta_train() for _ in range(self.hp.passes)]
        steps = sum(r.steps for r in results)
        loss = sum(r.loss * r.steps for r in results) / max(steps, 1)
        result = TrainResult(loss, steps, sum(r.samples for r in results))
        return self.reply(self.upload(), result)

    def _grads(self, model: nn.Module, x: Tensor, y: Tensor, create_graph: bool = False):
        params = [p for p in model.parameters() if p.requires_grad]
        loss = nn.functional.cross_entropy(model(x), y)
        return loss, torch.autograd.grad(loss, params, create_graph=create_graph)

    def meta_train(self) -> TrainResult:
        """One pass of Per-FedAvg local steps over the client's batches."""
        hp, lr = self.hp, self.ctx.settings.lr
        group = 3 if hp.variant == "hf" else 2
        model, tmp = self.model, self._adapted
        model.train()
        tmp.train()
        params = list(model.parameters())
        total, steps, samples = LossSum(), 0, 0
        for chunk in self._groups(group):
            (x1, y1), (x2, y2), *rest = chunk
            # w̃ = w - alpha·∇f(w; D), in a second model so that w stays untouched
            tmp.load_state_dict(model.state_dict())
            _, g1 = self._grads(tmp, x1, y1)
            with torch.no_grad():
                for p, g in zip(tmp.parameters(), g1, strict=True):
                    p.sub_(g, alpha=hp.alpha)
            loss, g2 = self._grads(tmp, x2, y2)
            if hp.variant == "hf":
                (x3, y3) = rest[0]
                _, g3 = self._grads(model, x3, y3, create_graph=True)
                dot = sum((g * d.detach()).sum() for g, d in zip(g3, g2, strict=True))
                hvp = torch.autograd.grad(dot, params)
                g2 = [d - hp.alpha * h for d, h in zip(g2, hvp, strict=True)]
            with torch.no_grad():
                for p, g in zip(params, g2, strict=True):
                    p.sub_(g, alpha=lr)
                # buffers (BatchNorm statistics) as the outer forward pass left them
                for b, b_tmp in zip(model.buffers(), tmp.buffers(), strict=True):
                    b.copy_(b_tmp)
            total.add(loss)
            steps += 1
            samples += sum(int(y.shape[0]) for _, y in chunk)
        return TrainResult(total.mean(steps), steps, samples)

    def _groups(self, size: int) -> Iterator[list[tuple[Tensor, Tensor]]]:
        """Consecutive mini-batches in groups of ``size``; a short tail (or a client with fewer
        batches) is split evenly, so every client with 2·``size`` samples takes a step."""
        pending: list[tuple[Tensor, Tensor]] = []
        for batch in self.batches():
            pending.append(batch)
            if len(pending) == size:
                yield pending
                pending = []
        if pending:
            x = torch.cat([b[0] for b in pending])
            y = torch.cat([b[1] for b in pending])
            if y.shape[0] >= 2 * size:  # at least two samples per batch (BatchNorm)
                yield list(zip(x.tensor_split(size), y.tensor_split(size), strict=True))

    def personalised(self, model: nn.Module) -> nn.Module:
        """``model`` after one SGD step of size alpha on one training mini-batch."""
        adapted = self._adapted
        adapted.load_state_dict(model.state_dict())
        adapted.train()
        batch = next(iter(self.batches(1)), None)
        if batch is not None:
            _, grads = self._grads(adapted, *batch)
            with torch.no_grad():
                for p, g in zip(adapted.parameters(), grads, strict=True):
                    p.sub_(g, alpha=self.hp.alpha)
        return adapted

    def evaluate(self, model: nn.Module | None = None, train_loss: bool = True) -> EvalReport:
        if model is None:
            with torch.enable_grad():
                model = self.personalised(self.evaluation_model())
        return super().evaluate(model=model, train_loss=train_loss)


register_algorithm(
    "perfedavg",
    PerFedAvgClient,
    FedAvgServer,
    PerFedAvgHParams,
    "Per-FedAvg: FedAvg on the MAML objective; evaluates after one personalisation step",
    family="pFL",
    paper="Fallah et al., Personalized Federated Learning with Theoretical Guarantees: A "
    "Model-Agnostic Meta-Learning Approach, NeurIPS 2020",
)
