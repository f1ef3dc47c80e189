"""Tests of nfpi.train.schedule: GLEM's EM schedule (GLEM §4.3 Algorithm 1), warm starts and lambda
annealing. Tiny flows on scikit-learn digits."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import correlated, tiny_config

from nfpi.prior import ClassGaussians, ClassStats
from nfpi.train import em_overrides, fit, load_checkpoint, train


def test_em_alternation_changes_the_gaussians_and_anneals_lambda(tmp_path):
    cfg = tiny_config(epochs=1, **em_overrides(lam=400.0, merge_epoch=1, lam_decay=0.5, gd_steps=30))
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
    stats = ClassStats.from_latents(z, y, 3)
    start = ClassGaussians(stats.mean() + 2.0, stats.var())
    cfg = tiny_config(**em_overrides(lam=1.0, merge_epoch=0, gd_steps=1, gd_lr=1e-4))
    warm, _ = fit(cfg, stats, 1.0, start)
    cold, _ = fit(cfg, stats, 1.0)
    # One tiny gradient step: the warm solve stays at the start, the cold one at the data means.
    assert torch.allclose(warm.means, start.means, atol=1e-2)
    assert torch.allclose(cold.means, stats.mean().float(), atol=1e-2)


def test_annealing_options_are_validated():
    with pytest.raises(ValueError, match="lam_decay"):
        tiny_config(**{"schedule.lam_decay": 0.0})
    with pytest.raises(ValueError, match="lam_min"):
        tiny_config(**{"schedule.lam_min": 1e6})
    assert math.isclose(em_overrides(5.0, 3)["gaussians.lam"], 5.0)


@pytest.mark.parametrize("prior", ["fpi", "gd"])
def test_both_solvers_take_the_variance_box_of_solver_rho(prior):
    """GD and FPI search the same set: solver.rho bounds the learned variances of either, and
    each reports the entries it leaves on the box."""
    z, y = correlated(300, 4, 3, seed=5)
    stats = ClassStats.from_latents(z, y, 3)
    v = stats.var().float()
    cfg = tiny_config(
        **{
            "gaussians.prior": prior,
            "gaussians.lam": 1e4,
            "gaussians.learn": "both",
            "solver.rule": "released",
            "solver.rho": 1.5,
            "gd.steps": 500,
            "gd.lr": 0.2,
        }
    )
    gaussians, info = fit(cfg, stats, 1e4)
    s = gaussians.variances
    assert ((s >= v / 1.5 * (1 - 1e-5)) & (s <= v * 1.5 * (1 + 1e-5))).all()
    assert info["bounds_active"] > 0
