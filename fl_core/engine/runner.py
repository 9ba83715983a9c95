"""The round loop, owned by the engine: selection, faults, local training, aggregation, eval."""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fl_core.algorithms import ClientContext, TrainSettings, get_algorithm, message_nbytes
from fl_core.algorithms.base import Algorithm, HParams
from fl_core.config import ConfigError, RunConfig, dump_config
from fl_core.data.federated import FederatedDataset, build_federated_dataset
from fl_core.engine.executors import (
    ProcessExecutor,
    SequentialExecutor,
    Task,
    TaskResult,
    can_fork,
    default_workers,
)
from fl_core.engine.metrics import summarize_clients
from fl_core.engine.state_store import ClientStateStore
from fl_core.models import build_model
from fl_core.models.groups import model_for_client
from fl_core.seeding import derive_seed, numpy_rng, torch_generator


@dataclass
class RoundRecord:
    round: int
    metrics: dict[str, float]
    bytes_up: int
    bytes_down: int
    seconds: float
    train_seconds: float
    aggregate_seconds: float
    eval_seconds: float

    def as_json(self) -> dict[str, Any]:
        return {
            "round": self.round,
            **self.metrics,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "seconds": self.seconds,
            "train_seconds": self.train_seconds,
            "aggregate_seconds": self.aggregate_seconds,
            "eval_seconds": self.eval_seconds,
        }


@dataclass
class RunResult:
    algorithm: str
    history: list[RoundRecord] = field(default_factory=list)
    rounds_run: int = 0
    round_seconds: list[float] = field(default_factory=list)
    train_seconds: list[float] = field(default_factory=list)
    eval_seconds: list[float] = field(default_factory=list)
    new_client_metrics: dict[str, float] | None = None
    stopped_early: bool = False

    @property
    def best_test_acc(self) -> float:
        accs = [
            r.metrics["test_acc"] for r in self.history if not math.isnan(r.metrics["test_acc"])
        ]
        return max(accs) if accs else float("nan")

    @property
    def final_test_acc(self) -> float:
        return self.history[-1].metrics["test_acc"] if self.history else float("nan")

    def summary(self) -> dict[str, Any]:
        med = statistics.median
        out = {
            "algorithm": self.algorithm,
            "best_test_acc": self.best_test_acc,
            "final_test_acc": self.final_test_acc,
            "rounds": self.rounds_run,
            "seconds_per_round": (
                sum(self.round_seconds) / len(self.round_seconds) if self.round_seconds else 0.0
            ),
            "median_seconds_per_round": med(self.round_seconds) if self.round_seconds else 0.0,
            "median_train_seconds": med(self.train_seconds) if self.train_seconds else 0.0,
            "median_eval_seconds": med(self.eval_seconds) if self.eval_seconds else 0.0,
            "bytes_up": self.history[-1].bytes_up if self.history else 0,
            "bytes_down": self.history[-1].bytes_down if self.history else 0,
            "stopped_early": self.stopped_early,
        }
        if self.history:
            out["final_metrics"] = self.history[-1].metrics
        if self.new_client_metrics is not None:
            out["new_clients"] = self.new_client_metrics
        return out


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "device is 'cuda' but no CUDA device is available; use device=cpu or device=auto"
        )
    return torch.device(name)


