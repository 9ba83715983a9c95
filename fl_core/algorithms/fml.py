"""FML, federated mutual learning (Shen et al., 2020): a shared "meme" model of one
architecture travels; each client's own model, of any architecture, stays local.

Each round a selected client receives the global meme model and trains it together with its
local model by deep mutual learning, on every batch:

- local: alpha·CE(local) + (1 - alpha)·KL(p_meme ‖ p_local),
- meme:  beta·CE(meme) + (1 - beta)·KL(p_local ‖ p_meme),

each model's KL target being the other model's prediction, held fixed. Both use plain SGD at
the federation's learning rate, with each model's gradient norm clipped at ``max_grad_norm``.
The client uploads the meme model; the server averages the memes and broadcasts the average.
Clients are evaluated with their local model. Down and up per client per round: the meme
model's state (its size depends only on ``shared_model``, never on the clients' models).

The meme's architecture is ``shared_model`` (default ``cnn4``): HtFLlib builds its global model
from client 0's architecture (``BaseHeadSplit(args, 0)``), which is FedAvgCNN (our ``cnn4``) in
the HtFE-img-2/4/8 and HtM-img-10 groups. cnn4 needs inputs of at least 16×16 pixels; for
smaller images (digits, 8×8) set ``algorithm.shared_model=mlp``.

Differences from HtFLlib's FML:

- HtFLlib's two losses keep the other model's prediction in the graph and call ``backward`` on
  both, so each model also gets the gradient of the *other* model's KL term; DML (and the paper)
  treat the other model's prediction as a fixed target. ``htfllib_gradients=True`` restores
  HtFLlib's gradients.
- HtFLlib's ``nn.KLDivLoss()`` uses reduction "mean", which divides the KL by the number of
  classes as well as the batch size; the KL here is per sample (``kl_reduction="batchmean"``),
  ``kl_reduction="mean"`` is HtFLlib's.
- HtFLlib's flag defaults are alpha = beta = 1, which switch mutual learning off (local
  training plus FedAvg of an unused model); ours are 0.5, the paper's setting and the one
  HtFLlib's own scripts (``total.sh``) run.
- HtFLlib averages the memes uniformly; we weight them by sample count, FedAvg's rule
  (``aggregate_by="clients"`` is HtFLlib's). Buffers (BatchNorm statistics) travel and are
  averaged with the meme, as in our FedAvg.
- The gradient clipping at norm 10 is HtFLlib's guard, not in the paper (``max_grad_norm=0``
  turns it off).
- A held-out new client fine-tunes with the same mutual learning, from the latest meme.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import Tensor, nn

from .base import Client, ClientContext, HParams, Reply, ServerContext
from .fedavg import FedAvgServer
from .parts import Part, select_state
from .registry import AlgorithmError, register_algorithm


# -- helpers shared with FedKD (any algorithm with one small model shared across a group) -------
def check_shared_model(name: str) -> str:
    """A registered model name, lower-cased (the validator of ``shared_model`` fields)."""
    from fl_core.models import list_models  # not at import: it loads every architecture

    key = str(name).lower()
    models = list_models()
    if key not in models:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(models)}")
    return key


def build_shared_model(ctx: ServerContext, arch: str) -> nn.Module:
    """The federation's initial ``arch`` model; an input it cannot take is refused naming the
    ``algorithm.shared_model`` field, before training."""
    from fl_core.models import ModelError

    try:
        return ctx.build_model(arch)
    except ModelError as e:
        raise AlgorithmError(
            f"algorithm.shared_model={arch!r} cannot be built for this federation: {e}; "
            "choose another shared_model (ktl list models)"
        ) from None


def kl_to_target(output: Tensor, target: Tensor, reduction: str) -> Tensor:
    """KL(softmax(target) ‖ softmax(output)), the gradient flowing into ``output`` (and into
    ``target`` unless the caller detached it)."""
    kl = nn.functional.kl_div(
        torch.log_softmax(output, dim=1), torch.softmax(target, dim=1), reduction="sum"
    )
    # "mean" (nn.KLDivLoss's default, HtFLlib's) divides by the classes too
    return kl / (output.numel() if reduction == "mean" else output.shape[0])


def clip_each(max_norm: float, *modules: nn.Module) -> None:
    """Clip each module's gradient norm separately (HtFLlib clips each model at 10)."""
    if max_norm > 0:
        for m in modules:
            nn.utils.clip_grad_norm_(m.parameters(), max_norm)


