"""Train the builtin generator ``builtin:animal-ddim`` on Animal-MNIST and measure its quality.

A small diffusers ``UNet2DModel`` (1 channel, native 28x28, 3 levels) learns the DDPM noise
prediction objective on a cosine noise schedule, with an exponential moving average (EMA) of its
weights. The EMA weights, rounded to float16 exactly as shipped, are then evaluated: a small CNN
classifier is trained on the same real training images, and the Fréchet distance between its
penultimate-layer features of generated samples and of held-out real images is reported next to
the same distance for real-vs-real (training vs held-out images) and for uniform noise.

Everything goes into ``--out`` (replaced atomically at the end): ``config.json``,
``diffusion_pytorch_model.safetensors`` (float16), ``scheduler_config.json``,
``generator_config.json``, ``training.json`` (settings, timings, quality figures) and
``samples.png`` (an 8x8 grid).

Examples::

    # the real run (GPU, time budget)
    python scripts/train_builtin_generator.py --device cuda --minutes 5 \
        --out generators/builtin/weights/animal-ddim --docs-image docs/builtin_samples.png
    # a smoke test on CPU
    python scripts/train_builtin_generator.py --device cpu --steps 30 --eval-samples 128 \
        --out /tmp/animal-ddim

Needs torch, diffusers (UNet2DModel, DDIMScheduler), safetensors, numpy and Pillow; it reads the
Animal-MNIST pickles from the ``animal-mnist`` package without importing it (its loader imports
tensorflow).
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import gzip
import json
import math
import pickle
import platform
import shutil
import sys
import time
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a plain script from a source checkout
    sys.path.insert(0, str(REPO_ROOT))

from generators.diffusion import PixelDiffusionGenerator  # noqa: E402
from generators.images import save_image_grid  # noqa: E402

NUM_CLASSES = 10
# As listed by the package description; it does not document which label is which animal.
CLASS_NAMES = [
    "bear",
    "bird",
    "cat",
    "cow",
    "dog",
    "elephant",
    "giraffe",
    "horse",
    "sheep",
    "zebra",
]
HELDOUT_PER_CLASS = 200
RESOLUTION = 28

# The UNet: 28 -> 14 -> 7, self-attention only at 7x7; ~2.6 M parameters (~5 MB in float16).
UNET_CONFIG: dict[str, Any] = {
    "sample_size": RESOLUTION,
    "in_channels": 1,
    "out_channels": 1,
    "layers_per_block": 2,
    "block_out_channels": [32, 64, 96],
    "down_block_types": ["DownBlock2D", "DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
    "norm_num_groups": 16,
    "attention_head_dim": 32,
}
# Cosine schedule suits small images; "trailing" spacing starts DDIM at t = T-1 for any number
# of steps, and clipping keeps predictions of x_0 inside the data range [-1, 1].
SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "epsilon",
    "clip_sample": True,
    "clip_sample_range": 1.0,
    "set_alpha_to_one": True,
    "timestep_spacing": "trailing",
}
DEFAULT_SAMPLE_STEPS = 25


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", type=Path, default=REPO_ROOT / "generators/builtin/weights/animal-ddim"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--minutes", type=float, default=None, help="training time budget")
    parser.add_argument("--steps", type=int, default=None, help="stop after this many steps")
    parser.add_argument("--epochs", type=float, default=None, help="stop after this many epochs")
    parser.add_argument(
        "--batch-size", type=int, default=None, help="default 256 on GPU, 64 on CPU"
    )
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--warmup-steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-amp", action="store_true", help="no bfloat16 autocast on GPU")
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile the UNet (compile time counts)"
    )
    parser.add_argument(
        "--sample-steps", type=int, default=DEFAULT_SAMPLE_STEPS, help="DDIM steps (the default)"
    )
    parser.add_argument("--eval-samples", type=int, default=2000)
    parser.add_argument("--classifier-epochs", type=int, default=None, help="default 8 GPU, 2 CPU")
    parser.add_argument("--docs-image", type=Path, default=None, help="also write the grid here")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="folder with animal_data_version_3.gz + animal_label_version_3.gz "
        "(default: the installed animal-mnist package)",
    )
    args = parser.parse_args(argv)
    if args.minutes is None and args.steps is None and args.epochs is None:
        args.minutes = 5.0
    for name in ("minutes", "steps", "epochs"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            parser.error(f"--{name} must be positive")
    if args.eval_samples < 64:
        parser.error("--eval-samples must be at least 64")
    return args


# ----------------------------------------------------------------------------- data


def load_animal_mnist(data_dir: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(10000, 28, 28) uint8 images and (10000,) labels from the animal-mnist package files (or
    the same two .gz files in ``data_dir``)."""
    if data_dir is not None:
        folder: Any = data_dir
    else:
        try:
            folder = files("animal_mnist") / "data" / "Animal_MNIST"
        except ModuleNotFoundError:
            raise SystemExit(
                "Animal-MNIST not found: `pip install --no-deps animal-mnist==0.4`, or pass "
                "--data-dir with animal_data_version_3.gz and animal_label_version_3.gz"
            ) from None
    with gzip.open(str(folder / "animal_data_version_3.gz"), "rb") as handle:
        images = np.asarray(pickle.load(handle), dtype=np.uint8)
    with gzip.open(str(folder / "animal_label_version_3.gz"), "rb") as handle:
        labels = np.asarray(pickle.load(handle), dtype=np.int64)
    if images.shape != (10000, 28, 28) or labels.shape != (10000,):
        raise SystemExit(f"unexpected Animal-MNIST shapes {images.shape}, {labels.shape}")
    return images, labels


