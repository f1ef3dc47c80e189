"""The class-Gaussian prior: densities, classification, sampling, constructors (docs/method.md §5-§6)."""

import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributions import Independent, Normal

from nfpi.prior import ClassGaussians, ClassStats, fpi, interpolate


def random_prior(k=4, d=6, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return ClassGaussians(
        torch.randn(k, d, generator=g, dtype=dtype) * 3 + 10, torch.rand(k, d, generator=g, dtype=dtype) + 0.1
    )


@given(st.integers(1, 6), st.integers(1, 8), st.integers(0, 1000))
@settings(max_examples=25, deadline=None)
def test_log_prob_and_nll_match_torch_distributions(k, d, seed):
    prior = random_prior(k, d, seed)
    z = torch.randn(7, d, dtype=torch.float64) * 3 + 10
    ref = torch.stack(
        [
            Independent(Normal(prior.means[i].double(), prior.variances[i].double().sqrt()), 1).log_prob(z)
            for i in range(k)
        ],
        1,
    )
    assert torch.allclose(prior.log_prob(z), ref, rtol=1e-5, atol=1e-4)
    y = torch.randint(0, k, (7,))
    assert torch.allclose(prior.nll(z, y), -ref.gather(1, y[:, None]).squeeze(1), rtol=1e-5, atol=1e-4)
    assert torch.equal(prior.predict(z), prior.log_prob(z).argmax(1))


def test_sampling_moments_temperature_and_mean_scale():
    prior = random_prior(3, 4, dtype=torch.float32)
    y = torch.full((40_000,), 1)
    g = torch.Generator().manual_seed(0)
    z = prior.sample(y, temperature=0.5, mean_scale=1.3, generator=g)
    assert torch.allclose(z.mean(0), 1.3 * prior.means[1], atol=0.03)
    assert torch.allclose(z.var(0), 0.25 * prior.variances[1], rtol=0.05)
    # a float64 CPU copy draws the same samples as float64 arithmetic on the float32 buffers
    copy = prior.cpu64()
    assert copy.means.dtype == torch.float64 and prior.means.dtype == torch.float32
    z64 = copy.sample(y[:50], 0.5, generator=torch.Generator().manual_seed(1))
    eps = torch.randn(50, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert torch.equal(z64, prior.means[1].double() + 0.5 * prior.variances[1].double().sqrt() * eps)
    # samples of a class are classified as that class when the classes are well apart
    far = ClassGaussians(torch.eye(3) * 20, torch.ones(3, 3))
    yy = torch.arange(3).repeat(100)
    assert torch.equal(far.predict(far.sample(yy)), yy)


def test_interpolation_endpoints_and_rescaling():
    z1, z2 = torch.randn(5), torch.randn(5)
    path = interpolate(z1, z2, 5)
    assert path.shape == (5, 5)
    assert torch.allclose(path[0], z2) and torch.allclose(path[-1], z1)
    mid = (0.5 * z1 + 0.5 * z2) / (0.5**0.5)
    assert torch.allclose(path[2], mid)


def test_constructors_and_buffers_round_trip():
    z = torch.randn(60, 3, dtype=torch.float64)
    y = torch.arange(60) % 3
    stats = ClassStats.from_latents(z, y, 3)
    data = ClassGaussians.from_stats(stats)
    assert torch.allclose(data.means.double(), stats.mean(), atol=1e-6)
    assert torch.equal(ClassGaussians.from_stats(stats, identity_variances=True).variances, torch.ones(3, 3))
    res = fpi.solve(stats, 1.0)
    assert torch.allclose(ClassGaussians.from_result(res).variances.double(), res.variances, atol=1e-6)
    rnd = ClassGaussians.random(5, 7, generator=torch.Generator().manual_seed(0))
    assert rnd.means.abs().max() <= 1 and (rnd.variances >= 0.125).all() and (rnd.variances <= 1.25).all()
    buf = io.BytesIO()
    torch.save(data.state_dict(), buf)
    buf.seek(0)
    fresh = ClassGaussians(torch.zeros(3, 3), torch.ones(3, 3))
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(fresh.means, data.means) and torch.equal(fresh.variances, data.variances)


def test_bad_input_errors():
    prior = random_prior()
    with pytest.raises(ValueError, match=r"latents must be \(B, 6\)"):
        prior.log_prob(torch.zeros(2, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\)"):
        prior.nll(torch.zeros(2, 6, dtype=torch.float64), torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="positive"):
        ClassGaussians(torch.zeros(2, 2), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="NaN"):
        ClassGaussians(torch.full((2, 2), float("nan")), torch.ones(2, 2))
