"""FedKTL: the ETF, the margin loss, the MMD, server alignment, generated pairs, the upload."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_config

from fl_core.algorithms import get_algorithm
from fl_core.algorithms.losses import mmd
from fl_core.config import build_config
from fl_core.engine.federation import Federation
from ktl.fedktl.knowledge import (
    FeatureTransformer,
    align,
    angular_margin_logits,
    client_latents,
    normalized_class_prototypes,
    simplex_etf,
    to_client_inputs,
)

FAST = {"generator_steps": 2, "server_epochs": 5}


@pytest.mark.parametrize("k", [2, 3, 10, 100])
def test_etf_is_a_simplex_etf(k):
    etf = simplex_etf(k, torch.Generator().manual_seed(k))
    assert etf.shape == (k, k)
    assert torch.allclose(etf.norm(dim=1), torch.ones(k), atol=1e-6)
    cos = etf.double() @ etf.double().t()
    off = cos[~torch.eye(k, dtype=torch.bool)]
    assert torch.allclose(off, torch.full_like(off, -1.0 / (k - 1)), atol=1e-6)


def test_etf_is_seeded():
    a = simplex_etf(5, torch.Generator().manual_seed(1))
    assert torch.equal(a, simplex_etf(5, torch.Generator().manual_seed(1)))
    assert not torch.equal(a, simplex_etf(5, torch.Generator().manual_seed(2)))


def test_angular_margin_moves_only_the_target_logit():
    g = torch.Generator().manual_seed(0)
    etf = simplex_etf(4, g)
    emb, y = torch.randn(6, 4, generator=g), torch.tensor([0, 1, 2, 3, 0, 1])
    plain = angular_margin_logits(emb, etf, None, 0.0, 1.0)
    assert torch.allclose(plain, F.normalize(emb, dim=1) @ etf.t(), atol=1e-6)
    out = angular_margin_logits(emb, etf, y, 0.5, 64.0)
    theta = torch.acos(plain.gather(1, y[:, None]).clamp(-1, 1))
    assert torch.allclose(out.gather(1, y[:, None]), 64 * torch.cos(theta + 0.5), atol=1e-4)
    mask = torch.ones_like(out, dtype=torch.bool).scatter(1, y[:, None], False)
    assert torch.allclose(out[mask], 64 * plain[mask], atol=1e-5)


def brute_rbf_mmd(x, y, bandwidths):
    z = torch.cat([x, y]).double()
    n, a = len(z), len(x)

    def k(i, j):
        d2 = float(((z[i] - z[j]) ** 2).sum())
        return sum(math.exp(-d2 / b) for b in bandwidths)

    xx = sum(k(i, j) for i in range(a) for j in range(a)) / a**2
    yy = sum(k(i, j) for i in range(a, n) for j in range(a, n)) / (n - a) ** 2
    xy = sum(k(i, j) for i in range(a) for j in range(a, n)) / (a * (n - a))
    return xx + yy - 2 * xy


def test_fixed_bandwidth_mmd_matches_brute_force_and_is_zero_for_equal_samples():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(6, 5, generator=g), torch.randn(4, 5, generator=g) + 0.5
    bw = [20.0, 30.0, 40.0, 100.0]
    assert float(mmd(x.double(), y.double(), bandwidths=bw)) == pytest.approx(
        brute_rbf_mmd(x, y, bw), rel=1e-9
    )
    assert abs(float(mmd(x, x.clone(), bandwidths=bw))) < 1e-6


def test_server_training_moves_transformed_prototypes_toward_the_prior():
    g = torch.Generator().manual_seed(0)
    k, latent = 5, 12
    protos = F.normalize(torch.randn(40, k, generator=g), dim=1)
    labels = torch.arange(40) % k
    transformer = FeatureTransformer(k, latent, torch.Generator().manual_seed(1))
    centroids = torch.nn.Parameter(torch.randn(k, latent, generator=g))
    prior_rng = torch.Generator().manual_seed(2)

    def prior(n):  # a prior far from where F starts: N(3, 2^2)
        return 3.0 + 2.0 * torch.randn(n, latent, generator=prior_rng)

    reference = prior(400)

    def distance() -> float:
        transformer.eval()
        with torch.no_grad():
            return float(mmd(transformer(protos), reference))

    before = distance()
    losses = align(
        transformer, centroids, protos, labels, prior,
        epochs=60, batch_size=20, lr=0.01, lam=0.1, generator=torch.Generator().manual_seed(3),
        prior_norm=False,
    )  # fmt: skip
    after = distance()
    assert len(losses) == 60 and losses[-1] < losses[0]
    assert after < 0.5 * before
    transformer.eval()
    with torch.no_grad():
        q = transformer(protos)
    assert abs(float(q.mean()) - 3.0) < abs(0.0 - 3.0) / 2  # moved most of the way to the mean
    # centroids end as the class means of the transformed prototypes
    for c in range(k):
        assert torch.allclose(centroids[c], q[labels == c].mean(0), atol=1e-5)


def test_pairs_take_the_clients_shape_channels_and_normalisation():
    rgb = torch.rand(3, 3, 64, 48)
    norm = {"mean": [0.5], "std": [0.25]}
    out = to_client_inputs(rgb, (1, 28, 28), norm)
    assert out.shape == (3, 1, 28, 28)
    flat = torch.full((1, 3, 32, 32), 0.75)
    assert torch.allclose(
        to_client_inputs(flat, (1, 28, 28), norm), torch.full((1, 1, 28, 28), 1.0)
    )
    grey = torch.full((2, 1, 28, 28), 0.2)
    out = to_client_inputs(grey, (3, 32, 32), {"mean": [0.1, 0.2, 0.3], "std": [0.5, 0.5, 0.5]})
    assert out.shape == (2, 3, 32, 32)
    assert torch.allclose(out[:, 0], torch.full((2, 32, 32), 0.2), atol=1e-6)
    assert torch.allclose(out[:, 2], torch.full((2, 32, 32), -0.2), atol=1e-6)
    with pytest.raises(ValueError, match="channels"):
        to_client_inputs(torch.rand(1, 2, 8, 8), (3, 8, 8), None)


def test_large_spatial_latents_are_pooled_for_the_clients():
    z = torch.randn(2, 4, 64, 64)
    pooled = client_latents(z, (4, 64, 64), 4096)
    assert pooled.shape == (2, 4 * 32 * 32)
    assert torch.allclose(pooled.view(2, 4, 32, 32)[0, 0, 0, 0], z[0, 0, :2, :2].mean())
    assert client_latents(torch.randn(3, 1, 28, 28), (1, 28, 28), 4096).shape == (3, 784)


def test_prototypes_are_normalised_class_means():
    x, y = torch.randn(10, 3), torch.tensor([0, 0, 1, 1, 1, 0, 1, 0, 0, 1])
    protos = normalized_class_prototypes(lambda t: t, x, y, 4, 3, torch.device("cpu"))
    assert protos.shape == (4, 3)
    for c in (0, 1):
        expected = F.normalize(F.normalize(x[y == c], dim=1).mean(0), dim=0)
        assert torch.allclose(protos[c], expected, atol=1e-6)
    assert torch.equal(protos[2:], torch.zeros(2, 3))


def test_upload_is_classes_times_k_floats_and_pairs_arrive_in_client_shape():
    cfg = tiny_config("fedktl", rounds=2, **FAST)
    fed = Federation(build_config(cfg))
    k = fed.dataset.num_classes
    up, down = fed.train_round(1)
    replies = fed.pending_replies
    for reply in replies.values():
        assert set(reply.message) == {"proto/local"}
        assert reply.message["proto/local"].shape == (k, k)
    assert up == len(replies) * k * k * 4  # float32
    assert down == len(replies) * k * k * 4  # round 1: only the ETF
    reported = fed.aggregate(1)
    # the server reports its alignment's loss: the mean of its last epoch
    assert reported == {"server_align_loss": fed.server.last_losses[-1]}
    message = fed.server.broadcast(2)
    images, latents = message["pairs/images"], message["pairs/latents"]
    assert images.shape[1:] == tuple(fed.dataset.input_shape)
    seen = int(fed.server.seen.sum())
    assert images.shape[0] == latents.shape[0] == seen  # one pair per class seen
    assert latents.shape[1] == fed.server.latent_dim
    fed.close()


def test_registered_through_the_entry_point_as_knowledge_transfer():
    algo = get_algorithm("fedktl")
    assert algo.family == "KT" and algo.heterogeneous
    assert algo.client_cls.__module__ == "ktl.fedktl.algorithm"


def test_bad_hyperparameters_get_a_clear_error():
    with pytest.raises(Exception, match="mu"):
        build_config(tiny_config("fedktl", mu=-1.0))
    with pytest.raises(Exception, match="unseen_classes"):
        build_config(tiny_config("fedktl", unseen_classes="maybe"))


# -- cloud-edge transfer (ktl transfer) ---------------------------------------------------------
def _digits_config(**algo):
    from fl_core.config import load_config

    sets = ["data.dataset=digits", "model.name=mlp", "model.feature_dim=16"]
    sets += [f"algorithm.{k}={v}" for k, v in {"name": "fedktl", **FAST, **algo}.items()]
    return load_config(None, sets)


def test_few_shot_split_has_k_shots_per_class_disjoint_from_its_test_split():
    from ktl.transfer import few_shot_dataset

    cfg = _digits_config()
    small = few_shot_dataset(cfg, 2, seed=0)
    large = few_shot_dataset(cfg, 5, seed=0)
    c = small.clients[0]
    assert small.num_classes == 10 and len(small.clients) == 1
    assert torch.bincount(c.train_y, minlength=10).tolist() == [2] * 10
    assert not set(c.train_indices.tolist()) & set(c.test_indices.tolist())
    # the test split does not depend on the shots, and k shots are a prefix of k' shots
    assert torch.equal(c.test_indices, large.clients[0].test_indices)
    for cls in range(10):
        few = c.train_indices[c.train_y == cls].tolist()
        more = large.clients[0].train_indices[large.clients[0].train_y == cls].tolist()
        assert few == more[:2]
    three_way = few_shot_dataset(cfg, 3, seed=1, ways=3)
    assert three_way.num_classes == 3
    assert set(three_way.clients[0].test_y.tolist()) == {0, 1, 2}


def test_transfer_summary_gains():
    from ktl.transfer import TransferRow, summarize

    rows = [
        TransferRow(2, 0, 0.0, 0.40, 0.40, 1.0),
        TransferRow(2, 1, 0.0, 0.50, 0.50, 1.0),
        TransferRow(2, 0, 50.0, 0.60, 0.60, 1.0),
        TransferRow(2, 1, 50.0, 0.80, 0.80, 1.0),
    ]
    (s,) = summarize(rows)
    assert s["client_only"] == pytest.approx(45.0) and s["with_ktl"] == pytest.approx(70.0)
    assert s["gain"] == pytest.approx(25.0)
    assert s["relative_gain"] == pytest.approx(25.0 / 45.0 * 100)
    assert s["client_only_std"] == pytest.approx(100 * math.sqrt(0.005))


def test_transfer_rows_of_another_configuration_are_refused_not_mixed(tmp_path):
    """A resumed table only reuses rows of the same configuration: the digest ignores the seed
    and where runs execute, and changes with anything they compute from."""
    import json

    from ktl.transfer import TransferRow, run_transfer, transfer_digest

    cfg = _digits_config()
    digest = transfer_digest(cfg)
    same = cfg.model_copy(update={"seed": 5, "threads": 1})
    assert transfer_digest(same) == digest
    assert transfer_digest(_digits_config(max_client_latent=16)) != digest
    rows_file = tmp_path / "rows.json"
    rows_file.write_text(json.dumps([TransferRow(2, 0, 0.0, 0.5, 0.5, 1.0, "0123").__dict__]))
    with pytest.raises(ValueError, match="another configuration"):
        run_transfer(cfg, [2], [0], rows_file=rows_file)
    # rows of this configuration are kept and not rerun
    kept = [
        TransferRow(2, 0, mu, 0.5, 0.5, 1.0, digest).__dict__
        for mu in (0.0, cfg.algorithm_hparams().mu)
    ]
    rows_file.write_text(json.dumps(kept))
    assert [r.__dict__ for r in run_transfer(cfg, [2], [0], rows_file=rows_file)] == kept


def test_bad_shot_counts_are_refused():
    from fl_core.data import DataError
    from ktl.transfer import few_shot_dataset

    with pytest.raises(DataError, match="shots"):
        few_shot_dataset(_digits_config(), 0, seed=0)
    with pytest.raises(DataError, match="ways"):
        few_shot_dataset(_digits_config(), 2, seed=0, ways=11)


def test_centroids_are_rescaled_to_the_prior_norm():
    g = torch.Generator().manual_seed(4)
    k, latent = 3, 8
    protos = F.normalize(torch.randn(9, k, generator=g), dim=1)
    labels = torch.arange(9) % k
    centroids = torch.nn.Parameter(torch.randn(k, latent, generator=g))
    prior_rng = torch.Generator().manual_seed(5)
    align(
        FeatureTransformer(k, latent, torch.Generator().manual_seed(6)), centroids, protos,
        labels, lambda n: 5.0 * torch.randn(n, latent, generator=prior_rng),
        epochs=3, batch_size=9, lr=0.01, lam=1.0, generator=torch.Generator().manual_seed(7),
    )  # fmt: skip
    norms = centroids.detach().norm(dim=1)
    assert torch.allclose(norms, norms.mean().expand(k), rtol=1e-5)
    assert abs(float(norms.mean()) - 5.0 * math.sqrt(latent)) < 0.15 * 5.0 * math.sqrt(latent)


def _held_out_r2(images: torch.Tensor, targets: torch.Tensor, train: int) -> tuple[float, float]:
    """R² on the training pairs and on held-out pairs of a cnn4 body + linear head trained to
    regress ``targets`` from ``images`` (as a FedKTL client's projection task does)."""
    from fl_core.models.registry import build_model

    torch.manual_seed(0)
    body = build_model("cnn4", tuple(images.shape[1:]), 10)
    head = torch.nn.Linear(body.feature_dim, targets.shape[1])
    opt = torch.optim.Adam([*body.parameters(), *head.parameters()], 1e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        idx = torch.randint(0, train, (20,), generator=g)
        loss = torch.nn.functional.mse_loss(head(body.body(images[idx])), targets[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    mean = targets[:train].mean(0)

    def r2(x: torch.Tensor, y: torch.Tensor) -> float:
        with torch.no_grad():
            return float(1 - ((head(body.body(x)) - y) ** 2).sum() / ((y - mean) ** 2).sum())

    return r2(images[:train], targets[:train]), r2(images[train:], targets[train:])


def test_why_transfer_from_the_builtin_generator_does_not_beat_mu_zero():
    """The issue asks for a tiny federation in which FedKTL beats its own run with the transfer
    task off (mu = 0), or for the reason it does not. With the builtin generator it barely
    does: ``benchmarks/results/fedktl.md`` (one edge client, Animal-MNIST, 3 seeds, the noise
    pooled to 4x4) shows +0.1 points at 2 shots (seed noise), +1.8 at 9 and +0.9 at 23, and
    regressing all 784 values (the reference's setting) lost 17-20 points at 9 shots; a tiny
    seed-fixed federation would show either sign by chance.

    The reason, asserted here: the transfer task asks a client to predict, from a generated
    image, the latent that generated it. For the builtin DDIM model that latent is the initial
    noise x_T, and it is not predictable from the image: a client-sized model fits its training
    pairs (R² near 1) and predicts held-out pairs worse than their mean (R² <= 0), whether it
    regresses all 784 values or the 4x4-pooled noise. Regressing x_T is memorisation, so it
    carries no knowledge to the body, and with the full latent its gradient competes with the
    classification loss. The same model and budget do learn a target that is a smooth function
    of the image (held-out R² > 0.5): it is the latent, not the task, that fails. FedKTL's
    results use StyleGAN, whose W latent is recoverable from the image (trained encoders invert
    it), which is what the transfer needs.
    """
    from generators import load_generator

    gen = load_generator("builtin", num_inference_steps=10)
    z = gen.sample_latents(120, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        images = torch.cat([gen.synthesize(z[i : i + 60]) for i in (0, 60)])
    images = (images - 0.5) / 0.5
    pooled_noise = torch.nn.functional.adaptive_avg_pool2d(z, 4).reshape(120, -1)
    for targets in (z.reshape(120, -1), pooled_noise):
        fit, held_out = _held_out_r2(images, targets, train=100)
        assert fit > 0.9 and held_out < 0.1, (fit, held_out)
    smooth = torch.nn.functional.adaptive_avg_pool2d(images, 4).reshape(120, -1)
    fit, held_out = _held_out_r2(images, smooth, train=100)
    assert fit > 0.9 and held_out > 0.5, (fit, held_out)
