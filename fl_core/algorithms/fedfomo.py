"""FedFomo (Zhang et al., ICLR 2021): each client weights other clients' models by how much
they lower its own validation loss (first-order model optimization).

The server keeps every client's latest model and an affinity matrix P (identity at start). Each
round it sends a selected client i M other clients' models: the ones with the highest affinity
P[i, ·], each slot replaced with probability ε by a random other model (ε-greedy exploration,
ε decaying by ``epsilon_decay`` per round). Client i holds out a validation split of its training
data and, for each received model θ_n, computes

    w_n = (L_val(θ_i) − L_val(θ_n)) / ‖θ_n − θ_i‖,

keeps the positive weights, normalises them, and replaces its model by θ_i + Σ w_n·(θ_n − θ_i)
(= Σ w_n·θ_n); with no positive weight it keeps θ_i. Only a model that lowers the client's
validation loss is ever mixed in. It then trains on the rest of its split and uploads the model
and the raw weights, which the server adds to P[i, n]. A client is evaluated with its model.

What travels, per selected client and round: down, M models (fewer until M clients have
uploaded); up, the model plus M weights and ids. Every client's model is kept on the server in
a `ModelStore` (memory up to the federation's ``state_memory_mb``, then disk).

Differences from PFLlib's FedFomo:

- PFLlib measures the weights against the model the client had *before* its last local training
  (``old_model`` is cloned right after aggregation); the paper, and we, use the client's current
  model θ_i^(t−1), the one it trained and uploaded.
- PFLlib sends the plain top-M by affinity; the paper (and its official code, ε = 0.3 decaying by
  0.05 per round) explores ε-greedily. ``epsilon=0`` gives PFLlib's selection.
- PFLlib takes the *last* 20% of a client's training samples as validation; ours takes 20%
  spread evenly over the (sorted) training indices, so a class-sorted split is not cut by class.
- PFLlib mixes parameters only; floating buffers (BatchNorm statistics) are mixed with the same
  weights here, so a mixed model is one consistent model.
- Held-out new clients receive no models and fine-tune from the initial model.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor, nn

from ._model_store import ModelStore, pack_models, unpack_models
from .base import Client, ClientContext, HParams, Message, Reply, ServerContext
from .common import OwnModelEvaluation, shared_model_state
from .parts import PartError, select_state
from .registry import register_algorithm


class FedFomoHParams(HParams):
    num_models: int = Field(5, ge=1, description="M: other clients' models sent per round")
    val_ratio: float = Field(
        0.2, gt=0.0, lt=1.0, description="share of a client's training data held out to weight"
    )
    epsilon: float = Field(
        0.3, ge=0.0, le=1.0, description="ε: chance that a slot gets a random model (exploration)"
    )
    epsilon_decay: float = Field(0.05, ge=0.0, description="ε decreases by this much per round")


def validation_positions(n: int, ratio: float) -> Tensor:
    """floor(n·ratio) positions spread evenly over range(n) (a boolean mask)."""
    i = torch.arange(n, dtype=torch.float64)
    return torch.floor((i + 1) * ratio) > torch.floor(i * ratio)


def fomo_weights(own_loss: float, losses: list[float], distances: list[float]) -> Tensor:
    """The raw FedFomo weights (L_own − L_n) / ‖θ_n − θ_own‖ (float64)."""
    loss = torch.tensor(losses, dtype=torch.float64)
    dist = torch.tensor(distances, dtype=torch.float64)
    return (own_loss - loss) / (dist + 1e-5)


class FedFomoClient(Client):
    shared = ()  # received models are unpacked by `receive`
    persistent = ("model",)

    def __init__(self, ctx: ClientContext) -> None:
        super().__init__(ctx)
        is_val = validation_positions(ctx.num_train, self.hp.val_ratio)
        self._val_idx = torch.nonzero(is_val).flatten()
        self._train_idx = torch.nonzero(~is_val).flatten()
        self.peers: list[dict[str, Tensor]] = []
        self.peer_ids = torch.zeros(0, dtype=torch.int64)

    def receive(self, message: Message) -> None:
        template = self.model.state_dict()
        rest, self.peers = unpack_models(message, "peers", template)
        self.peer_ids = rest.pop("fomo/ids", torch.zeros(0, dtype=torch.int64)).long()
        if len(self.peer_ids) != len(self.peers):
            raise PartError(
                f"message carries {len(self.peers)} models but {len(self.peer_ids)} ids"
            )
        super().receive(rest)

    @torch.no_grad()
    def validation_loss(self, model: nn.Module) -> float:
        model.eval()
        ctx = self.ctx
        total = 0.0
        bs = ctx.settings.eval_batch_size
        for start in range(0, len(self._val_idx), bs):
            idx = self._val_idx[start : start + bs]
            x = ctx.train_x.index_select(0, idx).to(ctx.device)
            y = ctx.train_y.index_select(0, idx).to(ctx.device)
            total += float(nn.functional.cross_entropy(model(x), y, reduction="sum"))
        return total / max(len(self._val_idx), 1)

    @torch.no_grad()
    def weigh_and_mix(self) -> Tensor:
        """Weight the received models against the own one on the validation split and mix in
        those with a positive weight; returns the raw weights."""
        if not self.peers or len(self._val_idx) == 0:
            return torch.zeros(len(self.peers), dtype=torch.float64)
        own = {k: v.clone() for k, v in self.model.state_dict().items()}
        names = [n for n, _ in self.model.named_parameters()]
        own_loss = self.validation_loss(self.model)
        scratch = self.ctx.extra_model("peer")
        losses, dists = [], []
        for peer in self.peers:
            scratch.load_state_dict(peer)
            losses.append(self.validation_loss(scratch))
            sq = sum(float(((peer[n].double() - own[n].double()) ** 2).sum()) for n in names)
            dists.append(sq**0.5)
        raw = fomo_weights(own_loss, losses, dists)
        positive = raw.clamp(min=0.0)
        if float(positive.sum()) > 0:
            w = positive / positive.sum()
            mixed = {}
            for key, value in own.items():
                if not value.is_floating_point():
                    continue
                acc = value.double().clone()
                for wn, peer in zip(w.tolist(), self.peers, strict=True):
                    acc.add_(peer[key].double() - value.double(), alpha=wn)
                mixed[key] = acc.to(value.dtype)
            self.model.load_state_dict(mixed, strict=False)
        return raw

    def batches(self, epochs: int | None = None):
        """Shuffled mini-batches of the training part (the validation part is held out)."""
        ctx = self.ctx
        bs = ctx.settings.batch_size
        n = len(self._train_idx)
        for _ in range(ctx.settings.local_epochs if epochs is None else epochs):
            order = self._train_idx[torch.randperm(n, generator=ctx.rng)]
            order = self.on_data_device([order])[0]
            for start in range(0, n, bs):
                yield self.gather(order[start : start + bs])

    def fit(self) -> Reply:
        raw = self.weigh_and_mix()
        result = self.train()
        message = select_state(self.parts(), ("model",))
        message["fomo/ids"] = self.peer_ids.clone()
        message["fomo/weights"] = raw
        return self.reply(message, result)


class FedFomoServer(OwnModelEvaluation):
    def __init__(self, ctx: ServerContext, hparams: FedFomoHParams) -> None:
        super().__init__(ctx, hparams)
        initial = shared_model_state(ctx, ("model",))  # one architecture: refuses a mixed group
        self.store = ModelStore(int(ctx.settings.state_memory_mb * 2**20), initial)
        self.affinity = torch.eye(ctx.num_clients, dtype=torch.float64)

    def choose(self, round: int, client_ids: list[int]) -> dict[int, list[int]]:
        """Per client: up to M other uploaded clients, by affinity with ε-greedy exploration."""
        hp = self.hp
        rng = self.ctx.rng(round, "fomo-explore")
        eps = max(0.0, hp.epsilon - (round - 1) * hp.epsilon_decay)
        uploaded = self.store.ids()
        out: dict[int, list[int]] = {}
        for i in client_ids:
            others = [j for j in uploaded if j != i]
            # highest affinity first, ties by id
            ranked = sorted(others, key=lambda j: (-float(self.affinity[i, j]), j))
            chosen: list[int] = []
            for _ in range(min(hp.num_models, len(others))):
                left = [j for j in others if j not in chosen]
                if float(torch.rand((), generator=rng)) < eps:
                    pick = left[int(torch.randint(len(left), (), generator=rng))]
                else:
                    pick = next(j for j in ranked if j not in chosen)
                chosen.append(pick)
            out[i] = chosen
        return out

    def configure(self, round: int, client_ids: list[int]) -> dict[int, Message]:
        cache: dict[int, dict[str, Tensor]] = {}  # one copy of a model sent to several clients
        out: dict[int, Message] = {}
        for i, chosen in self.choose(round, client_ids).items():
            models = []
            for j in chosen:
                if j not in cache:
                    cache[j] = {k.removeprefix("model/"): v for k, v in self.store.get(j).items()}
                models.append(cache[j])
            msg = pack_models("peers", models)
            if chosen:
                msg["fomo/ids"] = torch.tensor(chosen, dtype=torch.int64)
            out[i] = msg
        return out

    def aggregate(self, round: int, replies: dict[int, Reply]) -> None:
        for cid, reply in replies.items():
            msg = dict(reply.message)
            ids, weights = msg.pop("fomo/ids"), msg.pop("fomo/weights")
            self.store.put(cid, msg)
            if len(ids):
                self.affinity[cid, ids.long()] += weights.double()

    def state_dict(self) -> dict[str, Tensor]:
        return {"fomo/affinity": self.affinity, **self.store.state_dict("models/")}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.affinity = state["fomo/affinity"].clone()
        self.store.load_state_dict(state, "models/")


register_algorithm(
    "fedfomo",
    FedFomoClient,
    FedFomoServer,
    FedFomoHParams,
    "FedFomo: clients mix in other clients' models that lower their validation loss",
    family="pFL",
    paper="Zhang et al., Personalized Federated Learning with First Order Model Optimization, "
    "ICLR 2021",
)
