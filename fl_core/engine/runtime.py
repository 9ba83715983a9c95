"""The client runtime: what executes one client's task, buildable without the server.

It holds the clients' data, a pool of model instances per (architecture, slot) and the
algorithm's client class. A task carries only what crosses the server/client boundary (the
client's message and the key of the round's broadcast) plus the client's stored state, so the
runtime can live in this process, in a forked worker, or on another machine (a Flower
ClientApp builds one from the same config).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from fl_core.algorithms import Algorithm, ClientContext, HParams, Message, get_algorithm
from fl_core.algorithms.registry import AlgorithmError
from fl_core.data.federated import ClientData, FederatedDataset
from fl_core.models import build_model
from fl_core.models.groups import model_for_client
from fl_core.seeding import derive_seed, torch_generator

if TYPE_CHECKING:
    from fl_core.config import FederationSpec, RunConfig


def _to_bytes(fields: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    torch.save(fields, buf)
    return buf.getvalue()


def _restore(cls: type, payload: bytes):
    obj = cls.__new__(cls)
    obj.__dict__.update(torch.load(io.BytesIO(payload), weights_only=True))
    return obj


class _Portable:
    """Pickles as one torch.save blob: tensors travel as bytes, never as shared-memory handles
    (which would cost a file descriptor per tensor per task)."""

    def __reduce__(self):
        return (_restore, (type(self), _to_bytes(self.__dict__)))


@dataclass
class Task(_Portable):
    kind: str  # "fit" or "eval"
    client_id: int
    round: int
    message: Message  # this client's own message
    broadcast: str  # key of the round's broadcast ("" = none), published to the executor
    state: dict[str, Tensor]
    finetune_epochs: int = 0
    train_loss: bool = True


@dataclass
class TaskResult(_Portable):
    client_id: int
    message: Message = field(default_factory=dict)  # the reply's message (fit)
    num_samples: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    state: dict[str, Tensor] | None = None  # what persists (fit)
    report: dict[str, Any] | None = None  # an EvalReport as a dict (eval)


def build_initial_model(
    arch: str,
    *,
    seed: int,
    input_shape: tuple[int, int, int],
    num_classes: int,
    feature_dim: int,
    device: torch.device,
) -> nn.Module:
    """The federation's initial model of ``arch``: the same weights in every process, every run
    with this seed (drawn from (seed, "init", arch))."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "init", arch))
        model = build_model(
            arch, input_shape=input_shape, num_classes=num_classes, feature_dim=feature_dim
        )
    return model.to(device)


