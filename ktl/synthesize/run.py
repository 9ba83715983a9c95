"""The selection loop of ``ktl synthesize``: generate, select privately, vary, export."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ktl.synthesize.accountant import PrivacyPlan, plan_pcevolve, plan_pe
from ktl.synthesize.config import SynthesisConfig, SynthesisConfigError
from ktl.synthesize.embedding import Embedding, load_embedding
from ktl.synthesize.export import to_uint8, write_dataset
from ktl.synthesize.mechanisms import (
    class_centres,
    exponential_mechanism,
    kmeans,
    label_bins,
    label_by_nearest_bin,
    noisy_histogram,
    pcevolve_utility,
    pe_histogram,
    pe_select,
    spread_over_members,
)
from ktl.synthesize.private import (
    LabelledImages,
    PrivateDataError,
    fit_images,
    load_dataset_split,
    read_image_folder,
    select_classes,
    take_shots,
)

ProgressFn = Callable[[dict], None]


@dataclass
class Population:
    """One class's current synthetic samples (images, and latents when they exist)."""

    images: torch.Tensor
    latents: torch.Tensor | None


@dataclass
class SynthesisResult:
    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]
    plan: PrivacyPlan
    manifest: dict
    history: list[dict] = field(default_factory=list)


def load_private(
    config: SynthesisConfig, resolution: int, channels: int
) -> tuple[LabelledImages, LabelledImages | None]:
    """(private few shots, real held-out images or None) at the generator's size."""
    p = config.private
    if p.path is not None:
        private = select_classes(read_image_folder(Path(p.path), resolution, channels), p.classes)
        heldout = None
        if config.evaluate.heldout is not None:
            held = read_image_folder(Path(config.evaluate.heldout), resolution, channels)
            held = select_classes(held, private.class_names, "evaluate.heldout")
            heldout = held
        return private, heldout
    images, labels, names = load_dataset_split(p.dataset, p.split)
    data = select_classes(LabelledImages(images, labels, names), p.classes)
    picked, rest = take_shots(
        data.labels, p.shots_per_class, config.seed, list(range(len(data.class_names)))
    )
    few = LabelledImages(
        fit_images(data.images[picked], resolution, channels), data.labels[picked], data.class_names
    )
    held = LabelledImages(
        fit_images(data.images[rest], resolution, channels), data.labels[rest], data.class_names
    )
    return few, held


def private_class_count(config: SynthesisConfig) -> int:
    """How many classes the private data has, read without the generator, so that the budget
    can be checked (and a bad private folder refused) before a generator loads."""
    p = config.private
    if p.classes:
        return len(p.classes)
    if p.path is not None:
        return len(read_image_folder(Path(p.path), 8, 1).class_names)
    return len(load_dataset_split(p.dataset, p.split)[2])


def strength_at(config: SynthesisConfig, iteration: int) -> float:
    """Variation strength after selection round ``iteration`` (1-based): linear from
    ``strength_start`` to ``strength_end`` over the rounds."""
    v, t = config.variation, config.mechanism.iterations
    if t == 1:
        return v.strength_end
    return v.strength_start + (v.strength_end - v.strength_start) * (iteration - 1) / (t - 1)


def make_plan(config: SynthesisConfig, num_classes: int) -> PrivacyPlan:
    m = config.mechanism
    if m.name == "pcevolve":
        return plan_pcevolve(
            config.privacy.epsilon,
            config.privacy.delta,
            iterations=m.iterations,
            classes=num_classes,
            draws_per_class=m.select,
            epsilon_per_draw=m.epsilon_per_draw,
        )
    return plan_pe(
        config.privacy.epsilon,
        config.privacy.delta,
        iterations=m.iterations,
        noise_multiplier=m.noise_multiplier,
        noise=m.noise,
        nearest=m.nearest,
    )


