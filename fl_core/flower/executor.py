"""The server side: a ktl executor whose tasks travel as Flower messages over a Grid.

ktl keeps its own round loop, seeded selection, aggregation, metrics and checkpoints
(`fl_core.engine.loop`); this executor only carries each selected client's task to the node
that holds that client's partition and brings the reply back. A client whose node is gone, or
whose reply is an error or does not arrive within ``round_timeout``, is a dropped client: the
round completes with the others (the engine aggregates whatever replies it gets).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from fl_core.algorithms import Message as KtlMessage
from fl_core.engine.runtime import Task, TaskResult

from . import FlowerError
from .client import PARTITION_ID
from .codec import CodecError, decode_result, encode_task

if TYPE_CHECKING:
    from fl_core.engine.federation import Federation

log = logging.getLogger("ktl.flower")


class GridExecutor:
    """Runs ktl tasks on Flower nodes, found by the partition id each one reports."""

    def __init__(
        self,
        grid: Grid,
        config_digest: str,
        num_partitions: int,
        round_timeout: float | None = None,
        node_wait: float = 120.0,
        no_nodes_hint: str = "are the SuperNodes connected and started with "
        "--node-config 'partition-id=...'?",
        query_timeout: float = 60.0,
    ) -> None:
        self.grid = grid
        self.digest = config_digest
        self.num_partitions = num_partitions
        self.round_timeout = round_timeout
        self.node_wait = node_wait
        self.no_nodes_hint = no_nodes_hint
        self.query_timeout = query_timeout  # how long one exchange waits for nodes to answer
        self.nodes: dict[int, int] = {}  # client (partition) id -> Flower node id
        self.dropped: list[tuple[int, int, str]] = []  # (round, client id, why)
        self._broadcast: KtlMessage = {}
        self._discovered = False

    # -- nodes ------------------------------------------------------------------------------
    def discover(self, wait: float = 0.0) -> dict[int, int]:
        """Ask every unknown node which partition it holds; forget nodes that left. With
        ``wait``, keep looking until every partition has a node or ``wait`` seconds pass."""
        deadline = time.monotonic() + wait
        while True:
            live = set(self.grid.get_node_ids())
            self.nodes = {c: n for c, n in self.nodes.items() if n in live}
            unknown = sorted(live - set(self.nodes.values()))
            if unknown:
                queries = [
                    Message(RecordDict(), dst_node_id=n, message_type="query") for n in unknown
                ]
                replies = self.grid.send_and_receive(queries, timeout=self.query_timeout)
                for reply in replies:
                    if reply.has_error():
                        log.warning(
                            "node %s did not say its partition: %s",
                            reply.metadata.src_node_id,
                            reply.error.reason,
                        )
                        continue
                    pid = int(reply.content.config_records["node"][PARTITION_ID])
                    if pid in self.nodes and self.nodes[pid] != reply.metadata.src_node_id:
                        log.warning("two nodes hold partition %d; using the newer one", pid)
                    self.nodes[pid] = reply.metadata.src_node_id
            if len(self.nodes) >= self.num_partitions or time.monotonic() >= deadline:
                return self.nodes
            time.sleep(1.0)

    # -- the executor interface -------------------------------------------------------------
    def publish(self, message: KtlMessage) -> str:
        self._broadcast = message
        return "flower" if message else ""

    def map(self, tasks: Iterable[Task]) -> list[TaskResult]:
        # one Flower message per task, all sent at once: every task is built here
        tasks = list(tasks)
        if not tasks:
            return []
        if not self._discovered:
            self.discover(wait=self.node_wait)
            self._discovered = True
            if not self.nodes:
                raise FlowerError(
                    f"no Flower node reported a partition within {self.node_wait:.0f} s; "
                    + self.no_nodes_hint
                )
        else:
            self.discover()
        messages, by_message = [], {}
        for task in tasks:
            node = self.nodes.get(task.client_id)
            if node is None:
                self._drop(task, "no node holds this partition")
                continue
            content = encode_task(task, self._broadcast if task.broadcast else {}, self.digest)
            kind = "train" if task.kind == "fit" else "evaluate"
            msg = Message(content, dst_node_id=node, message_type=kind, group_id=str(task.round))
            messages.append(msg)
            by_message[id(msg)] = task
        results: dict[int, TaskResult] = {}
        for reply in self.grid.send_and_receive(messages, timeout=self.round_timeout):
            if reply.has_error():
                cid = self._client_of(reply.metadata.src_node_id)
                log.warning("client %s failed: %s", cid, reply.error.reason)
                self.dropped.append(
                    (tasks[0].round, -1 if cid is None else cid, reply.error.reason)
                )
                continue
            try:
                res = decode_result(reply.content)
            except CodecError as e:
                log.warning("a reply was not ktl's: %s", e)
                continue
            results[res.client_id] = res
        for task in tasks:
            if task.client_id not in results and task.client_id in self.nodes:
                if not any(d[1] == task.client_id and d[0] == task.round for d in self.dropped):
                    self._drop(task, "no reply within the round's timeout")
        # task order, as the in-process executors return them (aggregation sums in this order)
        return [results[t.client_id] for t in tasks if t.client_id in results]

    def close(self) -> None:
        return None

    # -- helpers ----------------------------------------------------------------------------
    def _client_of(self, node_id: int) -> int | None:
        return next((c for c, n in self.nodes.items() if n == node_id), None)

    def _drop(self, task: Task, why: str) -> None:
        log.warning("round %d: client %d dropped (%s)", task.round, task.client_id, why)
        self.dropped.append((task.round, task.client_id, why))


# The deployment ServerApp runs ktl's loop with the grid Flower gave it; the engine's executor
# factory finds that grid here (set only for the duration of the ServerApp's main).
_ACTIVE: dict[str, object] = {}


@contextmanager
def active_grid(grid: Grid, **options: float | None) -> Iterator[None]:
    _ACTIVE.clear()
    _ACTIVE.update(grid=grid, **options)
    try:
        yield
    finally:
        _ACTIVE.clear()


def make_executor(kind: str, federation: Federation):
    """The executor for ``federation.executor`` = ``flower-sim`` or ``flower``."""
    from fl_core.config import dump_config

    from .client import config_digest

    config = federation.config
    total = config.data.num_clients + config.federation.num_new_clients
    if kind == "flower-sim":
        from .simulation import SimulationExecutor

        return SimulationExecutor(config, federation.dataset)
    if kind == "flower":
        grid = _ACTIVE.get("grid")
        if grid is None:
            raise FlowerError(
                "federation.executor=flower runs inside ktl's Flower ServerApp (flwr run APP "
                "SUPERLINK, see docs/flower.md); on one machine use federation.executor=flower-sim"
            )
        return GridExecutor(
            grid,  # type: ignore[arg-type]
            config_digest(str(_ACTIVE.get("config_text") or dump_config(config))),
            total,
            round_timeout=_ACTIVE.get("round_timeout"),  # type: ignore[arg-type]
            node_wait=float(_ACTIVE.get("node_wait") or 120.0),
        )
    raise ValueError(f"not a Flower executor: {kind!r}")