class SharedModelHParams(HParams):
    """The hyperparameters of a client model distilling mutually with a small model that every
    client shares (FML's meme, FedKD's mentee); the algorithms add theirs."""

    shared_model: str = Field(
        "cnn4", description="architecture of the small model every client shares"
    )
    kl_reduction: Literal["batchmean", "mean"] = Field(
        "batchmean", description="KL per sample (paper) or also divided by classes (HtFLlib)"
    )
    max_grad_norm: float = Field(
        10.0, ge=0.0, description="clip each model's gradient norm at this (0 = no clipping)"
    )

    @field_validator("shared_model")
    @classmethod
    def _registered_model(cls, value: str) -> str:
        return check_shared_model(value)


class FMLHParams(SharedModelHParams):
    """The shared small model is the meme model."""

    alpha: float = Field(
        0.5, ge=0.0, le=1.0, description="local model: weight of CE (1 - alpha on the KL)"
    )
    beta: float = Field(
        0.5, ge=0.0, le=1.0, description="meme model: weight of CE (1 - beta on the KL)"
    )
    htfllib_gradients: bool = Field(
        False,
        description="let each KL term's gradient reach both models, as HtFLlib's two "
        "backward passes do",
    )
    aggregate_by: Literal["samples", "clients"] = Field(
        "samples", description="average memes by sample count (FedAvg) or uniformly (HtFLlib)"
    )


class FMLClient(Client):
    shared = ("meme",)
    persistent = ("model",)

    def __init__(self, ctx: ClientContext) -> None:
        super().__init__(ctx)
        self.meme = ctx.extra_model("meme", self.hp.shared_model)
        self.pair = nn.ModuleDict({"local": self.model, "meme": self.meme})

    def parts(self) -> dict[str, Part]:
        return {**super().parts(), "meme": self.meme}

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        if model is not self.pair:
            return nn.functional.cross_entropy(model(x), y)
        hp = self.hp
        out = self.model(x)
        out_g = self.meme(x)
        # the other model's prediction is a fixed target unless HtFLlib's gradients are asked
        tgt, tgt_g = (out_g, out) if hp.htfllib_gradients else (out_g.detach(), out.detach())
        ce = nn.functional.cross_entropy
        local = hp.alpha * ce(out, y)
        meme = hp.beta * ce(out_g, y)
        if hp.alpha < 1:
            local = local + (1 - hp.alpha) * kl_to_target(out, tgt, hp.kl_reduction)
        if hp.beta < 1:
            meme = meme + (1 - hp.beta) * kl_to_target(out_g, tgt_g, hp.kl_reduction)
        return local + meme

    def before_step(self, model: nn.Module) -> None:
        if model is self.pair:
            clip_each(self.hp.max_grad_norm, self.model, self.meme)

    def fit(self) -> Reply:
        result = self.train(self.pair)
        return self.reply(self.upload(), result)

    def finetune(self, epochs: int) -> None:
        self.train(self.pair, epochs=epochs)


class FMLServer(FedAvgServer):
    """Holds the global meme model and averages the uploaded ones."""

    def initial_state(self) -> dict[str, Tensor]:
        meme = build_shared_model(self.ctx, self.hp.shared_model)
        return select_state({"meme": meme}, ["meme"])

    def weight(self, reply: Reply) -> float:
        return float(reply.num_samples) if self.hp.aggregate_by == "samples" else 1.0


register_algorithm(
    "fml",
    FMLClient,
    FMLServer,
    FMLHParams,
    "FML: a shared meme model and each client's own model learn mutually; memes averaged",
    family="HtFL",
    paper="Shen et al., Federated Mutual Learning, arXiv 2020",
    heterogeneous=True,
)
