"""FedBABU (Oh et al., ICLR 2022): body aggregation and body update; the head is fine-tuned
only to personalise.

The head keeps the architecture's random initial weights, the same on every client, throughout
federated training: a selected client receives the global body, trains only the body (head
frozen) with cross-entropy for the federation's local epochs, and uploads it; the server
averages bodies by sample count. Up and down per client and round: the body. Nothing persists
on a client: its head is always the initial one.

Personalisation is part of evaluation, as in the paper: before a client is evaluated it
fine-tunes the whole model (the received body and the initial head) for ``finetune_epochs``
epochs on its training split, and the fine-tuned model is measured. The fine-tuned copy is
discarded (evaluation never writes state back), so training always continues from the global
body and the initial head. A held-out new client fine-tunes for the federation's
``new_client_finetune_epochs`` instead when that is set.

Differences from PFLlib's FedBABU:

- PFLlib evaluates the global body with the untrained head every round and fine-tunes (10
  epochs, ``-fte``) only once, after the last round. Here every evaluation is of the fine-tuned
  model, which is what the paper reports, with its 5 fine-tuning epochs (the official code's
  ``--ft_ep`` default). ``finetune_epochs=0`` evaluates the un-fine-tuned model, as PFLlib's
  per-round numbers do; ``finetune_epochs=10`` is PFLlib's final fine-tune.
- Body buffers (BatchNorm statistics) are averaged with the body; PFLlib averages
  ``parameters()`` only.
"""

from __future__ import annotations

from pydantic import Field
from torch import nn

from .base import ClientContext, EvalReport, HParams, Reply
from .fedavg import FedAvgClient, FedAvgServer
from .registry import register_algorithm


class FedBABUHParams(HParams):
    finetune_epochs: int = Field(
        5,
        ge=0,
        description="epochs of whole-model fine-tuning before each evaluation (0 = evaluate "
        "the global body with the initial head)",
    )


class FedBABUClient(FedAvgClient):
    shared = ("model/body",)  # received, trained, uploaded, averaged
    persistent = ()  # the head is the architecture's initial head on every client, always

    def __init__(self, ctx: ClientContext) -> None:
        super().__init__(ctx)
        self._finetuned = False

    def fit(self) -> Reply:
        result = self.train(params=self.model.body.parameters())  # the head stays frozen
        return self.reply(self.upload(), result)

    def finetune(self, epochs: int) -> None:
        """Personalise: ``epochs`` of SGD on the whole model (body and head)."""
        self.train(epochs=epochs)
        self._finetuned = True

    def evaluate(self, model: nn.Module | None = None, train_loss: bool = True) -> EvalReport:
        if not self._finetuned and self.hp.finetune_epochs:
            self.finetune(self.hp.finetune_epochs)
        return super().evaluate(model, train_loss)


register_algorithm(
    "fedbabu",
    FedBABUClient,
    FedAvgServer,
    FedBABUHParams,
    "FedBABU: only the body is trained and averaged; the initial head is fine-tuned to evaluate",
    family="pFL",
    paper="Oh et al., FedBABU: Toward Enhanced Representation for Federated Image "
    "Classification, ICLR 2022",
)