class Synthesizer:
    """Holds the generator, the embedding and the private data for one run."""

    def __init__(
        self, config: SynthesisConfig, generator=None, embedding: Embedding | None = None
    ) -> None:
        from generators import load_generator

        self.config = config
        self.gen = (
            generator
            if generator is not None
            else load_generator(config.generator.spec, **config.generator.options)
        )
        mode = config.variation.mode or self.gen.variation_modes[0]
        if mode not in self.gen.variation_modes:
            raise SynthesisConfigError(
                f"variation.mode {mode!r} is not available for {self.gen.name}; valid: "
                f"{', '.join(self.gen.variation_modes)}"
            )
        self.mode = mode
        self.embedding = (
            embedding
            if embedding is not None
            else load_embedding(config.embedding.name, config.embedding.weights, self.gen)
        )
        self.private, self.heldout = load_private(config, self.gen.resolution, self.gen.channels)
        self.class_names = self.private.class_names
        self.num_classes = len(self.class_names)
        if config.mechanism.name == "pcevolve" and self.num_classes < 2:
            raise SynthesisConfigError(
                "mechanism pcevolve needs at least 2 classes (its contrastive filter compares class centres)"
            )
        # the budget is checked before anything is generated
        self.plan = make_plan(config, self.num_classes)
        self.torch_rng = torch.Generator().manual_seed(config.seed)
        self.rng = np.random.default_rng(config.seed)
        self.private_embeddings = self.embedding(self.private.images)
        self.centres = class_centres(self.private_embeddings, self.private.labels, self.num_classes)
        self._prompts = None
        self._embedding_cache: tuple[Population, torch.Tensor, dict] | None = None
        if config.generator.prompt is not None:
            if not hasattr(self.gen, "set_prompt"):
                raise SynthesisConfigError(
                    f"generator.prompt needs a prompt-conditioned generator (Stable Diffusion); {self.gen.name} is not"
                )
            self._prompts = [config.generator.prompt.format(label=c) for c in self.class_names]

    # ------------------------------------------------------------------ generation

    def _condition(self, c: int) -> None:
        if self._prompts is not None:
            self.gen.set_prompt(self._prompts[c])

    def initial(self, c: int, n: int) -> Population:
        self._condition(c)
        latents = self.gen.sample_latents(n, self.torch_rng)
        return Population(self.gen.synthesize(latents), latents)

    def offspring(
        self, c: int, parents: Population, counts: np.ndarray, n: int, strength: float
    ) -> Population:
        """``n`` variations of parents drawn in proportion to their selection counts."""
        self._condition(c)
        p = counts / counts.sum()
        pick = torch.from_numpy(self.rng.choice(len(p), size=n, replace=True, p=p))
        images = parents.images[pick]
        latents = parents.latents[pick] if parents.latents is not None else None
        v = self.gen.vary(
            strength, latents=latents, images=images, generator=self.torch_rng, mode=self.mode
        )
        return Population(v.images, v.latents)

    # ------------------------------------------------------------------ selection

    def _embedded(self, population: Population) -> tuple[torch.Tensor, dict]:
        """The population's embeddings and a per-population cache of its k-means clusters,
        computed once per population: in round 1 every class shares one pool."""
        cached = self._embedding_cache
        if cached is None or cached[0] is not population:
            cached = (population, self.embedding(population.images), {})
            self._embedding_cache = cached
        return cached[1], cached[2]

    def threshold(self) -> float:
        """The PE histogram threshold H: post-processing of the noisy histogram, no privacy."""
        m, sigma = self.config.mechanism, self.plan.noise_multiplier
        if m.threshold is not None:
            return m.threshold
        if m.noise == "laplace":
            # half of one image's vote, plus 1.5 noise scales: an empty bin passes with
            # probability exp(-1.5 - vote/(2b))/2 (at most 11%; 0.08% at b = 0.1 with one vote)
            return 0.5 / math.sqrt(m.nearest) + 1.5 * sigma
        if m.cluster_size > 0:
            # over clusters the default threshold is 2 sigma (measured better than sigma at
            # epsilon 5 and 10, docs/synthesize.md)
            return 2 * sigma
        return sigma

    def label_pool(
        self, populations: list[Population], strength: float
    ) -> tuple[list[Population], list[dict]]:
        """``export.source: pool``: the last round over the candidates of all classes at once.
        Each class votes over the pool's bins (k-means clusters with ``cluster_size``, else
        single candidates) with PE's noisy histogram, exactly as in :meth:`select`; a bin takes
        the class with the highest noisy count where one passes the threshold; every candidate
        takes the class of its nearest labelled bin; ``export.per_class`` are drawn per class
        from its candidates (distinct first; the rest are variations of them)."""
        m, cfg = self.config.mechanism, self.config
        unique: dict[int, Population] = {}
        for p in populations:  # round 1's populations are one shared pool
            unique.setdefault(id(p), p)
        parts = list(unique.values())
        images = torch.cat([p.images for p in parts])
        latents = (
            torch.cat([p.latents for p in parts])
            if all(p.latents is not None for p in parts)
            else None
        )
        emb = self.embedding(images)
        bins = self.cluster_centroids(emb) if m.cluster_size > 0 else emb.double()
        noisy = np.stack(
            [
                noisy_histogram(
                    pe_histogram(
                        bins, self.private_embeddings[self.private.labels == c], m.nearest
                    ),
                    self.plan.noise_multiplier,
                    self.rng,
                    m.noise,
                )
                for c in range(self.num_classes)
            ]
        )
        bin_labels = label_bins(noisy, self.threshold())
        labels = label_by_nearest_bin(emb, bins, bin_labels)
        out, info = [], []
        n = cfg.export.per_class
        for c in range(self.num_classes):
            members = np.flatnonzero(labels == c)
            info.append(
                {
                    "class": self.class_names[c],
                    "bins_labelled": int((bin_labels == c).sum()),
                    "candidates_labelled": len(members),
                }
            )
            if len(members) == 0:
                # no candidate is nearest to a bin of c (or there are fewer bins than classes):
                # c keeps the candidate nearest to its highest-voted bin, so that no class of
                # the export is empty (post-processing again)
                best = bins[int(noisy[c].argmax())].unsqueeze(0)
                members = torch.cdist(emb.double(), best.double()).argmin(0).numpy()
            order = self.rng.permutation(members)
            keep = torch.from_numpy(order[:n])
            chosen = Population(images[keep], None if latents is None else latents[keep])
            if n > len(members):  # the rest: variations of the class's candidates
                counts = np.zeros(len(images))
                counts[members] = 1
                extra = self.offspring(
                    c, Population(images, latents), counts, n - len(members), strength
                )
                chosen = Population(
                    torch.cat([chosen.images, extra.images]),
                    None
                    if latents is None or extra.latents is None
                    else torch.cat([chosen.latents, extra.latents]),
                )
            out.append(chosen)
        return out, info

    def cluster_centroids(self, emb: torch.Tensor) -> torch.Tensor:
        """The k-means centroids PE votes over (``cluster_size`` candidates each on average),
        a function of the public candidates only."""
        k = max(1, round(emb.shape[0] / self.config.mechanism.cluster_size))
        return kmeans(emb, k, seed=self.config.seed)

    def select(self, c: int, population: Population, strength: float) -> tuple[np.ndarray, dict]:
        m = self.config.mechanism
        emb, clusters = self._embedded(population)
        if m.name == "pcevolve":
            utility = pcevolve_utility(emb, self.centres, c, m.tau)
            counts = exponential_mechanism(utility, self.plan.epsilon_per_draw, m.select, self.rng)
            return counts, {"filtered": int((utility == 0).sum())}
        if m.lookahead > 0:
            self._condition(c)
            views = []
            for _ in range(m.lookahead):
                v = self.gen.vary(
                    strength,
                    latents=population.latents,
                    images=population.images,
                    generator=self.torch_rng,
                    mode=self.mode,
                )
                views.append(self.embedding(v.images))
            emb = torch.stack(views).mean(0)
            clusters = {}  # this class's own (random) views: nothing to share
        own = self.private_embeddings[self.private.labels == c]
        sigma = self.plan.noise_multiplier
        threshold = self.threshold()
        if m.cluster_size > 0:
            # the clusters are a function of the public candidates only; each private image
            # still votes with one L2-norm-1 vector, now over the clusters
            if "kmeans" not in clusters:  # once per population (round 1: one shared pool)
                centroids = self.cluster_centroids(emb)
                clusters["kmeans"] = (
                    centroids,
                    torch.cdist(emb.double(), centroids).argmin(1).numpy(),
                )
            centroids, assign = clusters["kmeans"]
            histogram = pe_histogram(centroids, own, m.nearest)
            cluster_counts, noisy = pe_select(
                histogram, sigma, threshold, m.select, self.rng, m.noise
            )
            counts = spread_over_members(cluster_counts, assign, self.rng)
            return counts, {
                "clusters": int(centroids.shape[0]),
                "noisy_votes_above_threshold": int((noisy > threshold).sum()),
            }
        histogram = pe_histogram(emb, own, m.nearest)
        counts, noisy = pe_select(histogram, sigma, threshold, m.select, self.rng, m.noise)
        return counts, {"noisy_votes_above_threshold": int((noisy > threshold).sum())}

    # ------------------------------------------------------------------ the loop

    def run(self, on_progress: ProgressFn | None = None) -> SynthesisResult:
        m, cfg = self.config.mechanism, self.config
        start = time.perf_counter()
        if self._prompts is None:
            # unconditional: every class starts from one shared pool of prior samples (public),
            # so each class's first selection sees all classes x population candidates
            pool = self.initial(0, m.population * self.num_classes)
            populations = [pool] * self.num_classes
        else:
            populations = [self.initial(c, m.population) for c in range(self.num_classes)]
        history = []
        final_images, final_labels = [], []
        for it in range(1, m.iterations + 1):
            t0 = time.perf_counter()
            strength = strength_at(cfg, it)
            last = it == m.iterations
            info = []
            if last and cfg.export.source == "pool":
                populations, info = self.label_pool(populations, strength)
            else:
                for c in range(self.num_classes):
                    counts, details = self.select(c, populations[c], strength)
                    info.append(
                        {
                            "class": self.class_names[c],
                            "distinct_selected": int((counts > 0).sum()),
                            **details,
                        }
                    )
                    n = cfg.export.per_class if last else m.population
                    populations[c] = self.offspring(c, populations[c], counts, n, strength)
            spent = self.plan.spent_after(it, m.iterations)
            seconds = time.perf_counter() - t0
            history.append(
                {
                    "iteration": it,
                    "strength": round(strength, 4),
                    "epsilon_spent": _num(spent),
                    "seconds": round(seconds, 2),
                    "classes": info,
                }
            )
            if on_progress is not None:
                elapsed = time.perf_counter() - start
                on_progress(
                    {
                        "iteration": it,
                        "iterations": m.iterations,
                        "epsilon_spent": spent,
                        "epsilon": cfg.privacy.epsilon,
                        "seconds": elapsed,
                        "eta": elapsed / it * (m.iterations - it),
                    }
                )
        for c in range(self.num_classes):
            images = self._avoid_private_copies(c, populations[c].images)
            final_images.append(images)
            final_labels.append(torch.full((images.shape[0],), c, dtype=torch.int64))
        seconds = time.perf_counter() - start
        manifest = {
            "mechanism": m.name,
            "privacy": {
                **self.plan.to_dict(),
                "neighbouring": "add/remove one private image; class sizes public",
            },
            "generator": self.gen.describe(),
            "embedding": self.embedding.describe(),
            "variation": {
                "mode": self.mode,
                "strength_start": cfg.variation.strength_start,
                "strength_end": cfg.variation.strength_end,
            },
            "seed": cfg.seed,
            "iterations": m.iterations,
            "mechanism_settings": m.model_dump(mode="json"),
            "private": {
                "source": cfg.private.path or f"{cfg.private.dataset}:{cfg.private.split}",
                "images": len(self.private),
                "per_class": self.private.counts(),
            },
            "seconds": round(seconds, 2),
            "seconds_per_iteration": round(float(np.mean([h["seconds"] for h in history])), 3),
            "history": history,
        }
        return SynthesisResult(
            torch.cat(final_images),
            torch.cat(final_labels),
            self.class_names,
            self.plan,
            manifest,
            history,
        )

    def _avoid_private_copies(self, c: int, images: torch.Tensor, tries: int = 5) -> torch.Tensor:
        """Re-vary any synthetic image whose PNG would equal a private image pixel for pixel.
        For a continuous generator this practically never happens; it is a safety net."""
        private = {a.tobytes() for a in to_uint8(self.private.images)}
        for _ in range(tries):
            same = [i for i, a in enumerate(to_uint8(images)) if a.tobytes() in private]
            if not same:
                return images
            idx = torch.tensor(same)
            v = (
                self.gen.vary(
                    self.config.variation.strength_end or 0.5,
                    images=images[idx],
                    latents=None,
                    generator=self.torch_rng,
                    mode="image",
                )
                if "image" in self.gen.variation_modes
                else self.gen.vary(
                    1.0,
                    latents=self.gen.sample_latents(len(same), self.torch_rng),
                    generator=self.torch_rng,
                    mode="latent",
                )
            )
            images = images.clone()
            images[idx] = v.images
        keep = torch.tensor([a.tobytes() not in private for a in to_uint8(images)])
        return images[keep]


