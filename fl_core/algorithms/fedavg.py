"""FedAvg (McMahan et al., 2017): local SGD, sample-weighted averaging of the shared model.

Unlike PFLlib, buffers (BatchNorm running statistics) travel and are averaged too, so FedAvg on
a BatchNorm model is FedAvg and not an implicit FedBN.

`FedAvgServer` is the server of every algorithm that averages a declared part of the model
(FedProx, Ditto, FedRep …): it keeps the tensors its clients declare as ``shared`` and averages
them by sample count. With several architectures, those tensors must agree in shape.
"""

from __future__ import annotations

from torch import Tensor

from .base import Client, HParams, Message, Reply, Server, ServerContext
from .common import shared_model_state, weighted_average
from .registry import AlgorithmError, register_algorithm


class FedAvgHParams(HParams):
    """FedAvg has no hyperparameters beyond the federation's training settings."""


class FedAvgClient(Client):
    shared = ("model",)
    persistent = ()


class FedAvgServer(Server):
    """Keeps the shared model tensors and broadcasts them to every selected client.

    Subclasses that average something else (a shared small model) override `initial_state`;
    those that weight updates otherwise override `weight`.
    """

    def __init__(self, ctx: ServerContext, hparams: HParams) -> None:
        super().__init__(ctx, hparams)
        self.global_state: dict[str, Tensor] = self.initial_state()

    def initial_state(self) -> dict[str, Tensor]:
        """What the server holds before round 1: the clients' shared model tensors."""
        return shared_model_state(self.ctx, self.ctx.client_shared)

    def weight(self, reply: Reply) -> float:
        """A reply's weight in the average: its sample count."""
        return float(reply.num_samples)

    def broadcast(self, round: int) -> Message:
        return self.global_state

    def aggregate(self, round: int, replies: dict[int, Reply]) -> None:
        if not replies:
            return
        for cid, reply in replies.items():
            unknown = set(reply.message) - set(self.global_state)
            if unknown:
                raise AlgorithmError(
                    f"client {cid} uploaded {sorted(unknown)[:3]}, which the server does not hold"
                )
        # a tensor no client sent this round keeps its value
        self.global_state = {
            **self.global_state,
            **weighted_average([(r.message, self.weight(r)) for r in replies.values()]),
        }

    def state_dict(self) -> dict[str, Tensor]:
        return dict(self.global_state)

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.global_state = dict(state)


register_algorithm(
    "fedavg",
    FedAvgClient,
    FedAvgServer,
    FedAvgHParams,
    "FedAvg: sample-weighted averaging of the whole model",
    family="tFL",
    paper="McMahan et al., Communication-Efficient Learning of Deep Networks from "
    "Decentralized Data, AISTATS 2017",
)
