"""``federation.executor=flower-sim``: ktl's round loop with clients on Flower's simulation runtime.

Flower's simulation runs a ServerApp in a thread and the ClientApps in Ray actors. Here the
ServerApp does nothing but hand its Grid to this executor and wait: ktl's own loop (in the
caller's thread) sends every task through that Grid, so selection, aggregation, metrics and
checkpoints are the in-process engine's, and the metrics files are the same.

The dataset is saved once to a temporary ``ktl partition`` folder that each Ray worker reads
(each client once per worker); client states live in a temporary state folder keyed by
partition id. Both are removed on close, and Ray is shut down with the simulation.
"""

from __future__ import annotations

import logging
import queue
import sys
import tempfile
import threading
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fl_core.config import RunConfig, dump_config
from fl_core.data.federated import FederatedDataset
from fl_core.engine.executors import default_workers

from . import quiet_flower
from .client import config_digest, make_client_app
from .executor import FlowerError, GridExecutor

log = logging.getLogger("ktl.flower")

START_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 120.0  # for Flower to stop its workers and Ray once the ServerApp returns


# how the simulation's executor waits for its nodes: the first answer waits for Ray to start
# the workers and each to import its app, which takes minutes on a busy machine; all nodes exist
# from the start, so one exchange waits the whole time
GRID_OPTIONS = {
    "round_timeout": None,
    "node_wait": START_TIMEOUT_S,
    "query_timeout": START_TIMEOUT_S,
    "no_nodes_hint": (
        "the simulation's Ray workers did not answer (a busy machine, or workers "
        "that failed to start: see the log above); try fewer federation.workers"
    ),
}


class SimulationExecutor(GridExecutor):
    """A GridExecutor over Flower's simulation runtime, started and stopped with it."""

    def __init__(self, config: RunConfig, dataset: FederatedDataset) -> None:
        quiet_flower()
        from flwr.simulation import run_simulation

        self._tmp = tempfile.TemporaryDirectory(prefix="ktl-flower-sim-")
        root = Path(self._tmp.name)
        data_path = root / "partition"
        dataset.save(data_path)
        self.state_dir = root / "states"
        config_text = dump_config(config)
        fed = config.federation
        workers = fed.workers or default_workers()

        grids: queue.Queue[Grid] = queue.Queue()
        self._stop = threading.Event()
        self._error: list[BaseException] = []
        server_app = ServerApp()

        @server_app.main()
        def _main(grid: Grid, context: Context) -> None:
            grids.put(grid)
            self._stop.wait()

        client_app = make_client_app(config_text, str(data_path), str(self.state_dir))
        backend = {
            "client_resources": {"num_cpus": fed.threads_per_worker, "num_gpus": 0.0},
            "init_args": {
                "num_cpus": workers * fed.threads_per_worker,
                "num_gpus": 0,
                "include_dashboard": False,
            },
        }

        def _simulate() -> None:
            try:
                run_simulation(
                    server_app=server_app,
                    client_app=client_app,
                    num_supernodes=dataset.num_clients,
                    backend_config=backend,
                )
            except BaseException as e:  # reported to the caller, not lost in the thread
                self._error.append(e)
            finally:
                grids.put(None)  # type: ignore[arg-type]  (wakes a caller still waiting)

        self._thread = threading.Thread(target=_simulate, name="ktl-flower-sim", daemon=True)
        self._thread.start()
        try:
            grid = grids.get(timeout=START_TIMEOUT_S)
        except queue.Empty:
            grid = None
        if grid is None:
            self.close()
            why = f": {self._error[0]!r}" if self._error else ""
            raise FlowerError(f"Flower's simulation runtime did not start{why}")
        super().__init__(
            grid,
            config_digest(config_text),
            dataset.num_clients,
            **GRID_OPTIONS,
        )

    def map(self, tasks):
        if self._error:
            raise FlowerError(f"Flower's simulation runtime stopped: {self._error[0]!r}")
        return super().map(tasks)

    def close(self) -> None:
        self._stop.set()  # the ServerApp returns; Flower stops its workers and Ray
        self._thread.join(timeout=STOP_TIMEOUT_S)
        if self._thread.is_alive():
            # Flower did not wind down (seen after a start that timed out, the ServerApp
            # returning while the workers still start): shut Ray down here, so that no worker
            # process outlives the run
            log.warning(
                "Flower's simulation did not stop in %.0f s; shutting Ray down", STOP_TIMEOUT_S
            )
            shutdown_ray()
        self._tmp.cleanup()


def shutdown_ray() -> None:
    """Shut down this process's Ray runtime (and the workers it started), if one is up."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
