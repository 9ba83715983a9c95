"""FedKTL (Zhang et al., CVPR 2024): knowledge transfer from a pre-trained generator to
heterogeneous clients, as the ``fl_core`` algorithm ``fedktl``.

It is registered through the ``fl_core.algorithms`` entry point of the ``ktl`` distribution,
exactly as a third-party algorithm would be.

**Client.** Any model of the group: its head's output (K = number of classes values) is
L2-normalised and compared by cosine with a fixed simplex ETF shared by all clients (sent by the
server); the loss is cross-entropy on additive-angular-margin logits (margin 0.5, scale 64),
and prediction is the ETF row of largest cosine. From the second round on, the server's
image-latent pairs add ``mu · MSE(h'(body(x_G)), z_G)``: a projection head h' maps the body's
features of a generated image to the latent that generated it (one batch of pairs per local
batch, cycling through them). Gradients are clipped at norm 100. After training it uploads its
per-class normalised prototypes (mean of the normalised K-dimensional outputs, normalised
again): exactly classes × K floats, a zero row for a class it lacks.

**Server.** Loads a generator with :func:`generators.load_generator` (the builtin by default;
diffusers, Stable Diffusion and StyleGAN3 specs too), on the accelerator when one is present.
Each round it trains the feature transformer F (K -> latent) and the class centroids on every
uploaded (prototype, class) pair: ``MMD(F(P), W) + lambda · MSE(F(P), centroid_y)`` with W
drawn from the generator's own latent prior; then it synthesises an image from each class
centroid, converts it to the clients' input shape, channels and normalisation, and sends the
(image, latent) pairs to every client in the next round (once per worker; their bytes count).
Each round's images are saved as a grid PNG under ``<run>/fedktl/``.

Differences from the reference code (FedKTL/HtFLlib), each a decision:

- **Projection head kept, not reset.** The reference reloads the server's initial h' every
  round and never keeps a client's update, so h' restarts from the same weights; here each
  client keeps its h' between rounds (a persistent part) and nothing about h' is sent.
  ``reset_projection=True`` restores the reference (the server's initial h' is then broadcast
  every round and counted).
- With ``mu = 0`` the server neither trains F nor generates: nothing would use the pairs.
- **One pair per class per round** as the reference (``pairs_per_class=1``); more pairs draw
  variance-preserving perturbations of each centroid (``pair_spread``).
- **Classes no client has uploaded yet** keep random centroids in the reference, which still
  generates and sends their images; here they are skipped until some client uploads them
  (``unseen_classes="skip"``); ``"generate"`` is the reference.
- **MMD kernel.** The reference sums RBF kernels with fixed bandwidths 2 x {10, 15, 20, 50};
  against latents of hundreds of dimensions (squared distances ~ 2 · latent size) those kernels
  are all ~0 and the MMD term carries almost no gradient. The default here scales five
  bandwidths to the prior sample's mean squared distance (powers of 2 around it; scaled to the
  joint sample instead, the transformed prototypes and centroids grew without bound);
  ``mmd_bandwidths=[20, 30, 40, 100]`` is the reference.
- **Centroids on the prior's shell.** After each round's training the centroids are rescaled
  to the mean norm of draws from the generator's prior (``prior_norm``): the latents then lie
  where the generator puts its mass, and the transformer cannot carry them away. Without it
  (the reference) we saw the centroids' scale grow about 30-fold a round on a few-shot client,
  the MMD's repulsion among prototypes outweighing its pull toward prior draws far away, and
  the clients' regression targets with it. ``prior_norm=false`` is the reference.
- **Diffusion latents.** For a diffusion model the latent is the initial noise x_T, as in the
  reference (for Stable Diffusion 4x64x64 = 16,384 values). F's width is K, so it stays at about
  K · 16,384 parameters; the clients' regression target is the latent average-pooled spatially
  to at most ``max_client_latent`` values (4,096 by default), so each client's h' is at most
  feature size x 4,096 instead of x 16,384, and the pairs' download shrinks by the same factor.
  The reference regresses the full latent.
- The ETF is a (K, K) matrix rebuilt by the server from its seeded generator and sent with
  every broadcast (K² floats), so a client that joins late or is evaluated without training
  has it; the reference shares the object in memory.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from fl_core.algorithms import (
    Client,
    ClientContext,
    HParams,
    Message,
    Reply,
    Server,
    ServerContext,
    register_algorithm,
)
from fl_core.algorithms.parts import Part, load_flat, select_state, selected_keys
from fl_core.algorithms.registry import AlgorithmError

from .knowledge import (
    FeatureTransformer,
    align,
    angular_margin_logits,
    client_latents,
    normalized_class_prototypes,
    simplex_etf,
    to_client_inputs,
)


class FedKTLHParams(HParams):
    mu: float = Field(50.0, ge=0.0, description="weight of the latent-regression transfer loss")
    lam: float = Field(1.0, ge=0.0, description="weight of the centroid term in server training")
    margin: float = Field(0.5, ge=0.0, lt=math.pi / 2, description="additive angular margin")
    scale: float = Field(64.0, gt=0.0, description="logit scale of the margin loss")
    clip: float = Field(100.0, gt=0.0, description="gradient-norm clip, clients and server")
    server_lr: float = Field(0.01, gt=0.0, description="Adam learning rate of the server")
    server_epochs: int = Field(100, ge=0, description="server epochs over the prototypes")
    server_batch_size: int = Field(100, ge=2, description="prototypes per server batch")
    generator: str = Field("builtin", description="generator spec (see `ktl generators list`)")
    generator_device: str = Field(
        "auto", description="where the generator runs: auto (accelerator if any), cpu, cuda"
    )
    generator_steps: int | None = Field(
        None, ge=1, description="sampling steps of a diffusion generator (default: its own)"
    )
    generator_options: dict[str, str | int | float | bool] = Field(
        default_factory=dict,
        description="backend options, e.g. {prompt: 'a photo of an animal'} for Stable Diffusion",
    )
    gen_batch_size: int = Field(4, ge=1, description="images synthesised per generator call")
    pairs_per_class: int = Field(1, ge=1, description="image-latent pairs per class per round")
    pair_spread: float = Field(
        0.1, ge=0.0, le=1.0, description="perturbation strength of extra pairs of a class"
    )
    unseen_classes: Literal["skip", "generate"] = Field(
        "skip", description="pairs for classes no client uploaded yet: skip, or generate (ref.)"
    )
    reset_projection: bool = Field(
        False, description="reload the server's initial projection head every round (ref.)"
    )
    mmd_bandwidths: list[float] | None = Field(
        None, description="fixed RBF bandwidths (reference: [20, 30, 40, 100]); None = scaled"
    )
    prior_norm: bool = Field(
        True, description="rescale the centroids to the prior's mean norm after training (ours)"
    )
    max_client_latent: int = Field(
        4096, ge=1, description="largest latent the clients regress (spatial latents pooled)"
    )
    save_images: bool = Field(True, description="save each round's generated images as a PNG")


class FedKTLClient(Client):
    shared = ()
    persistent = ("model", "proj")

    def __init__(self, ctx: ClientContext) -> None:
        super().__init__(ctx)
        hp: FedKTLHParams = self.hp
        if hp.reset_projection:
            self.persistent = ("model",)
        self.etf: Tensor | None = None
        self.pairs: tuple[Tensor, Tensor] | None = None
        self.proj: nn.Linear | None = None
        self._cursor: int | None = None

    def parts(self) -> dict[str, Part]:
        parts = super().parts()
        if self.proj is not None:
            parts["proj"] = self.proj
        return parts

    def _make_projection(self, latent_dim: int) -> nn.Linear:
        g = torch.Generator().manual_seed(int(torch.randint(2**62, (1,), generator=self.ctx.rng)))
        proj = nn.Linear(self.model.feature_dim, latent_dim)
        bound = 1.0 / math.sqrt(self.model.feature_dim)
        with torch.no_grad():
            proj.weight.uniform_(-bound, bound, generator=g)
            proj.bias.uniform_(-bound, bound, generator=g)
        return proj.to(self.ctx.device)

    def _kept(self) -> tuple[str, ...]:
        """What persists now: the projection head exists once the first pairs arrived."""
        return tuple(s for s in self.persistent if s != "proj" or self.proj is not None)

    def state_dict(self) -> dict[str, Tensor]:
        return select_state(self.parts(), self._kept())

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if "proj/weight" in state and self.proj is None and "proj" in self.persistent:
            out_dim, in_dim = state["proj/weight"].shape  # its values come from the state
            self.proj = nn.utils.skip_init(nn.Linear, in_dim, out_dim, device=self.ctx.device)
        if state:
            parts = self.parts()
            load_flat(parts, state, "client state", selected_keys(parts, self._kept()))

    def receive(self, message: Message) -> None:
        known = {"etf/matrix", "pairs/images", "pairs/latents", "proj/weight", "proj/bias"}
        unknown = set(message) - known
        if unknown:
            raise AlgorithmError(f"FedKTL client got unexpected keys {sorted(unknown)}")
        device = self.ctx.device
        if "etf/matrix" in message:
            etf = message["etf/matrix"]
            if etf.shape != (self.ctx.num_classes, self.ctx.num_classes):
                raise AlgorithmError(
                    f"etf/matrix has shape {tuple(etf.shape)}; expected "
                    f"({self.ctx.num_classes}, {self.ctx.num_classes})"
                )
            self.etf = etf.to(device)
        if "pairs/images" in message:
            images, latents = message["pairs/images"], message["pairs/latents"]
            if tuple(images.shape[1:]) != tuple(self.ctx.train_x.shape[1:]):
                raise AlgorithmError(
                    f"pairs/images have shape {tuple(images.shape)}; the client's inputs are "
                    f"{tuple(self.ctx.train_x.shape[1:])}"
                )
            self.pairs = (images.to(device), latents.to(device))
            if self.proj is None:
                self.proj = self._make_projection(latents.shape[1])
        if "proj/weight" in message:
            weight, bias = message["proj/weight"], message["proj/bias"]
            if self.proj is None or self.proj.weight.shape != weight.shape:
                self.proj = nn.utils.skip_init(
                    nn.Linear, weight.shape[1], weight.shape[0], device=device
                )
            with torch.no_grad():
                self.proj.weight.copy_(weight)
                self.proj.bias.copy_(bias)

    def _need_etf(self) -> Tensor:
        if self.etf is None:
            raise AlgorithmError("FedKTL client has no ETF: the server's broadcast carries it")
        return self.etf

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        hp: FedKTLHParams = self.hp
        logits = angular_margin_logits(model(x), self._need_etf(), y, hp.margin, hp.scale)
        loss = F.cross_entropy(logits, y)
        if self._cursor is not None and self.pairs is not None and hp.mu > 0:
            images, latents = self.pairs
            n, bs = images.shape[0], x.shape[0]
            idx = torch.arange(self._cursor, self._cursor + bs, device=images.device) % n
            self._cursor = (self._cursor + bs) % n
            predicted = self.proj(model.body(images[idx]))
            loss = loss + hp.mu * F.mse_loss(predicted, latents[idx])
        return loss

    def before_step(self, model: nn.Module) -> None:
        params = list(model.parameters())
        if self.proj is not None:
            params += list(self.proj.parameters())
        nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], self.hp.clip)

    def predict(self, model: nn.Module, x: Tensor) -> Tensor:
        return angular_margin_logits(model(x), self._need_etf(), None, 0.0, 1.0)

    def prototypes(self) -> Tensor:
        self.model.eval()
        ctx = self.ctx
        return normalized_class_prototypes(
            self.model,
            ctx.train_x,
            ctx.train_y,
            ctx.num_classes,
            ctx.settings.eval_batch_size,
            ctx.device,
        )

    def fit(self) -> Reply:
        params = list(self.model.parameters())
        transfer = self.pairs is not None and self.hp.mu > 0
        if transfer:
            params += list(self.proj.parameters())
        self._cursor = 0 if transfer else None
        try:
            result = self.train(params=params)
        finally:
            self._cursor = None
        return self.reply({"proto/local": self.prototypes()}, result)


class FedKTLServer(Server):
    def __init__(self, ctx: ServerContext, hparams: FedKTLHParams) -> None:
        super().__init__(ctx, hparams)
        from generators import load_generator

        options = dict(hparams.generator_options)
        if hparams.generator_steps is not None:
            options["num_inference_steps"] = hparams.generator_steps
        device = hparams.generator_device
        if device == "auto" and ctx.device.type == "cpu":
            device = "cpu"  # a CPU federation keeps its generator on the CPU
        try:
            self.generator = load_generator(hparams.generator, device=device, **options)
        except TypeError as e:
            raise AlgorithmError(f"algorithm.generator_steps does not apply: {e}") from e
        self.gen_device = self.generator.device
        k = ctx.num_classes
        self.latent_shape = tuple(self.generator.latent_shape)
        self.latent_dim = math.prod(self.latent_shape)
        self.etf = simplex_etf(k, ctx.rng(0, "fedktl-etf"))
        self.transformer = FeatureTransformer(k, self.latent_dim, ctx.rng(0, "fedktl-transformer"))
        self.transformer.to(self.gen_device)
        centroids = torch.randn(k, self.latent_dim, generator=ctx.rng(0, "fedktl-centroids"))
        self.centroids = nn.Parameter(centroids.to(self.gen_device))
        self.seen = torch.zeros(k, dtype=torch.bool)
        self.pair_images = torch.empty(0, *ctx.input_shape)
        self.pair_latents = torch.empty(0, 0)
        self.pair_labels = torch.empty(0, dtype=torch.int64)
        self.last_losses: list[float] = []
        self.projection: nn.Linear | None = None
        if hparams.reset_projection:
            g = ctx.rng(0, "fedktl-projection")
            target = client_latents(
                torch.zeros(1, *self.latent_shape), self.latent_shape, hparams.max_client_latent
            ).shape[1]
            self.projection = nn.Linear(ctx.feature_dim, target)
            bound = 1.0 / math.sqrt(ctx.feature_dim)
            with torch.no_grad():
                self.projection.weight.uniform_(-bound, bound, generator=g)
                self.projection.bias.uniform_(-bound, bound, generator=g)

    # -- messages ---------------------------------------------------------------------------
    def broadcast(self, round: int) -> Message:
        message: Message = {"etf/matrix": self.etf}
        if self.pair_images.shape[0] > 0:
            message["pairs/images"] = self.pair_images
            message["pairs/latents"] = self.pair_latents
            if self.projection is not None:
                message["proj/weight"] = self.projection.weight.detach()
                message["proj/bias"] = self.projection.bias.detach()
        return message

    def evaluation_broadcast(self, round: int) -> Message:
        return {"etf/matrix": self.etf}

    def aggregate(self, round: int, replies: dict[int, Reply]) -> dict[str, float] | None:
        """Aligns the prototypes with the generator's prior and generates the round's pairs;
        reports the alignment's mean loss in its last epoch (``server_align_loss``)."""
        protos, labels = [], []
        k = self.ctx.num_classes
        for cid, reply in replies.items():
            local = reply.message.get("proto/local")
            if local is None or set(reply.message) != {"proto/local"} or local.shape != (k, k):
                raise AlgorithmError(
                    f"client {cid} must upload exactly 'proto/local' of shape ({k}, {k}), got "
                    f"{ {key: tuple(v.shape) for key, v in reply.message.items()} }"
                )
            present = local.norm(dim=1) > 0
            protos.append(local[present].float().cpu())
            labels.append(torch.nonzero(present).flatten().cpu())
        if not protos:
            return None
        p = torch.cat(protos).to(self.gen_device)
        y = torch.cat(labels).to(self.gen_device)
        if p.shape[0] == 0:
            return None
        self.seen[y.cpu()] = True
        hp: FedKTLHParams = self.hp
        if hp.mu == 0:  # the transfer task is off: clients would ignore the pairs
            return None
        prior_rng = self.ctx.rng(round, "fedktl-prior")
        self.last_losses = align(
            self.transformer,
            self.centroids,
            p,
            y,
            lambda n: self.generator.sample_latents(n, prior_rng),
            epochs=hp.server_epochs,
            batch_size=hp.server_batch_size,
            lr=hp.server_lr,
            lam=hp.lam,
            generator=self.ctx.rng(round, "fedktl-batches"),
            bandwidths=hp.mmd_bandwidths,
            clip=hp.clip,
            prior_norm=hp.prior_norm,
        )
        self.generate_pairs(round)
        return {"align_loss": self.last_losses[-1]} if self.last_losses else None

    # -- generation -------------------------------------------------------------------------
    @torch.no_grad()
    def generate_pairs(self, round: int) -> None:
        hp: FedKTLHParams = self.hp
        classes = torch.arange(self.ctx.num_classes)
        if hp.unseen_classes == "skip":
            classes = classes[self.seen]
        if classes.numel() == 0:
            return
        latents = self.centroids.detach()[classes.to(self.gen_device)].reshape(
            -1, *self.latent_shape
        )
        labels = classes
        if hp.pairs_per_class > 1:
            rng = self.ctx.rng(round, "fedktl-spread")
            extra = [
                self.generator.perturb_latents(latents, hp.pair_spread, rng)
                for _ in range(hp.pairs_per_class - 1)
            ]
            latents = torch.cat([latents, *extra])
            labels = classes.repeat(hp.pairs_per_class)
        images = torch.cat(
            [self.generator.synthesize(chunk) for chunk in latents.split(hp.gen_batch_size)]
        )
        if hp.save_images and self.ctx.out_dir is not None:
            from generators import save_image_grid

            order = torch.argsort(labels, stable=True)
            folder = self.ctx.out_dir / "fedktl"
            folder.mkdir(parents=True, exist_ok=True)
            save_image_grid(
                images[order].cpu(),
                folder / f"round_{round:04d}.png",
                nrow=hp.pairs_per_class if hp.pairs_per_class > 1 else None,
            )
        self.pair_images = to_client_inputs(images, self.ctx.input_shape, self.ctx.normalization)
        self.pair_images = self.pair_images.cpu()
        self.pair_latents = client_latents(
            latents.float(), self.latent_shape, hp.max_client_latent
        ).cpu()
        self.pair_labels = labels.cpu()

    # -- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        state = {f"transformer/{k}": v for k, v in self.transformer.state_dict().items()}
        state |= {
            "centroids": self.centroids.detach(),
            "seen": self.seen.to(torch.int64),
            "pairs/images": self.pair_images,
            "pairs/latents": self.pair_latents,
            "pairs/labels": self.pair_labels,
        }
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.transformer.load_state_dict(
            {
                k.removeprefix("transformer/"): v
                for k, v in state.items()
                if k.startswith("transformer/")
            }
        )
        with torch.no_grad():
            self.centroids.copy_(state["centroids"])
        self.seen = state["seen"].to(torch.bool)
        self.pair_images = state["pairs/images"]
        self.pair_latents = state["pairs/latents"]
        self.pair_labels = state["pairs/labels"]


ALGORITHM = register_algorithm(
    "fedktl",
    FedKTLClient,
    FedKTLServer,
    FedKTLHParams,
    "FedKTL: a pre-trained generator's images and latents, aligned to the clients' class "
    "prototypes, transferred to heterogeneous clients",
    family="KT",
    paper="Zhang et al., An Upload-Efficient Scheme for Transferring Knowledge From a Server-Side "
    "Pre-trained Generator to Clients in Heterogeneous Federated Learning, CVPR 2024",
    heterogeneous=True,
)