def _num(x: float):
    return "inf" if isinstance(x, float) and math.isinf(x) else round(float(x), 6)


def synthesize(
    config: SynthesisConfig,
    out: Path | None = None,
    *,
    evaluate: bool = False,
    overwrite: bool = False,
    on_progress: ProgressFn | None = None,
    generator=None,
    embedding: Embedding | None = None,
) -> SynthesisResult:
    """Run the loop; with ``out``, export the dataset there (atomically); with ``evaluate``,
    train the downstream classifiers and put both accuracies in the manifest."""
    from ktl.synthesize.export import check_output

    if out is not None:
        check_output(Path(out), overwrite)  # fail before spending minutes
    # the budget, before a generator loads (Stable Diffusion takes minutes); checked again,
    # with the same result, once the private data are read at the generator's size
    make_plan(config, private_class_count(config))
    synth = Synthesizer(config, generator=generator, embedding=embedding)
    if evaluate and synth.heldout is None:
        raise SynthesisConfigError(
            "--evaluate with private.path needs evaluate.heldout, a folder of real held-out images (<class>/*.png)"
        )
    result = synth.run(on_progress)
    if evaluate:
        from ktl.synthesize.evaluate import evaluate_downstream

        result.manifest["evaluation"] = evaluate_downstream(
            (result.images, result.labels),
            (synth.private.images, synth.private.labels),
            (synth.heldout.images, synth.heldout.labels),
            synth.num_classes,
            model=config.evaluate.model,
            steps=config.evaluate.steps,
            seed=config.seed,
        )
    result.manifest["config"] = config.model_dump(mode="json")
    if out is not None:
        write_dataset(
            Path(out),
            result.images,
            result.labels,
            result.class_names,
            result.manifest,
            overwrite=overwrite,
        )
    return result


__all__ = ["PrivateDataError", "SynthesisResult", "Synthesizer", "synthesize"]
