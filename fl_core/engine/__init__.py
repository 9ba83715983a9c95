"""The engine: owns the round loop; algorithms only supply hooks."""

from .runner import Federation, RoundRecord, RunResult, run
from .state_store import ClientStateStore

__all__ = ["ClientStateStore", "Federation", "RoundRecord", "RunResult", "run"]
