"""What a run produces: one record per evaluated round, and the run's summary."""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class RoundRecord:
    round: int
    metrics: dict[str, float]
    bytes_up: int  # cumulative
    bytes_down: int  # cumulative
    seconds: float  # since the start of the run (resumed runs: of every session together)
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

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RoundRecord:
        """The inverse of `as_json`: every key that is not a counter is a metric."""
        fixed = {k: data[k] for k in _RECORD_FIELDS}
        metrics = {k: v for k, v in data.items() if k not in _RECORD_FIELDS}
        return cls(metrics=metrics, **fixed)


_RECORD_FIELDS = (
    "round",
    "bytes_up",
    "bytes_down",
    "seconds",
    "train_seconds",
    "aggregate_seconds",
    "eval_seconds",
)


@dataclass
class RunResult:
    algorithm: str
    history: list[RoundRecord] = field(default_factory=list)
    rounds_run: int = 0
    round_seconds: list[float] = field(default_factory=list)
    train_seconds: list[float] = field(default_factory=list)
    eval_seconds: list[float] = field(default_factory=list)
    new_client_metrics: dict[str, float] | None = None
    stopped_early: bool = False  # by early_stop_patience
    stop_requested: bool = False  # by the caller's on_round
    # bytes sent after ``rounds_run`` rounds; None: those of the last evaluated round (a run
    # stopped on a round it did not evaluate has sent more than its last record says)
    bytes_up: int | None = None
    bytes_down: int | None = None

    @property
    def best_test_acc(self) -> float:
        accs = [
            r.metrics["test_acc"] for r in self.history if not math.isnan(r.metrics["test_acc"])
        ]
        return max(accs) if accs else float("nan")

    @property
    def best_round(self) -> int | None:
        best = self.best_test_acc
        return next((r.round for r in self.history if r.metrics["test_acc"] == best), None)

    @property
    def final_test_acc(self) -> float:
        return self.history[-1].metrics["test_acc"] if self.history else float("nan")

    def summary(self) -> dict[str, Any]:
        med = statistics.median
        out = {
            "algorithm": self.algorithm,
            "best_test_acc": self.best_test_acc,
            "best_round": self.best_round,
            "final_test_acc": self.final_test_acc,
            "rounds": self.rounds_run,
            "seconds_per_round": (
                sum(self.round_seconds) / len(self.round_seconds) if self.round_seconds else 0.0
            ),
            "median_seconds_per_round": med(self.round_seconds) if self.round_seconds else 0.0,
            "median_train_seconds": med(self.train_seconds) if self.train_seconds else 0.0,
            "median_eval_seconds": med(self.eval_seconds) if self.eval_seconds else 0.0,
            "bytes_up": self._bytes("up"),
            "bytes_down": self._bytes("down"),
            "stopped_early": self.stopped_early,
            "stop_requested": self.stop_requested,
        }
        if self.history:
            out["final_metrics"] = self.history[-1].metrics
        if self.new_client_metrics is not None:
            out["new_clients"] = self.new_client_metrics
        return out

    def _bytes(self, way: str) -> int:
        total = getattr(self, f"bytes_{way}")
        if total is not None:
            return total
        return getattr(self.history[-1], f"bytes_{way}") if self.history else 0

    @classmethod
    def from_history(cls, algorithm: str, history: list[RoundRecord]) -> RunResult:
        """The result of a run known only by its evaluated rounds (its ``metrics.jsonl``; for a
        run cut off before it could return one). A round's seconds are its training,
        aggregation and evaluation; rounds that were not evaluated are not in it."""
        trained = [r for r in history if r.round > 0]
        return cls(
            algorithm=algorithm,
            history=list(history),
            rounds_run=history[-1].round if history else 0,
            round_seconds=[r.train_seconds + r.aggregate_seconds + r.eval_seconds for r in trained],
            train_seconds=[r.train_seconds for r in trained],
            eval_seconds=[r.eval_seconds for r in trained],
        )

    # checkpoints store the result so far as JSON
    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunResult:
        history = [RoundRecord(**r) for r in data.pop("history")]
        return cls(history=history, **data)
