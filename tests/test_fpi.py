"""The fixed-point solver: statistics, KL, stationarity of the fixed point, robustness (SPEC §2-§3, §5)."""
import math
import warnings

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch.distributions import Independent, MultivariateNormal, Normal, kl_divergence

from nfpi import fpi, gd
from nfpi.fpi import ClassStats, FPIWarning



@pytest.fixture(autouse=True, scope="module")
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def make_stats(k=6, d=5, n=60, sep=0.5, seed=0, full=False):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(k).repeat_interleave(n)
    scale = 0.5 + torch.rand(d, generator=g)
    z = torch.randn(k * n, d, generator=g) * scale + sep * torch.randn(k, d, generator=g)[y]
    return ClassStats.from_latents(z, y, k, full=full)


def naive_j(stats, mu, s, lam, alpha, pi):
    """J of SPEC §2 written pair by pair, pi detached: independent of the library's matrix forms."""
    k = stats.num_classes
    m = stats.total / stats.count[:, None]
    full = s.ndim == 3
    if full:
        v = stats.total_outer / stats.count[:, None, None] - m[:, :, None] * m[:, None, :]
        dists = [MultivariateNormal(mu[i], covariance_matrix=s[i]) for i in range(k)]
    else:
        v = stats.total_sq / stats.count[:, None] - m ** 2
        dists = [Independent(Normal(mu[i], s[i].sqrt()), 1) for i in range(k)]
    nll = 0.0
    for i in range(k):
        diff = m[i] - mu[i]
        if full:
            scat = v[i] + torch.outer(diff, diff)
            nll = nll + 0.5 * (torch.trace(torch.linalg.solve(s[i], scat)) + torch.logdet(s[i]))
        else:
            nll = nll + 0.5 * ((v[i] + diff ** 2) / s[i] + s[i].log()).sum()
    kl = {(i, j): kl_divergence(dists[i], dists[j]) for i in range(k) for j in range(k) if i != j}
    if pi == "pairwise":
        scale = {p: val.detach() for p, val in kl.items()}
    else:
        mean = sum(val.detach() for val in kl.values()) / len(kl)
        scale = {p: mean for p in kl}
    rep = sum(torch.exp(-kl[p] / (scale[p] * alpha)) for p in kl)
    return nll, lam / (k * (k - 1)) * rep


def stationarity(stats, res, lam, alpha, pi, learn):
    """Relative gradient residual of the naive J at the solver's output (natural units)."""
    mu = res.means.clone().requires_grad_(True)
    s = res.variances.clone().requires_grad_(True)
    nll, rep = naive_j(stats, mu, s, lam, alpha, pi)
    params = [p for p, on in ((mu, learn != "variances"), (s, learn != "means")) if on]
    g_nll = torch.autograd.grad(nll, params, retain_graph=True)
    g_rep = torch.autograd.grad(rep, params)
    sd = (res.variances.diagonal(dim1=-2, dim2=-1) if res.variances.ndim == 3 else res.variances).sqrt()
    scale = {id(mu): sd, id(s): res.variances if res.variances.ndim == 2 else torch.ones_like(res.variances)}

    def norm(gs):
        return math.sqrt(sum(float(((g * scale[id(p)]) ** 2).sum()) for g, p in zip(gs, params)))

    total = norm([a + b for a, b in zip(g_nll, g_rep)])
    size = math.sqrt(sum(p.numel() for p in params))
    return total / (norm(g_nll) + norm(g_rep) + 1e-12 * size)   # floor: both terms at rounding level


