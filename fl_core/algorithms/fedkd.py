"""FedKD (Wu et al., Nature Communications 2022): a small shared "mentee" model learns with each
client's own "mentor" model, of any architecture, and only SVD-compressed mentee updates travel.

Each round a selected client trains its mentor and its copy of the global mentee together by
adaptive mutual distillation, on every batch (t = mentor, s = mentee, H = features, W_h = a
learned D×D map the client keeps):

- mentor: CE_t + [KL(p_s ‖ p_t) + MSE(H_t, W_h·H_s)] / (CE_t + CE_s),
- mentee: CE_s + [KL(p_t ‖ p_s) + MSE(H_t, W_h·H_s)] / (CE_t + CE_s),

each model's target being the other model's output held fixed, and the scale CE_t + CE_s a
weight (distillation counts less while both models are still wrong); the hidden loss trains the
mentor, the mentee and W_h once each. The mentor and W_h use SGD at the federation's learning
rate, the mentee ``mentee_lr``; each is clipped at ``max_grad_norm``. Clients are evaluated
with their mentor.

Compression: a weight matrix M (a convolution weight as the matrix out × in·k·k) travels as its
truncated SVD U_k, S_k, V_k, k being the smallest rank whose singular values hold a fraction T
of the energy: Σ_{i≤k} σ_i² ≥ T·Σ_i σ_i². A message holds ``<space>.svd/<name>/u|s|v`` for such
a matrix and ``<space>/<name>`` for a tensor that travels dense (biases, integer buffers, a
matrix whose factors would be larger), so the byte count is that of the factors. ``<space>`` is
``update`` for a change of the mentee and ``mentee`` for the mentee itself. T rises linearly
from ``t_start`` in round 1 to ``t_end`` in the last round: early updates are compressed harder.

Per client per round (paper, ``compress="update"``):

- up: the client's update of the mentee (trained − received), compressed at T(round);
- the server averages the reconstructed updates, compresses the average at T(round) and adds
  its reconstruction to the global mentee, so its mentee is exactly what a client holds that
  applied every global update;
- down: nothing in round 1 (every client starts from the federation's initial mentee), then the
  last compressed global update to a client that holds the previous global mentee, or the
  global mentee itself, compressed at T(round), to one that missed rounds (the paper has every
  client take part every round; this engine may select a fraction). The server keeps which
  global version each client holds; a client keeps its copy of the global mentee.

The mentee's architecture is ``shared_model`` (default ``cnn4``): HtFLlib builds its global
model from ``args.global_model`` when the group names one, otherwise from client 0's
architecture, which is FedAvgCNN (our ``cnn4``) in the HtFE-img-2/4/8, HtM-img-10 and
HtFE-img-8-HtC-img-4 groups. cnn4 needs inputs of at least 16×16 pixels.

Differences from HtFLlib's FedKD:

- HtFLlib compresses the mentee's *weights*, up and down, so the truncation is applied to the
  model itself every round; the paper and its authors' code compress *updates* (default).
  ``compress="weights"`` is HtFLlib's scheme: clients upload compressed weights, the server's
  mentee is their average, and every client receives it compressed.
- HtFLlib's rank search stops one short (``range(len(sigma))`` with a strict ``>``): when every
  singular value is needed it keeps none and the matrix arrives as zeros. Here k is the
  smallest rank with Σ_{i≤k} σ_i² ≥ T·Σ σ², at most full rank.
- HtFLlib takes numpy's SVD of a 4-D convolution weight, i.e. of each k×k kernel slice, with one
  rank for all slices; that saves bytes only at rank ≤ 2 for 5×5 kernels. We factor the
  out × (in·k·k) matrix (``conv_layout="flatten"``); ``conv_layout="kernel"`` is HtFLlib's.
- Factors that would be larger than the dense matrix travel dense (HtFLlib always sends them).
- HtFLlib keeps each model's target in the graph, differentiates through the adaptive scale
  CE_t + CE_s (which pushes the CE terms *up* to shrink the distillation terms), and adds the
  hidden loss to both losses, so every model and W_h get it twice. ``htfllib_gradients=True``
  restores that.
- HtFLlib's ``nn.KLDivLoss()`` also divides the KL by the number of classes;
  ``kl_reduction="mean"`` reproduces it, ``"batchmean"`` (default) is the per-sample KL.
- HtFLlib parses ``-mlr`` (mentee learning rate) but never uses it: its mentee trains at the
  client lr. ``mentee_lr`` is used here; unset, it is the federation's lr (what HtFLlib does).
- HtFLlib averages only parameters and leaves each client its own mentee buffers; buffers
  travel here (dense) and are averaged, as in our FedAvg. Averages are uniform over clients
  (paper code and HtFLlib); ``aggregate_by="samples"`` weights them by sample count.
- W_h starts as PyTorch's default Linear initialisation, drawn from the client's seeded
  generator (HtFLlib seeds every client with 0, so all start equal).
- The gradient clipping at norm 10 is HtFLlib's guard (``max_grad_norm=0`` turns it off).
- A held-out new client receives the global mentee (compressed) and fine-tunes with the same
  mutual distillation.
- The paper's attention loss (between Transformer attention maps) is not implemented: the
  models here share no attention maps.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from fl_core.seeding import derive_seed

from .base import Client, ClientContext, Message, Reply, Server, ServerContext
from .common import weighted_average
from .fml import SharedModelHParams, build_shared_model, clip_each, kl_to_target
from .parts import Part
from .registry import AlgorithmError, register_algorithm

MENTEE = "mentee"  # message space of the mentee itself
UPDATE = "update"  # message space of a change of the mentee
SPACES = (MENTEE, UPDATE)


class FedKDHParams(SharedModelHParams):
    """The shared small model is the mentee."""

    t_start: float = Field(
        0.95, gt=0.0, le=1.0, description="energy kept by the SVD in the first round (-Ts)"
    )
    t_end: float = Field(
        0.98, gt=0.0, le=1.0, description="energy kept by the SVD in the last round (-Te)"
    )
    mentee_lr: float | None = Field(
        None, gt=0.0, description="learning rate of the mentee (unset: the federation's lr)"
    )
    compress: Literal["update", "weights"] = Field(
        "update",
        description="upload the compressed update of the mentee (paper) or its compressed "
        "weights (HtFLlib)",
    )
    conv_layout: Literal["flatten", "kernel"] = Field(
        "flatten",
        description="factor a conv weight as out × (in·k·k) or per k×k kernel slice (HtFLlib)",
    )
    htfllib_gradients: bool = Field(
        False,
        description="differentiate through targets and the adaptive scale and count the "
        "hidden loss twice, as HtFLlib does",
    )
    aggregate_by: Literal["clients", "samples"] = Field(
        "clients", description="average updates uniformly (paper, HtFLlib) or by sample count"
    )


def energy_threshold(hp: FedKDHParams, round: int, rounds: int) -> float:
    """T(round): ``t_start`` in round 1 (and before), ``t_end`` in round ``rounds``, linear."""
    if rounds <= 1:
        return hp.t_start
    frac = min(max((round - 1) / (rounds - 1), 0.0), 1.0)
    return hp.t_start + frac * (hp.t_end - hp.t_start)


# -- SVD compression ----------------------------------------------------------------------------
def svd_factors(tensor: Tensor, energy: float, conv_layout: str = "flatten") -> list[Tensor] | None:
    """[U_k, S_k, V_k] of ``tensor`` keeping the smallest rank k whose singular values hold
    ``energy`` of Σσ², or None when it should travel dense (not a floating matrix, a vector-like
    matrix, or factors at least as large as the tensor).

    A matrix is a 2-D tensor, or a convolution weight (out, in, kh, kw) seen as out × in·kh·kw
    ("flatten"), or as the batch of its kh × kw slices sharing one rank ("kernel", HtFLlib).
    """
    if not tensor.is_floating_point() or tensor.dim() < 2:
        return None
    if tensor.dim() == 2 or conv_layout == "flatten":
        matrix = tensor.reshape(tensor.shape[0], -1)
    else:
        matrix = tensor
    m, n = matrix.shape[-2:]
    if min(m, n) < 2:
        return None
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    power = s.double().pow(2).reshape(-1, s.shape[-1]).sum(0)  # energy per singular index
    cumulative = power.cumsum(0)
    k = int(torch.searchsorted(cumulative, energy * cumulative[-1]).item()) + 1
    k = min(max(k, 1), s.shape[-1])
    if math.prod(matrix.shape[:-2]) * k * (m + n + 1) >= tensor.numel():
        return None
    return [u[..., :k].contiguous(), s[..., :k].contiguous(), vh[..., :k, :].contiguous()]


def svd_encode(state: dict[str, Tensor], energy: float, conv_layout: str, space: str) -> Message:
    """A message for ``state`` ({tensor name: tensor}) in ``space``: factors where smaller."""
    message: Message = {}
    for name, tensor in state.items():
        factors = svd_factors(tensor, energy, conv_layout)
        if factors is None:
            message[f"{space}/{name}"] = tensor.detach().clone()
        else:
            for which, f in zip("usv", factors, strict=True):
                message[f"{space}.svd/{name}/{which}"] = f
    return message


def message_space(message: Message, what: str) -> str:
    """The one space (``mentee`` or ``update``) the keys of ``message`` belong to."""
    spaces = {key.partition("/")[0].removesuffix(".svd") for key in message}
    if len(spaces) != 1 or not spaces <= set(SPACES):
        raise AlgorithmError(
            f"{what} mixes or misnames spaces {sorted(spaces)}; keys look like "
            "'mentee/<tensor>', 'mentee.svd/<tensor>/u|s|v' or the same under 'update'"
        )
    return spaces.pop()


def svd_decode(
    message: Message, reference: dict[str, Tensor], space: str, what: str
) -> dict[str, Tensor]:
    """{tensor name: dense tensor} from a message of `svd_encode` in ``space``; every tensor of
    ``reference`` (names, shapes, dtypes) must be in it exactly once, and nothing else."""
    dense: dict[str, Tensor] = {}
    factors: dict[str, dict[str, Tensor]] = {}
    for key, tensor in message.items():
        head, _, rest = key.partition("/")
        name, _, which = rest.rpartition("/")
        if head == space:
            dense[rest] = tensor
        elif head == f"{space}.svd" and name and which in ("u", "s", "v"):
            factors.setdefault(name, {})[which] = tensor
        else:
            raise AlgorithmError(
                f"{what} key {key!r} is neither '{space}/<tensor>' nor '{space}.svd/<tensor>/u|s|v'"
            )
    for name, f in factors.items():
        if set(f) != {"u", "s", "v"} or name in dense:
            raise AlgorithmError(
                f"{what}: tensor {name!r} needs exactly the factors u, s, v or one dense value, "
                f"got factors {sorted(f)}{' and a dense value' if name in dense else ''}"
            )
        if name in reference:
            full = (f["u"] * f["s"].unsqueeze(-2)) @ f["v"]
            dense[name] = full.reshape(reference[name].shape)
    missing, unknown = set(reference) - set(dense), set(dense) - set(reference)
    if missing or unknown:
        raise AlgorithmError(
            f"{what} does not match the mentee: missing {sorted(missing)[:3]}, "
            f"unknown {sorted(unknown)[:3]}"
        )
    for name, t in dense.items():
        if t.shape != reference[name].shape:
            raise AlgorithmError(
                f"{what}: {name!r} has shape {tuple(t.shape)}, the mentee's is "
                f"{tuple(reference[name].shape)}"
            )
    return {name: dense[name].to(reference[name].dtype) for name in reference}


def apply_update(state: dict[str, Tensor], update: dict[str, Tensor]) -> dict[str, Tensor]:
    """state + update for floating tensors; integer tensors (counters) take the update's value.
    The server and the clients both use it, so a client in step holds the server's mentee."""
    return {
        k: v + update[k].to(v.device, v.dtype) if v.is_floating_point() else update[k].to(v.device)
        for k, v in state.items()
    }


