"""Tests of nfpi.prior.FullGaussians: GLEM's RFCM full covariances (GLEM Tables 5-6)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import correlated

from nfpi.prior import FullGaussians

pytestmark = pytest.mark.usefixtures("single_thread")


def test_rfcm_full_covariance_is_the_empirical_covariance():
    z, y = correlated(600, 6, 3)
    g = FullGaussians.from_latents(z, y, 3, floor=1e-9)
    for c in range(3):
        zc = z[y == c].numpy()
        np.testing.assert_allclose(g.means[c].numpy(), zc.mean(0), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(
            g.covariance()[c].double().numpy(), np.cov(zc.T, bias=True), rtol=1e-4, atol=1e-5
        )


def test_rfcm_log_prob_matches_a_full_gaussian_and_classifies():
    z, y = correlated(600, 5, 3, seed=1)
    g = FullGaussians.from_latents(z, y, 3)
    cov = torch.stack([torch.from_numpy(np.cov(z[y == c].numpy().T, bias=True)) for c in range(3)])
    ref = torch.distributions.MultivariateNormal(g.means.double(), covariance_matrix=cov)
    np.testing.assert_allclose(
        g.log_prob(z[:50].float()).double().numpy(), ref.log_prob(z[:50, None]).numpy(), rtol=1e-3, atol=1e-3
    )
    assert g.nll(z[:50].float(), y[:50]).shape == (50,)
    # Classes are well separated: the re-estimated Gaussians classify their own data.
    assert (g.predict(z.float()) == y).double().mean() > 0.95


def test_rfcm_low_rank_keeps_variances_and_top_axes():
    z, y = correlated(800, 10, 2, seed=2)
    g = FullGaussians.from_latents(z, y, 2, rank=3)
    assert g.rank == 3
    for c in range(2):
        zc = z[y == c]
        np.testing.assert_allclose(
            g.covariance()[c].diagonal().double().numpy(), zc.var(0, unbiased=False).numpy(), rtol=1e-4
        )
        top = torch.linalg.eigh(torch.from_numpy(np.cov(zc.numpy().T, bias=True)))[1][:, -3:]
        factor = g.factor[c].double()
        # The factor spans the top-3 principal axes.
        np.testing.assert_allclose(
            torch.linalg.svdvals(top.T @ torch.linalg.qr(factor)[0]).numpy(), 1.0, atol=1e-4
        )


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
