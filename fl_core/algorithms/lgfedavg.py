"""LG-FedAvg (Liang et al., 2020): local representations, a global head.

Each round a selected client receives the global head, trains its whole model (its own body and
the received head) with cross-entropy, and uploads the head; the server averages the heads by
sample count and broadcasts the result. Bodies never travel and persist per client, so clients
may run different architectures as long as their heads agree in shape (one ``feature_dim`` and
one number of classes); the server checks this before training. Up and down, per client and
round: the head, (D + 1)·C floats for D features and C classes.

Differences from HtFLlib's LG-FedAvg:

- None in the update: the server head starts as the first client architecture's initial head
  (HtFLlib copies client 0's), heads are averaged by training-sample count, and a client's head
  is overwritten by the global one whenever it receives it.
- The paper's homogeneous experiments start the local bodies from a FedAvg-trained model; with
  heterogeneous bodies there is no common body to pre-train, so training starts from each
  architecture's initial weights, as HtFLlib does.
- A client is evaluated with the latest global head on its own body; the head it trained is not
  kept between rounds (it would be overwritten on receipt), so only the body persists.
"""

from __future__ import annotations

from .base import HParams
from .fedavg import FedAvgClient, FedAvgServer
from .registry import register_algorithm


class LGFedAvgHParams(HParams):
    """LG-FedAvg has no hyperparameters beyond the federation's training settings."""


class LGFedAvgClient(FedAvgClient):
    shared = ("model/head",)  # received, trained with the body, uploaded, averaged
    persistent = ("model/body",)  # this client's own body (any architecture)


class LGFedAvgServer(FedAvgServer):
    """Averages the heads by sample count; refuses architectures whose heads differ in shape."""


register_algorithm(
    "lg-fedavg",
    LGFedAvgClient,
    LGFedAvgServer,
    LGFedAvgHParams,
    "LG-FedAvg: local bodies, a global head averaged by sample count",
    family="HtFL",
    paper="Liang et al., Think Locally, Act Globally: Federated Learning with Local and Global "
    "Representations, arXiv 2020",
    heterogeneous=True,
)