def state_change(after: dict[str, Tensor], before: dict[str, Tensor]) -> dict[str, Tensor]:
    """The update that `apply_update` turns ``before`` into ``after`` with."""
    return {k: v - before[k] if v.is_floating_point() else v for k, v in after.items()}


# -- client and server --------------------------------------------------------------------------
class FedKDClient(Client):
    shared = (MENTEE,)
    persistent = ("model", "w_h", MENTEE)  # the mentee: this client's copy of the global one

    def __init__(self, ctx: ClientContext) -> None:
        super().__init__(ctx)
        if self.hp.compress == "weights":  # the whole mentee arrives every round
            self.persistent = ("model", "w_h")
        self.mentee = ctx.extra_model(MENTEE, self.hp.shared_model)
        self.w_h = nn.Linear(self.mentee.feature_dim, self.model.feature_dim, bias=False)
        # PyTorch's default Linear init, from a generator of this task (ctx.rng is untouched)
        g = torch.Generator().manual_seed(derive_seed(ctx.rng.initial_seed(), "fedkd", "w_h"))
        bound = 1.0 / math.sqrt(self.mentee.feature_dim)
        with torch.no_grad():
            self.w_h.weight.copy_(
                torch.rand(self.w_h.weight.shape, generator=g) * 2 * bound - bound
            )
        self.w_h.to(ctx.device)
        self.trio = nn.ModuleDict({"mentor": self.model, "mentee": self.mentee, "w_h": self.w_h})

    def parts(self) -> dict[str, Part]:
        return {**super().parts(), MENTEE: self.mentee, "w_h": self.w_h}

    def receive(self, message: Message) -> None:
        """The global mentee (compressed), or the global update to apply to this client's copy."""
        if not message:
            return
        copy = self.mentee.state_dict()
        space = message_space(message, "message")
        decoded = svd_decode(message, copy, space, "message")
        state = decoded if space == MENTEE else apply_update(copy, decoded)
        super().receive({f"{MENTEE}/{k}": v for k, v in state.items()})

    def energy(self) -> float:
        return energy_threshold(self.hp, self.ctx.round, self.ctx.settings.rounds)

    def make_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        lr = self.ctx.settings.lr
        mentee = {id(p) for p in self.mentee.parameters()}
        groups = [
            {"params": [p for p in params if id(p) not in mentee], "lr": lr},
            {"params": [p for p in params if id(p) in mentee], "lr": self.hp.mentee_lr or lr},
        ]
        return torch.optim.SGD([g for g in groups if g["params"]], lr=lr)

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        if model is not self.trio:
            return nn.functional.cross_entropy(model(x), y)
        hp = self.hp
        ce = nn.functional.cross_entropy
        h_t, h_s = self.model.body(x), self.mentee.body(x)
        out_t, out_s = self.model.head(h_t), self.mentee.head(h_s)
        ce_t, ce_s = ce(out_t, y), ce(out_s, y)
        if hp.htfllib_gradients:
            scale = ce_t + ce_s
            kd = kl_to_target(out_t, out_s, hp.kl_reduction)
            kd = kd + kl_to_target(out_s, out_t, hp.kl_reduction)
            hidden = 2 * nn.functional.mse_loss(h_t, self.w_h(h_s))
        else:
            scale = (ce_t + ce_s).detach()
            kd = kl_to_target(out_t, out_s.detach(), hp.kl_reduction)
            kd = kd + kl_to_target(out_s, out_t.detach(), hp.kl_reduction)
            # one hidden loss, whose gradient reaches the mentor (through H_t) and the mentee
            # and W_h (through W_h·H_s) once each
            mapped = self.w_h(h_s)
            hidden = nn.functional.mse_loss(h_t, mapped.detach())
            hidden = hidden + nn.functional.mse_loss(h_t.detach(), mapped)
        return ce_t + ce_s + (kd + hidden) / scale

    def before_step(self, model: nn.Module) -> None:
        if model is self.trio:
            clip_each(self.hp.max_grad_norm, self.model, self.mentee, self.w_h)

    def fit(self) -> Reply:
        start = {k: v.detach().clone() for k, v in self.mentee.state_dict().items()}
        result = self.train(self.trio)
        after = {k: v.detach() for k, v in self.mentee.state_dict().items()}
        energy = self.energy()
        if self.hp.compress == "weights":
            message = svd_encode(after, energy, self.hp.conv_layout, MENTEE)
        else:
            change = state_change(after, start)
            message = svd_encode(change, energy, self.hp.conv_layout, UPDATE)
            # what persists is the copy of the global mentee, not this client's trained one
            self.mentee.load_state_dict(start)
        reply = self.reply(message, result)
        reply.metrics["energy"] = energy
        return reply

    def finetune(self, epochs: int) -> None:
        self.train(self.trio, epochs=epochs)


