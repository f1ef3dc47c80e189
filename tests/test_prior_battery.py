"""One battery for the interface both class priors share: the diagonal
:class:`nfpi.prior.ClassGaussians` and the full-covariance ``FullGaussians`` (RFCM).

``log_prob``, ``nll``, ``predict``, ``sample``, ``dim``/``num_classes``, buffers and bad
input are checked against float64 torch.distributions references; bad labels and NaN
parameters must give the same ValueErrors from both.
"""

import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributions import Independent, MultivariateNormal, Normal

from nfpi.prior import ClassGaussians, FullGaussians


def diagonal(k, d, seed):
    """ClassGaussians with random parameters, and its (K, D, D) float64 covariances."""
    g = torch.Generator().manual_seed(seed)
    prior = ClassGaussians(
        torch.randn(k, d, generator=g, dtype=torch.float64) * 3 + 10,
        torch.rand(k, d, generator=g, dtype=torch.float64) + 0.1,
    )
    return prior, torch.diag_embed(prior.variances.double())


def full(k, d, seed):
    """FullGaussians (rank min(2, D) + diagonal) with random parameters, and its covariances."""
    g = torch.Generator().manual_seed(seed)
    prior = FullGaussians(
        torch.randn(k, d, generator=g, dtype=torch.float64) * 3 + 10,
        torch.randn(k, d, min(2, d), generator=g, dtype=torch.float64) * 0.7,
        torch.rand(k, d, generator=g, dtype=torch.float64) + 0.1,
    )
    factor = prior.factor.double()
    return prior, factor @ factor.mT + torch.diag_embed(prior.diag.double())


KINDS = {"diagonal": diagonal, "full": full}


def reference(prior, cov):
    """log N(z; mu_y, Sigma_y) by torch.distributions in float64, as a function z -> (N, K)."""
    means = prior.means.double()
    if isinstance(prior, ClassGaussians):
        dists = [Independent(Normal(means[i], cov[i].diagonal().sqrt()), 1) for i in range(len(means))]
    else:
        dists = [MultivariateNormal(means[i], covariance_matrix=cov[i]) for i in range(len(means))]
    return lambda z: torch.stack([dist.log_prob(z) for dist in dists], 1)


def latents(prior, n, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, prior.dim, generator=g, dtype=dtype) * 3 + 10).to(dtype)


@pytest.fixture(params=list(KINDS))
def kind(request):
    return KINDS[request.param]


# ----------------------------------------------------------------------- densities
@pytest.mark.parametrize("name", list(KINDS))
@given(k=st.integers(1, 6), d=st.integers(1, 7), seed=st.integers(0, 10_000))
@settings(max_examples=20, deadline=None)
def test_log_prob_nll_and_predict_match_the_float64_reference(name, k, d, seed):
    prior, cov = KINDS[name](k, d, seed)
    z = latents(prior, 9, seed)
    logp = prior.log_prob(z)
    assert logp.shape == (9, k) and logp.dtype == torch.float64
    ref = reference(prior, cov)(z)
    assert torch.allclose(logp, ref, rtol=1e-10, atol=1e-9)
    y = torch.randint(0, k, (9,), generator=torch.Generator().manual_seed(seed))
    assert torch.allclose(prior.nll(z, y), -ref.gather(1, y[:, None]).squeeze(1), rtol=1e-10, atol=1e-9)
    # nll is -log_prob at the label (ClassGaussians evaluates it directly, hence the rounding)
    assert torch.allclose(prior.nll(z, y), -logp.gather(1, y[:, None]).squeeze(1), rtol=1e-12, atol=1e-10)
    assert torch.equal(prior.predict(z), logp.argmax(1))


def test_float32_latents_give_float32_scores(kind):
    prior, cov = kind(4, 3, 0)
    z = latents(prior, 5, 1, torch.float32)
    logp = prior.log_prob(z)
    assert logp.dtype == torch.float32 and logp.shape == (5, 4)
    assert torch.allclose(logp.double(), reference(prior, cov)(z.double()), rtol=1e-5, atol=1e-4)
    assert prior.nll(z, torch.arange(5) % 4).dtype == torch.float32


def test_dim_and_num_classes(kind):
    prior, _ = kind(5, 3, 0)
    assert (prior.num_classes, prior.dim) == (5, 3)
    assert prior.means.shape == (5, 3)


# ------------------------------------------------------------------------ sampling
def test_sample_shape_moments_and_classes(kind):
    """sample(y, T): (B, D), class y's mean and T^2 Sigma_y as covariance; well separated
    classes are predicted back."""
    prior, cov = kind(3, 2, 0)
    y = torch.full((40_000,), 1)
    z = prior.sample(y, temperature=0.5, generator=torch.Generator().manual_seed(0))
    assert z.shape == (40_000, 2)
    assert torch.allclose(z.mean(0).double(), prior.means[1].double(), atol=0.03)
    assert torch.allclose(torch.cov(z.T.double()), 0.25 * cov[1], atol=0.02)
    yy = torch.arange(3).repeat(50)
    far, _ = kind(3, 2, 0)
    far.means.copy_(torch.tensor([[0.0, 0.0], [40.0, 0.0], [0.0, 40.0]]))
    assert torch.equal(far.predict(far.sample(yy, generator=torch.Generator().manual_seed(1))), yy)


