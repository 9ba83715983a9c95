"""The server/client contract every algorithm implements.

A message is a flat ``dict[str, Tensor]`` with namespaced keys (``model/…``, ``proto/…``,
``cv/…``); nothing else crosses the boundary. Clients are short-lived views over persistent
*state*: the engine builds a client, loads its stored state, lets it receive / fit / evaluate,
stores what ``state_dict()`` returns, and drops the object.

One participation, as the engine drives it::

    client = Algo.client_cls(ctx)          # parts at their architecture's initial values
    client.load_state_dict(stored_state)   # what persisted from earlier rounds
    client.receive(broadcast | message)    # what the server sent
    reply = client.fit()                   # a Reply: message, sample count, metrics
    store(client.state_dict())

Optimiser state does not persist: every ``train()`` call builds a fresh optimiser (plain SGD at
the federation's learning rate, as the papers and PFLlib use). An algorithm that needs momentum
across rounds keeps it as a persistent tensor-dict part.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn

from fl_core.seeding import torch_generator

from .parts import Part, Selector, load_flat, select_state, selected_keys

if TYPE_CHECKING:
    from fl_core.config import FederationSpec

Message = dict[str, Tensor]
Family = Literal["tFL", "pFL", "HtFL", "KT"]
FAMILIES: dict[str, str] = {
    "tFL": "traditional FL",
    "pFL": "personalized FL",
    "HtFL": "heterogeneous-model FL",
    "KT": "knowledge transfer",
}


class HParams(BaseModel):
    """Base of every algorithm's typed hyperparameters (unknown keys are rejected)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass
class TrainResult:
    """What one call of `Client.train` did."""

    loss: float  # mean loss over the steps
    steps: int  # optimiser steps taken (SCAFFOLD's K)
    samples: int  # samples seen, counting repeats over epochs


@dataclass
class Reply:
    """A client's answer to a training round; it describes itself, so the server never reads a
    client's data: the message, the sample count its update stands for, and scalar metrics."""

    message: Message
    num_samples: int
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class EvalReport:
    """A client's evaluation: counts, class scores and labels (what the AUC needs), train loss."""

    test_correct: int
    test_num: int
    test_probs: Tensor
    test_labels: Tensor
    train_loss_sum: float = 0.0
    train_num: int = 0


# A client's train split larger than this stays in host memory during training (mini-batches are
# then copied to the device one by one); smaller ones are copied to the device once.
DEVICE_DATA_LIMIT = 1 << 30


def split_batches(perm: Tensor, batch_size: int, drop_last: bool) -> list[Tensor]:
    """``perm`` cut into consecutive batches of ``batch_size``; with ``drop_last`` the last
    incomplete batch is left out unless it is the only batch (so a client smaller than one
    batch still trains)."""
    n = perm.numel()
    stop = n - n % batch_size if drop_last and n >= batch_size else n
    return list(perm[:stop].split(batch_size)) if stop > 0 else []


class LossSum:
    """A running sum of scalar losses kept on their device (in float64), read once at the end:
    reading a GPU loss per step would make every step wait for the device."""

    def __init__(self) -> None:
        self.total: Tensor | float = 0.0

    def add(self, loss: Tensor) -> None:
        self.total = self.total + loss.detach().double()

    def mean(self, steps: int) -> float:
        return float(self.total) / max(steps, 1)


@dataclass
class ClientContext:
    """Everything a client needs for one participation; built by the client runtime."""

    client_id: int
    round: int
    arch: str
    model: nn.Module  # pooled instance, reset to its architecture's initial state
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    num_classes: int
    settings: FederationSpec  # the federation's training settings (batch size, lr, epochs …)
    hparams: HParams
    rng: torch.Generator  # derived from (seed, purpose, round, client id): shuffling, sampling
    device: torch.device
    pooled_model: Callable[[str, str | None], nn.Module]
    _train_on_device: tuple[Tensor, Tensor] | None = field(default=None, init=False, repr=False)

    def train_on_device(self) -> tuple[Tensor, Tensor]:
        """``(train_x, train_y)`` on ``device``, copied there once per participation (unless
        larger than ``DEVICE_DATA_LIMIT``): mini-batches are then gathered on the device, and a
        training step does not wait for a copy from pageable host memory (each such copy
        synchronises the device's stream, which on a GPU shared by several processes costs a
        time slice per step)."""
        if self._train_on_device is None:
            size = self.train_x.nbytes + self.train_y.nbytes
            if self.device.type == "cpu" or size > DEVICE_DATA_LIMIT:
                self._train_on_device = (self.train_x, self.train_y)
            else:
                self._train_on_device = (self.train_x.to(self.device), self.train_y.to(self.device))
        return self._train_on_device

    def extra_model(self, slot: str, arch: str | None = None) -> nn.Module:
        """Another pooled model (of this client's architecture unless ``arch`` is given), reset
        to that architecture's initial state: a personal model, a mentee, a meme model."""
        return self.pooled_model(slot, arch)

    @property
    def num_train(self) -> int:
        return int(self.train_y.shape[0])