class FedKDServer(Server):
    """The global mentee, the last compressed global update, and which global version (count
    of updates) each client holds."""

    def __init__(self, ctx: ServerContext, hparams: FedKDHParams) -> None:
        super().__init__(ctx, hparams)
        mentee = build_shared_model(ctx, hparams.shared_model)
        self.mentee = {k: v.detach().clone() for k, v in mentee.state_dict().items()}
        self.version = 0
        self.client_version = torch.zeros(ctx.num_clients, dtype=torch.int64)
        self.last_update: Message = {}

    def energy(self, round: int) -> float:
        return energy_threshold(self.hp, round, self.ctx.settings.rounds)

    def compressed_mentee(self, round: int) -> Message:
        return svd_encode(self.mentee, self.energy(round), self.hp.conv_layout, MENTEE)

    def broadcast(self, round: int) -> Message:
        return self.compressed_mentee(round) if self.hp.compress == "weights" else {}

    def configure(self, round: int, client_ids: list[int]) -> dict[int, Message]:
        if self.hp.compress == "weights":
            return {}
        out: dict[int, Message] = {}
        full: Message | None = None
        for cid in client_ids:
            held = int(self.client_version[cid])
            if held == self.version:
                continue  # already holds the global mentee
            if held == self.version - 1 and self.last_update:
                out[cid] = self.last_update
            else:
                full = self.compressed_mentee(round) if full is None else full
                out[cid] = full
        return out

    def configure_evaluation(self, round: int, client_ids: list[int]) -> dict[int, Message]:
        # evaluation uses the mentor; only a held-out client that fine-tunes needs the mentee
        if self.hp.compress == "weights" or not self.ctx.settings.new_client_finetune_epochs:
            return {}
        new = [cid for cid in client_ids if cid not in self.ctx.architectures]
        full = self.compressed_mentee(round) if new else {}
        return {cid: full for cid in new}

    def aggregate(self, round: int, replies: dict[int, Reply]) -> None:
        if not replies:
            return
        space = MENTEE if self.hp.compress == "weights" else UPDATE
        by_samples = self.hp.aggregate_by == "samples"
        uploads = []
        for cid, reply in replies.items():
            what = f"client {cid}'s upload"
            if message_space(reply.message, what) != space:
                raise AlgorithmError(f"{what} is not in the '{space}' space")
            decoded = svd_decode(reply.message, self.mentee, space, what)
            uploads.append((decoded, reply.num_samples if by_samples else 1.0))
        mean = weighted_average(uploads)
        if self.hp.compress == "weights":
            self.mentee = mean
            return
        update = svd_encode(mean, self.energy(round), self.hp.conv_layout, UPDATE)
        decoded = svd_decode(update, self.mentee, UPDATE, "global update")
        self.mentee = apply_update(self.mentee, decoded)
        self.last_update = update
        for cid in replies:
            self.client_version[cid] = self.version
        self.version += 1

    def state_dict(self) -> dict[str, Tensor]:
        return {
            **{f"{MENTEE}/{k}": v for k, v in self.mentee.items()},
            **{f"last/{k}": v for k, v in self.last_update.items()},
            "version": torch.tensor([self.version], dtype=torch.int64),
            "client_version": self.client_version,
        }

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.mentee = {
            k[len(MENTEE) + 1 :]: v for k, v in state.items() if k.startswith(MENTEE + "/")
        }
        self.last_update = {k[5:]: v for k, v in state.items() if k.startswith("last/")}
        self.version = int(state["version"])
        self.client_version = state["client_version"].clone()


register_algorithm(
    "fedkd",
    FedKDClient,
    FedKDServer,
    FedKDHParams,
    "FedKD: a shared mentee and each client's mentor distil mutually; SVD-compressed updates",
    family="HtFL",
    paper="Wu et al., Communication-efficient federated learning via knowledge distillation, "
    "Nature Communications 2022",
    heterogeneous=True,
)
