"""FedAMP (Huang et al., AAAI 2021): attentive message passing between personal models.

The server keeps every client's latest model w_j. For a selected client i it builds a
*personalized cloud model* u_i = Σ_j ξ_ij·w_j with attention weights
ξ_ij = α_K·A'(‖w_i − w_j‖²) for j ≠ i, A'(x) = e^(−x/σ)/σ, and ξ_ii = 1 − Σ_{j≠i} ξ_ij, so
similar clients attract each other more. The client trains its own model (never overwritten)
on CE + λ/(2α_K)·‖w − u_i‖² and uploads it; it is evaluated with that model.

What travels, per selected client and round: down, u_i (the model's parameters); up, the whole
model. Every client's model is kept on the server in a `ModelStore` (memory up to the
federation's ``state_memory_mb``, then disk), and the cloud models are computed in blocks of
selected clients that fit that budget, each with two streaming passes over the store.

Differences from PFLlib's FedAMP:

- PFLlib builds the attraction term from ``p.data`` (``clientamp.py``), so it carries no
  gradient and FedAMP trains exactly like Local (PFLlib issue #95). Here the term
  λ/(2α_K)·‖w − u_i‖² (squared, as in the paper; PFLlib's norm is not squared) adds
  λ/α_K·(w − u_i) to every parameter's gradient. ``lam=0`` reproduces what PFLlib trains.
- PFLlib mixes only the models uploaded in the previous round, plus the client's live model;
  the paper's server holds every client's latest model, and so does ours (a client that has not
  trained yet counts with the initial model).
- The paper assumes α_K small enough that ξ_ii ≥ 0, i.e. u_i is a convex combination. When the
  weights of the other clients sum to more than 1 (with PFLlib's α_K = σ = 1 this happens as
  soon as two models are close), they are scaled to sum to 1 (ξ_ii = 0) instead of
  extrapolating away from the client's own model, which PFLlib's formula would do.
- The paper tunes α_K, λ and σ per dataset and fixes no default; ours are PFLlib's (1, 1, 1).
- Held-out new clients receive no cloud model: they fine-tune and are evaluated from the
  initial model (PFLlib's FedAMP has no global model to give them either).
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor, nn

from ._model_store import ModelStore
from .base import Client, ClientContext, HParams, Message, Reply, ServerContext
from .common import OwnModelEvaluation, shared_model_state
from .fedprox import add_proximal_gradient
from .parts import Part, select_state
from .registry import register_algorithm


class FedAMPHParams(HParams):
    alpha_k: float = Field(
        1.0, gt=0.0, description="α_K: step size; scales the attention weights and divides λ"
    )
    lam: float = Field(
        1.0,
        ge=0.0,
        description="λ: weight of the attraction λ/(2α_K)·‖w − u_i‖² (0 = Local training, "
        "which is what PFLlib's gradient-free term trains)",
    )
    sigma: float = Field(
        1.0, gt=0.0, description="σ: scale of the attention A'(d) = exp(−d/σ)/σ over distances"
    )


class FedAMPClient(Client):
    shared = ("cloud",)  # the personalized cloud model u_i, received
    persistent = ("model",)  # the client's own model, never overwritten by the server

    def __init__(self, ctx: ClientContext) -> None:
        super().__init__(ctx)
        self.cloud = {n: torch.zeros_like(p.detach()) for n, p in self.model.named_parameters()}
        self._anchor: list[Tensor] | None = None

    def parts(self) -> dict[str, Part]:
        return {**super().parts(), "cloud": self.cloud}

    def receive(self, message: Message) -> None:
        super().receive(message)
        if any(k.startswith("cloud/") for k in message):
            self._anchor = [self.cloud[n] for n, _ in self.model.named_parameters()]

    def before_step(self, model: nn.Module) -> None:
        # gradient of λ/(2α_K)·‖w − u_i‖²
        if self._anchor is not None and model is self.model:
            add_proximal_gradient(model, self._anchor, self.hp.lam / self.hp.alpha_k)

    def fit(self) -> Reply:
        result = self.train()
        return self.reply(select_state(self.parts(), ("model",)), result)


class FedAMPServer(OwnModelEvaluation):
    def __init__(self, ctx: ServerContext, hparams: FedAMPHParams) -> None:
        super().__init__(ctx, hparams)
        initial = shared_model_state(ctx, ("model",))  # one architecture: refuses a mixed group
        model = ctx.build_model(ctx.distinct_architectures[0])
        self.param_shapes = {f"model/{n}": p.shape for n, p in model.named_parameters()}
        budget = int(ctx.settings.state_memory_mb * 2**20)
        self.store = ModelStore(budget, initial)

    def _vector(self, state: dict[str, Tensor]) -> Tensor:
        return torch.cat([state[k].reshape(-1).float() for k in self.param_shapes])

    def cloud_models(self, client_ids: list[int]) -> dict[int, Tensor]:
        """u_i as one flat parameter vector per client. Clients are taken in blocks whose own
        vectors fit the memory budget; each block makes two passes over the stored models."""
        vector_bytes = 4 * sum(shape.numel() for shape in self.param_shapes.values())
        block = max(1, int(self.store.memory_budget // vector_bytes))
        clouds: dict[int, Tensor] = {}
        for start in range(0, len(client_ids), block):
            clouds.update(self._cloud_block(client_ids[start : start + block]))
        return clouds

    def _cloud_block(self, client_ids: list[int]) -> dict[int, Tensor]:
        hp = self.hp
        everyone = list(range(self.ctx.num_clients))
        own = {i: self._vector(self.store.get(i)) for i in client_ids}
        xi = torch.zeros(len(client_ids), len(everyone), dtype=torch.float64)
        for j, state in self.store.items(everyone):
            w_j = self._vector(state)
            for a, i in enumerate(client_ids):
                if i != j:
                    dist = torch.sum((own[i] - w_j) ** 2, dtype=torch.float64)
                    xi[a, j] = hp.alpha_k * torch.exp(-dist / hp.sigma) / hp.sigma
        others = xi.sum(1, keepdim=True)
        xi = torch.where(others > 1.0, xi / others, xi)  # keep u_i a convex combination
        clouds = {i: own[i] * float(1.0 - xi[a].sum()) for a, i in enumerate(client_ids)}
        for j, state in self.store.items(everyone):
            if bool((xi[:, j] != 0).any()):
                w_j = self._vector(state)
                for a, i in enumerate(client_ids):
                    clouds[i].add_(w_j, alpha=float(xi[a, j]))
        return clouds

    def configure(self, round: int, client_ids: list[int]) -> dict[int, Message]:
        out: dict[int, Message] = {}
        for cid, vec in self.cloud_models(client_ids).items():
            msg, start = {}, 0
            for key, shape in self.param_shapes.items():
                n = shape.numel()
                msg["cloud/" + key.removeprefix("model/")] = vec[start : start + n].view(shape)
                start += n
            out[cid] = msg
        return out

    def aggregate(self, round: int, replies: dict[int, Reply]) -> None:
        for cid, reply in replies.items():
            self.store.put(cid, reply.message)

    def state_dict(self) -> dict[str, Tensor]:
        return self.store.state_dict("models/")

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.store.load_state_dict(state, "models/")


register_algorithm(
    "fedamp",
    FedAMPClient,
    FedAMPServer,
    FedAMPHParams,
    "FedAMP: personal models attracted to attention-weighted cloud models of similar clients",
    family="pFL",
    paper="Huang et al., Personalized Cross-Silo Federated Learning on Non-IID Data, AAAI 2021",
)
