"""Local: every client trains its own model on its own data; nothing is communicated."""

from __future__ import annotations

from .base import Client, HParams, Server
from .registry import register_algorithm


class LocalHParams(HParams):
    """No hyperparameters beyond the federation's training settings."""


class LocalClient(Client):
    shared = ()
    persistent = ("model",)


register_algorithm(
    "local",
    LocalClient,
    Server,
    LocalHParams,
    "Local: each client trains alone, no communication (the lower baseline)",
    family="pFL",
    paper="the no-communication baseline of PFLlib and HtFLlib",
    heterogeneous=True,
)
