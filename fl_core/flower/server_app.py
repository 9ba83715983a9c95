"""The ServerApp of a real deployment: ktl's round loop on the SuperLink's side.

``flwr run APP SUPERLINK`` starts it with the run config written by ``ktl flower app``:

- ``ktl-config``: the run's resolved YAML config (the ClientApps read the same text);
- ``out``: the output folder (on the SuperLink's machine) for config, metrics, summary,
  curves and checkpoints, exactly as ``ktl run`` writes them;
- ``num-classes``, ``input-shape``, ``num-partitions``: what the server needs to know of the
  data, and ``normalization`` (from the partition's manifest): it never reads a client's data;
- ``round-timeout``: seconds a round waits for replies before the missing clients count as
  dropped (0 = wait for all); ``node-wait``: seconds to wait for SuperNodes at the start.
"""

from __future__ import annotations

import json
import logging

import torch
import yaml
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fl_core.config import ConfigError, build_config
from fl_core.data.federated import ClientData, FederatedDataset
from fl_core.engine import run

from . import quiet_flower
from .client import CONFIG_KEY
from .executor import active_grid

log = logging.getLogger("ktl.flower")


def metadata_dataset(
    num_partitions: int,
    num_classes: int,
    input_shape: tuple[int, ...],
    normalization: dict | None = None,
) -> FederatedDataset:
    """A dataset with each client's shape and no samples: all the server side may know."""
    empty_x = torch.empty((0, *input_shape))
    empty_y = torch.empty(0, dtype=torch.int64)
    clients = [ClientData(empty_x, empty_y, empty_x, empty_y) for _ in range(num_partitions)]
    manifest = {
        "num_clients": num_partitions,
        "num_classes": num_classes,
        "normalization": normalization,
        "server_side": True,
    }
    return FederatedDataset(clients, num_classes, tuple(input_shape), manifest)  # type: ignore[arg-type]


def _required(run_config, key: str):
    if key not in run_config:
        raise ConfigError(
            f"the Flower run config has no {key!r}; write the app folder with `ktl flower app`"
        )
    return run_config[key]


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    quiet_flower()
    rc = context.run_config
    config_text = str(_required(rc, CONFIG_KEY))
    raw = yaml.safe_load(config_text)
    raw.setdefault("federation", {})["executor"] = "flower"
    config = build_config(raw)
    shape = tuple(int(v) for v in str(_required(rc, "input-shape")).lower().split("x"))
    dataset = metadata_dataset(
        int(_required(rc, "num-partitions")),
        int(_required(rc, "num-classes")),
        shape,
        json.loads(str(rc.get("normalization", "null"))),
    )
    timeout = float(rc.get("round-timeout", 0.0)) or None
    with active_grid(
        grid,
        config_text=config_text,
        round_timeout=timeout,
        node_wait=float(rc.get("node-wait", 120.0)),
    ):
        result = run(config, out_dir=str(_required(rc, "out")), dataset=dataset)
    s = result.summary()
    log.warning(
        "ktl run finished: best test acc %.4f, final %.4f, %d rounds",
        s["best_test_acc"],
        s["final_test_acc"],
        s["rounds"],
    )