# ------------------------------------------------------------------------------ statistics
@given(st.integers(2, 5), st.integers(1, 4), st.integers(0, 10_000))
@settings(max_examples=25, deadline=None)
def test_class_stats_match_direct_and_merge(k, d, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.cat([torch.arange(k).repeat(2), torch.randint(0, k, (30,), generator=g)])
    z = torch.randn(len(y), d, generator=g) * 3 + 1
    whole = ClassStats.from_latents(z, y, k, full=True)
    parts = ClassStats.from_latents(z[:7], y[:7], k, full=True) + ClassStats.from_latents(z[7:], y[7:], k, full=True)
    for c in range(k):
        zc = z[y == c]
        assert torch.allclose(whole.mean()[c], zc.mean(0))
        assert torch.allclose(whole.var()[c], zc.var(0, unbiased=False))
        assert torch.allclose(whole.cov()[c], torch.cov(zc.T, correction=0).reshape(d, d))
    assert torch.allclose(parts.mean(), whole.mean()) and torch.allclose(parts.cov(), whole.cov())


def test_class_stats_reject_bad_input():
    z, y = torch.randn(10, 3), torch.arange(10) % 3
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        ClassStats.from_latents(z, y, 2)
    with pytest.raises(ValueError, match="NaN or inf"):
        ClassStats.from_latents(z.index_fill(0, torch.tensor([1]), math.nan), y, 3)
    with pytest.raises(ValueError, match=r"shape \(N, D\)"):
        ClassStats.from_latents(z[None], y, 3)
    few = ClassStats.from_latents(z[:4], torch.tensor([0, 0, 1, 2]), 3)
    with pytest.raises(ValueError, match=r"classes \[1, 2\] have fewer than 2 samples"):
        fpi.solve(few, 1.0)


# ---------------------------------------------------------------------------------- KL
@given(st.integers(2, 6), st.integers(1, 6), st.integers(0, 10_000), st.floats(0.1, 100.0))
@settings(max_examples=30, deadline=None)
def test_pairwise_kl_matches_torch_distributions(k, d, seed, shift):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(k, d, generator=g) + shift   # an offset stresses the expanded square
    s = torch.rand(k, d, generator=g) * 2 + 0.05
    kl = fpi.pairwise_kl(mu, s)
    dists = [Independent(Normal(mu[i], s[i].sqrt()), 1) for i in range(k)]
    ref = torch.stack([torch.stack([kl_divergence(p, q) for q in dists]) for p in dists])
    assert torch.allclose(kl, ref, rtol=1e-9, atol=1e-9)


def test_full_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(4, 3, 3, generator=g)
    cov = a @ a.mT + 0.5 * torch.eye(3)
    mu = torch.randn(4, 3, generator=g)
    dists = [MultivariateNormal(mu[i], cov[i]) for i in range(4)]
    ref = torch.stack([torch.stack([kl_divergence(p, q) for q in dists]) for p in dists])
    assert torch.allclose(fpi.pairwise_kl(mu, cov), ref, atol=1e-10)


def test_geometric_mean_solves_riccati():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(2, 3, 4, 4, generator=g)
    a, b = a @ a.mT + torch.eye(4), b @ b.mT + torch.eye(4)
    x = fpi.geometric_mean_solve(a, b)
    assert torch.allclose(x @ a @ x, b, atol=1e-9)
    assert (torch.linalg.eigvalsh(x) > 0).all()


def test_objective_gradient_is_that_of_j_with_pi_fixed():
    stats = make_stats()
    g = torch.Generator().manual_seed(3)
    mu = (stats.mean() + 0.3 * torch.randn(6, 5, generator=g)).requires_grad_(True)
    s = (stats.var() * (0.5 + torch.rand(6, 5, generator=g))).requires_grad_(True)
    for pi in ("pairwise", "mean"):
        ours = torch.autograd.grad(fpi.objective(stats, mu, s, 7.0, 10.0, pi), (mu, s))
        ref = torch.autograd.grad(sum(naive_j(stats, mu, s, 7.0, 10.0, pi)), (mu, s))
        for a, b in zip(ours, ref):
            assert torch.allclose(a, b, rtol=1e-8, atol=1e-10)


# ----------------------------------------------------------------------- the fixed point
@pytest.mark.parametrize("learn", ["both", "means", "variances"])
@pytest.mark.parametrize("pi", ["pairwise", "mean"])
@pytest.mark.parametrize("lam", [0.5, 3.0, 10.0])
def test_fixed_point_is_stationary(learn, pi, lam):
    stats = make_stats(k=6, d=5, sep=0.4)
    assert lam < fpi.unbounded_threshold(6)        # the bounded regime
    res = fpi.solve(stats, lam, pi=pi, learn=learn)
    assert res.converged and res.bounds_active == 0
    assert stationarity(stats, res, lam, 10.0, pi, learn) <= 1e-6
    assert fpi.gradient_residual(stats, res.means, res.variances, lam, pi=pi, learn=learn) <= 1e-6
    assert res.lam_normalised == pytest.approx(lam / 30)
    if learn == "means":   # the untouched block stays at its data value
        assert torch.equal(res.variances, stats.var())
    if learn == "variances":
        assert torch.equal(res.means, stats.mean())


@pytest.mark.parametrize("pi", ["pairwise", "mean"])
def test_means_only_is_bounded_at_any_lambda(pi):
    stats = make_stats(k=6, d=5, sep=0.1)
    res = fpi.solve(stats, 1e4, pi=pi, learn="means")
    assert res.converged
    assert stationarity(stats, res, 1e4, 10.0, pi, "means") <= 1e-6


@pytest.mark.parametrize("lam", [0.5, 3.0])
def test_full_covariance_fixed_point_is_stationary(lam):
    stats = make_stats(k=4, d=2, n=80, sep=0.6, full=True)
    res = fpi.solve(stats, lam, covariance="full")
    assert res.converged
    assert stationarity(stats, res, lam, 10.0, "pairwise", "both") <= 1e-6
    assert (torch.linalg.eigvalsh(res.variances) > 0).all()


@given(k=st.integers(2, 6), d=st.integers(1, 6), seed=st.integers(0, 10_000),
       frac=st.one_of(st.just(0.0), st.floats(1e-3, 0.5)), sep=st.floats(0.05, 3.0),
       learn=st.sampled_from(["both", "means", "variances"]), pi=st.sampled_from(["pairwise", "mean"]))
@settings(max_examples=40, deadline=None)
def test_random_statistics_converge_to_positive_stationary_points(k, d, seed, frac, sep, learn, pi):
    stats = make_stats(k=k, d=d, n=12, sep=sep, seed=seed)
    lam = frac * fpi.unbounded_threshold(k)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        res = fpi.solve(stats, lam, pi=pi, learn=learn, max_iter=3000)
    assert torch.isfinite(res.means).all() and (res.variances > 0).all()
    assert res.converged
    if res.bounds_active:   # J keeps decreasing outward (possible for pi="mean"): it must say so
        assert any("sit on the bound" in str(r.message) for r in record)
    elif lam > 0:
        assert stationarity(stats, res, lam, 10.0, pi, learn) <= 1e-6


@given(st.integers(2, 6), st.integers(1, 6), st.integers(0, 10_000))
@settings(max_examples=20, deadline=None)
def test_lambda_zero_returns_data_statistics_exactly(k, d, seed):
    stats = make_stats(k=k, d=d, n=5, seed=seed)
    res = fpi.solve(stats, 0.0)
    assert torch.equal(res.means, stats.mean()) and torch.equal(res.variances, stats.var())


def test_released_rule_lambda_zero_fixed_point_is_cube_root():
    stats = make_stats()
    res = fpi.solve(stats, 0.0, rule="released", learn="variances")
    assert torch.allclose(res.variances, stats.var() ** (1 / 3), rtol=1e-8)


def test_released_rule_and_isotropic_step_run_at_released_lambda():
    stats = make_stats(k=10, d=8, sep=0.3)
    res = fpi.solve(stats, 3e5, rule="released", isotropic_mean_step=True, pi="pairwise")
    assert torch.isfinite(res.means).all() and (res.variances > 0).all()
    # the repulsion moved the means apart
    assert fpi.pairwise_kl(res.means, res.variances).sum() > fpi.pairwise_kl(stats.mean(), stats.var()).sum()


# -------------------------------------------------------------------------------- robustness
@pytest.mark.parametrize("lam", [58.0, 1e3, 1e6])
def test_unbounded_regime_warns_and_stays_bounded(lam):
    stats = make_stats(k=10, d=16, sep=0.05)
    with pytest.warns(FPIWarning, match="unbounded below") as record:
        res = fpi.solve(stats, lam, max_iter=500)
    assert torch.isfinite(res.means).all() and torch.isfinite(res.variances).all()
    v = stats.var()
    assert (res.variances <= v * 1e3 * (1 + 1e-9)).all() and (res.variances >= v / 1e3 * (1 - 1e-9)).all()
    # the result says what happened: a bound is active, or it did not converge (with a warning)
    assert res.bounds_active > 0 or not res.converged
    said = " ".join(str(r.message) for r in record)
    assert ("sit on the bound" in said) or ("did not converge" in said)


def test_not_converged_can_raise():
    stats = make_stats(k=10, d=16, sep=0.05)
    with pytest.raises(fpi.FPIDivergenceError, match="did not converge"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FPIWarning)
            fpi.solve(stats, 1e3, learn="means", max_iter=2, on_fail="raise")


def test_degenerate_inputs():
    # zero variance in a dimension: floored, finite result
    z = torch.randn(40, 3)
    z[:, 1] = 2.0
    y = torch.arange(40) % 4
    stats = ClassStats.from_latents(z, y, 4)
    res = fpi.solve(stats, 5.0)
    assert (res.variances > 0).all() and torch.isfinite(res.means).all() and res.converged
    # identical class means, different variances: a symmetric stationary point, means stay equal
    z2 = torch.cat([torch.randn(50, 2), 3 * torch.randn(50, 2)])
    z2 = z2 - torch.cat([z2[:50].mean(0).expand(50, 2), z2[50:].mean(0).expand(50, 2)])
    y2 = torch.arange(100) // 50
    res2 = fpi.solve(ClassStats.from_latents(z2, y2, 2), 2.0)
    assert res2.converged and torch.allclose(res2.means[0], res2.means[1])
    # two identical Gaussians: pairwise pi = KL = 0 is undefined; pi="mean" is fine
    z3 = torch.randn(20, 2)
    stats3 = ClassStats.from_latents(torch.cat([z3, z3, z3 + 5]), torch.arange(60) // 20, 3)
    with pytest.raises(ValueError, match="identical"):
        fpi.solve(stats3, 1.0)
    assert fpi.solve(stats3, 1.0, pi="mean").converged
    with pytest.raises(ValueError, match="lambda must be"):
        fpi.solve(stats, -1.0)
    with pytest.raises(ValueError, match="init must have shapes"):
        fpi.solve(stats, 1.0, init=(torch.zeros(2, 3), torch.ones(2, 3)))


def test_anderson_agrees_with_damped_iteration():
    stats = make_stats(k=8, d=6, sep=0.1)
    a = fpi.solve(stats, 200.0, learn="means")
    b = fpi.solve(stats, 200.0, learn="means", accel="none", damping=0.5, max_iter=20_000)
    assert a.converged and b.converged
    assert torch.allclose(a.means, b.means, atol=1e-7)
    assert a.iterations < b.iterations


# ------------------------------------------------------------------------------- baseline 2
def test_gradient_descent_descends_towards_the_fpi_optimum():
    stats = make_stats(k=5, d=4, sep=0.3)
    ref = fpi.solve(stats, 10.0)
    res = gd.solve(stats, 10.0, policy="linear", steps=3000, lr=0.02)
    h = res.history["objective"]
    assert h[-1] < h[0]
    assert h[-1] == pytest.approx(ref.objective, abs=1e-3 * abs(ref.objective) + 1e-3)
    assert h[-1] >= ref.objective - 1e-6      # the FPI point is the (local) minimum
    assert torch.allclose(res.means, ref.means, atol=5e-2)


def test_gradient_descent_policies_and_errors():
    stats = make_stats(k=3, d=2)
    for policy in gd.POLICIES:
        res = gd.solve(stats, 1.0, policy=policy, steps=20)
        assert res.iterations == 20 and (res.variances > 0).all()
    with pytest.raises(ValueError, match="unknown lr policy"):
        gd.solve(stats, 1.0, policy="cosine")
    released = gd.solve(stats, 1.0, a=1.0, c=0.25, steps=50)
    assert ((released.variances > 0.25) & (released.variances < 1.25)).all()


def test_fixed_blocks_are_not_touched_by_the_bounds():
    """Means-only with identity variances far outside [v/rho, v*rho] keeps them exactly 1 (FPI and GD)."""
    stats = make_stats(k=4, d=3, sep=0.5)
    stats = ClassStats(stats.count, stats.total * 10, stats.total_sq * 100)     # variances ~ 100x
    ones = torch.ones(4, 3)
    res = fpi.solve(stats, 50.0, learn="means", init=(stats.mean(), ones), rho=2.0)
    assert torch.equal(res.variances, ones) and res.bounds_active == 0
    assert stationarity(stats, res, 50.0, 10.0, "pairwise", "means") <= 1e-6
    res_gd = gd.solve(stats, 50.0, learn="means", init=(stats.mean(), ones), steps=20)
    assert torch.equal(res_gd.variances, ones)


def test_released_rule_does_not_warn_about_the_paper_rules_bound():
    stats = make_stats(k=10, d=8, sep=0.3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FPIWarning)
        with pytest.raises(FPIWarning, match="unbounded below"):
            fpi.solve(stats, 1e3, rule="paper", max_iter=3)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fpi.solve(stats, 1e3, rule="released")
    assert not any("unbounded below" in str(r.message) for r in record)
