"""FedALA (Zhang et al., AAAI 2023): adaptive local aggregation of the global model.

The server is FedAvg's. A client does not overwrite its local model θ with the received global
model θ_g; it initialises local training with

    lower layers: θ_g;   the top ``top_tensors`` parameter tensors: θ + (θ_g - θ) ⊙ W,

with element-wise weights W ∈ [0, 1] (one per parameter of those tensors, starting at 1) learned
on a random ``sample_percent``% of its training data by W ← clip(W - eta·∇_θ̂ L ⊙ (θ_g - θ), 0, 1)
on each mini-batch, θ̂ being the mixed model. The first time (the paper's round 1 for the
client) the weights train until the standard deviation of the last ``num_pre_loss`` epoch losses
falls below ``threshold``; afterwards one epoch per round. A client with no local model yet (its
first participation) starts from θ_g and learns nothing (ALA is off when θ = θ_g). Then it trains
the initialised model for the local epochs and uploads it; the trained model and W persist.

Evaluation runs the same local aggregation on the received global model (the weights learned
there are not kept) and evaluates the result, the model the client would train from, as PFLlib
evaluates each client after its local aggregation. The cost: evaluation and the next round's
training each learn weights on the same pair of models, so a round does two weight-learning
epochs where PFLlib does one, and the first learning to convergence runs twice (in round 1's
evaluation, then in round 2's training). That first learning is made cheap instead: when every
learned tensor is in the head (the default), the body (global, in eval mode) gives the same
features in every epoch, so they are computed once and the epochs run the head alone. The
metrics are the same bit for bit, and on PFLlib's protocol with 3,000 samples round 1's
evaluation is 5x and round 2's training about 3x faster (benchmarks/fedala_first_aggregation.py).

Defaults are the paper's (eta = 1.0, s = 80%, p = the last layer: its weight and bias tensors,
threshold 0.1 over the last 10 losses).

Differences from PFLlib's FedALA:

- ``top_tensors`` counts parameter tensors from the output, as PFLlib's ``-p`` (default 2, the
  head's weight and bias on the models here).
- PFLlib samples a contiguous slice of the train set with Python's unseeded ``random``; here a
  random subset drawn from the client's seeded generator.
- PFLlib learns weights for every client every round (its broadcast reaches all clients);
  here a client learns when it is selected (and again, without keeping them, when evaluated).
- PFLlib's convergence loop has no bound; ``max_epochs`` caps the first-round training.
- Buffers (BatchNorm statistics) are taken from the global model with the lower layers (PFLlib
  never sends buffers). The weights learn on the mixed model in eval mode (BatchNorm on its
  statistics, no dropout); PFLlib's copy is in whatever mode the client's model was left in,
  which is eval mode after an evaluation round.
"""

from __future__ import annotations

import statistics

import torch
from pydantic import Field
from torch import Tensor, nn

from fl_core.models.registry import SplitModel

from .base import Client, ClientContext, HParams, Message, Reply, ServerContext
from .fedavg import FedAvgServer
from .parts import Part
from .registry import AlgorithmError, register_algorithm


class FedALAHParams(HParams):
    eta: float = Field(1.0, gt=0.0, description="learning rate of the aggregation weights")
    sample_percent: float = Field(
        80.0, gt=0.0, le=100.0, description="percent of the train split the weights learn on"
    )
    top_tensors: int = Field(
        2, ge=1, description="parameter tensors, from the output, that are mixed by weights"
    )
    threshold: float = Field(
        0.1, gt=0.0, description="first-round stop: std of the recent losses below this"
    )
    num_pre_loss: int = Field(10, ge=2, description="how many recent losses the std covers")
    max_epochs: int = Field(200, ge=1, description="cap on the first-round weight-learning epochs")


