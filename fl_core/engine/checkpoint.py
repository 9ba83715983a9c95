"""Checkpoints: everything a run needs to continue exactly where it stopped.

A checkpoint is a folder ``<out>/checkpoint`` holding ``server.safetensors`` (the server's
state), ``clients.safetensors`` (every client's stored state, keys ``<client id>/<key>``) and
``progress.json`` (the round reached, the byte counters, early-stopping state, and the metrics
and timings so far). Every random choice in a run is drawn from a generator derived from
(seed, purpose, round, client), so there is no generator position to save beyond the round.

It is written to ``checkpoint.tmp`` and renamed into place; the previous checkpoint is kept as
``checkpoint.old`` until the new one is complete, so a crash at any moment leaves one whole
checkpoint to resume from.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from fl_core.config import ConfigError

from .outputs import finite, from_json_floats
from .results import RunResult

CHECKPOINT = "checkpoint"
FORMAT_VERSION = 1


@dataclass
class Checkpoint:
    round: int
    server_state: dict[str, Tensor]
    client_states: dict[int, dict[str, Tensor]]
    result: RunResult
    bytes_up: int
    bytes_down: int
    best: float
    since_best: int
    elapsed: float


def _portable(state: dict[str, Tensor]) -> dict[str, Tensor]:
    # safetensors refuses tensors that share memory or are not contiguous
    return {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}


def save_checkpoint(out: Path, ckpt: Checkpoint) -> Path:
    final = out / CHECKPOINT
    tmp = out / f"{CHECKPOINT}.tmp"
    old = out / f"{CHECKPOINT}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(_portable(ckpt.server_state), str(tmp / "server.safetensors"))
    flat = {
        f"{cid}/{key}": value
        for cid, state in ckpt.client_states.items()
        for key, value in state.items()
    }
    save_file(_portable(flat), str(tmp / "clients.safetensors"))
    progress: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "round": ckpt.round,
        "bytes_up": ckpt.bytes_up,
        "bytes_down": ckpt.bytes_down,
        "best": ckpt.best,
        "since_best": ckpt.since_best,
        "elapsed": ckpt.elapsed,
        "clients_with_state": sorted(ckpt.client_states),
        "result": ckpt.result.to_json(),
    }
    (tmp / "progress.json").write_text(json.dumps(finite(progress)))
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def find_checkpoint(out: Path) -> Path | None:
    for name in (CHECKPOINT, f"{CHECKPOINT}.old"):
        if (out / name / "progress.json").is_file():
            return out / name
    return None


def load_checkpoint(out: Path) -> Checkpoint:
    folder = find_checkpoint(out)
    if folder is None:
        raise ConfigError(
            f"{str(out)!r} holds no checkpoint to resume from (looked for {CHECKPOINT}/"
            "progress.json); runs write one every federation.checkpoint_every rounds"
        )
    try:
        progress = json.loads((folder / "progress.json").read_text())
        server = load_file(str(folder / "server.safetensors"))
        flat = load_file(str(folder / "clients.safetensors"))
    except (OSError, ValueError, SafetensorError) as e:
        raise ConfigError(f"the checkpoint in {str(folder)!r} is unreadable: {e}") from None
    if progress.get("format_version") != FORMAT_VERSION:
        raise ConfigError(
            f"the checkpoint in {str(folder)!r} has format {progress.get('format_version')!r}; "
            f"this version of ktl reads format {FORMAT_VERSION}"
        )
    clients: dict[int, dict[str, Tensor]] = {int(c): {} for c in progress["clients_with_state"]}
    for key, value in flat.items():
        cid, _, name = key.partition("/")
        clients[int(cid)][name] = value
    result_json = progress["result"]
    for rec in result_json["history"]:
        rec["metrics"] = from_json_floats(rec["metrics"])
    return Checkpoint(
        round=int(progress["round"]),
        server_state=server,
        client_states=clients,
        result=RunResult.from_json(result_json),
        bytes_up=int(progress["bytes_up"]),
        bytes_down=int(progress["bytes_down"]),
        best=float(progress["best"]),
        since_best=int(progress["since_best"]),
        elapsed=float(progress["elapsed"]),
    )
