"""Pieces shared by many algorithms: weighted averaging, the shared initial state of a model,
per-class feature sums (prototypes), a client with a personal model, a server that sends
nothing for evaluation."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import Client, ClientContext, Message, Server, ServerContext
from .parts import Part, Select, Selector, select_state
from .registry import AlgorithmError


def weighted_average(messages: list[tuple[Message, float]]) -> dict[str, Tensor]:
    """Average each key over the messages that carry it, weighted by the given weights.

    Floating tensors are averaged in float64 and cast back; integer tensors (e.g. BatchNorm's
    ``num_batches_tracked``) take the maximum, which is what a counter means after merging.
    """
    if not messages:
        return {}
    keys: dict[str, None] = {}
    for msg, _ in messages:
        keys.update(dict.fromkeys(msg))
    out: dict[str, Tensor] = {}
    for key in keys:
        present = [(m[key], float(w)) for m, w in messages if key in m]
        first = present[0][0]
        if not first.is_floating_point():
            out[key] = torch.stack([t for t, _ in present]).max(dim=0).values
            continue
        total = sum(w for _, w in present)
        if total <= 0:
            total, present = float(len(present)), [(t, 1.0) for t, _ in present]
        acc = torch.zeros_like(first, dtype=torch.float64)
        for t, w in present:
            acc.add_(t.to(torch.float64), alpha=w / total)
        out[key] = acc.to(first.dtype)
    return out


def shared_model_state(ctx: ServerContext, selectors: tuple[Selector, ...]) -> dict[str, Tensor]:
    """The initial value of the model tensors the clients share (``model/…`` keys).

    With several architectures the shared tensors must agree in name and shape across all of
    them (heads of one size in LG-FedAvg or FedGH); otherwise the run is refused here, before
    training, with the architectures and the first disagreeing tensor named. The initial values
    are taken from the first client's architecture.
    """
    model_selectors = [s for s in map(Select.parse, selectors) if s.part == "model"]
    reference: dict[str, Tensor] | None = None
    ref_arch = ""
    for arch in ctx.distinct_architectures:
        state = select_state({"model": ctx.build_model(arch)}, model_selectors)
        if reference is None:
            reference, ref_arch = state, arch
            continue
        for key in sorted(set(reference) | set(state)):
            a, b = reference.get(key), state.get(key)
            if a is None or b is None or a.shape != b.shape:
                shape = lambda t: "absent" if t is None else tuple(t.shape)  # noqa: E731
                raise AlgorithmError(
                    f"algorithm {ctx.algorithm!r} averages {_describe(model_selectors)} across "
                    f"clients, but architectures {ref_arch!r} and {arch!r} disagree on "
                    f"{key!r} ({shape(a)} vs {shape(b)}); use one architecture (model.name) "
                    "or an algorithm for heterogeneous models (ktl list algorithms)"
                )
    return reference or {}


def _describe(selectors: list[Select]) -> str:
    names = []
    for s in selectors:
        name = f"model.{s.prefix}" if s.prefix else "the model"
        if s.modules is not None:
            which = "all but the" if s.invert else "the"
            name += f" ({which} layers matching {getattr(s.modules, '__name__', 'a predicate')})"
        names.append(name)
    return ", ".join(names) or "nothing"


@torch.no_grad()
def class_means(model: nn.Module, ctx: ClientContext) -> tuple[Tensor, Tensor]:
    """Per-class mean body features of the client's training data (eval mode), and the class
    counts: a (classes, feature_dim) tensor with zero rows for classes the client lacks, and a
    (classes,) int64 tensor. The prototypes of FedProto, FedGH, FedTGP."""
    body = model.body
    body.eval()
    sums = torch.zeros(ctx.num_classes, model.feature_dim, device=ctx.device)
    bs = ctx.settings.eval_batch_size
    for start in range(0, ctx.num_train, bs):
        features = body(ctx.train_x[start : start + bs].to(ctx.device)).float()
        sums.index_add_(0, ctx.train_y[start : start + bs].to(ctx.device), features)
    counts = torch.bincount(ctx.train_y.to(ctx.device), minlength=ctx.num_classes)
    return sums / counts.clamp(min=1).unsqueeze(1), counts


class PersonalModelClient(Client):
    """The base of a client with a personal model (the part ``personal``) that it is evaluated
    with once it has one (Ditto, APPLE, pFedMe, APFL). A client that never trained (a held-out
    new client) has none: it is evaluated with the model part, and fine-tuning starts its
    personal model from that. Subclasses list ``"personal"`` in ``persistent``."""

    def __init__(self, ctx: ClientContext) -> None:
        super().__init__(ctx)
        self.personal = ctx.extra_model("personal")
        self._has_personal = False  # a client that never trained has no personal model yet

    def parts(self) -> dict[str, Part]:
        return {**super().parts(), "personal": self.personal}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        super().load_state_dict(state)
        self._has_personal = bool(state)

    def evaluation_model(self) -> nn.Module:
        return self.personal if self._has_personal else self.model

    def finetune(self, epochs: int) -> None:
        if not self._has_personal:
            self.personal.load_state_dict(self.model.state_dict())
            self._has_personal = True
        self.train(self.personal, epochs=epochs)


class OwnModelEvaluation(Server):
    """The base of a server whose clients are evaluated with their own model, so evaluation
    sends nothing (FedAMP, FedFomo)."""

    def evaluation_broadcast(self, round: int) -> Message:
        return {}

    def configure_evaluation(self, round: int, client_ids: list[int]) -> dict[int, Message]:
        return {}
