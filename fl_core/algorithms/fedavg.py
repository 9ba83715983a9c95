"""FedAvg (McMahan et al., 2017): local SGD, sample-weighted averaging of the whole model.

Unlike PFLlib, buffers (BatchNorm running statistics) travel and are averaged too, so FedAvg on
a BatchNorm model is FedAvg and not an implicit FedBN.
"""

from __future__ import annotations

from torch import Tensor, nn

from .base import Client, HParams, Message, Server, select_state
from .common import weighted_average
from .registry import AlgorithmError, register_algorithm


class FedAvgHParams(HParams):
    """FedAvg has no hyperparameters beyond the federation's training settings."""


class FedAvgClient(Client):
    shared = ("",)
    personal = ()


class FedAvgServer(Server):
    """Keeps the global model as a tensor dict and broadcasts it to every selected client."""

    #: submodule prefixes of the model held and averaged by the server
    shared: tuple[str, ...] = ("",)

    def __init__(self, hparams: HParams, initial_models: dict[str, nn.Module], num_clients: int):
        super().__init__(hparams, initial_models, num_clients)
        if len(initial_models) != 1:
            raise AlgorithmError(
                f"{type(self).__name__} averages one shared architecture, but the clients use "
                f"{len(initial_models)} ({', '.join(initial_models)}); choose a single model "
                "(model.name) or a heterogeneous-model algorithm"
            )
        (model,) = initial_models.values()
        self.global_state: dict[str, Tensor] = {
            k: v.detach().clone() for k, v in select_state(model, self.shared).items()
        }

    def configure(self, round: int, client_ids: list[int]) -> dict[int, Message]:
        return dict.fromkeys(client_ids, self.global_state)

    def aggregate(self, round: int, replies: dict[int, tuple[Message, int]]) -> None:
        if replies:
            self.global_state = weighted_average(list(replies.values()))

    def state_dict(self) -> dict[str, Tensor]:
        return dict(self.global_state)

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.global_state = dict(state)


register_algorithm(
    "fedavg",
    FedAvgClient,
    FedAvgServer,
    FedAvgHParams,
    "FedAvg: sample-weighted averaging of the whole model (McMahan et al., 2017)",
)
