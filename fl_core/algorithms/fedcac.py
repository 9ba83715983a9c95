"""FedCAC (Wu et al., ICCV 2023): critical parameters collaborate only among similar clients.

Each round a selected client trains its whole model with cross-entropy and then marks, in each
parameter tensor, the fraction ``tau`` with the largest sensitivity |Δθ ⊙ θ| (Δθ: the change
made by this round's training) as *critical*. It uploads its model and its critical-parameter
mask (one byte per parameter).

The server averages the models by sample count (the FedAvg model). For every pair of the
round's clients it computes the overlap of their masks, 1 - Σ|m_i - m_j| / (2·Σ m_i), and the
threshold t = mean + (round / beta)·(max - mean) over all pairs; client i's *customized global
model* is the uniform average of the models of i and of every client whose overlap with i is at
least t. The threshold rises each round, so collaboration on critical parameters narrows from
many clients to the client alone once round ≥ beta.

When a client next receives the FedAvg model and its customized model, its critical parameters
(by its own mask) come from the customized model and all others from the FedAvg model; buffers
come from the FedAvg model. This is also the model it is evaluated with. A client that has
never trained has no mask and uses the FedAvg model.

Differences from PFLlib's FedCAC:

- PFLlib builds no customized model after the first round but still applies the masks, so each
  client's critical parameters fall back to the *initial* model's values for round 2 (its
  customized model is a copy of the initial model). The authors' implementation (in Fling)
  builds the customized models after every round, as here; ``skip_first_customization=true``
  reproduces PFLlib.
- PFLlib's defaults (``-tau 1``, ``-bt 0``) mark every parameter critical and fail its own
  assertion; ours are the authors' setting, tau = 0.5 and beta = 100 (Fling's FedCAC example
  configuration).
- The server keeps each client's customized model until that client next participates, so a
  client that was not selected receives the one built at its last participation (PFLlib's
  client objects keep it the same way). The server's state therefore grows with the number of
  clients that have trained.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from .base import Client, ClientContext, HParams, Message, Reply, ServerContext
from .common import weighted_average
from .fedavg import FedAvgServer
from .parts import Part
from .registry import AlgorithmError, register_algorithm


class FedCacHParams(HParams):
    tau: float = Field(
        0.5, ge=0.0, le=1.0, description="fraction of each tensor's parameters marked critical"
    )
    beta: float = Field(
        100.0,
        gt=0.0,
        description="rounds until critical parameters collaborate with no other client",
    )
    skip_first_customization: bool = Field(
        False,
        description="PFLlib: no customized model after round 1, so critical parameters restart "
        "from the initial model",
    )


@torch.no_grad()
def critical_mask(before: Tensor, after: Tensor, tau: float) -> Tensor:
    """The critical entries of one parameter tensor: the top ``tau`` fraction by |Δθ ⊙ θ|.

    Ties at the threshold are all included; a zero threshold is replaced by the smallest
    nonzero sensitivity (so that untouched parameters are not critical), as in the authors' code.
    """
    sensitivity = ((after - before) * after).abs()
    flat = sensitivity.flatten()
    k = int(tau * flat.numel())
    if k == 0:
        return torch.zeros_like(after, dtype=torch.bool)
    threshold = torch.topk(flat, k).values[-1]
    if threshold <= 1e-10:
        nonzero = flat[flat > 1e-20]
        if nonzero.numel():
            threshold = nonzero.min()
    return sensitivity >= threshold


def overlap_matrix(masks: list[Tensor]) -> Tensor:
    """overlap[i, j] = 1 - Σ|m_i - m_j| / (2·Σ m_i) for flattened boolean masks (diagonal 1)."""
    n = len(masks)
    sizes = [max(int(m.sum()), 1) for m in masks]
    out = torch.ones(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(i + 1, n):
            differ = int((masks[i] ^ masks[j]).sum())
            out[i, j] = 1.0 - differ / (2.0 * sizes[i])
            out[j, i] = 1.0 - differ / (2.0 * sizes[j])
    return out


class FedCacClient(Client):
    shared = ("model", "custom")
    persistent = ("mask",)

    def __init__(self, ctx: ClientContext) -> None:
        super().__init__(ctx)
        named = list(self.model.named_parameters())
        self.custom = {name: torch.zeros_like(p.detach()) for name, p in named}
        self.mask = {name: torch.zeros_like(p.detach(), dtype=torch.bool) for name, p in named}
        self._has_mask = False

    def parts(self) -> dict[str, Part]:
        return {**super().parts(), "custom": self.custom, "mask": self.mask}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        super().load_state_dict(state)
        self._has_mask = bool(state)

    def receive(self, message: Message) -> None:
        super().receive(message)
        if self._has_mask and any(k.startswith("custom/") for k in message):
            with torch.no_grad():
                for name, p in self.model.named_parameters():
                    p.copy_(torch.where(self.mask[name], self.custom[name], p))

    def fit(self) -> Reply:
        before = {name: p.detach().clone() for name, p in self.model.named_parameters()}
        result = self.train()
        for name, p in self.model.named_parameters():
            self.mask[name] = critical_mask(before[name], p.detach(), self.hp.tau)
        self._has_mask = True
        message = {f"model/{k}": v.detach().clone() for k, v in self.model.state_dict().items()}
        message.update({f"mask/{k}": v.clone() for k, v in self.mask.items()})
        return self.reply(message, result)


class FedCacServer(FedAvgServer):
    """FedAvg model for everyone, plus one customized model per client that has trained."""

    def __init__(self, ctx: ServerContext, hparams: HParams) -> None:
        super().__init__(ctx, hparams)
        model = ctx.build_model(ctx.distinct_architectures[0])
        self.param_names = [name for name, _ in model.named_parameters()]
        self.initial_params = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.custom: dict[int, dict[str, Tensor]] = {}  # client id -> {"custom/<name>": tensor}

    def configure(self, round: int, client_ids: list[int]) -> dict[int, Message]:
        return {cid: self.custom[cid] for cid in client_ids if cid in self.custom}

    def aggregate(self, round: int, replies: dict[int, Reply]) -> None:
        if not replies:
            return
        ids = list(replies)
        for cid in ids:
            missing = [n for n in self.param_names if f"mask/{n}" not in replies[cid].message]
            if missing:
                raise AlgorithmError(
                    f"client {cid} sent no critical-parameter mask for {missing[0]}"
                )
        models = {
            cid: {k: v for k, v in replies[cid].message.items() if k.startswith("model/")}
            for cid in ids
        }
        super().aggregate(round, {cid: Reply(models[cid], replies[cid].num_samples) for cid in ids})
        if self.hp.skip_first_customization and round == 1:
            for cid in ids:
                self.custom[cid] = {f"custom/{n}": p for n, p in self.initial_params.items()}
            return
        masks = [
            torch.cat([replies[cid].message[f"mask/{n}"].flatten() for n in self.param_names])
            for cid in ids
        ]
        for cid, group in zip(ids, self.collaborators(round, masks), strict=True):
            members = [
                ({k: models[ids[j]][f"model/{k}"] for k in self.param_names}, 1.0) for j in group
            ]
            avg = weighted_average(members)
            self.custom[cid] = {f"custom/{n}": avg[n] for n in self.param_names}

    def collaborators(self, round: int, masks: list[Tensor]) -> list[list[int]]:
        """For each client (by position), itself and the clients whose overlap reaches the
        round's threshold."""
        n = len(masks)
        if n == 1:
            return [[0]]
        overlap = overlap_matrix(masks)
        off = ~torch.eye(n, dtype=torch.bool)
        mean, top = overlap[off].mean(), overlap[off].max()
        threshold = mean + (round / self.hp.beta) * (top - mean)
        return [
            [i] + [j for j in range(n) if j != i and bool(overlap[i, j] >= threshold)]
            for i in range(n)
        ]

    def state_dict(self) -> dict[str, Tensor]:
        state = dict(self.global_state)
        for cid, tensors in self.custom.items():
            for key, value in tensors.items():
                state[f"client{cid}/{key}"] = value
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.global_state = {k: v for k, v in state.items() if k.startswith("model/")}
        self.custom = {}
        for key, value in state.items():
            if key.startswith("client"):
                head, _, rest = key.partition("/")
                self.custom.setdefault(int(head.removeprefix("client")), {})[rest] = value


register_algorithm(
    "fedcac",
    FedCacClient,
    FedCacServer,
    FedCacHParams,
    "FedCAC: critical parameters from a model averaged over similar clients, the rest FedAvg'd",
    family="pFL",
    paper="Wu et al., Bold but Cautious: Unlocking the Potential of Personalized Federated "
    "Learning through Cautiously Aggressive Collaboration, ICCV 2023",
)
