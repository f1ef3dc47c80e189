"""The generic safeguarded Anderson iteration (nfpi.prior.anderson), on maps that are not Gaussians."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nfpi.prior import anderson, fixed_point

pytestmark = pytest.mark.usefixtures("float64")


def contraction(n, radius, seed, symmetric=True):
    """A (n, n) with spectral radius ``radius`` < 1 (norm too when symmetric), b (n,), and the
    fixed point (I - A)^-1 b of x = A x + b."""
    g = torch.Generator().manual_seed(seed)
    if symmetric:
        q, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
        a = q @ torch.diag(torch.linspace(-radius, radius, n)) @ q.T
    else:  # non-normal: scaled to operator norm `radius`, so plain iteration contracts too
        a = torch.randn(n, n, generator=g)
        a = radius * a / torch.linalg.matrix_norm(a, 2)
    b = torch.randn(n, generator=g)
    return a, b, torch.linalg.solve(torch.eye(n) - a, b)


def residual_below(tol):
    return lambda x, gx, aux: float((gx - x).norm()) <= tol


def test_fixed_point_is_exported_by_nfpi_prior():
    assert fixed_point is anderson.fixed_point


@pytest.mark.parametrize("accel", ["anderson", "none"])
def test_fixed_point_iteration_on_a_linear_contraction(accel):
    """x = A x + b with spectral radius 0.95: the fixed point (I - A)^-1 b. Anderson with memory
    >= n is a Krylov method on a linear map: x0, one plain step and n mixing steps reach it (one
    more for rounding), where plain iteration needs log(1e-12) / log(0.95) ~ 540 iterates."""
    n = 6
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    a = q @ torch.diag(torch.linspace(-0.95, 0.95, n)) @ q.T
    b = torch.randn(n, generator=g)
    exact = torch.linalg.solve(torch.eye(n) - a, b)
    seen = []

    def done(x, gx, aux):
        seen.append(aux)
        return float((gx - x).norm()) <= 1e-12

    x, gx, aux, ok = fixed_point(
        lambda x: (a @ x + b, len(seen)), torch.zeros(n), done, accel=accel, memory=n, max_iter=2000
    )
    assert ok and torch.allclose(x, exact, atol=1e-10)
    assert seen == list(range(len(seen)))  # done sees every iterate once, in order
    assert len(seen) <= (n + 3 if accel == "anderson" else 2000) and (accel == "anderson" or len(seen) > 400)


def test_fixed_point_iteration_respects_projection_and_budget():
    """Proposals are projected (here onto x >= 0) and the budget ends with converged=False."""
    calls = []

    def g(x):
        calls.append(x.clone())
        return -2.0 * x + 1.0, None  # expanding: no convergence

    x, _, _, ok = fixed_point(g, torch.ones(3), lambda *_: False, lambda z: z.clamp_min(0.0), max_iter=5)
    assert not ok and all((c >= 0).all() for c in calls)


def test_more_memory_needs_fewer_iterations():
    """On x = A x + b (n = 20, radius 0.98) each added Anderson memory slot cuts the iterates
    to a 1e-10 residual; all of them beat plain iteration by far."""
    a, b, exact = contraction(20, 0.98, seed=1)
    counts = {}
    for accel, memory in [("none", 1), ("anderson", 1), ("anderson", 3), ("anderson", 10)]:
        seen = []
        x, _, _, ok = fixed_point(
            lambda x: (a @ x + b, None),
            torch.zeros(20),
            lambda x, gx, aux, seen=seen: seen.append(1) or float((gx - x).norm()) <= 1e-10,
            accel=accel,
            memory=memory,
            max_iter=5000,
        )
        assert ok and torch.allclose(x, exact, atol=1e-8)
        counts[accel, memory] = len(seen)
    plain = counts["none", 1]
    assert plain > 1000  # log(1e-10) / log(0.98) ~ 1140
    assert plain > counts["anderson", 1] > counts["anderson", 3] > counts["anderson", 10]
    assert counts["anderson", 10] < plain / 10


def test_damping_scales_the_plain_step():
    """accel='none': x_{t+1} = x_t + damping (g(x_t) - x_t), exactly."""
    a, b, _ = contraction(4, 0.5, seed=2)
    xs = []
    fixed_point(
        lambda x: (a @ x + b, None),
        torch.ones(4),
        lambda x, gx, aux: xs.append(x) or False,
        accel="none",
        damping=0.3,
        max_iter=4,
    )
    assert len(xs) == 4
    for x, x_next in zip(xs, xs[1:]):
        assert torch.equal(x_next, x + 0.3 * (a @ x + b - x))


def test_safeguard_rejects_an_overshooting_extrapolation():
    """g(x) = x - atan(x), fixed point 0, from x0 = 5. With two iterates Anderson is the secant
    method on f = -atan, which overshoots from 3.63 to about -21.6 where |f| is larger than at
    3.63: the safeguard evaluates that proposal, rejects it, takes the plain step x + f instead
    and restarts the memory (so the next proposal is a plain step again); it still converges."""
    evaluated, iterates = [], []

    def g(x):
        evaluated.append(x.clone())
        return x - torch.atan(x), None

    x, _, _, ok = fixed_point(
        g,
        torch.tensor([5.0]),
        lambda x, gx, aux: iterates.append(x.clone()) or float((gx - x).abs()) <= 1e-12,
        memory=3,
        max_iter=100,
    )
    assert ok and float(x.abs()) <= 1e-6
    x1 = 5.0 - math.atan(5.0)
    assert float(iterates[1]) == pytest.approx(x1, rel=1e-15)
    overshoot = float(evaluated[2])  # the first mixing proposal
    assert overshoot < -20 and math.atan(abs(overshoot)) > math.atan(x1)
    # rejected: the next iterate is the plain step from x1, and the proposal after it too
    assert float(iterates[2]) == pytest.approx(x1 - math.atan(x1), rel=1e-15)
    assert float(evaluated[4]) == pytest.approx(float(iterates[2]) - math.atan(float(iterates[2])), rel=1e-15)
    assert len(evaluated) > len(iterates)  # a rejection costs one extra evaluation
    # accepted steps never raise the residual |f(x)| = atan(|x|)
    resid = [math.atan(abs(float(x))) for x in iterates]
    assert resid[1] <= resid[0]


def test_max_iter_reports_non_convergence_with_the_last_iterate():
    """The budget ends the iteration after max_iter calls of done, with converged False and the
    last iterate (and its image) returned."""
    a, b, exact = contraction(5, 0.9, seed=3)
    seen = []
    x, gx, _, ok = fixed_point(
        lambda x: (a @ x + b, None),
        torch.zeros(5),
        lambda x, gx, aux: seen.append(x) or float((gx - x).norm()) <= 1e-14,
        accel="none",
        max_iter=7,
    )
    assert not ok and len(seen) == 7
    assert torch.equal(x, a @ seen[-1] + b) and torch.equal(gx, a @ x + b)  # one more plain step
    assert not torch.allclose(x, exact, atol=1e-6)


@given(
    st.integers(1, 8),
    st.floats(0.05, 0.95),
    st.integers(0, 10_000),
    st.booleans(),
    st.integers(1, 6),
    st.sampled_from(["anderson", "none"]),
)
@settings(max_examples=60, deadline=None)
def test_random_contractions_converge_to_the_solution(n, radius, seed, symmetric, memory, accel):
    """Any contraction x = A x + b (operator norm < 1, normal or not) reaches (I - A)^-1 b, with
    or without mixing, at any memory."""
    a, b, exact = contraction(n, radius, seed, symmetric)
    scale = 1.0 + float(exact.norm())
    x, _, _, ok = fixed_point(
        lambda x: (a @ x + b, None),
        torch.zeros(n),
        residual_below(1e-12 * scale),
        accel=accel,
        memory=memory,
        max_iter=2000,
    )
    assert ok
    assert torch.allclose(x, exact, atol=1e-10 * scale / (1 - radius))