class ClientRuntime:
    """Runs clients' tasks for one federation: data, model pool, algorithm."""

    def __init__(
        self,
        *,
        algorithm: Algorithm,
        hparams: HParams,
        settings: FederationSpec,
        seed: int,
        device: torch.device,
        clients: Callable[[int], ClientData] | FederatedDataset,
        num_classes: int,
        input_shape: tuple[int, int, int],
        feature_dim: int,
        architecture: Callable[[int], str],
    ) -> None:
        self.algorithm = algorithm
        self.hparams = hparams
        self.settings = settings
        self.seed = seed
        self.device = device
        self._clients = clients.client if isinstance(clients, FederatedDataset) else clients
        self.num_classes = num_classes
        self.input_shape = tuple(input_shape)
        self.feature_dim = feature_dim
        self.architecture = architecture
        self._pool: dict[tuple[str, str], nn.Module] = {}
        self._initial: dict[str, dict[str, Tensor]] = {}
        self.broadcasts: dict[str, Message] = {}
        # set by an executor whose workers must fetch a broadcast they have not seen
        self.fetch_broadcast: Callable[[str], Message] | None = None

    @classmethod
    def from_config(cls, config: RunConfig, dataset: FederatedDataset, device: torch.device):
        return cls(
            algorithm=get_algorithm(config.algorithm.name),
            hparams=config.algorithm_hparams(),
            settings=config.federation,
            seed=config.seed,
            device=device,
            clients=dataset,
            num_classes=dataset.num_classes,
            input_shape=tuple(dataset.input_shape),
            feature_dim=config.model.feature_dim,
            architecture=lambda cid: model_for_client(config.model.name, cid),
        )

    # -- models ----------------------------------------------------------------------------
    def new_model(self, arch: str) -> nn.Module:
        """A fresh (unpooled) model of ``arch`` with the federation's initial weights."""
        return build_initial_model(
            arch,
            seed=self.seed,
            input_shape=self.input_shape,
            num_classes=self.num_classes,
            feature_dim=self.feature_dim,
            device=self.device,
        )

    def initial_state(self, arch: str) -> dict[str, Tensor]:
        if arch not in self._initial:
            model = self.new_model(arch)
            self._initial[arch] = {k: v.detach().clone() for k, v in model.state_dict().items()}
            self._pool[(arch, "model")] = model
        return self._initial[arch]

    def pooled_model(self, arch: str, slot: str = "model") -> nn.Module:
        """The pooled instance for (arch, slot), reset to the architecture's initial state."""
        state = self.initial_state(arch)
        model = self._pool.get((arch, slot))
        if model is None:
            model = self._pool[(arch, slot)] = self.new_model(arch)
        model.load_state_dict(state)
        return model

    # -- tasks -----------------------------------------------------------------------------
    def client(self, client_id: int, round: int, purpose: str, state: dict[str, Tensor]):
        arch = self.architecture(client_id)
        data = self._clients(client_id)

        def extra(slot: str, other_arch: str | None = None) -> nn.Module:
            if slot == "model" and other_arch in (None, arch):
                raise AlgorithmError("slot 'model' is the client's main model; name another slot")
            return self.pooled_model(other_arch or arch, slot)

        ctx = ClientContext(
            client_id=client_id,
            round=round,
            arch=arch,
            model=self.pooled_model(arch),
            train_x=data.train_x,
            train_y=data.train_y,
            test_x=data.test_x,
            test_y=data.test_y,
            num_classes=self.num_classes,
            settings=self.settings,
            hparams=self.hparams,
            rng=torch_generator(self.seed, purpose, round, client_id),
            device=self.device,
            pooled_model=extra,
        )
        client = self.algorithm.client_cls(ctx)
        client.load_state_dict(state)
        return client

    def broadcast(self, key: str) -> Message:
        if not key:
            return {}
        if key not in self.broadcasts:
            if self.fetch_broadcast is None:
                raise RuntimeError(f"broadcast {key!r} was never published to this runtime")
            self.broadcasts = {key: self.fetch_broadcast(key)}  # keep only the latest
        return self.broadcasts[key]

    def run_task(self, task: Task) -> TaskResult:
        """One client's work; runs in this process or in an executor's worker."""
        shared = self.broadcast(task.broadcast)
        clash = set(shared) & set(task.message)
        if clash:
            raise AlgorithmError(
                f"the server sent {sorted(clash)[:3]} both in the broadcast and to client "
                f"{task.client_id}; a key belongs to one of them"
            )
        message = {**shared, **task.message} if task.message else shared
        purpose = "train" if task.kind == "fit" else "eval"
        # anything drawing from torch's global generator (dropout) is seeded per task too
        torch.manual_seed(derive_seed(self.seed, purpose, "global", task.round, task.client_id))
        client = self.client(task.client_id, task.round, purpose, task.state)
        client.receive(message)
        if task.kind == "fit":
            reply = client.fit()
            return TaskResult(
                task.client_id,
                message=reply.message,
                num_samples=int(reply.num_samples),
                metrics={k: float(v) for k, v in reply.metrics.items()},
                state=client.state_dict(),
            )
        # evaluation: a fresh view of the client; its state is never written back
        if task.finetune_epochs:
            client.finetune(task.finetune_epochs)
        report = client.evaluate(train_loss=task.train_loss)
        return TaskResult(task.client_id, report=vars(report))