def test_temperature_zero_returns_the_scaled_class_means(kind):
    prior, _ = kind(4, 3, 2)
    y = torch.tensor([3, 0, 0, 2])
    assert torch.equal(prior.sample(y, temperature=0.0), prior.means[y])
    assert torch.equal(prior.sample(y, temperature=0.0, mean_scale=0.5), 0.5 * prior.means[y])


def test_sampling_is_reproducible_with_a_generator(kind):
    prior, _ = kind(4, 3, 3)
    y = torch.arange(4).repeat(3)
    a = prior.sample(y, generator=torch.Generator().manual_seed(7))
    b = prior.sample(y, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_buffers_round_trip_through_state_dict(kind):
    prior, _ = kind(3, 2, 4)
    buf = io.BytesIO()
    torch.save(prior.state_dict(), buf)
    buf.seek(0)
    fresh, _ = kind(3, 2, 5)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    z = latents(prior, 4, 0)
    assert torch.equal(fresh.log_prob(z), prior.log_prob(z))


# ----------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "bad, message",
    [
        (torch.zeros(2, 5, dtype=torch.float64), r"latents must be \(B, 3\), got \(2, 5\)"),
        (torch.zeros(5, dtype=torch.float64), r"latents must be \(B, 3\), got \(5,\)"),
        (
            torch.tensor([[0.0, float("nan"), 0.0]], dtype=torch.float64),
            r"latents contain NaN or inf in 1 row",
        ),
        (torch.tensor([[0.0, 0.0, float("inf")]], dtype=torch.float64), r"latents contain NaN or inf"),
    ],
)
def test_scoring_rejects_bad_latents(kind, bad, message):
    prior, _ = kind(4, 3, 0)
    with pytest.raises(ValueError, match=message):
        prior.log_prob(bad)
    with pytest.raises(ValueError, match=message):
        prior.predict(bad)


def test_nll_rejects_latents_of_the_wrong_width(kind):
    prior, _ = kind(4, 3, 0)
    with pytest.raises(ValueError, match=r"latents must be \(B, 3\)"):
        prior.nll(torch.zeros(2, 4, dtype=torch.float64), torch.tensor([0, 1]))


@pytest.mark.parametrize("labels", [[0, 4], [-1, 0]])
def test_sample_rejects_labels_out_of_range(kind, labels):
    prior, _ = kind(4, 3, 0)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\)"):
        prior.sample(torch.tensor(labels))


def test_constructors_reject_non_positive_variances_and_bad_shapes():
    means = torch.zeros(3, 2)
    with pytest.raises(ValueError, match="must be positive"):
        ClassGaussians(means, torch.zeros(3, 2))
    with pytest.raises(ValueError, match="must be positive"):
        FullGaussians(means, torch.ones(3, 2, 1), torch.zeros(3, 2))
    with pytest.raises(ValueError, match=r"\(K, D\)"):
        ClassGaussians(means, torch.ones(3, 3))
    with pytest.raises(ValueError, match=r"\(K, D\)"):
        FullGaussians(means, torch.ones(3, 2, 1), torch.ones(3, 3))


# ------------------------------------------------------------- bad labels and parameters
@pytest.mark.parametrize("name", ["diagonal", "full"])
@pytest.mark.parametrize(
    "labels, message",
    [
        (torch.tensor([0, 4]), r"labels must lie in \[0, 4\)"),
        (torch.tensor([0.0, 1.0]), r"labels must be an integer tensor"),
    ],
)
def test_nll_rejects_bad_labels(name, labels, message):
    prior, _ = KINDS[name](4, 3, 0)
    with pytest.raises(ValueError, match=message):
        prior.nll(torch.zeros(2, 3, dtype=torch.float64), labels)


@pytest.mark.parametrize("name", ["diagonal", "full"])
def test_sample_rejects_float_labels(name):
    prior, _ = KINDS[name](4, 3, 0)
    with pytest.raises(ValueError, match=r"labels must be an integer tensor"):
        prior.sample(torch.tensor([0.0, 1.0]))


@pytest.mark.parametrize("name", ["diagonal", "full"])
def test_constructor_rejects_nan_means(name):
    prior, _ = KINDS[name](2, 2, 0)
    params = [t.clone() for t in prior.buffers()]
    params[0][0, 0] = float("nan")  # the means buffer comes first in both
    with pytest.raises(ValueError, match="NaN"):
        type(prior)(*params)
