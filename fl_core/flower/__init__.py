"""Flower adapter: any registered algorithm as a Flower ServerApp + ClientApp, no per-algorithm code.

ktl keeps its round loop, seeded selection, aggregation and metrics on the server side; Flower
carries the messages. Install with ``pip install 'ktl[flower]'``.

- `codec`: ktl tasks and results <-> Flower records (tensors to arrays, scalars to records);
- `client`: the ClientApp (data per process, client state on disk keyed by partition id);
- `executor`: the ktl executor that sends tasks over a Flower Grid;
- `simulation`: ``federation.executor=flower-sim``, Flower's simulation runtime on this machine;
- `server_app`: the ServerApp of a real deployment (SuperLink + SuperNodes);
- `deploy`: app folders, split partitions, TLS certificates and SuperNode keys.

See docs/flower.md.
"""

from __future__ import annotations

import logging
import os

# Known traps, off unless the user says otherwise: telemetry (a 4 s exit timeout offline), the
# update check, and `uv sync` installing the app's dependencies at run time (it ignores pip's
# configuration and can download a different torch).
FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_DEDUP_LOGS": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
}


class _KnownDeprecation(logging.Filter):
    # ktl runs the simulation in-process beside its own loop, which `flwr run` cannot do
    def filter(self, record: logging.LogRecord) -> bool:
        return "run_simulation` function is deprecated" not in record.getMessage()


def quiet_flower() -> None:
    """Set the environment above (where unset) and keep Flower's per-message logs quiet."""
    for key, value in FLOWER_ENV.items():
        os.environ.setdefault(key, value)
    logger = logging.getLogger("flwr")
    logger.setLevel(logging.WARNING)
    if not any(isinstance(f, _KnownDeprecation) for f in logger.filters):
        logger.addFilter(_KnownDeprecation())


class FlowerError(RuntimeError):
    """The Flower side of a run failed (no nodes, simulation did not start, ...)."""


def require_flower() -> None:
    try:
        import flwr  # noqa: F401
    except ImportError:
        raise ImportError(
            "Flower is not installed; install the extra with: pip install 'ktl[flower]'"
        ) from None


quiet_flower()
