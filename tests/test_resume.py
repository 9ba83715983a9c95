"""Checkpoint and resume across a killed process, and the default config shipping with ktl."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from fl_core.config import RunConfig, load_config

ROOT = Path(__file__).resolve().parent.parent


def _config(path: Path, rounds: int) -> Path:
    cfg = {
        "seed": 2,
        "threads": 1,
        "data": {
            "dataset": "synthetic",
            "num_clients": 5,
            "source_options": {"num_samples": 600, "num_classes": 5, "image_size": 16},
        },
        "model": {"name": "mlp", "feature_dim": 32},
        "algorithm": {"name": "scaffold"},
        "federation": {
            "rounds": rounds,
            "join_ratio": 0.6,
            "local_epochs": 1,
            "batch_size": 8,
            "lr": 0.02,
            "executor": "sequential",
            "checkpoint_every": 1,
        },
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def _ktl(*args: str) -> list[str]:
    return [sys.executable, "-m", "ktl.cli", *args]


def _metrics(folder: Path) -> list[dict]:
    rows = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in rows]


def test_a_killed_run_resumes_to_exactly_the_uninterrupted_metrics(tmp_path):
    rounds = 20
    cfg = _config(tmp_path / "cfg.yaml", rounds)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    full = tmp_path / "full"
    subprocess.run(_ktl("run", str(cfg), "--out", str(full), "--quiet"), check=True, env=env)

    cut = tmp_path / "cut"
    proc = subprocess.Popen(
        _ktl("run", str(cfg), "--out", str(cut), "--quiet"),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    progress = cut / "checkpoint" / "progress.json"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if progress.is_file() and json.loads(progress.read_text())["round"] >= 3:
                break
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = json.loads(progress.read_text())["round"]
    assert 3 <= killed_at < rounds
    assert not (cut / "summary.json").exists()

    subprocess.run(_ktl("run", "--resume", str(cut), "--quiet"), check=True, env=env)
    assert _metrics(cut) == _metrics(full)
    assert [r["round"] for r in _metrics(cut)] == list(range(rounds + 1))
    summary = json.loads((cut / "summary.json").read_text())
    assert summary["rounds"] == rounds


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "config.yaml").write_text("seed: 0\n")
    res = subprocess.run(
        _ktl("run", "--resume", str(tmp_path)), capture_output=True, text=True, check=False
    )
    assert res.returncode == 2
    assert "no checkpoint" in res.stderr and "Traceback" not in res.stderr


def test_the_builtin_defaults_are_configs_default_yaml():
    # `ktl run` with no config uses RunConfig's defaults, so an installed ktl needs no file
    assert load_config(ROOT / "configs" / "default.yaml") == RunConfig()