@dataclass
class ServerContext:
    """What a server knows of its federation, and nothing of any client's data."""

    algorithm: str  # the registered name, for messages
    device: torch.device
    seed: int
    num_clients: int
    num_classes: int
    input_shape: tuple[int, int, int]
    feature_dim: int
    architectures: dict[int, str]  # each training client's architecture
    settings: FederationSpec
    client_shared: tuple[Selector, ...]  # what the algorithm's clients declare as travelling
    model_builder: Callable[[str], nn.Module]
    # How the clients' inputs were normalised (the dataset manifest's "normalization": formula,
    # mean, std), for servers that make inputs (generated images); None when unknown.
    normalization: dict | None = None
    # The run's output folder when there is one (set by the round loop), for server artefacts
    # such as image grids; None in runs without a folder.
    out_dir: Path | None = None

    def build_model(self, arch: str) -> nn.Module:
        """A fresh model of ``arch`` holding the federation's initial weights for it (never a
        pooled instance that clients train in)."""
        return self.model_builder(arch)

    def rng(self, round: int, purpose: str) -> torch.Generator:
        """A generator derived from (seed, "server", purpose, round): same in every run."""
        return torch_generator(self.seed, "server", purpose, round, device="cpu")

    @property
    def distinct_architectures(self) -> list[str]:
        return list(dict.fromkeys(self.architectures.values()))


