"""Output files of a run: atomic writes, the metrics file, the summary and the curves plot."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from .results import RoundRecord, RunResult


def finite(obj: Any) -> Any:
    """JSON has no NaN: write null instead."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [finite(v) for v in obj]
    return obj


def from_json_floats(obj: Any) -> Any:
    """The inverse of `finite` for metric dicts: null back to NaN."""
    if obj is None:
        return float("nan")
    if isinstance(obj, dict):
        return {k: from_json_floats(v) for k, v in obj.items()}
    return obj


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class MetricsFile:
    """``metrics.jsonl``: one JSON object per evaluated round, flushed as it is written."""

    def __init__(self, path: Path, history: list[RoundRecord]):
        # a resumed run starts from the checkpoint's records, dropping any written after it
        atomic_write_text(path, "".join(self._line(r) for r in history))
        self._file = open(path, "a")  # noqa: SIM115  (appended at every evaluation)

    @staticmethod
    def _line(record: RoundRecord) -> str:
        return json.dumps(finite(record.as_json())) + "\n"

    def write(self, record: RoundRecord) -> None:
        self._file.write(self._line(record))
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_metrics(path: Path) -> list[RoundRecord]:
    """The records of a ``metrics.jsonl`` (null back to NaN); a last line cut off mid-write by a
    killed run is skipped."""
    records = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            data = json.loads(line)
        except json.JSONDecodeError:
            continue
        records.append(RoundRecord.from_json(from_json_floats(data)))
    return records


def write_summary(result: RunResult, out: Path) -> None:
    atomic_write_text(out / "summary.json", json.dumps(finite(result.summary()), indent=2))
    plot_curves(result, out / "curves.png")


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
