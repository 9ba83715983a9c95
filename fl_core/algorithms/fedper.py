"""FedPer (Arivazhagan et al., 2019): the body is shared and averaged, the head stays personal.

Each round a selected client receives the global body, trains body and its own head together
with cross-entropy for the federation's local epochs (one optimiser over the whole model, unlike
FedRep's alternating head-then-body schedule), and uploads the body; the server averages bodies
by sample count. Up and down per client and round: the body. The head never travels and is
kept in the client's state.

Differences from PFLlib's FedPer:

- None in the update. The split is the model's declared body/head (PFLlib takes the attribute
  ``fc`` as the head), and body buffers (BatchNorm statistics) are averaged with the body
  (PFLlib averages ``parameters()`` only, so they stay per client).
"""

from __future__ import annotations

from .base import HParams
from .fedavg import FedAvgClient, FedAvgServer
from .registry import register_algorithm


class FedPerHParams(HParams):
    """FedPer has no hyperparameters beyond the federation's training settings."""


class FedPerClient(FedAvgClient):
    shared = ("model/body",)  # received, trained with the head, uploaded, averaged
    persistent = ("model/head",)  # this client's own head, kept between rounds


register_algorithm(
    "fedper",
    FedPerClient,
    FedAvgServer,  # averages whatever the clients declare as shared
    FedPerHParams,
    "FedPer: shared body averaged by FedAvg, personal head trained with it",
    family="pFL",
    paper="Arivazhagan et al., Federated Learning with Personalization Layers, arXiv 2019",
)
