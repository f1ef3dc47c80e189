"""The fixed-point solver: statistics, KL, stationarity of the fixed point, robustness
(docs/method.md §2-§3, §5)."""

import inspect
import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributions import Independent, MultivariateNormal, Normal, kl_divergence

from nfpi.prior import (
    ClassStats,
    FPIWarning,
    fpi,
    gd,
    geometric_mean_solve,
    gradient_residual,
    objective,
    pairwise_kl,
    unbounded_threshold,
    update,
)

pytestmark = pytest.mark.usefixtures("float64")


def make_stats(k=6, d=5, n=60, sep=0.5, seed=0, full=False):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(k).repeat_interleave(n)
    scale = 0.5 + torch.rand(d, generator=g)
    z = torch.randn(k * n, d, generator=g) * scale + sep * torch.randn(k, d, generator=g)[y]
    return ClassStats.from_latents(z, y, k, full=full)


def naive_j(stats, mu, s, lam, alpha, pi):
    """J of docs/method.md §2 written pair by pair, pi detached: independent of the library's matrix forms."""
    k = stats.num_classes
    m = stats.total / stats.count[:, None]
    full = s.ndim == 3
    if full:
        v = stats.total_outer / stats.count[:, None, None] - m[:, :, None] * m[:, None, :]
        dists = [MultivariateNormal(mu[i], covariance_matrix=s[i]) for i in range(k)]
    else:
        v = stats.total_sq / stats.count[:, None] - m**2
        dists = [Independent(Normal(mu[i], s[i].sqrt()), 1) for i in range(k)]
    nll = 0.0
    for i in range(k):
        diff = m[i] - mu[i]
        if full:
            scat = v[i] + torch.outer(diff, diff)
            nll = nll + 0.5 * (torch.trace(torch.linalg.solve(s[i], scat)) + torch.logdet(s[i]))
        else:
            nll = nll + 0.5 * ((v[i] + diff**2) / s[i] + s[i].log()).sum()
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
    return total / (norm(g_nll) + norm(g_rep) + 1e-12 * size)  # floor: both terms at rounding level


