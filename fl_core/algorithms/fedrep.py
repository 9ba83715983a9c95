"""FedRep (Collins et al., ICML 2021): a shared representation (the body), personal heads.

Each round a selected client receives the global body, trains its own head for
``head_epochs`` epochs with the body frozen, then the body for the federation's local epochs
with the head frozen, and uploads the body; the server averages bodies by sample count. Heads
never travel and persist per client.

Differences from PFLlib's FedRep:

- ``head_epochs`` defaults to 10, the paper's setting; PFLlib's ``-pls`` default is 1 (set
  ``algorithm.head_epochs=1`` to reproduce its numbers).
- While the body is frozen its features do not change, so when the body has no layer that
  behaves differently in training (BatchNorm, dropout) they are computed once and the head
  epochs run on them: the same updates, without a forward pass through the body per epoch.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field
from torch import nn

from .base import Client, HParams, LossSum, Reply, TrainResult
from .fedavg import FedAvgServer
from .registry import register_algorithm


class FedRepHParams(HParams):
    head_epochs: int = Field(
        10, ge=0, description="local epochs of the head (body frozen) per round"
    )


def train_mode_matters(module: nn.Module) -> bool:
    """Whether ``module`` computes differently in train and eval mode (BatchNorm, dropout)."""
    kinds = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)
    return any(isinstance(m, kinds) for m in module.modules())


class FedRepClient(Client):
    shared = ("model/body",)
    persistent = ("model/head",)
    #: train the head on features computed once (plain CE; a subclass that changes ``loss``,
    #: ``before_step`` or ``batches`` for the head epochs sets this to False)
    cache_features: ClassVar[bool] = True

    def fit(self) -> Reply:
        self.train_head(self.hp.head_epochs)
        result = self.train(params=self.model.body.parameters())
        return self.reply(self.upload(), result)

    def finetune(self, epochs: int) -> None:
        self.train_head(epochs)

    def train_head(self, epochs: int) -> TrainResult:
        """``epochs`` of SGD on the head alone, the body frozen."""
        if epochs == 0:
            return TrainResult(0.0, 0, 0)
        if not self.cache_features or train_mode_matters(self.model.body):
            return self.train(params=self.model.head.parameters(), epochs=epochs)
        return self._train_head_on_features(epochs)

    def _train_head_on_features(self, epochs: int) -> TrainResult:
        ctx = self.ctx
        with torch.no_grad():
            self.model.body.eval()
            bs = ctx.settings.eval_batch_size
            features = (
                torch.cat(
                    [
                        self.model.body(ctx.train_on_device()[0][i : i + bs].to(ctx.device))
                        for i in range(0, ctx.num_train, bs)
                    ]
                )
                if ctx.num_train
                else torch.empty(0)
            )
        head = self.model.head
        head.train()
        opt = self.make_optimizer(list(head.parameters()))
        labels = ctx.train_on_device()[1].to(ctx.device)
        total, steps, samples = LossSum(), 0, 0
        for _ in range(epochs):
            # the same shuffles and batches as Client.batches, on features instead of images
            for idx in self.on_data_device(self.epoch_batches()):
                idx = idx.to(ctx.device)
                opt.zero_grad(set_to_none=True)
                loss = nn.functional.cross_entropy(head(features[idx]), labels[idx])
                loss.backward()
                opt.step()
                total.add(loss)
                steps += 1
                samples += int(idx.shape[0])
        return TrainResult(total.mean(steps), steps, samples)


register_algorithm(
    "fedrep",
    FedRepClient,
    FedAvgServer,
    FedRepHParams,
    "FedRep: shared body averaged by FedAvg, personal heads trained first each round",
    family="pFL",
    paper="Collins et al., Exploiting Shared Representations for Personalized Federated "
    "Learning, ICML 2021",
)
