"""FedBN (Li et al., ICLR 2021): FedAvg that keeps every BatchNorm layer local.

Every tensor owned by a BatchNorm layer (its weight and bias, running mean and variance, and
``num_batches_tracked``) stays with the client and persists between its rounds; everything else
travels and is averaged by sample count, as in FedAvg. On a model without BatchNorm, FedBN is
FedAvg. Down and up per client per round: the model without its BatchNorm layers.

The BatchNorm layers are found by module type (`is_batchnorm`: BatchNorm1d/2d/3d, SyncBatchNorm),
so the stem's and the shortcuts' BatchNorm of a ResNet (``body.…stem.1``, ``…shortcut.1``) stay
local like ``bn1`` and ``bn2``.

Differences from PFLlib's FedBN:

- PFLlib skips, on receipt, the *parameters* whose name contains "bn": BatchNorm layers named
  otherwise (a ResNet's stem and shortcut BatchNorm, any ``nn.Sequential`` index) are averaged
  like the rest, and its FedBN is FedAvg on its CNN, which has no BatchNorm (PFLlib issue #42).
  Here a layer is local because of its type, not its name.
- PFLlib uploads the BatchNorm parameters and averages them although no client loads them; here
  they never travel, so the byte counts are those of the shared tensors only.
- The running statistics are local here because they belong to a BatchNorm layer; in PFLlib
  they are local because no buffer ever travels (its FedAvg keeps them local too, issue #260).
- A held-out new client starts from the initial BatchNorm layers and the global rest, and
  fine-tunes both when ``federation.new_client_finetune_epochs`` is set.
"""

from __future__ import annotations

from .base import HParams
from .fedavg import FedAvgClient, FedAvgServer
from .parts import Select, is_batchnorm
from .registry import register_algorithm


class FedBNHParams(HParams):
    """No hyperparameters beyond the federation's training settings."""


class FedBNClient(FedAvgClient):
    shared = (Select("model", modules=is_batchnorm, invert=True),)  # averaged by FedAvg
    persistent = (Select("model", modules=is_batchnorm),)  # every BatchNorm tensor, local


register_algorithm(
    "fedbn",
    FedBNClient,
    FedAvgServer,  # averages whatever the clients declare as shared
    FedBNHParams,
    "FedBN: FedAvg of everything but the BatchNorm layers, which stay local (by module type)",
    family="tFL",
    paper="Li et al., FedBN: Federated Learning on Non-IID Features via Local Batch "
    "Normalization, ICLR 2021",
)