# ------------------------------------------------------------------------------ statistics
@given(st.integers(2, 5), st.integers(1, 4), st.integers(0, 10_000))
@settings(max_examples=25, deadline=None)
def test_class_stats_match_direct_and_merge(k, d, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.cat([torch.arange(k).repeat(2), torch.randint(0, k, (30,), generator=g)])
    z = torch.randn(len(y), d, generator=g) * 3 + 1
    whole = ClassStats.from_latents(z, y, k, full=True)
    parts = ClassStats.from_latents(z[:7], y[:7], k, full=True) + ClassStats.from_latents(
        z[7:], y[7:], k, full=True
    )
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
    mu = torch.randn(k, d, generator=g) + shift  # an offset stresses the expanded square
    s = torch.rand(k, d, generator=g) * 2 + 0.05
    kl = pairwise_kl(mu, s)
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
    assert torch.allclose(pairwise_kl(mu, cov), ref, atol=1e-10)


def test_geometric_mean_solves_riccati():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(2, 3, 4, 4, generator=g)
    a, b = a @ a.mT + torch.eye(4), b @ b.mT + torch.eye(4)
    x = geometric_mean_solve(a, b)
    assert torch.allclose(x @ a @ x, b, atol=1e-9)
    assert (torch.linalg.eigvalsh(x) > 0).all()


def test_objective_gradient_is_that_of_j_with_pi_fixed():
    stats = make_stats()
    g = torch.Generator().manual_seed(3)
    mu = (stats.mean() + 0.3 * torch.randn(6, 5, generator=g)).requires_grad_(True)
    s = (stats.var() * (0.5 + torch.rand(6, 5, generator=g))).requires_grad_(True)
    for pi in ("pairwise", "mean"):
        ours = torch.autograd.grad(objective(stats, mu, s, 7.0, 10.0, pi), (mu, s))
        ref = torch.autograd.grad(sum(naive_j(stats, mu, s, 7.0, 10.0, pi)), (mu, s))
        for a, b in zip(ours, ref):
            assert torch.allclose(a, b, rtol=1e-8, atol=1e-10)


# ----------------------------------------------------------------------- the fixed point
@pytest.mark.parametrize("learn", ["both", "means", "variances"])
@pytest.mark.parametrize("pi", ["pairwise", "mean"])
@pytest.mark.parametrize("lam", [0.5, 3.0, 10.0])
def test_fixed_point_is_stationary(learn, pi, lam):
    stats = make_stats(k=6, d=5, sep=0.4)
    assert lam < unbounded_threshold(6)  # the bounded regime
    res = fpi.solve(stats, lam, pi=pi, learn=learn)
    assert res.converged and res.bounds_active == 0
    assert stationarity(stats, res, lam, 10.0, pi, learn) <= 1e-6
    assert gradient_residual(stats, res.means, res.variances, lam, pi=pi, learn=learn) <= 1e-6
    assert res.lam_normalised == pytest.approx(lam / 30)
    if learn == "means":  # the untouched block stays at its data value
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


@given(
    k=st.integers(2, 6),
    d=st.integers(1, 6),
    seed=st.integers(0, 10_000),
    frac=st.one_of(st.just(0.0), st.floats(1e-3, 0.5)),
    sep=st.floats(0.05, 3.0),
    learn=st.sampled_from(["both", "means", "variances"]),
    pi=st.sampled_from(["pairwise", "mean"]),
)
@settings(max_examples=40, deadline=None)
def test_random_statistics_converge_to_positive_stationary_points(k, d, seed, frac, sep, learn, pi):
    stats = make_stats(k=k, d=d, n=12, sep=sep, seed=seed)
    lam = frac * unbounded_threshold(k)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        res = fpi.solve(stats, lam, pi=pi, learn=learn, max_iter=3000)
    assert torch.isfinite(res.means).all() and (res.variances > 0).all()
    assert res.converged
    if res.bounds_active:  # J keeps decreasing outward (possible for pi="mean"): it must say so
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
    assert pairwise_kl(res.means, res.variances).sum() > pairwise_kl(stats.mean(), stats.var()).sum()


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
    with pytest.raises(fpi.FPIDivergenceError, match="did not converge"), warnings.catch_warnings():
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
    assert h[-1] >= ref.objective - 1e-6  # the FPI point is the (local) minimum
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
    stats = ClassStats(stats.count, stats.total * 10, stats.total_sq * 100)  # variances ~ 100x
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


# ------------------------------------------------- released options: defining properties
def direct_kernel(mu, s, alpha, pi):
    """K_yy' pair by pair from torch.distributions' KL (docs/method.md §2), independent of the library."""
    k = mu.shape[0]
    dists = [Independent(Normal(mu[i], s[i].sqrt()), 1) for i in range(k)]
    kl = torch.stack([torch.stack([kl_divergence(p, q) for q in dists]) for p in dists])
    scale = kl if pi == "pairwise" else torch.full_like(kl, float(kl.sum()) / (k * (k - 1)))
    out = torch.zeros(k, k)
    for i in range(k):
        for j in range(k):
            if i != j:
                out[i, j] = torch.exp(-kl[i, j] / (scale[i, j] * alpha)) / (scale[i, j] * alpha)
    return out


def spread_stats(k=5, d=6, seed=4):
    """Statistics with variances spread over two decades (as in flow latents) and a perturbed
    iterate (mu, s) away from them, so every term of the updates matters."""
    g = torch.Generator().manual_seed(seed)
    stats = make_stats(k=k, d=d, sep=0.4, seed=seed)
    mu = stats.mean() + 0.2 * torch.randn(k, d, generator=g)
    s = 10 ** (2 * torch.rand(k, d, generator=g) - 1)
    return stats, mu, s


@pytest.mark.parametrize("pi", ["pairwise", "mean"])
def test_isotropic_mean_step_is_the_released_formula(pi):
    """mu_y <- m_y + c mean_d(s_y) sum_y' (K_yy' mean_d(1/s_y') + K_y'y mean_d(1/s_y)) (mu_y - mu_y'),
    evaluated pair by pair; the plain step is Eq. 5 with the same loops."""
    stats, mu, s = spread_stats()
    k, lam, alpha = 5, 40.0, 10.0
    c = lam / (k * (k - 1))
    kmat = direct_kernel(mu, s, alpha, pi)
    m = stats.mean()
    iso, eq5 = m.clone(), m.clone()
    for y in range(k):
        for j in range(k):
            if j != y:
                d = mu[y] - mu[j]
                prec = kmat[y, j] * (1 / s[j]).mean() + kmat[j, y] * (1 / s[y]).mean()
                iso[y] += c * s[y].mean() * prec * d
                eq5[y] += c * s[y] * (kmat[y, j] / s[j] + kmat[j, y] / s[y]) * d
    for isotropic, ref in ((True, iso), (False, eq5)):
        ours, s_new = update(stats, mu, s, lam, alpha, pi, learn="means", isotropic_mean_step=isotropic)
        assert torch.allclose(ours, ref, rtol=1e-10, atol=1e-12)
        assert torch.equal(s_new, s)
    # the two steps differ by much more than the tolerance on such variances
    assert (iso - m - (eq5 - m)).abs().max() > 0.1 * (eq5 - m).abs().max()


def test_released_variance_rule_is_the_released_formula():
    """s_y <- sqrt(b / a), a = (1 + tau_y) s_y + c sum_y' K_y'y (q_y' + s_y'),
    b = v_y + c s_y^2 sum_y' K_yy' / s_y', q_y' = sum_l (mu_y' - mu_l)^2 (docs/method.md §3), pair by pair."""
    stats, mu, s = spread_stats(seed=5)
    k, lam, alpha = 5, 40.0, 10.0
    c = lam / (k * (k - 1))
    kmat = direct_kernel(mu, s, alpha, "pairwise")
    v = stats.var()
    ref = torch.empty_like(s)
    for y in range(k):
        tau = c * sum(kmat[y, j] - kmat[j, y] for j in range(k))
        a = (1 + tau) * s[y]
        b = v[y].clone()
        for j in range(k):
            if j != y:
                q = sum((mu[j] - mu[i]) ** 2 for i in range(k))
                a = a + c * kmat[j, y] * (q + s[j])
                b = b + c * s[y] ** 2 * kmat[y, j] / s[j]
        ref[y] = (b / a).sqrt()
    mu_new, ours = update(stats, mu, s, lam, alpha, learn="variances", rule="released")
    assert torch.allclose(ours, ref, rtol=1e-10) and torch.equal(mu_new, mu)


@pytest.mark.parametrize("isotropic", [False, True])
@pytest.mark.parametrize("learn", ["both", "means", "variances"])
@pytest.mark.parametrize("rule", ["released", "paper"])
def test_solution_is_a_fixed_point_of_its_own_update(rule, learn, isotropic):
    """One more undamped update from the returned point changes it by ~0 (relative)."""
    stats = make_stats(k=10, d=8, sep=0.3)
    lam = 1e3 if rule == "released" else 30.0
    res = fpi.solve(stats, lam, learn=learn, rule=rule, isotropic_mean_step=isotropic, tol=1e-12)
    assert res.converged and res.bounds_active == 0
    mu, s = update(
        stats, res.means, res.variances, lam, learn=learn, rule=rule, isotropic_mean_step=isotropic
    )
    std = stats.var().sqrt()
    assert ((mu - res.means) / std).abs().max() <= 1e-10
    assert ((s - res.variances) / res.variances).abs().max() <= 1e-10
    assert (res.means - stats.mean()).abs().max() > 1e-3 or learn == "variances"  # it did move


@pytest.mark.parametrize("learn", ["both", "variances"])
def test_released_stop_is_the_released_rule(learn):
    """stop='released' with plain iteration stops at the first step whose per-class L2 change of
    mu and of s are both <= 0.1, exactly as a direct loop over update does."""
    stats = make_stats(k=10, d=8, sep=0.3)
    stats = ClassStats(stats.count, stats.total * 3, stats.total_sq * 9)  # absolute units matter
    lam = 1e3
    res = fpi.solve(stats, lam, learn=learn, rule="released", stop="released", accel="none", rho=1e6)
    mu, s = stats.mean(), stats.var()
    for it in range(1, 1001):  # noqa: B007 (the count is checked after the loop)
        mu_n, s_n = update(stats, mu, s, lam, learn=learn, rule="released")
        change = max(float((mu_n - mu).norm(dim=1).max()), float((s_n - s).norm(dim=1).max()))
        mu, s = mu_n, s_n
        if change <= fpi.RELEASED_TOL:
            break
    assert res.converged and res.iterations == it > 1
    assert res.history["change"][-1] == pytest.approx(change, rel=1e-9)
    assert all(ch > fpi.RELEASED_TOL for ch in res.history["change"][:-1])
    assert torch.allclose(res.means, mu, rtol=1e-10) and torch.allclose(res.variances, s, rtol=1e-10)
    with pytest.raises(ValueError, match="stop must be"):
        fpi.solve(stats, lam, stop="l2")


def test_mean_pi_threshold_separates_bounded_and_runaway_variances():
    """pi='mean', paper rule: one variance started far out (1000 v) returns below
    unbounded_threshold(K, alpha, 'mean') and runs to its bound above it (5% either side)."""
    k, d = 10, 4
    g = torch.Generator().manual_seed(0)
    mean = 0.3 * torch.randn(k, d, generator=g)
    n = torch.full((k,), 100.0)
    stats = ClassStats(n, mean * 100, (1 + mean**2) * 100)  # unit variances in every class
    s0 = torch.ones(k, d)
    s0[0, 0] = 1e3
    threshold = unbounded_threshold(k, 10.0, pi="mean")
    assert threshold == pytest.approx(5 * math.e)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FPIWarning)
        below = fpi.solve(stats, 0.95 * threshold, pi="mean", init=(stats.mean(), s0), rho=1e6)
    assert below.converged and below.bounds_active == 0 and below.variances.max() < 1e3
    assert stationarity(stats, below, 0.95 * threshold, 10.0, "mean", "both") <= 1e-6
    with pytest.warns(FPIWarning, match="variances are unbounded") as record:
        above = fpi.solve(stats, 1.05 * threshold, pi="mean", init=(stats.mean(), s0), rho=1e6)
    assert above.bounds_active == 1 and above.variances[0, 0] == pytest.approx(1e6)
    assert any("sit on the bound" in str(r.message) for r in record)


