"""Executors run the selected clients' tasks: in this process, or in a pool of processes.

Each round the engine *publishes* the server's broadcast (the part of the message that is the
same for every client) once, then maps tasks that carry only their key. The sequential executor
hands the broadcast to the runtime directly; the process executor writes it to one file that
each worker reads once per round, however many of the round's tasks it runs.

``map`` takes an iterable of tasks and yields their results, in any order (the federation puts
them back in task order, so sums over clients do not depend on the executor). The in-process
executors draw a task from the iterable only when a worker can take it (at most
``IN_FLIGHT_PER_WORKER`` per worker), so a lazily built task list holds only that many clients'
states in memory at once, whatever the number of clients.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import os
import queue
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Protocol

import torch

from fl_core.algorithms import Message

from .runtime import ClientRuntime, Task, TaskResult


class Executor(Protocol):
    def publish(self, message: Message) -> str: ...

    def map(self, tasks: Iterable[Task]) -> Iterable[TaskResult]: ...

    def close(self) -> None: ...


IN_FLIGHT_PER_WORKER = 2
"""Tasks handed to a worker process ahead of time: one running, one queued."""


class SequentialExecutor:
    """Runs tasks one after another in this process."""

    def __init__(self, runtime: ClientRuntime):
        self.runtime = runtime
        self._keys = itertools.count()

    def publish(self, message: Message) -> str:
        if not message:
            return ""
        key = f"b{next(self._keys)}"
        self.runtime.broadcasts = {key: message}
        return key

    def map(self, tasks: Iterable[Task]) -> Iterator[TaskResult]:
        for task in tasks:
            yield self.runtime.run_task(task)

    def close(self) -> None:
        return None


_RUNTIME: ClientRuntime | None = None
_BROADCAST_DIR: Path | None = None


def _read_broadcast(key: str) -> Message:
    assert _BROADCAST_DIR is not None
    return torch.load(_BROADCAST_DIR / f"{key}.pt", weights_only=True)


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)
    assert _RUNTIME is not None
    _RUNTIME.broadcasts = {}
    _RUNTIME.fetch_broadcast = _read_broadcast


def _run_in_child(task: Task) -> TaskResult:
    assert _RUNTIME is not None, "process executor used before its runtime was set"
    return _RUNTIME.run_task(task)


class ProcessExecutor:
    """Runs tasks in ``workers`` forked processes, each on ``threads_per_worker`` threads.

    The runtime (with its in-memory dataset and model pool) is inherited by fork, so data is
    not copied or re-read; per task only the client's message and state travel, and each
    round's broadcast travels once per worker. On small models several single-threaded
    processes beat one multi-threaded one.
    """

    def __init__(self, runtime: ClientRuntime, workers: int, threads_per_worker: int = 1):
        global _RUNTIME, _BROADCAST_DIR
        if not can_fork():
            raise ValueError(
                "federation.executor=process needs the 'fork' start method (Linux); "
                "use federation.executor=sequential on this platform"
            )
        self._tmp = tempfile.TemporaryDirectory(prefix="ktl-broadcast-")
        _RUNTIME, _BROADCAST_DIR = runtime, Path(self._tmp.name)
        ctx = mp.get_context("fork")
        self.pool = ctx.Pool(
            processes=workers, initializer=_init_worker, initargs=(threads_per_worker,)
        )
        self.workers = workers
        self.in_flight = workers * IN_FLIGHT_PER_WORKER
        self._keys = itertools.count()
        self._published: Path | None = None

    def publish(self, message: Message) -> str:
        if self._published is not None:  # the previous round's tasks have all finished
            self._published.unlink(missing_ok=True)
            self._published = None
        if not message:
            return ""
        key = f"b{next(self._keys)}"
        path = Path(self._tmp.name) / f"{key}.pt"
        tmp = path.with_suffix(".tmp")
        torch.save({k: v.detach().cpu() for k, v in message.items()}, tmp)
        os.replace(tmp, path)
        self._published = path
        return key

    def map(self, tasks: Iterable[Task]) -> Iterator[TaskResult]:
        # Tasks are drawn (and so built, with their clients' states) in this thread, one each
        # time the caller has taken a result: at most in_flight exist at once, and no worker
        # waits for a slow task ahead of it. Results come in the order they finish.
        source = iter(tasks)
        finished: queue.SimpleQueue = queue.SimpleQueue()

        def submit(task: Task) -> None:
            self.pool.apply_async(
                _run_in_child, (task,), callback=finished.put, error_callback=finished.put
            )

        running = 0
        for task in itertools.islice(source, self.in_flight):
            submit(task)
            running += 1
        while running:
            result = finished.get()
            running -= 1
            if isinstance(result, BaseException):
                raise result
            yield result  # the caller stores it before the next task is drawn
            task = next(source, None)
            if task is not None:
                submit(task)
                running += 1

    def close(self) -> None:
        self.pool.terminate()
        self.pool.join()
        self._tmp.cleanup()


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def can_fork() -> bool:
    return "fork" in mp.get_all_start_methods()
