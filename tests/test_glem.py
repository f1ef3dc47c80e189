"""Tests of nfpi.glem: RFCM full covariances, CE class codes, and GLEM's EM schedule in
nfpi.train (GLEM §4.3 Algorithm 1, §5.2, Tables 5-6). Tiny flows on scikit-learn digits."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from nfpi import data, fpi, glem
from nfpi.glem import ClassCodes, CodeConfig, FullGaussians
from nfpi.priors import ClassGaussians
from nfpi.train import TrainConfig, _fit, load_checkpoint, load_data, train

TINY = {
    "dataset": "digits", "bits": 5, "per_class": 40, "epochs": 1, "batch_size": 100,
    "eval_batch_size": 200, "init_images": 200, "seed": 1, "threads": 1,
    "model": {"levels": 2, "steps": 1, "hidden": 8},
    "optim": {"warmup": 5, "ema": 0.9},
    "gaussians": {"prior": "fpi", "lam": 40.0},
}

@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """One intra-op thread: these tiny tensors gain nothing from threads, and on a busy shared
    CPU OpenMP spin-waiting makes them many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(**overrides) -> TrainConfig:
    return TrainConfig.from_dict(TINY, **overrides)


def correlated(n: int, d: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents (n, d) of k classes with class-specific full covariances, float64."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % k
    mix = torch.randn(k, d, d, generator=g, dtype=torch.float64)
    z = (mix[y] @ torch.randn(n, d, 1, generator=g, dtype=torch.float64)).squeeze(2)
    return z + 3 * torch.randn(k, d, generator=g, dtype=torch.float64)[y], y


# ---------------------------------------------------------------------------------- RFCM
def test_rfcm_full_covariance_is_the_empirical_covariance():
    z, y = correlated(600, 6, 3)
    g = FullGaussians.from_latents(z, y, 3, floor=1e-9)
    for c in range(3):
        zc = z[y == c].numpy()
        np.testing.assert_allclose(g.means[c].numpy(), zc.mean(0), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(g.covariance()[c].double().numpy(), np.cov(zc.T, bias=True), rtol=1e-4, atol=1e-5)


def test_rfcm_log_prob_matches_a_full_gaussian_and_classifies():
    z, y = correlated(600, 5, 3, seed=1)
    g = FullGaussians.from_latents(z, y, 3)
    cov = torch.stack([torch.from_numpy(np.cov(z[y == c].numpy().T, bias=True)) for c in range(3)])
    ref = torch.distributions.MultivariateNormal(g.means.double(), covariance_matrix=cov)
    np.testing.assert_allclose(g.log_prob(z[:50].float()).double().numpy(), ref.log_prob(z[:50, None]).numpy(),
                               rtol=1e-3, atol=1e-3)
    assert g.nll(z[:50].float(), y[:50]).shape == (50,)
    # Classes are well separated: the re-estimated Gaussians classify their own data.
    assert (g.predict(z.float()) == y).double().mean() > 0.95


def test_rfcm_low_rank_keeps_variances_and_top_axes():
    z, y = correlated(800, 10, 2, seed=2)
    g = FullGaussians.from_latents(z, y, 2, rank=3)
    assert g.rank == 3
    for c in range(2):
        zc = z[y == c]
        np.testing.assert_allclose(g.covariance()[c].diagonal().double().numpy(), zc.var(0, unbiased=False).numpy(),
                                   rtol=1e-4)
        top = torch.linalg.eigh(torch.from_numpy(np.cov(zc.numpy().T, bias=True)))[1][:, -3:]
        factor = g.factor[c].double()
        # The factor spans the top-3 principal axes.
        np.testing.assert_allclose(torch.linalg.svdvals(top.T @ torch.linalg.qr(factor)[0]).numpy(), 1.0, atol=1e-4)


def test_rfcm_samples_have_the_covariance_scaled_by_temperature():
    z, y = correlated(600, 4, 2, seed=3)
    g = FullGaussians.from_latents(z, y, 2)
    labels = torch.zeros(40000, dtype=torch.long)
    s = g.sample(labels, temperature=0.5, mean_scale=1.3, generator=torch.Generator().manual_seed(0)).double()
    np.testing.assert_allclose(s.mean(0).numpy(), 1.3 * g.means[0].double().numpy(), atol=0.05)
    np.testing.assert_allclose(np.cov(s.numpy().T), 0.25 * g.covariance()[0].double().numpy(), atol=0.05)


def test_rfcm_errors_say_what_to_do():
    z, y = correlated(100, 8, 2)
    with pytest.raises(ValueError, match="pass rank=r"):
        FullGaussians.from_latents(z, y, 2, max_full_dim=4)
    with pytest.raises(ValueError, match=r"rank must lie in \[1, D=8\]"):
        FullGaussians.from_latents(z, y, 2, rank=9)
    with pytest.raises(ValueError, match="N_y >= 2"):
        FullGaussians.fit([z[:1], z[1:3]])


# ---------------------------------------------------------------------------------- CE codes
def test_codes_are_deterministic_separated_and_in_range():
    a = ClassCodes.learn(10, (1, 4, 8), seed=3)
    b = ClassCodes.learn(10, (1, 4, 8), seed=3)
    assert torch.equal(a.prototypes, b.prototypes)
    assert a.prototypes.abs().max() <= 0.8
    # Far apart compared with the training noise (0.1 per pixel, mean squared 0.0033).
    assert a.min_distance() > 0.5
    assert not torch.equal(a.prototypes, ClassCodes.learn(10, (1, 4, 8), seed=4).prototypes)


@pytest.mark.parametrize("bits", [3, 5, 8])
def test_code_round_trip_through_quantisation(bits):
    arrays = data.load("digits", "train")
    codes = ClassCodes.learn(10, (1, 4, 8))
    coded = codes.append_arrays(arrays, noise=0.1, seed=0)
    assert coded.shape == (1, 12, 8)
    assert torch.equal(coded.x[:, :, :8], arrays.x)  # the image itself is untouched
    x = data.dequantize(data.quantize(coded.x, bits), bits, noise=False)
    assert torch.equal(codes.decode(x), arrays.y)
    image, rows = codes.split(x)
    assert image.shape[2:] == (8, 8) and rows.shape[2:] == (4, 8)


def test_float_append_and_random_test_rows():
    codes = ClassCodes.learn(3, (1, 2, 4))
    x = torch.zeros(6, 1, 4, 4)
    y = torch.tensor([0, 1, 2, 2, 1, 0])
    assert torch.equal(codes.decode(codes.append(x, y, noise=0.2, generator=torch.Generator().manual_seed(0))), y)
    arrays = data.ImageArrays(torch.zeros(6, 1, 4, 4, dtype=torch.uint8), y, ("a", "b", "c"))
    rows = codes.append_random(arrays, seed=0).x[:, :, 4:]
    assert rows.float().std() > 30  # uniform 0..255, not the prototypes
    with pytest.raises(ValueError, match=r"\(N, 1, H, 4\)"):
        codes.decode(torch.zeros(2, 1, 6, 5))


def test_code_config_validation():
    with pytest.raises(ValueError, match="codes.noise"):
        CodeConfig(rows=4, amplitude=0.5, noise=0.5)
    with pytest.raises(ValueError, match="codes.rows"):
        CodeConfig(rows=-1)


def test_training_with_codes_and_a_monomodal_prior(tmp_path):
    cfg = tiny(**{"codes.rows": 4, "gaussians.prior": "standard"})
    train_set, test_set = load_data(cfg)
    assert train_set.shape == test_set.shape == (1, 12, 8)
    train(cfg, tmp_path, progress=False)
    model, prior, loaded = load_checkpoint(tmp_path)
    assert model.in_shape == (1, 12, 8) and loaded.codes.rows == 4
    # CE baseline: one standard normal for every class, never refitted.
    assert torch.equal(prior.means, torch.zeros_like(prior.means))
    assert torch.equal(prior.variances, torch.ones_like(prior.variances))
    assert json.loads((tmp_path / "metrics.json").read_text())["solves"] == []


# ---------------------------------------------------------------------------------- EM
def test_em_alternation_changes_the_gaussians_and_anneals_lambda(tmp_path):
    cfg = tiny(epochs=1, **glem.em_overrides(lam=400.0, merge_epoch=1, lam_decay=0.5, gd_steps=30))
    train(cfg, tmp_path, progress=False)
    first = load_checkpoint(tmp_path)[1]
    train(cfg.replace(epochs=2), tmp_path, progress=False)  # resumes: one more E-step and M-step
    second = load_checkpoint(tmp_path)[1]
    assert not torch.allclose(first.means, second.means)
    train(cfg.replace(epochs=3), tmp_path, progress=False)  # after merge_epoch: no M-step
    third = load_checkpoint(tmp_path)[1]
    assert torch.equal(second.means, third.means) and torch.equal(second.variances, third.variances)
    solves = json.loads((tmp_path / "metrics.json").read_text())["solves"]
    assert [s["epoch"] for s in solves] == [0, 1]
    assert [s["lam"] for s in solves] == [400.0, 200.0]
    assert all(s["kind"] == "gd" for s in solves)


def test_warm_start_iterates_from_the_current_gaussians():
    z, y = correlated(300, 4, 3, seed=5)
    stats = fpi.ClassStats.from_latents(z, y, 3)
    start = ClassGaussians(stats.mean() + 2.0, stats.var())
    g = tiny(**glem.em_overrides(lam=1.0, merge_epoch=0, gd_steps=1, gd_lr=1e-4)).gaussians
    warm, _ = _fit(g, stats, 1.0, start)
    cold, _ = _fit(g, stats, 1.0)
    # One tiny gradient step: the warm solve stays at the start, the cold one at the data means.
    assert torch.allclose(warm.means, start.means, atol=1e-2)
    assert torch.allclose(cold.means, stats.mean().float(), atol=1e-2)


def test_annealing_options_are_validated():
    with pytest.raises(ValueError, match="lam_decay"):
        tiny(**{"gaussians.lam_decay": 0.0})
    with pytest.raises(ValueError, match="lam_min"):
        tiny(**{"gaussians.lam_min": 1e6})
    assert math.isclose(glem.em_overrides(5.0, 3)["gaussians.lam"], 5.0)