@pytest.mark.parametrize("policy", sorted(gd.POLICIES))
def test_gradient_descent_lr_policy_schedule(policy):
    """lr_t = lr0 (1 - t/T)^p with the exponent docs/solver.md gives for each policy, t = 0 .. T-1."""
    p = {
        "constant": 0.0,
        "sublinear_v1": 0.5,
        "sublinear_v2": 0.75,
        "linear": 1.0,
        "superlinear_v1": 1.5,
        "superlinear_v2": 2.0,
    }[policy]
    steps, lr0 = 40, 0.03
    res = gd.solve(make_stats(k=3, d=2), 1.0, policy=policy, steps=steps, lr=lr0)
    assert len(res.history["lr"]) == steps
    for t in (0, 1, 10, 20, 33, 39):
        assert res.history["lr"][t] == pytest.approx(lr0 * (1 - t / steps) ** p, rel=1e-12, abs=0)


def test_gd_searches_fpis_box_and_reports_its_active_bounds():
    """Same default rho as FPI; above the unbounded threshold both solvers end on the box
    [v/rho, v*rho], and GD counts the entries it saturates (it reported 0 before)."""
    defaults = [inspect.signature(f).parameters["rho"].default for f in (fpi.solve, gd.solve)]
    assert defaults[0] == defaults[1]
    stats = make_stats(k=10, d=4, sep=0.3)
    lam, rho = 4 * unbounded_threshold(10, 10.0, "pairwise"), 5.0
    v = stats.var()
    res = gd.solve(stats, lam, rho=rho, steps=2000, lr=0.1)
    assert ((res.variances >= v / rho * (1 - 1e-9)) & (res.variances <= v * rho * (1 + 1e-9))).all()
    assert res.bounds_active > 0 and res.history["active_bounds"][-1] == res.bounds_active
    assert res.history["active_bounds"][0] == 0  # starts at the data variances, inside the box
    at_bound = (res.variances <= v / rho * (1 + gd.BOUND_TOL)) | (
        res.variances >= v * rho * (1 - gd.BOUND_TOL)
    )
    assert res.bounds_active == int(at_bound.sum())
    assert gd.solve(stats, lam, learn="means", rho=rho, steps=50).bounds_active == 0
