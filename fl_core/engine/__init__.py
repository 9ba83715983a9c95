"""The engine: owns the round loop; algorithms only supply hooks.

- `runtime`: executes one client's task (data, model pool, algorithm), buildable alone;
- `executors`: run tasks in this process or a pool of processes;
- `federation`: server, runtime, client states, selection and byte accounting;
- `loop`: the round loop with evaluation, checkpoints and early stop;
- `results`, `outputs`, `checkpoint`: what a run writes.
"""

from .checkpoint import load_checkpoint
from .federation import Federation
from .loop import TrainingDiverged, run
from .results import RoundRecord, RunResult
from .runtime import ClientRuntime, Task, TaskResult
from .state_store import ClientStateStore

__all__ = [
    "ClientRuntime",
    "ClientStateStore",
    "Federation",
    "RoundRecord",
    "RunResult",
    "Task",
    "TaskResult",
    "TrainingDiverged",
    "load_checkpoint",
    "run",
]
