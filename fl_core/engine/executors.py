"""Executors run the selected clients' work: in this process, or in a pool of processes.

A task carries only what crosses the server/client boundary plus the client's stored state
(tensor dicts), so the result is the same whichever executor runs it: every random choice
inside a task draws from a generator derived from (seed, round, client id).
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from fl_core.algorithms import Message


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
    message: Message
    state: dict[str, Tensor]
    finetune_epochs: int = 0
    train_loss: bool = True


@dataclass
class TaskResult(_Portable):
    client_id: int
    reply: Message | None = None
    state: dict[str, Tensor] | None = None
    metrics: dict[str, Any] | None = None


class Worker(Protocol):
    def run_task(self, task: Task) -> TaskResult: ...


class SequentialExecutor:
    """Runs tasks one after another in this process (the default)."""

    def __init__(self, worker: Worker):
        self.worker = worker

    def map(self, tasks: list[Task]) -> list[TaskResult]:
        return [self.worker.run_task(t) for t in tasks]

    def close(self) -> None:
        return None


_WORKER: Worker | None = None


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def _run_in_child(task: Task) -> TaskResult:
    assert _WORKER is not None, "process executor used before its worker was set"
    return _WORKER.run_task(task)


class ProcessExecutor:
    """Runs tasks in ``workers`` forked processes, each on ``threads_per_worker`` threads.

    The worker (the federation with its in-memory dataset and model pool) is inherited by
    fork, so data is not copied or re-read; only messages and states travel per task. On
    small models several single-threaded processes beat one multi-threaded one.
    """

    def __init__(self, worker: Worker, workers: int, threads_per_worker: int = 1):
        global _WORKER
        if not can_fork():
            raise ValueError(
                "federation.executor=process needs the 'fork' start method (Linux); "
                "use federation.executor=sequential on this platform"
            )
        _WORKER = worker
        ctx = mp.get_context("fork")
        self.pool = ctx.Pool(
            processes=workers, initializer=_init_worker, initargs=(threads_per_worker,)
        )
        self.workers = workers

    def map(self, tasks: list[Task]) -> list[TaskResult]:
        if not tasks:
            return []
        # contiguous chunks keep per-task overhead low while balancing the workers
        chunk = max(1, len(tasks) // (self.workers * 4))
        return self.pool.map(_run_in_child, tasks, chunksize=chunk)

    def close(self) -> None:
        self.pool.terminate()
        self.pool.join()


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def can_fork() -> bool:
    return "fork" in mp.get_all_start_methods()
