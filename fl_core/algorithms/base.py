"""The server/client contract every algorithm implements.

A message is a flat ``dict[str, Tensor]``; nothing else crosses the boundary. Clients are
short-lived views over persistent *state*: the engine builds a client, loads its stored state,
lets it receive / fit / evaluate, stores what ``state_dict()`` returns, and drops the object.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn

Message = dict[str, Tensor]


class HParams(BaseModel):
    """Base of every algorithm's typed hyperparameters (unknown keys are rejected)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass
class TrainSettings:
    """Federation-wide local training settings, the same for every algorithm."""

    local_epochs: int = 1
    batch_size: int = 10
    lr: float = 0.005
    eval_batch_size: int = 1000


@dataclass
class ClientContext:
    """Everything a client needs for one participation; built by the engine."""

    client_id: int
    round: int
    model: nn.Module  # pooled instance, already holding the client's architecture's initial state
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    num_classes: int
    settings: TrainSettings
    hparams: HParams
    generator: torch.Generator  # derived from (seed, round, client id): shuffling, sampling
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


def message_nbytes(message: Message) -> int:
    """Exact payload size of a message: the bytes of its tensors."""
    return sum(t.numel() * t.element_size() for t in message.values())


def select_state(module: nn.Module, prefixes: tuple[str, ...]) -> dict[str, Tensor]:
    """The entries of ``module.state_dict()`` under the given submodule prefixes ("" = all)."""
    out = {}
    for name, tensor in module.state_dict().items():
        if any(p == "" or name == p or name.startswith(p + ".") for p in prefixes):
            out[name] = tensor
    return out


class Client:
    """Default client: local SGD on cross-entropy over the model's whole output.

    Subclasses *declare* what travels and what persists:

    - ``shared``: submodule prefixes of the model that are received from and sent to the server
      (``("",)`` = the whole model, ``()`` = nothing).
    - ``personal``: prefixes kept between rounds in the client's state.
    """

    shared: ClassVar[tuple[str, ...]] = ("",)
    personal: ClassVar[tuple[str, ...]] = ()

    def __init__(self, ctx: ClientContext) -> None:
        self.ctx = ctx
        self.model = ctx.model
        self.hp = ctx.hparams

    # -- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        if not self.personal:
            return {}
        return {k: v.detach().clone() for k, v in select_state(self.model, self.personal).items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if state:
            self.model.load_state_dict(state, strict=False)

    # -- messages --------------------------------------------------------------------------
    def receive(self, message: Message) -> None:
        """Load the shared part of the model from the server's message."""
        if message:
            self.model.load_state_dict(message, strict=False)

    def upload(self) -> Message:
        if not self.shared:
            return {}
        return {k: v.detach().clone() for k, v in select_state(self.model, self.shared).items()}

    def fit(self) -> Message:
        self.train()
        return self.upload()

    # -- training --------------------------------------------------------------------------
    def make_optimizer(self, params) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=self.ctx.settings.lr)

    def batches(self, epochs: int | None = None):
        """Shuffled mini-batches of the client's train split, ``epochs`` passes."""
        ctx = self.ctx
        n = ctx.train_x.shape[0]
        bs = ctx.settings.batch_size
        for _ in range(ctx.settings.local_epochs if epochs is None else epochs):
            perm = torch.randperm(n, generator=ctx.generator)
            for start in range(0, n, bs):
                idx = perm[start : start + bs]
                yield (
                    ctx.train_x.index_select(0, idx).to(ctx.device, non_blocking=True),
                    ctx.train_y.index_select(0, idx).to(ctx.device, non_blocking=True),
                )

    def loss(self, x: Tensor, y: Tensor) -> Tensor:
        return nn.functional.cross_entropy(self.model(x), y)

    def before_step(self) -> None:
        """Hook between backward and the optimiser step (gradient corrections)."""

    def train(self, epochs: int | None = None) -> float:
        """Run local training; returns the mean training loss over the steps."""
        self.model.train()
        opt = self.make_optimizer(self.model.parameters())
        total, steps = 0.0, 0
        for x, y in self.batches(epochs):
            opt.zero_grad(set_to_none=True)
            loss = self.loss(x, y)
            loss.backward()
            self.before_step()
            opt.step()
            total += float(loss.detach())
            steps += 1
        return total / max(steps, 1)

    # -- evaluation ------------------------------------------------------------------------
    def predict_logits(self, x: Tensor) -> Tensor:
        return self.model(x)

    @torch.no_grad()
    def evaluate(self, train_loss: bool = True) -> dict[str, Any]:
        """Test predictions and (optionally) the summed train loss of the current model."""
        self.model.eval()
        ctx = self.ctx
        bs = ctx.settings.eval_batch_size
        probs = []
        correct = 0
        for start in range(0, ctx.test_x.shape[0], bs):
            x = ctx.test_x[start : start + bs].to(ctx.device)
            y = ctx.test_y[start : start + bs].to(ctx.device)
            logits = self.predict_logits(x)
            correct += int((logits.argmax(1) == y).sum())
            probs.append(torch.softmax(logits.float(), dim=1).cpu())
        out: dict[str, Any] = {
            "test_correct": correct,
            "test_num": int(ctx.test_x.shape[0]),
            "test_probs": torch.cat(probs) if probs else torch.empty(0, ctx.num_classes),
        }
        if train_loss:
            loss_sum = 0.0
            for start in range(0, ctx.train_x.shape[0], bs):
                x = ctx.train_x[start : start + bs].to(ctx.device)
                y = ctx.train_y[start : start + bs].to(ctx.device)
                loss_sum += float(self.loss(x, y)) * x.shape[0]
            out["train_loss_sum"] = loss_sum
            out["train_num"] = int(ctx.train_x.shape[0])
        return out


class Server:
    """Default server: holds nothing and sends nothing (the ``local`` baseline)."""

    def __init__(self, hparams: HParams, initial_models: dict[str, nn.Module], num_clients: int):
        self.hp = hparams
        self.num_clients = num_clients

    def configure(self, round: int, client_ids: list[int]) -> dict[int, Message]:
        return {cid: {} for cid in client_ids}

    def configure_evaluation(self, client_ids: list[int]) -> dict[int, Message]:
        """What each client receives before it is evaluated (default: the training broadcast)."""
        return self.configure(-1, client_ids)

    def aggregate(self, round: int, replies: dict[int, tuple[Message, int]]) -> None:
        return None

    def state_dict(self) -> dict[str, Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        return None


@dataclass
class Algorithm:
    name: str
    client_cls: type[Client]
    server_cls: type[Server]
    hparams_cls: type[HParams]
    description: str