class Federation:
    """One federated run: data, a pool of models per architecture, client states, a server."""

    def __init__(self, config: RunConfig, dataset: FederatedDataset | None = None):
        self.config = config
        fed = config.federation
        if config.threads:
            torch.set_num_threads(config.threads)
        self.device = resolve_device(config.device)
        self.algorithm: Algorithm = get_algorithm(config.algorithm.name)
        self.hparams: HParams = config.algorithm_hparams()
        total_clients = config.data.num_clients + fed.num_new_clients
        if dataset is None:
            spec = config.data.model_copy(update={"num_clients": total_clients})
            dataset = build_federated_dataset(spec, seed=config.seed)
        elif dataset.num_clients != total_clients:
            raise ConfigError(
                f"the dataset has {dataset.num_clients} clients but the config asks for "
                f"data.num_clients + federation.num_new_clients = {total_clients}"
            )
        self.dataset = dataset
        self.num_clients = config.data.num_clients
        self.new_client_ids = list(range(self.num_clients, total_clients))
        self.settings = TrainSettings(
            local_epochs=fed.local_epochs,
            batch_size=fed.batch_size,
            lr=fed.lr,
            eval_batch_size=fed.eval_batch_size,
        )
        self.architectures = {
            cid: model_for_client(config.model.name, cid) for cid in range(total_clients)
        }
        # one model instance per architecture; clients load their state into it when they run
        self.pool: dict[str, nn.Module] = {}
        self.initial_state: dict[str, dict[str, torch.Tensor]] = {}
        for arch in dict.fromkeys(self.architectures.values()):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(derive_seed(config.seed, "init", arch))
                model = build_model(
                    arch,
                    input_shape=tuple(dataset.input_shape),
                    num_classes=dataset.num_classes,
                    feature_dim=config.model.feature_dim,
                ).to(self.device)
            self.pool[arch] = model
            self.initial_state[arch] = {
                k: v.detach().clone() for k, v in model.state_dict().items()
            }
        training_archs = {self.architectures[c] for c in range(self.num_clients)}
        self.server = self.algorithm.server_cls(
            self.hparams,
            {a: self.pool[a] for a in self.pool if a in training_archs},
            self.num_clients,
        )
        self.store = ClientStateStore(memory_budget=int(fed.state_memory_mb * 2**20))
        self.bytes_up = 0
        self.bytes_down = 0
        self._executor = None
        self._pending_replies: dict = {}

    # -- clients -------------------------------------------------------------------------
    def _client(self, cid: int, round: int, purpose: str, state: dict[str, torch.Tensor]):
        arch = self.architectures[cid]
        model = self.pool[arch]
        model.load_state_dict(self.initial_state[arch])
        data = self.dataset.clients[cid]
        ctx = ClientContext(
            client_id=cid,
            round=round,
            model=model,
            train_x=data.train_x,
            train_y=data.train_y,
            test_x=data.test_x,
            test_y=data.test_y,
            num_classes=self.dataset.num_classes,
            settings=self.settings,
            hparams=self.hparams,
            generator=torch_generator(self.config.seed, purpose, round, cid),
            device=self.device,
        )
        client = self.algorithm.client_cls(ctx)
        client.load_state_dict(state)
        return client

    def run_task(self, task: Task) -> TaskResult:
        """One client's work; runs in this process or in an executor's worker."""
        if task.kind == "fit":
            client = self._client(task.client_id, task.round, "train", task.state)
            client.receive(task.message)
            reply = client.fit()
            return TaskResult(task.client_id, reply=reply, state=client.state_dict())
        # evaluation: a fresh view of the client; its state is never written back
        client = self._client(task.client_id, task.round, "eval", task.state)
        client.receive(task.message)
        if task.finetune_epochs:
            client.train(epochs=task.finetune_epochs)
        return TaskResult(task.client_id, metrics=client.evaluate(train_loss=task.train_loss))

    @property
    def executor(self):
        if self._executor is None:
            fed = self.config.federation
            workers = fed.workers or default_workers()
            kind = fed.executor
            if kind == "auto":
                # forked workers cannot use CUDA; one core gains nothing from a pool
                use_pool = self.device.type == "cpu" and workers > 1 and can_fork()
                kind = "process" if use_pool else "sequential"
            if kind == "process":
                self._executor = ProcessExecutor(self, workers, fed.threads_per_worker)
            else:
                self._executor = SequentialExecutor(self)
        return self._executor

    def select(self, round: int) -> list[int]:
        fed = self.config.federation
        rng = numpy_rng(self.config.seed, "select", round)
        n = self.num_clients
        k = max(1, int(round_half_up(fed.join_ratio * n)))
        if fed.random_join_ratio and k < n:
            k = int(rng.integers(k, n + 1))
        chosen = sorted(int(c) for c in rng.choice(n, size=k, replace=False))
        if fed.client_drop_rate > 0:
            drop_rng = numpy_rng(self.config.seed, "drop", round)
            keep = drop_rng.random(len(chosen)) >= fed.client_drop_rate
            chosen = [c for c, kept in zip(chosen, keep, strict=True) if kept]
        return chosen

    def train_round(self, round: int) -> tuple[int, int]:
        selected = self.select(round)
        messages = self.server.configure(round, selected)
        down = sum(message_nbytes(messages.get(cid, {})) for cid in selected)
        tasks = [
            Task("fit", cid, round, messages.get(cid, {}), self.store.get(cid)) for cid in selected
        ]
        replies = {}
        up = 0
        for res in self.executor.map(tasks):
            self.store.put(res.client_id, res.state or {})
            up += message_nbytes(res.reply or {})
            replies[res.client_id] = (
                res.reply or {},
                int(self.dataset.clients[res.client_id].train_y.shape[0]),
            )
        self._pending_replies = replies
        return up, down

    def aggregate(self, round: int) -> None:
        self.server.aggregate(round, self._pending_replies)
        self._pending_replies = {}

    def evaluate(self, client_ids: list[int], finetune_epochs: int = 0) -> dict[str, float]:
        messages = self.server.configure_evaluation(client_ids)
        tasks = [
            Task(
                "eval",
                cid,
                -1,
                messages.get(cid, {}),
                self.store.get(cid),
                finetune_epochs=finetune_epochs,
                train_loss=self.config.federation.eval_train_loss,
            )
            for cid in client_ids
        ]
        per_client = []
        for res in self.executor.map(tasks):
            metrics = dict(res.metrics or {})
            metrics["test_labels"] = self.dataset.clients[res.client_id].test_y
            per_client.append(metrics)
        return summarize_clients(per_client, self.dataset.num_classes)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.close()
            self._executor = None
        self.store.close()


