"""Contract tests for the generator backends owned by generators/ (builtin, diffusers) and the
`ktl generators` CLI. Tiny randomly initialised pipelines are saved with diffusers'
save_pretrained and loaded back through the public `diffusers:<dir>` spec; nothing touches the
network (HF_HUB_OFFLINE=1) and nothing depends on sample quality."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from generators import (  # noqa: E402
    Generator,
    GeneratorError,
    list_generators,
    load_generator,
    make_grid,
)
from generators.testing import (  # noqa: E402
    build_pixel_pipeline,
    build_stable_diffusion_pipeline,
)

STEPS = 3  # DDIM steps in tests: enough to exercise the loop, cheap on CPU


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def pixel_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny unconditional DDPMPipeline (UNet2DModel + DDPMScheduler), 3x16x16."""
    return build_pixel_pipeline(tmp_path_factory.mktemp("pixel") / "pipeline")


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny StableDiffusionPipeline (PNDM scheduler, as SD v1.5 ships), 3x16x16 images from
    4x8x8 latents."""
    return build_stable_diffusion_pipeline(tmp_path_factory.mktemp("sd") / "pipeline")


@pytest.fixture(scope="module")
def pixel_gen(pixel_dir: Path) -> Generator:
    return load_generator(f"diffusers:{pixel_dir}", num_inference_steps=STEPS)


@pytest.fixture(scope="module")
def sd_gen(sd_dir: Path) -> Generator:
    return load_generator(f"diffusers:{sd_dir}", num_inference_steps=STEPS)


@pytest.fixture(scope="module")
def builtin_gen() -> Generator:
    return load_generator(None, num_inference_steps=2)


GENERATORS = ["pixel_gen", "sd_gen", "builtin_gen"]


# ----------------------------------------------------------------------------- the contract


@pytest.mark.parametrize("fixture", GENERATORS)
def test_contract(fixture: str, request: pytest.FixtureRequest) -> None:
    gen: Generator = request.getfixturevalue(fixture)
    z = gen.sample_latents(3, torch.Generator().manual_seed(0))
    assert z.shape == (3, *gen.latent_shape)
    images = gen.synthesize(z)
    assert images.shape == (3, gen.channels, gen.resolution, gen.resolution)
    assert images.dtype == torch.float32
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert torch.isfinite(images).all()
    # deterministic: same latents, same images
    assert torch.equal(images, gen.synthesize(z.clone()))
    # different latents give different images
    assert (images[0] - images[1]).abs().max() > 1e-4


@pytest.mark.parametrize("fixture", GENERATORS)
def test_sample_latents_follow_the_seed(fixture: str, request: pytest.FixtureRequest) -> None:
    gen: Generator = request.getfixturevalue(fixture)
    a = gen.sample_latents(4, torch.Generator().manual_seed(7))
    b = gen.sample_latents(4, torch.Generator().manual_seed(7))
    c = gen.sample_latents(4, torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert abs(float(a.std()) - 1.0) < 0.5  # the prior is N(0, sigma^2), sigma = 1 for DDIM


@pytest.mark.parametrize("fixture", GENERATORS)
def test_wrong_latent_shape_is_a_clear_error(fixture: str, request: pytest.FixtureRequest) -> None:
    gen: Generator = request.getfixturevalue(fixture)
    with pytest.raises(GeneratorError, match="expects"):
        gen.synthesize(torch.zeros(2, gen.latent_dim + 1))


def test_shapes_of_each_backend(pixel_gen: Generator, sd_gen: Generator, builtin_gen) -> None:
    assert pixel_gen.latent_shape == (3, 16, 16) and pixel_gen.resolution == 16
    assert sd_gen.latent_shape == (4, 8, 8) and sd_gen.resolution == 16 and sd_gen.channels == 3
    assert builtin_gen.latent_shape == (1, 28, 28)
    assert (builtin_gen.resolution, builtin_gen.channels) == (28, 1)
    assert builtin_gen.name == "builtin:animal-ddim"
    assert builtin_gen.dtype == torch.float32  # float16 weights on disk, float32 in memory


def test_pixel_matches_diffusers_ddim_pipeline(pixel_dir: Path, pixel_gen: Generator) -> None:
    """Our latent -> image map is exactly diffusers' DDIMPipeline (eta 0) started from x_T."""
    from diffusers import DDIMPipeline

    pipeline = DDIMPipeline.from_pretrained(pixel_dir)
    pipeline.set_progress_bar_config(disable=True)
    expected = pipeline(
        batch_size=2,
        generator=torch.Generator().manual_seed(3),
        num_inference_steps=STEPS,
        eta=0.0,
        output_type="np",
    ).images
    ours = pixel_gen.synthesize(pixel_gen.sample_latents(2, torch.Generator().manual_seed(3)))
    assert torch.allclose(ours.permute(0, 2, 3, 1), torch.from_numpy(expected), atol=1e-5)


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_stable_diffusion_matches_diffusers(sd_dir: Path, guidance_scale: float) -> None:
    """Same images as StableDiffusionPipeline given the same x_T, prompt and DDIM scheduler."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    gen = load_generator(
        f"diffusers:{sd_dir}",
        num_inference_steps=STEPS,
        prompt="a cat",
        guidance_scale=guidance_scale,
    )
    # clip_sample off, as StableDiffusionPipeline would set it itself (with a warning)
    scheduler = DDIMScheduler.from_pretrained(sd_dir, subfolder="scheduler", clip_sample=False)
    pipeline = StableDiffusionPipeline.from_pretrained(
        sd_dir, scheduler=scheduler, safety_checker=None
    )
    pipeline.set_progress_bar_config(disable=True)
    z = gen.sample_latents(2, torch.Generator().manual_seed(5))
    expected = pipeline(
        prompt=["a cat", "a cat"],
        negative_prompt=["", ""] if guidance_scale > 1 else None,
        latents=z / pipeline.scheduler.init_noise_sigma,
        num_inference_steps=STEPS,
        guidance_scale=guidance_scale,
        eta=0.0,
        output_type="pt",
    ).images
    assert torch.allclose(gen.synthesize(z), expected, atol=1e-5)


def test_prompt_changes_the_images(sd_dir: Path, sd_gen: Generator) -> None:
    other = load_generator(f"diffusers:{sd_dir}", num_inference_steps=STEPS, prompt="a dog")
    z = sd_gen.sample_latents(1, torch.Generator().manual_seed(0))
    assert not torch.allclose(sd_gen.synthesize(z), other.synthesize(z))


@pytest.mark.parametrize("fixture", ["pixel_gen", "sd_gen"])
def test_save_pretrained_round_trip(
    fixture: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    gen = request.getfixturevalue(fixture)
    gen.save_pretrained(tmp_path / "saved")
    again = load_generator(f"diffusers:{tmp_path / 'saved'}")  # options come from the folder
    assert again.num_inference_steps == STEPS
    z = gen.sample_latents(2, torch.Generator().manual_seed(1))
    assert torch.equal(gen.synthesize(z), again.synthesize(z))


def test_flat_layout_round_trip_with_float16_weights(pixel_gen, tmp_path: Path) -> None:
    pixel_gen.save_pretrained(tmp_path / "flat", layout="flat", weights_dtype=torch.float16)
    assert (tmp_path / "flat" / "scheduler_config.json").is_file()
    again = load_generator(f"diffusers:{tmp_path / 'flat'}")
    assert again.dtype == torch.float32
    z = pixel_gen.sample_latents(2, torch.Generator().manual_seed(1))
    assert torch.allclose(pixel_gen.synthesize(z), again.synthesize(z), atol=0.05)


def test_batch_size_option_does_not_change_results(pixel_dir: Path, pixel_gen) -> None:
    chunked = load_generator(f"diffusers:{pixel_dir}", num_inference_steps=STEPS, batch_size=2)
    z = pixel_gen.sample_latents(5, torch.Generator().manual_seed(2))
    assert torch.allclose(chunked.synthesize(z), pixel_gen.synthesize(z), atol=1e-5)


def test_builtin_training_record() -> None:
    from generators.builtin import builtin_directory, training_record

    directory = builtin_directory("animal-ddim")
    for name in ("config.json", "scheduler_config.json", "diffusion_pytorch_model.safetensors"):
        assert (directory / name).is_file()
    quality = training_record("animal-ddim")["quality"]
    assert {"fd_generated_vs_heldout", "fd_real_train_vs_heldout"} <= set(quality)


def test_stylegan3_spec_dispatches_to_the_backend(tmp_path: Path) -> None:
    """`stylegan3:<dir>` reaches generators.stylegan3 with device, dtype and options."""
    sg3 = pytest.importorskip("generators.stylegan3")
    from generators.stylegan3.convert import write_converted_dir

    config = sg3.StyleGAN3Config(
        z_dim=16,
        w_dim=16,
        img_resolution=16,
        img_channels=3,
        synthesis_kwargs=sg3.SynthesisConfig(channel_base=512, channel_max=32, num_fp16_res=0),
    )
    torch.manual_seed(0)
    network = sg3.StyleGAN3Network(config)
    directory = write_converted_dir(config, network.state_dict(), tmp_path / "sg3")
    gen = load_generator(f"stylegan3:{directory}", truncation_psi=0.7)
    z = gen.sample_latents(2, torch.Generator().manual_seed(0))
    images = gen.synthesize(z)
    assert images.shape == (2, 3, 16, 16) and images.min() >= 0 and images.max() <= 1
    assert torch.equal(images, gen.synthesize(z))
    with pytest.raises(GeneratorError, match="num_inference_steps"):
        load_generator(f"stylegan3:{directory}", num_inference_steps=5)


# ----------------------------------------------------------------------------- errors


def test_unknown_spec_prefix_lists_valid_forms() -> None:
    with pytest.raises(GeneratorError) as info:
        load_generator("gan:foo")
    message = str(info.value)
    for form in ("builtin:<name>", "diffusers:<directory or hub id>", "stylegan3:"):
        assert form in message


@pytest.mark.parametrize("spec", [None, "", "builtin", "builtin:", " Builtin : "])
def test_builtin_without_a_name_is_the_default(spec: str | None) -> None:
    from generators import parse_spec
    from generators.builtin import DEFAULT_BUILTIN

    assert DEFAULT_BUILTIN == "animal-ddim"
    assert parse_spec(spec) == ("builtin", DEFAULT_BUILTIN)


def test_load_builtin_without_a_name() -> None:
    gen = load_generator("builtin", num_inference_steps=1)
    assert gen.name == "builtin:animal-ddim"
    assert load_generator("builtin:", num_inference_steps=1).name == gen.name
    with pytest.raises(GeneratorError, match="names no target"):
        load_generator("diffusers:")  # only builtin has a default target


def test_unknown_builtin_name() -> None:
    with pytest.raises(GeneratorError, match="builtin:animal-ddim"):
        load_generator("builtin:nope")


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(GeneratorError, match="does not exist"):
        load_generator(f"diffusers:{tmp_path / 'absent'}")
    with pytest.raises(GeneratorError, match="not found"):
        load_generator(f"stylegan3:{tmp_path / 'absent.pkl'}")


def test_directory_that_is_not_a_pipeline(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(GeneratorError, match="not a diffusers pipeline"):
        load_generator(f"diffusers:{tmp_path}")


def test_incomplete_pipeline(pixel_dir: Path, tmp_path: Path) -> None:
    broken = shutil.copytree(pixel_dir, tmp_path / "broken")
    shutil.rmtree(broken / "unet")
    with pytest.raises(GeneratorError, match="unet/"):
        load_generator(f"diffusers:{broken}")


def test_truncated_safetensors_names_the_file(pixel_dir: Path, tmp_path: Path) -> None:
    broken = shutil.copytree(pixel_dir, tmp_path / "broken")
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(GeneratorError, match="truncated") as info:
        load_generator(f"diffusers:{broken}")
    assert str(weights) in str(info.value)


def test_corrupt_config_names_the_file(pixel_dir: Path, tmp_path: Path) -> None:
    broken = shutil.copytree(pixel_dir, tmp_path / "broken")
    (broken / "model_index.json").write_text("{not json")
    with pytest.raises(GeneratorError, match="model_index.json"):
        load_generator(f"diffusers:{broken}")


def test_hub_id_offline_without_cache_explains_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    # offline even if huggingface_hub was imported before this module set HF_HUB_OFFLINE
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(GeneratorError) as info:
        load_generator("diffusers:google/ddpm-cifar10-32", cache_dir=tmp_path / "empty-cache")
    message = str(info.value)
    assert "HF_HUB_OFFLINE is set" in message
    assert "hf download google/ddpm-cifar10-32" in message
    assert "diffusers:/path/to/folder" in message


def test_unknown_and_misplaced_options(pixel_dir: Path) -> None:
    with pytest.raises(GeneratorError, match="valid options"):
        load_generator(None, prompt="a cat")
    with pytest.raises(GeneratorError, match="only apply to Stable Diffusion"):
        load_generator(f"diffusers:{pixel_dir}", prompt="a cat")
    with pytest.raises(GeneratorError, match="num_inference_steps"):
        load_generator(f"diffusers:{pixel_dir}", num_inference_steps=0)


def test_device_and_dtype_errors() -> None:
    with pytest.raises(GeneratorError, match="dtype"):
        load_generator(None, dtype="int8")
    with pytest.raises(GeneratorError, match="not a device"):
        load_generator(None, device="warp-drive")
    if not torch.cuda.is_available():
        with pytest.raises(GeneratorError, match="no cuda device"):
            load_generator(None, device="cuda")


def test_auto_device_and_reduced_precision() -> None:
    from generators import resolve_device

    auto = resolve_device("auto")
    assert auto.type == "cuda" if torch.cuda.is_available() else auto.type in {"cpu", "mps", "xpu"}
    assert resolve_device(None) == torch.device("cpu")
    gen = load_generator(None, dtype="bf16", num_inference_steps=1)
    assert gen.dtype == torch.bfloat16
    z = gen.sample_latents(1, torch.Generator().manual_seed(0))
    assert z.dtype == torch.bfloat16
    images = gen.synthesize(z)
    assert images.dtype == torch.float32 and images.shape == (1, 1, 28, 28)


def test_backends_do_not_import_loading() -> None:
    """Dependencies run one way: generators.loading imports the backends, never the reverse."""
    import ast

    import generators

    package = Path(generators.__file__).parent
    offenders = []
    for file in sorted(package.rglob("*.py")):
        module = ".".join(file.relative_to(package.parent).with_suffix("").parts)
        if module in {"generators.__init__", "generators.loading"}:
            continue
        parent = module.split(".")[:-1]  # the package a relative import starts from
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                imported = {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = parent[: len(parent) - node.level + 1] if node.level else []
                target = ".".join([*base, *([node.module] if node.module else [])])
                imported = {target} | {f"{target}.{alias.name}" for alias in node.names}
            else:
                continue
            if "generators.loading" in imported:
                offenders.append(f"{module} line {node.lineno}")
    assert not offenders, f"backend modules import generators.loading: {offenders}"


def test_list_generators() -> None:
    entries = {e.spec: e for e in list_generators()}
    assert entries["builtin:animal-ddim"].default
    assert {"diffusers:<directory or hub id>", "stylegan3:<file.pkl or directory>"} <= set(entries)


# ----------------------------------------------------------------------------- grid + CLI


def test_make_grid_size() -> None:
    grid = make_grid(torch.zeros(5, 1, 4, 6), nrow=3, padding=1)
    assert grid.shape == (1, 2 * 4 + 3, 3 * 6 + 4)


def test_cli_sample_writes_grid(pixel_dir: Path, tmp_path: Path) -> None:
    from PIL import Image
    from typer.testing import CliRunner

    from ktl.cli_generators import app

    out = tmp_path / "grid.png"
    result = CliRunner().invoke(
        app,
        ["sample", f"diffusers:{pixel_dir}", "--n", "5", "--seed", "0", "--out", str(out)]
        + ["--steps", "2", "--device", "cpu"],
    )
    assert result.exit_code == 0, result.output
    with Image.open(out) as image:
        assert image.size == (3 * 16 + 4 * 2, 2 * 16 + 3 * 2)  # 3 columns, 2 rows, 2px padding
        assert image.mode == "RGB"
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"]  # no temporary file left


def test_cli_errors_are_one_paragraph_exit_2(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from ktl.cli_generators import app

    result = CliRunner().invoke(app, ["sample", "nope:x", "--out", str(tmp_path / "g.png")])
    assert result.exit_code == 2
    assert "unknown generator spec" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "g.png").exists()


def test_cli_convert_stylegan3_missing_pickle(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from ktl.cli_generators import app

    result = CliRunner().invoke(
        app, ["convert-stylegan3", str(tmp_path / "absent.pkl"), str(tmp_path / "out")]
    )
    assert result.exit_code == 2
    assert "not found" in result.output and "Traceback" not in result.output


def test_cli_list() -> None:
    from typer.testing import CliRunner

    from ktl.cli_generators import app

    result = CliRunner().invoke(app, ["list"])
    assert result.exit_code == 0
    assert "builtin:animal-ddim" in result.output and "(default)" in result.output