def split(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split: HELDOUT_PER_CLASS images of each class held out, the rest for training."""
    rng = np.random.default_rng(seed)
    heldout = np.concatenate(
        [
            rng.permutation(np.flatnonzero(labels == c))[:HELDOUT_PER_CLASS]
            for c in range(NUM_CLASSES)
        ]
    )
    train = np.setdiff1d(np.arange(len(labels)), heldout)
    return rng.permutation(train), rng.permutation(heldout)


# ----------------------------------------------------------------------------- diffusion training


def build_unet() -> nn.Module:
    from diffusers import UNet2DModel

    return UNet2DModel(**UNET_CONFIG)


def build_scheduler() -> Any:
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SCHEDULER_CONFIG)


def train_diffusion(
    args: argparse.Namespace, data: torch.Tensor, device: torch.device
) -> tuple[nn.Module, Any, dict[str, Any]]:
    """DDPM noise prediction; returns the EMA model, the scheduler and a training record."""
    torch.manual_seed(args.seed)
    unet = build_unet().to(device)
    ema = copy.deepcopy(unet).requires_grad_(False)
    scheduler = build_scheduler()
    alphas_cumprod = scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)
    num_timesteps = int(scheduler.config.num_train_timesteps)

    use_amp = device.type == "cuda" and not args.no_amp
    optimizer = torch.optim.AdamW(
        unet.parameters(), lr=args.lr, weight_decay=0.0, fused=device.type == "cuda"
    )
    n = data.shape[0]
    max_steps = args.steps
    if args.epochs is not None:
        epoch_steps = math.ceil(args.epochs * n / args.batch_size)
        max_steps = epoch_steps if max_steps is None else min(max_steps, epoch_steps)
    budget = args.minutes * 60.0 if args.minutes is not None else None
    generator = torch.Generator(device=device).manual_seed(args.seed)

    def progress(step: int, elapsed: float) -> float:
        by_steps = step / max_steps if max_steps else 0.0
        by_time = elapsed / budget if budget else 0.0
        return min(1.0, max(by_steps, by_time))

    model = torch.compile(unet) if args.compile else unet
    ema_params = list(ema.parameters())
    params = list(unet.parameters())
    loss_trace: list[tuple[int, float]] = []
    running = None
    step = 0
    start = time.monotonic()
    stop_reason = "steps"
    print(
        f"training: {sum(p.numel() for p in params) / 1e6:.2f} M parameters on {device}, "
        f"batch {args.batch_size}, amp={use_amp}",
        flush=True,
    )
    while True:
        elapsed = time.monotonic() - start
        if max_steps is not None and step >= max_steps:
            stop_reason = "steps" if args.steps is not None and step >= args.steps else "epochs"
            break
        if budget is not None and elapsed >= budget:
            stop_reason = "time budget"
            break
        # learning rate: linear warm-up, then cosine decay to 10% over the steps/time budget
        warm = min(1.0, (step + 1) / max(1, args.warmup_steps))
        lr = args.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress(step, elapsed))))
        for group in optimizer.param_groups:
            group["lr"] = lr

        index = torch.randint(0, n, (args.batch_size,), device=device, generator=generator)
        x0 = data[index]
        flip = torch.rand(args.batch_size, 1, 1, 1, device=device, generator=generator) < 0.5
        x0 = torch.where(flip, x0.flip(-1), x0)  # animals face either way
        t = torch.randint(0, num_timesteps, (args.batch_size,), device=device, generator=generator)
        noise = torch.randn(x0.shape, device=device, generator=generator)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            prediction = model(xt, t).sample
        loss = F.mse_loss(prediction.float(), noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        decay = min(args.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1.0 - decay)
        step += 1
        if step % 100 == 0 or step == 1:
            value = loss.item()
            running = value if running is None else 0.9 * running + 0.1 * value
            loss_trace.append((step, round(value, 5)))
            print(f"step {step:6d}  {elapsed:7.1f}s  loss {value:.4f}  lr {lr:.2e}", flush=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.monotonic() - start
    final_loss = float(loss.item()) if step else float("nan")
    record = {
        "steps": step,
        "epochs": round(step * args.batch_size / n, 2),
        "seconds": round(seconds, 1),
        "steps_per_second": round(step / max(seconds, 1e-9), 2),
        "stop_reason": stop_reason,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "lr_schedule": f"linear warm-up {args.warmup_steps} steps, cosine to 10%",
        "optimizer": "AdamW (no weight decay), grad-norm clip 1.0",
        "ema_decay": args.ema_decay,
        "bf16_autocast": use_amp,
        "torch_compile": args.compile,
        "augmentation": "random horizontal flip",
        "final_loss": round(final_loss, 5),
        "loss_trace": loss_trace,
    }
    return ema.eval(), scheduler, record


# ----------------------------------------------------------------------------- quality figure


class FeatureCNN(nn.Module):
    """A small classifier; its 128-d penultimate layer is the feature space for the FD."""

    def __init__(self, feature_dim: int = 128) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
            nn.Flatten(), nn.Linear(64 * 7 * 7, feature_dim), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Linear(feature_dim, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def train_classifier(
    images: torch.Tensor, labels: torch.Tensor, epochs: int, seed: int, device: torch.device
) -> FeatureCNN:
    """images in [0, 1], (n, 1, 28, 28)."""
    torch.manual_seed(seed)
    model = FeatureCNN().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    n = images.shape[0]
    generator = torch.Generator(device="cpu").manual_seed(seed)
    for _ in range(epochs):
        for batch in torch.randperm(n, generator=generator).split(128):
            batch = batch.to(device)
            loss = F.cross_entropy(model(images[batch] * 2 - 1), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return model.eval()


@torch.no_grad()
def features(model: FeatureCNN, images: torch.Tensor) -> torch.Tensor:
    return torch.cat([model.body(chunk * 2 - 1) for chunk in images.split(500)]).double().cpu()


@torch.no_grad()
def accuracy(model: FeatureCNN, images: torch.Tensor, labels: torch.Tensor) -> float:
    predictions = torch.cat([model(chunk * 2 - 1).argmax(1) for chunk in images.split(500)])
    return float((predictions == labels).float().mean())


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2), in float64."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    values, vectors = torch.linalg.eigh(cov_a)
    root_a = vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T
    middle = root_a @ cov_b @ root_a
    trace_root = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    distance = (mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * trace_root
    return round(float(distance), 3)


def evaluate(
    args: argparse.Namespace,
    generated: torch.Tensor,
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    heldout_images: torch.Tensor,
    heldout_labels: torch.Tensor,
    device: torch.device,
) -> dict[str, Any]:
    """All image tensors in [0, 1], (n, 1, 28, 28), on ``device``."""
    start = time.monotonic()
    epochs = args.classifier_epochs or (8 if device.type == "cuda" else 2)
    classifier = train_classifier(train_images, train_labels, epochs, args.seed, device)
    rng = torch.Generator(device="cpu").manual_seed(args.seed + 1)
    real_subset = train_images[
        torch.randperm(train_images.shape[0], generator=rng)[: heldout_images.shape[0]]
    ]
    noise = torch.rand(generated.shape, generator=rng).to(device)
    reference = features(classifier, heldout_images)
    with torch.no_grad():
        predicted = torch.cat([classifier(c * 2 - 1).argmax(1) for c in generated.split(500)])
    histogram = torch.bincount(predicted.cpu(), minlength=NUM_CLASSES).tolist()
    return {
        "metric": (
            "Fréchet distance between penultimate-layer (128-d) features of a CNN classifier "
            "trained on the real training images; lower is better"
        ),
        "reference": (
            f"{heldout_images.shape[0]} held-out real images ({HELDOUT_PER_CLASS} per class)"
        ),
        "classifier_epochs": epochs,
        "classifier_heldout_accuracy": round(
            accuracy(classifier, heldout_images, heldout_labels), 4
        ),
        "generated_samples": generated.shape[0],
        "num_inference_steps": args.sample_steps,
        "fd_generated_vs_heldout": frechet_distance(features(classifier, generated), reference),
        "fd_real_train_vs_heldout": frechet_distance(features(classifier, real_subset), reference),
        "fd_uniform_noise_vs_heldout": frechet_distance(features(classifier, noise), reference),
        "generated_class_histogram": histogram,  # classifier-predicted labels 0..9
        "seconds": round(time.monotonic() - start, 1),
    }


# ----------------------------------------------------------------------------- main

OUTPUT_FILES = {
    "config.json",
    "diffusion_pytorch_model.safetensors",
    "scheduler_config.json",
    "generator_config.json",
    "training.json",
    "samples.png",
}


def check_replaceable(out: Path) -> None:
    """--out is replaced as a whole: refuse a folder holding anything this script did not write."""
    if out.exists():
        if not out.is_dir():
            raise SystemExit(f"--out {out} exists and is not a directory")
        foreign = sorted(p.name for p in out.iterdir() if p.name not in OUTPUT_FILES)
        if foreign:
            raise SystemExit(f"--out {out} holds files this script did not write: {foreign}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    check_replaceable(args.out.resolve())  # fail before training, not after
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda was given but CUDA is not available")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    if args.batch_size is None:
        args.batch_size = 256 if device.type == "cuda" else 64
    import diffusers  # fail here, before any work, if it is missing

    started = dt.datetime.now(dt.UTC)
    images, labels = load_animal_mnist(args.data_dir)
    train_index, heldout_index = split(labels, args.seed)

    def as_tensor(index: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(images[index]).float().div(255).unsqueeze(1).to(device)

    train_images, heldout_images = as_tensor(train_index), as_tensor(heldout_index)
    train_labels = torch.from_numpy(labels[train_index]).to(device)
    heldout_labels = torch.from_numpy(labels[heldout_index]).to(device)

    ema, scheduler, training = train_diffusion(args, train_images * 2 - 1, device)
    with torch.no_grad():  # evaluate exactly the float16 weights that are shipped
        for parameter in ema.parameters():
            parameter.copy_(parameter.half().float())
    generator = PixelDiffusionGenerator(
        ema,
        dict(scheduler.config),
        num_inference_steps=args.sample_steps,
        name="builtin:animal-ddim",
    )

    out = args.out.resolve()
    check_replaceable(out)
    staging = out.parent / f".{out.name}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    generator.save_pretrained(staging, layout="flat", weights_dtype=torch.float16)
    generator.batch_size = 500  # only for the evaluation below; not saved

    print(f"sampling {args.eval_samples} images with {args.sample_steps} DDIM steps", flush=True)
    sample_start = time.monotonic()
    latents = generator.sample_latents(args.eval_samples, torch.Generator().manual_seed(args.seed))
    generated = generator.synthesize(latents)
    sample_seconds = time.monotonic() - sample_start
    save_image_grid(generated[:64], staging / "samples.png", nrow=8)
    print(f"evaluating (sampling took {sample_seconds:.1f}s)", flush=True)
    try:
        quality = evaluate(
            args, generated, train_images, train_labels, heldout_images, heldout_labels, device
        )
        quality["sampling_seconds"] = round(sample_seconds, 1)
    except Exception as exc:  # keep the trained weights even if the evaluation fails
        quality = {"error": f"{type(exc).__name__}: {exc}"}

    record = {
        "generator": "builtin:animal-ddim",
        "dataset": {
            "name": "Animal-MNIST (pip package animal-mnist 0.4, 10 classes x 1000 images)",
            "classes": CLASS_NAMES,
            "class_note": "names from the package description; label order undocumented",
            "train_images": int(train_index.size),
            "heldout_images": int(heldout_index.size),
            "split": f"stratified, {HELDOUT_PER_CLASS} per class held out, seed {args.seed}",
            "preprocessing": "28x28 greyscale scaled to [-1, 1]",
        },
        "model": {
            "class": "diffusers.UNet2DModel",
            "config": UNET_CONFIG,
            "parameters": sum(p.numel() for p in ema.parameters()),
            "stored_dtype": "float16",
        },
        "objective": "DDPM epsilon prediction (MSE), uniform t in [0, 1000)",
        "scheduler": SCHEDULER_CONFIG,
        "sampling": {"sampler": "DDIM, eta 0", "num_inference_steps": args.sample_steps},
        "training": training,
        "quality": quality,
        "environment": {
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else platform.processor() or "cpu",
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "python": platform.python_version(),
        },
        "command": "python scripts/train_builtin_generator.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "created": started.isoformat(timespec="seconds"),
    }
    (staging / "training.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")

    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    if args.docs_image is not None:
        args.docs_image.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / "samples.png", args.docs_image)
    print(
        json.dumps(
            {
                "out": str(out),
                "training": {k: v for k, v in training.items() if k != "loss_trace"},
                "quality": quality,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
