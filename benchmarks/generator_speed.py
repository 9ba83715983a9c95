"""Images per second of each generator backend (CPU by default).

Cases: the builtin generator; an unconditional diffusers DDIM UNet at 3x32x32 (~6.5 M
parameters, a realistic size for 32x32 pixel diffusion, randomly initialised); a tiny Stable
Diffusion-shaped pipeline (UNet2DConditionModel + AutoencoderKL + CLIP text encoder, 64x64
images from 4x8x8 latents, random weights); and StyleGAN3-T at 64x64 with a small random config
when ``generators.stylegan3`` is importable. The diffusers models are saved with
``save_pretrained`` and loaded through ``load_generator("diffusers:<dir>")``, the path users take.
Diffusion cost grows linearly with the number of DDIM steps, so the table states them.

    python benchmarks/generator_speed.py [--device cpu] [--steps 20] [--batch 8] [--repeats 2]
                                         [--threads N]

On a machine shared with other jobs, ``--threads 1`` gives steadier numbers: several processes
each running multi-threaded CPU kernels slow one another down far more than in proportion.

Writes benchmarks/results/generator_speed.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from generators import Generator, load_generator  # noqa: E402
from generators.testing import build_stable_diffusion_pipeline  # noqa: E402

RESULTS = REPO_ROOT / "benchmarks" / "results"


def build_ddim_unet_32(directory: Path) -> Path:
    from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        layers_per_block=2,
        block_out_channels=(64, 128, 128),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    )
    DDIMPipeline(unet=unet, scheduler=DDIMScheduler()).save_pretrained(directory)
    return directory


def build_tiny_stable_diffusion(directory: Path) -> Path:
    return build_stable_diffusion_pipeline(
        directory,
        image_size=64,
        text_width=32,
        text_layers=2,
        max_tokens=77,
        unet_channels=(32, 64),
        vae_channels=(16, 32, 32, 32),
        norm_num_groups=8,
    )


def build_stylegan3(device: str) -> Generator:
    from generators.stylegan3 import (
        StyleGAN3Config,
        StyleGAN3Generator,
        StyleGAN3Network,
        SynthesisConfig,
    )

    torch.manual_seed(0)
    config = StyleGAN3Config(
        z_dim=64,
        w_dim=64,
        img_resolution=64,
        img_channels=3,
        synthesis_kwargs=SynthesisConfig(channel_base=4096, channel_max=128, num_fp16_res=0),
    )
    return StyleGAN3Generator(StyleGAN3Network(config), device=device)


def parameter_count(gen: Generator) -> float:
    modules = [getattr(gen, name, None) for name in ("unet", "vae", "text_encoder", "network")]
    return sum(p.numel() for m in modules if m is not None for p in m.parameters()) / 1e6


def measure(gen: Generator, batch: int, repeats: int) -> dict[str, Any]:
    latents = [gen.sample_latents(batch, torch.Generator().manual_seed(i)) for i in range(repeats)]
    gen.synthesize(latents[0][:1])  # warm-up
    if gen.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for z in latents:
        gen.synthesize(z)
    if gen.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {
        "images_per_second": round(batch * repeats / seconds, 3),
        "seconds_per_batch": round(seconds / repeats, 3),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps of the diffusion cases")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "generator_speed")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        cases: list[tuple[str, str, Callable[[], Generator]]] = [
            (
                "builtin:animal-ddim",
                "builtin",
                lambda: load_generator(None, args.device, num_inference_steps=args.steps),
            ),
            (
                "DDIM UNet2DModel 3x32x32 (random)",
                "diffusers",
                lambda: load_generator(
                    f"diffusers:{build_ddim_unet_32(tmp_path / 'ddim32')}",
                    args.device,
                    num_inference_steps=args.steps,
                ),
            ),
            (
                "Stable Diffusion-shaped tiny 64x64 (random)",
                "diffusers",
                lambda: load_generator(
                    f"diffusers:{build_tiny_stable_diffusion(tmp_path / 'sd' / 'pipeline')}",
                    args.device,
                    num_inference_steps=args.steps,
                ),
            ),
            ("StyleGAN3-T 64x64 small (random)", "stylegan3", lambda: build_stylegan3(args.device)),
        ]
        for name, backend, build in cases:
            row: dict[str, Any] = {"generator": name, "backend": backend}
            try:
                gen = build()
            except Exception as exc:  # e.g. the StyleGAN3 backend not present in this copy
                row["skipped"] = f"{type(exc).__name__}: {exc}"
                rows.append(row)
                print(f"{name}: skipped ({row['skipped']})", flush=True)
                continue
            row.update(
                params_millions=round(parameter_count(gen), 2),
                latent_shape=list(gen.latent_shape),
                image=f"{gen.channels}x{gen.resolution}x{gen.resolution}",
                steps=getattr(gen, "num_inference_steps", None),
                batch=args.batch,
                **measure(gen, args.batch, args.repeats),
            )
            rows.append(row)
            print(f"{name}: {row['images_per_second']} images/s", flush=True)

    environment = {
        "device": args.device,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
        "load_average_1min_at_end": round(os.getloadavg()[0], 2),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(
        json.dumps({"environment": environment, "results": rows}, indent=2) + "\n",
        encoding="utf-8",
    )
    lines = [
        "# Generator speed",
        "",
        f"Device {args.device}, torch {environment['torch']}, "
        f"{environment['threads']} CPU thread(s), batch {args.batch}, "
        f"{args.repeats} timed batches after one warm-up image; "
        f"diffusion models use {args.steps} DDIM steps. Measured {environment['date']}; "
        f"{environment['cpu_count']} CPUs, 1-minute load average "
        f"{environment['load_average_1min_at_end']} at the end (other jobs slow CPU timings).",
        "",
        "| generator | backend | params (M) | latent | image | steps | images/s | s/batch |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        if "skipped" in row:
            lines.append(f"| {row['generator']} | {row['backend']} | skipped: {row['skipped']} |")
            continue
        latent = "x".join(map(str, row["latent_shape"]))
        lines.append(
            f"| {row['generator']} | {row['backend']} | {row['params_millions']} | {latent} | "
            f"{row['image']} | {row['steps'] or '-'} | {row['images_per_second']} | "
            f"{row['seconds_per_batch']} |"
        )
    table = "\n".join(lines) + "\n"
    args.out.with_suffix(".md").write_text(table, encoding="utf-8")
    print(table)


if __name__ == "__main__":
    main()
