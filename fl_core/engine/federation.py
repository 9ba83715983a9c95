"""One federation: the server, the client runtime, the clients' stored state, an executor.

The federation selects clients, hands the server's messages to the executor, counts the bytes
that cross the boundary, and gives the replies back to the server. It never reads a client's
data: sample counts and evaluation labels come in the clients' replies.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Mapping
from types import MappingProxyType

import torch

from fl_core.algorithms import EvalReport, Reply, ServerContext, get_algorithm, tensor_nbytes
from fl_core.config import ConfigError, RunConfig
from fl_core.data.federated import FederatedDataset, build_federated_dataset
from fl_core.device import DeviceError, resolve_device
from fl_core.engine.executors import (
    Executor,
    ProcessExecutor,
    SequentialExecutor,
    can_fork,
    default_workers,
)
from fl_core.engine.metrics import summarize_clients
from fl_core.engine.runtime import ClientRuntime, Task
from fl_core.engine.state_store import ClientStateStore
from fl_core.seeding import numpy_rng


class Federation:
    """One federated run: data, client runtime, client states, a server."""

    def __init__(self, config: RunConfig, dataset: FederatedDataset | None = None):
        self.config = config
        fed = config.federation
        if config.threads:
            torch.set_num_threads(config.threads)
        try:
            self.device = resolve_device(config.device)
        except DeviceError as e:
            raise ConfigError(str(e)) from None
        self.algorithm = get_algorithm(config.algorithm.name)
        total_clients = config.data.num_clients + fed.num_new_clients
        if dataset is None:
            spec = config.data.model_copy(update={"num_clients": total_clients})
            dataset = build_federated_dataset(spec, seed=config.seed, batch_size=fed.batch_size)
        elif dataset.num_clients != total_clients:
            raise ConfigError(
                f"the dataset has {dataset.num_clients} clients but the config asks for "
                f"data.num_clients + federation.num_new_clients = {total_clients}"
            )
        self.dataset = dataset
        self.num_clients = config.data.num_clients
        self.new_client_ids = list(range(self.num_clients, total_clients))
        self.runtime = ClientRuntime.from_config(config, dataset, self.device)
        self.architectures = {c: self.runtime.architecture(c) for c in range(total_clients)}
        # build every architecture now: one that cannot take this input fails before training
        for arch in dict.fromkeys(self.architectures.values()):
            self.runtime.initial_state(arch)
        self.server_context = ServerContext(
            algorithm=self.algorithm.name,
            device=self.device,
            seed=config.seed,
            num_clients=self.num_clients,
            num_classes=dataset.num_classes,
            input_shape=tuple(dataset.input_shape),
            feature_dim=config.model.feature_dim,
            architectures={c: self.architectures[c] for c in range(self.num_clients)},
            settings=fed,
            client_shared=tuple(self.algorithm.client_cls.shared),
            model_builder=self.runtime.new_model,
            normalization=dataset.manifest.get("normalization"),
        )
        self.server = self.algorithm.server_cls(self.server_context, self.runtime.hparams)
        self.store = ClientStateStore(memory_budget=int(fed.state_memory_mb * 2**20))
        self.bytes_up = 0
        self.bytes_down = 0
        self._executor: Executor | None = None
        self._pending_replies: dict[int, Reply] = {}

    @property
    def executor(self) -> Executor:
        if self._executor is None:
            fed = self.config.federation
            workers = fed.workers or default_workers()
            kind = fed.executor
            if kind == "auto":
                # forked workers cannot use CUDA; one core gains nothing from a pool
                use_pool = self.device.type == "cpu" and workers > 1 and can_fork()
                kind = "process" if use_pool else "sequential"
            if kind in ("flower-sim", "flower"):
                if importlib.util.find_spec("flwr") is None:
                    raise ConfigError(
                        f"federation.executor={kind} needs Flower: pip install 'ktl[flower]'"
                    )
                from fl_core.flower.executor import make_executor

                self._executor = make_executor(kind, self)
            elif kind == "process":
                if self.device.type != "cpu":
                    raise ConfigError(
                        "federation.executor=process runs clients in forked CPU workers; with "
                        f"device={self.config.device} use federation.executor=sequential"
                    )
                self._executor = ProcessExecutor(self.runtime, workers, fed.threads_per_worker)
            else:
                self._executor = SequentialExecutor(self.runtime)
        return self._executor

    def select(self, round: int) -> list[int]:
        fed = self.config.federation
        rng = numpy_rng(self.config.seed, "select", round)
        n = self.num_clients
        k = max(1, round_half_up(fed.join_ratio * n))
        if fed.random_join_ratio and k < n:
            k = int(rng.integers(k, n + 1))
        chosen = sorted(int(c) for c in rng.choice(n, size=k, replace=False))
        if fed.client_drop_rate > 0:
            drop_rng = numpy_rng(self.config.seed, "drop", round)
            keep = drop_rng.random(len(chosen)) >= fed.client_drop_rate
            chosen = [c for c, kept in zip(chosen, keep, strict=True) if kept]
        return chosen

    def train_round(self, round: int) -> tuple[int, int]:
        """Run the selected clients' local training; returns (bytes up, bytes down)."""
        selected = self.select(round)
        broadcast = self.server.broadcast(round)
        messages = self.server.configure(round, selected)
        key = self.executor.publish(broadcast)
        down = 0

        def tasks():  # built lazily: a task (its message, its client's state) when a worker frees
            nonlocal down
            for cid in selected:
                message = messages.get(cid, {})
                down += tensor_nbytes(broadcast) + tensor_nbytes(message)
                yield Task("fit", cid, round, message, key, self.store.get(cid))

        replies: dict[int, Reply] = {}
        up = 0
        for res in self.executor.map(tasks()):
            self.store.put(res.client_id, res.state or {})
            up += tensor_nbytes(res.message)
            replies[res.client_id] = Reply(res.message, res.num_samples, res.metrics)
        # task order, whatever order the executor finished them in
        replies = {cid: replies[cid] for cid in selected if cid in replies}
        self._pending_replies = replies
        return up, down

    @property
    def pending_replies(self) -> Mapping[int, Reply]:
        """The replies of the last `train_round`, by client, until `aggregate` takes them
        (read-only: what the server will aggregate)."""
        return MappingProxyType(self._pending_replies)

    def aggregate(self, round: int) -> dict[str, float]:
        """The server's aggregation of the last round's replies; what it reports of its own
        step, as ``server_<name>`` metrics (empty when it reports nothing)."""
        reported = self.server.aggregate(round, self._pending_replies)
        self._pending_replies = {}
        return {f"server_{k}": float(v) for k, v in (reported or {}).items()}

    def evaluate(
        self, client_ids: list[int], round: int, finetune_epochs: int = 0
    ) -> dict[str, float]:
        broadcast = self.server.evaluation_broadcast(round)
        messages = self.server.configure_evaluation(round, client_ids)
        key = self.executor.publish(broadcast)
        tasks = (
            Task(
                "eval",
                cid,
                round,
                messages.get(cid, {}),
                key,
                self.store.get(cid),
                finetune_epochs=finetune_epochs,
                train_loss=self.config.federation.eval_train_loss,
            )
            for cid in client_ids
        )
        by_client = {res.client_id: res.report for res in self.executor.map(tasks)}
        reports = [EvalReport(**by_client[cid]) for cid in client_ids if cid in by_client]
        return summarize_clients(reports, self.dataset.num_classes)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.close()
            self._executor = None
        self.store.close()


def round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))