class Client:
    """Default client: local SGD on cross-entropy over the model's output.

    Subclasses *declare* which tensors travel and which persist, as selections of their parts
    (see `fl_core.algorithms.parts`):

    - ``shared``: received from the server and sent back (``("model",)`` = the whole model,
      ``("model/body",)`` = the body, ``()`` = nothing);
    - ``persistent``: kept in the client's state between rounds.
    """

    shared: ClassVar[tuple[Selector, ...]] = ("model",)
    persistent: ClassVar[tuple[Selector, ...]] = ()

    def __init__(self, ctx: ClientContext) -> None:
        self.ctx = ctx
        self.model = ctx.model
        self.hp = ctx.hparams

    def parts(self) -> dict[str, Part]:
        """The client's named parts; subclasses add theirs to ``super().parts()``."""
        return {"model": self.model}

    # -- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        return select_state(self.parts(), self.persistent)

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if state:
            parts = self.parts()
            load_flat(parts, state, "client state", selected_keys(parts, self.persistent))

    # -- messages --------------------------------------------------------------------------
    def receive(self, message: Message) -> None:
        """Load what the server sent into the shared parts; an unexpected key is an error."""
        if message:
            parts = self.parts()
            load_flat(parts, message, "message", selected_keys(parts, self.shared))

    def upload(self) -> Message:
        return select_state(self.parts(), self.shared)

    def fit(self) -> Reply:
        result = self.train()
        return self.reply(self.upload(), result)

    def reply(self, message: Message, result: TrainResult | None = None) -> Reply:
        metrics = {} if result is None else {"train_loss": result.loss, "steps": result.steps}
        return Reply(message, self.ctx.num_train, metrics)

    def finetune(self, epochs: int) -> None:
        """What a new client does with ``epochs`` local epochs before it is evaluated."""
        self.train(epochs=epochs)

    # -- training --------------------------------------------------------------------------
    def make_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=self.ctx.settings.lr)

    def epoch_batches(self, index: Tensor | None = None) -> list[Tensor]:
        """One epoch of training: ``index`` (default: every train sample) shuffled with the
        client's generator and cut into batches of ``settings.batch_size``, the last incomplete
        one dropped when ``settings.drop_last`` (unless it is the only one)."""
        ctx = self.ctx
        if index is None:
            perm = torch.randperm(ctx.num_train, generator=ctx.rng)
        else:
            perm = index[torch.randperm(index.numel(), generator=ctx.rng)]
        return split_batches(perm, ctx.settings.batch_size, ctx.settings.drop_last)

    def on_data_device(self, batches: list[Tensor]) -> list[Tensor]:
        """Index batches moved, in one copy, to where `ClientContext.train_on_device` keeps the
        train split (unchanged when they are there already)."""
        device = self.ctx.train_on_device()[0].device
        if not batches or batches[0].device == device:
            return batches
        return list(torch.cat(batches).to(device).split([b.numel() for b in batches]))

    def gather(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        """The train samples ``idx`` (from `on_data_device`) as a batch on the client's device."""
        x, y = self.ctx.train_on_device()
        device = self.ctx.device
        return (
            x.index_select(0, idx).to(device, non_blocking=True),
            y.index_select(0, idx).to(device, non_blocking=True),
        )

    def batches(self, epochs: int | None = None) -> Iterator[tuple[Tensor, Tensor]]:
        """Shuffled mini-batches of the client's train split, ``epochs`` passes."""
        for _ in range(self.ctx.settings.local_epochs if epochs is None else epochs):
            for idx in self.on_data_device(self.epoch_batches()):
                yield self.gather(idx)

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return nn.functional.cross_entropy(model(x), y)

    def before_step(self, model: nn.Module) -> None:
        """Hook between backward and the optimiser step (gradient corrections)."""

    def train(
        self,
        model: nn.Module | None = None,
        params: Iterable[nn.Parameter] | None = None,
        epochs: int | None = None,
    ) -> TrainResult:
        """Local SGD on ``model`` (default: the model part) for ``epochs`` (default: the
        federation's local epochs), updating only ``params`` (default: all of the model's).

        Parameters outside ``params`` are frozen for the call (no gradient is computed for them)
        and restored afterwards.
        """
        model = self.model if model is None else model
        trained = list(model.parameters()) if params is None else list(params)
        trained_ids = {id(p) for p in trained}
        frozen = [p for p in model.parameters() if p.requires_grad and id(p) not in trained_ids]
        for p in frozen:
            p.requires_grad_(False)
        model.train()
        opt = self.make_optimizer(trained)
        total, steps, samples = LossSum(), 0, 0
        try:
            for x, y in self.batches(epochs):
                opt.zero_grad(set_to_none=True)
                loss = self.loss(model, x, y)
                loss.backward()
                self.before_step(model)
                opt.step()
                total.add(loss)
                steps += 1
                samples += int(y.shape[0])
        finally:
            for p in frozen:
                p.requires_grad_(True)
        return TrainResult(total.mean(steps), steps, samples)

    # -- evaluation ------------------------------------------------------------------------
    def predict(self, model: nn.Module, x: Tensor) -> Tensor:
        """Class scores (logits or anything whose argmax is the prediction)."""
        return model(x)

    def evaluation_model(self) -> nn.Module:
        """The model a client is evaluated with (a personal model, in pFL)."""
        return self.model

    @torch.no_grad()
    def evaluate(self, model: nn.Module | None = None, train_loss: bool = True) -> EvalReport:
        """Accuracy and class probabilities on the test split and (optionally) the summed train
        loss of ``model`` (default: `evaluation_model`)."""
        model = self.evaluation_model() if model is None else model
        model.eval()
        ctx = self.ctx
        bs = ctx.settings.eval_batch_size
        probs = []
        correct = 0
        for start in range(0, ctx.test_x.shape[0], bs):
            x = ctx.test_x[start : start + bs].to(ctx.device)
            y = ctx.test_y[start : start + bs].to(ctx.device)
            scores = self.predict(model, x)
            correct += int((scores.argmax(1) == y).sum())
            probs.append(torch.softmax(scores.float(), dim=1).cpu())
        report = EvalReport(
            test_correct=correct,
            test_num=int(ctx.test_x.shape[0]),
            test_probs=torch.cat(probs) if probs else torch.empty(0, ctx.num_classes),
            test_labels=ctx.test_y,
        )
        if train_loss:
            loss_sum = 0.0
            for start in range(0, ctx.num_train, bs):
                x = ctx.train_x[start : start + bs].to(ctx.device)
                y = ctx.train_y[start : start + bs].to(ctx.device)
                loss_sum += float(self.loss(model, x, y)) * x.shape[0]
            report.train_loss_sum = loss_sum
            report.train_num = ctx.num_train
        return report


class Server:
    """Default server: holds nothing and sends nothing (the ``local`` baseline).

    Per round the engine asks for ``broadcast(round)`` (the same for every selected client; it
    reaches each worker process once) and ``configure(round, client_ids)`` (per-client extras);
    a client receives the union, and a key in both is an error. Then ``aggregate`` gets the
    replies. Evaluation asks ``evaluation_broadcast`` / ``configure_evaluation``, which default
    to the training ones.

    ``configure`` may return any mapping: the engine reads a client's entry (``.get``) only
    when it builds that client's task, which it does when a worker is free, so a server holding
    per-client models in a spill-to-disk store can load each one on demand instead of holding
    every client's message at once.

    ``aggregate`` may return a few numbers about the server's own step (a loss, a margin); the
    round loop records them beside the clients' metrics of that round as ``server_<name>``
    (in evaluated rounds: a round that is not evaluated has no record).
    """

    def __init__(self, ctx: ServerContext, hparams: HParams) -> None:
        self.ctx = ctx
        self.hp = hparams

    def broadcast(self, round: int) -> Message:
        return {}

    def configure(self, round: int, client_ids: list[int]) -> Mapping[int, Message]:
        return {}

    def evaluation_broadcast(self, round: int) -> Message:
        return self.broadcast(round)

    def configure_evaluation(self, round: int, client_ids: list[int]) -> Mapping[int, Message]:
        return self.configure(round, client_ids)

    def aggregate(self, round: int, replies: dict[int, Reply]) -> Mapping[str, float] | None:
        return None

    def state_dict(self) -> dict[str, Tensor]:
        """Everything the server carries between rounds (checkpoints store it)."""
        return {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        return None


@dataclass
class Algorithm:
    """A registered algorithm: its pair, hyperparameters and metadata."""

    name: str
    client_cls: type[Client]
    server_cls: type[Server]
    hparams_cls: type[HParams]
    description: str
    family: Family
    paper: str = ""
    heterogeneous: bool = False  # works when clients have different architectures
