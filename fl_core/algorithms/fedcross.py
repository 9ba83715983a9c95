"""FedCross (Hu et al., ICDE 2024): multi-model cross-aggregation.

The server keeps K *middle models*, K being the number of clients that join a round
(``federation.join_ratio`` × clients), all equal to the initial model at first. Each round:

1. the middle models are dispatched to the selected clients in a random order (one each);
2. each client trains the middle model it received (plain local SGD) and uploads it;
3. each trained middle model v_i is cross-aggregated with one collaborative model v_co(i) among
   the others: v_i ← alpha·v_i + (1 - alpha)·v_co(i), where co(i) is, by ``select``,
   - "lowest": the model least similar to v_i (cosine similarity of the parameters; default),
   - "highest": the most similar one,
   - "in_order": v_{(i + r mod (K - 1) + 1) mod K} in round r (a rotation);
4. the global model, used for evaluation and by new clients, is the mean of the middle models.

During the first ``warmup_rounds`` rounds the server does FedAvg instead: every middle model is
set to the sample-weighted average of the uploads. Down and up per client per round: one model
(each client receives its own middle model, so nothing is broadcast in training); the server
holds K + 1 models.

When more clients join than there are middle models (``federation.random_join_ratio``), a
middle model goes to several clients and becomes the sample-weighted average of what they
upload; a middle model whose client dropped out is cross-aggregated untrained.

Differences from PFLlib's FedCross:

- PFLlib's client loop reuses the round variable ``i`` (``for i, client in
  enumerate(selected)``), so the warm-up bound ``-fsb`` and the in-order rotation offset see the
  last client's index instead of the round. Here both use the round. With PFLlib's defaults
  (``-fsb 0``, least-similar selection) this changes nothing.
- PFLlib's similarity sums cosine similarities over pairs of consecutive state-dict tensors
  (buffers included); here it is the cosine similarity of the whole parameter vectors, the
  paper's model similarity. Only the ranking matters for the selection.
- PFLlib's global model is the sample-weighted average of the uploads before cross-aggregation;
  here it is the mean of the middle models after it, as in the paper (``global_model="uploads"``
  is PFLlib's).
- PFLlib evaluates each client with the model it trained the last time it was selected (its
  FedCross server never sends the global model before evaluating), which scores local fits on
  local test data; here clients are evaluated with the global model, the model FedCross
  deploys.
- Integer buffers (``num_batches_tracked``) take the larger of the two models' values instead
  of being mixed.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from .base import HParams, Message, Reply, ServerContext
from .common import weighted_average
from .fedavg import FedAvgClient, FedAvgServer
from .registry import register_algorithm


class FedCrossHParams(HParams):
    alpha: float = Field(
        0.99,
        ge=0.5,
        le=1.0,
        description="weight of a middle model's own update in cross-aggregation "
        "(1 - alpha on its collaborator)",
    )
    select: Literal["lowest", "highest", "in_order"] = Field(
        "lowest",
        description="how the collaborative model is chosen: least similar, most "
        "similar, or a rotation by round",
    )
    warmup_rounds: int = Field(
        0, ge=0, description="rounds of plain FedAvg (all middle models = the average) first"
    )
    global_model: Literal["middle", "uploads"] = Field(
        "middle",
        description="evaluate the mean of the middle models (paper) or the sample-weighted "
        "mean of the uploads (PFLlib)",
    )


class FedCrossClient(FedAvgClient):
    """Trains whatever model it receives (its middle model) and uploads it."""


def cross_partners(vectors: list[Tensor], select: str, round: int) -> list[int]:
    """The collaborator of each middle model (an index != i when K > 1)."""
    k = len(vectors)
    if k == 1:
        return [0]
    if select == "in_order":
        offset = round % (k - 1) + 1
        return [(i + offset) % k for i in range(k)]
    stacked = torch.stack(vectors)
    unit = stacked / stacked.norm(dim=1, keepdim=True).clamp(min=1e-12)
    sim = unit @ unit.T
    # a model is never its own collaborator
    sim.fill_diagonal_(float("inf") if select == "lowest" else float("-inf"))
    return (sim.argmin(1) if select == "lowest" else sim.argmax(1)).tolist()


class FedCrossServer(FedAvgServer):
    """FedAvg's server (its ``global_state`` is the model evaluated and given to new clients)
    plus the K middle models, which are what training sends."""

    def __init__(self, ctx: ServerContext, hparams: FedCrossHParams) -> None:
        super().__init__(ctx, hparams)  # global_state: the initial model
        settings = ctx.settings
        self.k = max(1, int(settings.join_ratio * ctx.num_clients + 0.5))
        self.middle = [dict(self.global_state) for _ in range(self.k)]
        model = ctx.build_model(ctx.distinct_architectures[0])
        self.param_keys = [f"model/{n}" for n, _ in model.named_parameters()]
        self._assignment: dict[int, int] = {}

    # -- training --------------------------------------------------------------------------
    def broadcast(self, round: int) -> Message:
        return {}  # each client receives its own middle model

    def configure(self, round: int, client_ids: list[int]) -> dict[int, Message]:
        order = torch.randperm(self.k, generator=self.ctx.rng(round, "dispatch")).tolist()
        self._assignment = {cid: order[j % self.k] for j, cid in enumerate(client_ids)}
        return {cid: self.middle[m] for cid, m in self._assignment.items()}

    def aggregate(self, round: int, replies: dict[int, Reply]) -> None:
        if not replies:
            return
        super().aggregate(round, replies)  # FedAvg: checks the uploads and averages them
        uploads = self.global_state
        if round <= self.hp.warmup_rounds:
            self.middle = [dict(uploads) for _ in range(self.k)]
            self.global_state = dict(uploads)
            return
        trained = list(self.middle)
        for m in range(self.k):
            group = [
                (r.message, r.num_samples)
                for c, r in replies.items()
                if self._assignment.get(c) == m
            ]
            if group:
                trained[m] = weighted_average(group)
        vectors = [
            torch.cat([v[key].double().flatten() for key in self.param_keys]) for v in trained
        ]
        partners = cross_partners(vectors, self.hp.select, round)
        a = self.hp.alpha
        self.middle = [_mix(trained[i], trained[partners[i]], a) for i in range(self.k)]
        if self.hp.global_model == "middle":
            self.global_state = weighted_average([(v, 1.0) for v in self.middle])
        else:
            self.global_state = uploads

    # -- evaluation ------------------------------------------------------------------------
    def evaluation_broadcast(self, round: int) -> Message:
        return self.global_state

    def configure_evaluation(self, round: int, client_ids: list[int]) -> dict[int, Message]:
        return {}

    def state_dict(self) -> dict[str, Tensor]:
        state = dict(self.global_state)
        for m, model in enumerate(self.middle):
            state.update({f"middle{m}/{k}": v for k, v in model.items()})
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.global_state = {k: v for k, v in state.items() if k.startswith("model/")}
        self.middle = [
            {
                k.removeprefix(f"middle{m}/"): v
                for k, v in state.items()
                if k.startswith(f"middle{m}/")
            }
            for m in range(self.k)
        ]


def _mix(own: dict[str, Tensor], other: dict[str, Tensor], alpha: float) -> dict[str, Tensor]:
    out = {}
    for key, v in own.items():
        if v.is_floating_point():
            mixed = alpha * v.double() + (1 - alpha) * other[key].double()
            out[key] = mixed.to(v.dtype)
        else:
            out[key] = torch.maximum(v, other[key])
    return out


register_algorithm(
    "fedcross",
    FedCrossClient,
    FedCrossServer,
    FedCrossHParams,
    "FedCross: K middle models trained by the clients, each cross-aggregated with a collaborator",
    family="tFL",
    paper="Hu et al., FedCross: Towards Accurate Federated Learning via Multi-Model "
    "Cross-Aggregation, ICDE 2024",
)