def round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def run(
    config: RunConfig,
    out_dir: str | os.PathLike | None = None,
    dataset: FederatedDataset | None = None,
    on_round: Callable[[int, RoundRecord | None], None] | None = None,
) -> RunResult:
    """Run a federation end to end; write config, metrics, summary and a plot to ``out_dir``."""
    fed_cfg = config.federation
    federation = Federation(config, dataset)
    result = RunResult(algorithm=federation.algorithm.name)
    out = Path(out_dir) if out_dir is not None else None
    metrics_file = None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(out / "config.yaml", dump_config(config))
        metrics_file = open(out / "metrics.jsonl", "w")  # noqa: SIM115  (appended every eval)
    try:
        start = time.perf_counter()
        best, since_best = -1.0, 0

        def do_eval(rnd: int, train_s: float, agg_s: float) -> RoundRecord:
            t0 = time.perf_counter()
            metrics = federation.evaluate(list(range(federation.num_clients)))
            eval_s = time.perf_counter() - t0
            rec = RoundRecord(
                round=rnd,
                metrics=metrics,
                bytes_up=federation.bytes_up,
                bytes_down=federation.bytes_down,
                seconds=time.perf_counter() - start,
                train_seconds=train_s,
                aggregate_seconds=agg_s,
                eval_seconds=eval_s,
            )
            result.history.append(rec)
            if metrics_file is not None:
                metrics_file.write(json.dumps(_finite(rec.as_json())) + "\n")
                metrics_file.flush()
            return rec

        rec = do_eval(0, 0.0, 0.0)
        if on_round:
            on_round(0, rec)
        for rnd in range(1, fed_cfg.rounds + 1):
            t0 = time.perf_counter()
            up, down = federation.train_round(rnd)
            t1 = time.perf_counter()
            federation.aggregate(rnd)
            t2 = time.perf_counter()
            federation.bytes_up += up
            federation.bytes_down += down
            result.train_seconds.append(t1 - t0)
            rec = None
            if rnd % fed_cfg.eval_every == 0 or rnd == fed_cfg.rounds:
                rec = do_eval(rnd, t1 - t0, t2 - t1)
                result.eval_seconds.append(rec.eval_seconds)
            result.round_seconds.append(time.perf_counter() - t0)
            result.rounds_run = rnd
            if on_round:
                on_round(rnd, rec)
            if rec is not None and fed_cfg.early_stop_patience is not None:
                acc = rec.metrics["test_acc"]
                if acc > best:
                    best, since_best = acc, 0
                else:
                    since_best += 1
                    if since_best >= fed_cfg.early_stop_patience:
                        result.stopped_early = True
                        break
        if federation.new_client_ids:
            result.new_client_metrics = federation.evaluate(
                federation.new_client_ids, finetune_epochs=fed_cfg.new_client_finetune_epochs
            )
    finally:
        if metrics_file is not None:
            metrics_file.close()
        federation.close()
    if out is not None:
        _atomic_write_text(out / "summary.json", json.dumps(_finite(result.summary()), indent=2))
        plot_curves(result, out / "curves.png")
    return result


def _finite(obj: Any) -> Any:
    """JSON has no NaN: write null instead."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def plot_curves(result: RunResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r.round for r in result.history]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    axes[0].plot(rounds, [r.metrics["test_acc"] for r in result.history], marker=".")
    axes[0].set_xlabel("round")
    axes[0].set_ylabel("test accuracy")
    axes[0].set_title(f"{result.algorithm}: test accuracy")
    axes[0].grid(alpha=0.3)
    losses = [r.metrics.get("train_loss", float("nan")) for r in result.history]
    axes[1].plot(rounds, losses, marker=".", color="tab:red")
    axes[1].set_xlabel("round")
    axes[1].set_ylabel("train loss")
    axes[1].set_title("train loss")
    axes[1].grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
