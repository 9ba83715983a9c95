"""Helpers shared by the test files (pytest puts this folder on sys.path)."""

from __future__ import annotations

from typing import Any


def tiny_config(
    algorithm: str,
    model: str = "mlp",
    rounds: int = 3,
    *,
    classes: int = 4,
    feature_dim: int = 16,
    image_size: int = 16,
    batch_size: int = 16,
    lr: float = 0.05,
    **hparams: Any,
) -> dict:
    """A config dict for a seconds-long federation: 4 clients on synthetic data, Dir(0.5)."""
    return {
        "seed": 11,
        "data": {
            "dataset": "synthetic",
            "partition": "dir",
            "alpha": 0.5,
            "num_clients": 4,
            "source_options": {
                "num_samples": 600,
                "num_classes": classes,
                "image_size": image_size,
            },
        },
        "model": {"name": model, "feature_dim": feature_dim},
        "algorithm": {"name": algorithm, **hparams},
        "federation": {
            "rounds": rounds,
            "local_epochs": 1,
            "batch_size": batch_size,
            "lr": lr,
            "executor": "sequential",
            "checkpoint_every": None,
        },
    }
