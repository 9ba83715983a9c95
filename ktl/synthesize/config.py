"""The ``ktl synthesize`` configuration: YAML validated by pydantic, ``--set key=value``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .accountant import delta_problem, epsilon_problem


class SynthesisConfigError(ValueError):
    """A configuration problem: the field, the value, and what would be valid."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GeneratorSection(_Strict):
    spec: str = Field("builtin", description="generator spec (ktl generators list)")
    options: dict[str, Any] = Field(
        default_factory=dict, description="load_generator options, e.g. num_inference_steps"
    )
    prompt: str | None = Field(
        None,
        description="Stable Diffusion: per-class prompt template, '{label}' is the class name",
    )


class PrivateSection(_Strict):
    path: str | None = Field(None, description="folder of private images, <path>/<class>/*.png")
    dataset: str | None = Field(
        None, description="or an offline dataset: animal_mnist, fashion_mnist, digits"
    )
    split: Literal["train", "test"] = Field("test", description="dataset split the shots come from")
    shots_per_class: int = Field(5, ge=1, description="private images per class (dataset only)")
    classes: list[str] | None = Field(None, description="class names to use (default: all)")


class EmbeddingSection(_Strict):
    name: str | None = Field(
        None,
        description="denoiser[:t] | pixels[:side] | torchvision:<arch> | clip:<dir>; default: "
        "denoiser for a pixel-diffusion generator, else pixels",
    )
    weights: str | None = Field(None, description="state-dict file for torchvision:<arch>")


class MechanismSection(_Strict):
    name: Literal["pcevolve", "pe"] = "pcevolve"
    iterations: int = Field(4, ge=1, description="selection rounds T")
    population: int = Field(24, ge=2, description="synthetic candidates per class per round")
    select: int = Field(6, ge=1, description="selections (draws) per class per round")
    tau: float = Field(10.0, gt=0, description="pcevolve: similarity calibration exp(tau*score)")
    epsilon_per_draw: float | None = Field(
        None, description="pcevolve: fix the per-draw epsilon (checked against the budget)"
    )
    nearest: int = Field(1, ge=1, description="pe: each private image votes for this many")
    threshold: float | None = Field(
        None,
        ge=0,
        description="pe: histogram threshold H (default: the noise multiplier sigma; 2 sigma "
        "with cluster_size; laplace: half a vote plus 1.5 scales)",
    )
    lookahead: int = Field(0, ge=0, description="pe: embed a candidate as the mean of k variations")
    cluster_size: int = Field(
        0,
        ge=0,
        description="pe: vote for k-means clusters of about this many candidates instead of "
        "single candidates (0: single candidates)",
    )
    noise: Literal["gaussian", "laplace"] = Field(
        "gaussian",
        description="pe: the histogram's noise; laplace is pure DP with scale T*sqrt(nearest)/"
        "epsilon, far less noise than gaussian at few iterations and epsilon of about 5 or more",
    )
    noise_multiplier: float | None = Field(
        None, description="pe: fix sigma, or the laplace scale (checked against the budget)"
    )


class VariationSection(_Strict):
    mode: str | None = Field(None, description="image | latent (default: the generator's first)")
    strength_start: float = Field(0.8, ge=0, le=1, description="strength after round 1")
    strength_end: float = Field(0.5, ge=0, le=1, description="strength after the last round")


class PrivacySection(_Strict):
    epsilon: float = Field(5.0, description="total epsilon (.inf: no privacy, the ceiling)")
    delta: float = Field(1e-5, description="total delta")

    @field_validator("epsilon", mode="before")
    @classmethod
    def _infinity(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().lower() in ("inf", ".inf", "infinity"):
            return math.inf
        return value

    # checked when the config loads, before a generator is loaded or anything is written, by
    # the accountant's own rules
    @field_validator("epsilon")
    @classmethod
    def _positive(cls, value: float) -> float:
        if (problem := epsilon_problem(value)) is not None:
            raise ValueError(problem)
        return value

    @field_validator("delta")
    @classmethod
    def _probability(cls, value: float) -> float:
        if (problem := delta_problem(value)) is not None:
            raise ValueError(problem)
        return value


class ExportSection(_Strict):
    per_class: int = Field(60, ge=1, description="synthetic images per class in the export")
    source: Literal["selected", "pool"] = Field(
        "selected",
        description="selected: variations of each class's selected candidates; pool (pe, "
        "unconditional generators): the last round's candidates of all classes, each labelled "
        "with the class of its nearest selected bin, per_class drawn per class",
    )


class EvaluateSection(_Strict):
    heldout: str | None = Field(
        None,
        description="folder of real held-out images (default for datasets: the rest of the split)",
    )
    model: str = Field("cnn4", description="classifier (ktl list models)")
    steps: int = Field(400, ge=1, description="Adam steps for each classifier")


class SynthesisConfig(_Strict):
    seed: int = 0
    generator: GeneratorSection = Field(default_factory=GeneratorSection)
    private: PrivateSection = Field(default_factory=PrivateSection)
    embedding: EmbeddingSection = Field(default_factory=EmbeddingSection)
    mechanism: MechanismSection = Field(default_factory=MechanismSection)
    variation: VariationSection = Field(default_factory=VariationSection)
    privacy: PrivacySection = Field(default_factory=PrivacySection)
    export: ExportSection = Field(default_factory=ExportSection)
    evaluate: EvaluateSection = Field(default_factory=EvaluateSection)


def _message(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        where = ".".join(str(x) for x in e["loc"])
        if e["type"] == "extra_forbidden":
            parts.append(f"{where}: unknown key")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            parts.append(f"{where}: {msg} (got {e.get('input')!r})")
    return "invalid synthesize configuration: " + "; ".join(parts)


def build_config(raw: dict[str, Any]) -> SynthesisConfig:
    try:
        config = SynthesisConfig(**raw)
    except ValidationError as exc:
        raise SynthesisConfigError(_message(exc)) from None
    private = config.private
    if (private.path is None) == (private.dataset is None):
        raise SynthesisConfigError(
            "private: give exactly one of private.path (a folder of <class>/ sub-folders) or "
            "private.dataset (animal_mnist, fashion_mnist, digits)"
        )
    if config.export.source == "pool":
        problems = []
        if config.mechanism.name != "pe":
            problems.append(f"mechanism.name is {config.mechanism.name!r}, it needs 'pe'")
        if config.mechanism.lookahead:
            problems.append("mechanism.lookahead must be 0")
        if config.generator.prompt is not None:
            problems.append(
                "generator.prompt must be unset (a prompt-conditioned generator makes each "
                "class its own candidates, so there is no shared pool to label)"
            )
        if problems:
            raise SynthesisConfigError(
                "export.source 'pool' labels one shared pool by the classes' noisy votes: "
                + "; ".join(problems)
                + " (or use export.source 'selected')"
            )
    return config


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> SynthesisConfig:
    from fl_core.config import ConfigError, apply_overrides

    raw: dict[str, Any] = {}
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise SynthesisConfigError(f"config file {str(file)!r} does not exist")
        try:
            raw = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise SynthesisConfigError(
                f"config file {str(file)!r} is not valid YAML: {exc}"
            ) from None
        if not isinstance(raw, dict):
            raise SynthesisConfigError(f"config file {str(file)!r} must hold a mapping of sections")
    try:
        raw = apply_overrides(raw, overrides or [])
    except ConfigError as exc:
        raise SynthesisConfigError(str(exc)) from None
    return build_config(raw)
