"""FedL2G (Zhang et al., 2024): learning to guide local training with server-held guiding vectors
that are meta-learned so that following them helps each client's own task.

The server holds one guiding vector per class, g_c: of the feature size D (variant ``feat``,
FedL2G-f) or of the number of classes C (variant ``logit``, FedL2G-l), broadcast every round.
A client holds out a fixed *quiz set* (``meta_quiz_batches`` batches of its training data, drawn
once and kept in its state); the rest is its *study set*. Each round a selected client

1. after ``warm_up_rounds`` rounds, trains its own model on the study set on
   CE + MSE(z(x), g_y), z being the features (feat) or the logits (logit), with gradients
   clipped to norm ``max_grad_norm``; during the warm-up it does not train;
2. takes one differentiable SGD step (the clients' lr) on the same loss over
   ``meta_study_batches`` batches of the study set, evaluates CE of the stepped model on the quiz
   set, and differentiates that quiz loss with respect to the guiding vectors;
3. uploads the gradient rows of the classes in its study batches (and their class ids).

The server averages each class's gradient over the clients that sent it, clips the averaged
gradient (all classes together) to norm ``max_grad_norm`` and takes one SGD step of size
``server_lr`` on the guiding vectors. A client predicts with its own model's logits.

The meta-gradient needs only first-order derivatives of the model: for the feat variant,
∂L_quiz/∂g_c = (2·lr / (S·B·D)) · Σ_{i: y_i = c} J_i v, with v the quiz loss's gradient at the
stepped parameters and J_i the Jacobian of sample i's features at the current ones (the paper's
point). It is computed here by differentiating through the step with autograd, as HtFLlib does
with ``higher``; both give the same value.

Differences from HtFLlib's FedL2G:

- HtFLlib's quiz set is the first ``meta_quiz_batches × batch_size`` samples of the client's
  data file. Our clients' training splits are sorted by source index (a source sorted by class
  would give a one-class quiz), so the quiz set is drawn at random once, at a client's first
  training round, and persists. It is capped at half the client's data so that a small client
  keeps a study set; a client with a single sample skips the meta-step.
- HtFLlib uploads a dict of the non-zero gradient rows; here the rows of the classes present in
  the study batches, as a (k, width) tensor and the k class ids (the same rows in practice, and
  a tensor message).
- ``server_lr`` defaults to the FedL2G repository's scripts: 100 for feat and 0.1 for logit.
  HtFLlib's ``-slr`` default, 0.01, is FedGH's and would leave the feat guiding vectors almost
  unchanged (their gradients carry the factor 2·lr / (S·B·D)).
- HtFLlib neither evaluates nor counts the warm-up rounds as training rounds; here they are
  rounds of the federation (evaluated as configured) in which clients only run the meta-step.
  Set ``warm_up_rounds`` relative to ``federation.rounds``.
- HtFLlib's loaders drop the last incomplete batch; every study sample is used here.
- A held-out new client has no quiz set: it fine-tunes on all its data.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn
from torch.func import functional_call

from .base import (
    Client,
    ClientContext,
    HParams,
    Message,
    Reply,
    Server,
    ServerContext,
    TrainResult,
)
from .parts import Part
from .registry import register_algorithm

DEFAULT_SERVER_LR = {"feat": 100.0, "logit": 0.1}


class FedL2GHParams(HParams):
    variant: Literal["feat", "logit"] = Field(
        "feat", description="guide the features (FedL2G-f) or the logits (FedL2G-l)"
    )
    server_lr: float | None = Field(
        None,
        gt=0.0,
        description="SGD step on the guiding vectors; None = the FedL2G scripts' value for the "
        "variant: 100 (feat), 0.1 (logit)",
    )
    warm_up_rounds: int = Field(
        50, ge=0, description="first rounds in which clients only meta-learn the guiding vectors"
    )
    meta_study_batches: int = Field(
        1, ge=1, description="study batches of the differentiable step of the meta-step"
    )
    meta_quiz_batches: int = Field(1, ge=1, description="size of the held-out quiz set, in batches")
    max_grad_norm: float = Field(
        100.0, gt=0.0, description="clip norm of client gradients and of the averaged guide one"
    )


def guide_width(hp: FedL2GHParams, feature_dim: int, num_classes: int) -> int:
    return feature_dim if hp.variant == "feat" else num_classes


def quiz_size(hp: FedL2GHParams, num_train: int, batch_size: int) -> int:
    """Samples held out as the quiz set: ``meta_quiz_batches`` batches, at most half the data."""
    return min(hp.meta_quiz_batches * batch_size, num_train // 2)


def _sub(flat: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k.removeprefix(prefix): v for k, v in flat.items() if k.startswith(prefix)}


class FedL2GClient(Client):
    shared = ("guide",)
    persistent = ("model", "quiz")

    def __init__(self, ctx: ClientContext) -> None:
        super().__init__(ctx)
        width = guide_width(self.hp, self.model.feature_dim, ctx.num_classes)
        self.guide = {"vectors": torch.zeros(ctx.num_classes, width, device=ctx.device)}
        size = quiz_size(self.hp, ctx.num_train, ctx.settings.batch_size)
        self.quiz = {"index": torch.zeros(size, dtype=torch.int64)}
        self._has_quiz = False  # drawn at the first training round, then kept in the state

    def parts(self) -> dict[str, Part]:
        return {**super().parts(), "guide": self.guide, "quiz": self.quiz}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        super().load_state_dict(state)
        self._has_quiz = "quiz/index" in state

    # -- data ------------------------------------------------------------------------------
    def study_index(self) -> Tensor:
        """Training indices outside the quiz set (all of them before a quiz set exists)."""
        n = self.ctx.num_train
        if not self._has_quiz:
            return torch.arange(n)
        keep = torch.ones(n, dtype=torch.bool)
        keep[self.quiz["index"]] = False
        return torch.nonzero(keep).flatten()

    def _batches_of(self, index: Tensor, limit: int | None = None) -> list[Tensor]:
        """``index`` shuffled with the client's generator, cut into batches (the first
        ``limit``)."""
        batches = self.epoch_batches(index)
        return self.on_data_device(batches if limit is None else batches[:limit])

    def batches(self, epochs: int | None = None):
        index = self.study_index()
        for _ in range(self.ctx.settings.local_epochs if epochs is None else epochs):
            for batch in self._batches_of(index):
                yield self.gather(batch)

    # -- training --------------------------------------------------------------------------
    def guided_loss(self, features: Tensor, logits: Tensor, y: Tensor, guide: Tensor) -> Tensor:
        guided = features if self.hp.variant == "feat" else logits
        return nn.functional.cross_entropy(logits, y) + nn.functional.mse_loss(guided, guide[y])

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        features = model.body(x)
        return self.guided_loss(features, model.head(features), y, self.guide["vectors"])

    def before_step(self, model: nn.Module) -> None:
        nn.utils.clip_grad_norm_(model.parameters(), self.hp.max_grad_norm)

    def fit(self) -> Reply:
        ctx = self.ctx
        if not self._has_quiz:
            drawn = torch.randperm(ctx.num_train, generator=ctx.rng)[: self.quiz["index"].numel()]
            self.quiz["index"] = drawn.sort().values
            self._has_quiz = True
        if ctx.round > self.hp.warm_up_rounds:
            result: TrainResult | None = self.train()
        else:
            result = None  # warm-up: the guiding vectors are learned, the model is not trained
        grad, classes = self.meta_gradient()
        return self.reply({"guide/grad": grad[classes], "guide/classes": classes}, result)

    def meta_gradient(self) -> tuple[Tensor, Tensor]:
        """The gradient of the quiz loss after one differentiable SGD step on the guided loss,
        with respect to the guiding vectors, and the classes of the study batches."""
        ctx, model = self.ctx, self.model
        guide = self.guide["vectors"].detach().clone().requires_grad_(True)
        none = torch.zeros(0, dtype=torch.int64, device=ctx.device)
        study = self._batches_of(self.study_index(), self.hp.meta_study_batches)
        quiz = self._batches_of(self.quiz["index"], self.hp.meta_quiz_batches)
        if not study or not quiz:
            return torch.zeros_like(guide).detach(), none
        params = dict(model.named_parameters())
        # BatchNorm statistics of the look-ahead must not leak into the client's model
        buffers = {k: v.clone() for k, v in model.named_buffers()}
        model.train()

        def forward(weights: dict[str, Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
            state = {**weights, **buffers}
            features = functional_call(model.body, _sub(state, "body."), (x,))
            return features, functional_call(model.head, _sub(state, "head."), (features,))

        study_loss = 0.0
        labels = []
        for batch in study:
            x, y = self.gather(batch)
            features, logits = forward(params, x)
            study_loss = study_loss + self.guided_loss(features, logits, y, guide)
            labels.append(y)
        study_loss = study_loss / len(study)
        grads = torch.autograd.grad(
            study_loss, list(params.values()), create_graph=True, allow_unused=True
        )
        lr = ctx.settings.lr
        stepped = {
            name: p if g is None else p - lr * g
            for (name, p), g in zip(params.items(), grads, strict=True)
        }
        quiz_loss = 0.0
        for batch in quiz:
            x, y = self.gather(batch)
            quiz_loss = quiz_loss + nn.functional.cross_entropy(forward(stepped, x)[1], y)
        (grad,) = torch.autograd.grad(quiz_loss / len(quiz), guide)
        classes = torch.unique(torch.cat(labels))
        return grad.detach(), classes


class FedL2GServer(Server):
    """Holds the guiding vectors and steps them along the clients' averaged meta-gradients."""

    def __init__(self, ctx: ServerContext, hparams: FedL2GHParams) -> None:
        super().__init__(ctx, hparams)
        width = guide_width(hparams, ctx.feature_dim, ctx.num_classes)
        # N(0, 1), nn.Embedding's initialisation in HtFLlib
        self.guide = torch.randn(ctx.num_classes, width, generator=ctx.rng(0, "guide-init"))

    @property
    def server_lr(self) -> float:
        hp = self.hp
        return hp.server_lr if hp.server_lr is not None else DEFAULT_SERVER_LR[hp.variant]

    def broadcast(self, round: int) -> Message:
        return {"guide/vectors": self.guide}

    def aggregate(self, round: int, replies: dict[int, Reply]) -> None:
        total = torch.zeros(self.guide.shape, dtype=torch.float64)
        senders = torch.zeros(self.guide.shape[0], dtype=torch.float64)
        for cid in sorted(replies):
            message = replies[cid].message
            classes = message["guide/classes"].cpu()
            total.index_add_(0, classes, message["guide/grad"].cpu().double())
            senders.index_add_(0, classes, torch.ones(classes.numel(), dtype=torch.float64))
        if not bool((senders > 0).any()):
            return
        # each class's gradient averaged over the clients that sent it; absent classes: zero
        grad = total / senders.clamp(min=1).unsqueeze(1)
        norm = torch.linalg.vector_norm(grad)
        grad = grad * torch.clamp(self.hp.max_grad_norm / (norm + 1e-6), max=1.0)
        self.guide = (self.guide.double() - self.server_lr * grad).float()

    def state_dict(self) -> dict[str, Tensor]:
        return {"guide/vectors": self.guide}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.guide = state["guide/vectors"]


register_algorithm(
    "fedl2g",
    FedL2GClient,
    FedL2GServer,
    FedL2GHParams,
    "FedL2G: server guiding vectors meta-learned from clients' quiz-loss gradients; clients "
    "train toward them",
    family="HtFL",
    paper="Zhang et al., FedL2G: Learning to Guide Local Training in Heterogeneous Federated "
    "Learning, arXiv 2410.06490, 2024",
    heterogeneous=True,
)