class FedALAClient(Client):
    shared = ("model",)
    persistent = ("model", "ala")

    def __init__(self, ctx: ClientContext) -> None:
        super().__init__(ctx)
        names = [n for n, _ in self.model.named_parameters()]
        self.top = names[-self.hp.top_tensors :]
        params = dict(self.model.named_parameters())
        self.ala = {
            **{f"w.{n}": torch.ones_like(params[n]) for n in self.top},
            "started": torch.zeros((), dtype=torch.int64),
        }
        self._temp = ctx.extra_model("ala")
        self._has_local = False
        self.ala_losses: list[float] = []  # last-batch loss of each weight-learning epoch

    def parts(self) -> dict[str, Part]:
        return {**super().parts(), "ala": self.ala}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        super().load_state_dict(state)
        self._has_local = bool(state)

    def receive(self, message: Message) -> None:
        local = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        super().receive(message)  # the model part now holds θ_g
        if self._has_local and any(k.startswith("model/") for k in message):
            self.adaptive_local_aggregation(local)

    def adaptive_local_aggregation(self, local: dict[str, Tensor]) -> None:
        """Mix the local model into the received one (top tensors by learned weights)."""
        model, temp, hp = self.model, self._temp, self.hp
        glob = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if all(torch.equal(glob[n], local[n]) for n in self.top):
            return  # θ = θ_g: nothing to learn (the paper's round 1)
        weights = {n: self.ala[f"w.{n}"] for n in self.top}
        diff = {n: glob[n] - local[n] for n in self.top}
        temp.load_state_dict(glob)
        temp_params = dict(temp.named_parameters())
        for name, p in temp_params.items():
            p.requires_grad_(name in weights)

        def set_mixed() -> None:
            with torch.no_grad():
                for n in self.top:
                    temp_params[n].copy_(local[n] + diff[n] * weights[n])

        set_mixed()
        n = self.ctx.num_train
        count = max(1, int(n * hp.sample_percent / 100))
        idx = torch.randperm(n, generator=self.ctx.rng)[:count]
        x_all, y_all = self.ctx.train_x[idx], self.ctx.train_y[idx]
        bs = self.ctx.settings.batch_size
        first = int(self.ala["started"]) == 0
        losses: list[float] = []
        # eval mode: BatchNorm uses its statistics (any batch size works) and dropout is off,
        # so the weights see the model that is evaluated
        temp.eval()
        batches = [
            (x_all[i : i + bs].to(self.ctx.device), y_all[i : i + bs].to(self.ctx.device))
            for i in range(0, count, bs)
        ]
        if first and self._head_only(temp):
            # every learned tensor is in the head and the body is fixed (global, eval mode):
            # the body's features are the same in every epoch, so compute them once, batch by
            # batch as the loop would, and learn on the head alone (the convergence loop's
            # epochs then cost a head's forward and backward each)
            with torch.no_grad():
                batches = [(temp.forward_features(x), y) for x, y in batches]
            forward = temp.forward_head
        else:
            forward = temp
        try:
            while True:
                for x, y in batches:
                    temp.zero_grad(set_to_none=True)
                    loss = nn.functional.cross_entropy(forward(x), y)
                    loss.backward()
                    with torch.no_grad():
                        for name in self.top:
                            grad = temp_params[name].grad
                            w = weights[name] - hp.eta * grad * diff[name]
                            weights[name] = w.clamp_(0.0, 1.0)
                    set_mixed()
                losses.append(float(loss.detach()))
                if not first or len(losses) >= hp.max_epochs:
                    break
                recent = losses[-hp.num_pre_loss :]
                if len(losses) > hp.num_pre_loss and statistics.pstdev(recent) < hp.threshold:
                    break
        finally:
            for p in temp.parameters():
                p.requires_grad_(True)
        self.ala_losses = losses
        for name in self.top:
            self.ala[f"w.{name}"] = weights[name]
        self.ala["started"] = torch.ones((), dtype=torch.int64)
        with torch.no_grad():
            params = dict(model.named_parameters())
            for name in self.top:
                params[name].copy_(temp_params[name])

    def _head_only(self, model: nn.Module) -> bool:
        """Whether every learned tensor is in the model's head, behind ``forward_features``."""
        return isinstance(model, SplitModel) and all(n.startswith("head.") for n in self.top)

    def fit(self) -> Reply:
        result = self.train()
        reply = self.reply(self.upload(), result)
        reply.metrics["ala_epochs"] = len(self.ala_losses)
        return reply


class FedALAServer(FedAvgServer):
    """FedAvg's server; refuses a ``top_tensors`` larger than the model before training."""

    def __init__(self, ctx: ServerContext, hparams: FedALAHParams) -> None:
        super().__init__(ctx, hparams)
        for arch in ctx.distinct_architectures:
            count = len(list(ctx.build_model(arch).parameters()))
            if hparams.top_tensors > count:
                raise AlgorithmError(
                    f"algorithm.top_tensors={hparams.top_tensors}, but model {arch!r} has only "
                    f"{count} parameter tensors; choose 1..{count}"
                )


register_algorithm(
    "fedala",
    FedALAClient,
    FedALAServer,
    FedALAHParams,
    "FedALA: FedAvg whose clients mix the global model into theirs by learned weights",
    family="pFL",
    paper="Zhang et al., FedALA: Adaptive Local Aggregation for Personalized Federated "
    "Learning, AAAI 2023",
)
