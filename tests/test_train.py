"""Tests of nfpi.train (SPEC §4 training protocol): config, outputs, resume, errors, solve, DDP.

All runs use scikit-learn digits and a tiny Glow (a few seconds each).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import socket
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

from nfpi import data, fpi
from nfpi.priors import ClassGaussians
from nfpi.train import (
    CheckpointError, GaussianConfig, NonFiniteLossError, TrainConfig, _solves_after, class_stats, evaluate,
    load_checkpoint, load_data, main, train,
)

REPO = Path(__file__).resolve().parents[1]
TINY = {
    "dataset": "digits", "bits": 5, "per_class": 60, "epochs": 1, "batch_size": 100,
    "eval_batch_size": 128, "init_images": 256, "seed": 3, "threads": 1,
    "model": {"levels": 2, "steps": 2, "hidden": 8},
    "optim": {"warmup": 5, "ema": 0.99},
    "gaussians": {"prior": "fpi", "lam": 40.0, "solve_epoch": 0},
}


def tiny(**overrides) -> TrainConfig:
    return TrainConfig.from_dict(TINY, **overrides)


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, dict]:
    """A finished one-epoch run shared by the read-only tests."""
    run_dir = tmp_path_factory.mktemp("finished")
    return run_dir, train(tiny(), run_dir, progress=False)


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory) -> tuple[Path, dict, TrainConfig]:
    """A finished two-epoch run whose Gaussians are solved after the second epoch."""
    cfg = tiny(epochs=2, **{"gaussians.solve_epoch": 1})
    run_dir = tmp_path_factory.mktemp("two_epochs")
    return run_dir, train(cfg, run_dir, progress=False), cfg


def _states(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoint.pt", weights_only=True)


# ------------------------------------------------------------------------------ config
def test_config_yaml_round_trip_and_overrides(tmp_path):
    cfg = tiny(**{"model.hidden": 16}, optim={"lr": 3e-3})
    assert cfg.model.hidden == 16 and cfg.optim.lr == 3e-3 and cfg.model.levels == 2
    cfg.to_yaml(tmp_path / "c.yaml")
    assert TrainConfig.from_yaml(tmp_path / "c.yaml") == cfg
    again = TrainConfig.from_yaml(tmp_path / "c.yaml", epochs=7, **{"gaussians.prior": "gd"})
    assert again.epochs == 7 and again.gaussians.prior == "gd" and again.model == cfg.model
    # YAML 1.1 reads 1e-2 as a string; float fields accept it.
    (tmp_path / "s.yaml").write_text("optim:\n  lr: 1e-2\n")
    assert TrainConfig.from_yaml(tmp_path / "s.yaml").optim.lr == 0.01


def test_config_unknown_and_invalid_keys(tmp_path):
    (tmp_path / "bad.yaml").write_text("dataset: digits\nepoch: 3\n")
    with pytest.raises(ValueError, match=r"unknown config key.*'epoch'.*valid keys.*'epochs'") as err:
        TrainConfig.from_yaml(tmp_path / "bad.yaml")
    assert "bad.yaml" in str(err.value)
    with pytest.raises(ValueError, match=r"model\.hiden.*valid keys in model.*'hidden'"):
        tiny(**{"model.hiden": 3})
    with pytest.raises(ValueError, match="gaussians.prior must be one of"):
        tiny(**{"gaussians.prior": "fp"})
    with pytest.raises(ValueError, match="epochs must be of type int"):
        tiny(epochs="three")
    with pytest.raises(ValueError, match="dg_fraction and gaussians.merge_epoch go together"):
        tiny(**{"gaussians.dg_fraction": 0.1})


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = TrainConfig.from_yaml(path)
    text = path.read_text()
    assert text.lstrip().startswith("#"), "every config starts with a comment saying what it is"
    assert cfg.to_dict() == TrainConfig.from_dict(yaml.safe_load(text)).to_dict()


def test_released_solve_keys_reach_the_solver():
    """gaussians.stop / accel: 'released' / 'none' give the released plain iteration and stopping
    rule (fewer iterations than the default relative tolerance), and bad values are refused."""
    from nfpi.train import _fit
    g = torch.Generator().manual_seed(0)
    y = torch.arange(4).repeat_interleave(30)
    z = torch.randn(120, 6, generator=g, dtype=torch.float64) + 0.3 * torch.randn(4, 6, generator=g)[y]
    stats = fpi.ClassStats.from_latents(z, y, 4)
    released = GaussianConfig(lam=100.0, rule="released", stop="released", accel="none")
    fitted, info = _fit(released, stats, 100.0)
    ref = fpi.solve(stats, 100.0, rule="released", stop="released", accel="none")
    torch.testing.assert_close(fitted.means, ref.means.float())
    assert info["iterations"] == ref.iterations and info["change"] <= fpi.RELEASED_TOL
    _, default = _fit(GaussianConfig(lam=100.0, rule="released"), stats, 100.0)
    assert default["change"] <= 1e-10 < info["change"] and default["iterations"] > info["iterations"]
    with pytest.raises(ValueError, match="gaussians.stop must be one of"):
        tiny(**{"gaussians.stop": "l2"})
    with pytest.raises(ValueError, match="gaussians.accel must be one of"):
        tiny(**{"gaussians.accel": "broyden"})


# ------------------------------------------------------------------------------ outputs
def test_short_run_writes_outputs(finished):
    run_dir, final = finished
    table = pd.read_csv(run_dir / "metrics.csv")
    assert list(table["epoch"]) == [0]
    assert math.isfinite(final["train_bpd"]) and math.isfinite(final["test_bpd"])
    assert 0 < final["test_bpd"] < 10 and 0 <= final["acc_top1"] <= final["acc_top5"] <= 100
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert summary["metrics"] == final and summary["config"] == tiny().to_dict()
    assert summary["solves"][0]["epoch"] == 0 and summary["solves"][0]["converged"]
    # The reloaded EMA flow and Gaussians reproduce the reported test metrics.
    model, prior, cfg = load_checkpoint(run_dir)
    assert cfg == tiny()
    _, test_set = load_data(cfg)
    again = evaluate(model, prior, test_set, cfg.bits)
    assert again["acc_top1"] == pytest.approx(final["acc_top1"])
    assert again["test_bpd"] == pytest.approx(final["test_bpd"], rel=1e-6)


def test_finished_run_is_reused(finished):
    run_dir, final = finished
    before = (run_dir / "checkpoint.pt").stat().st_mtime_ns
    assert train(tiny(), run_dir, progress=False) == final
    assert (run_dir / "checkpoint.pt").stat().st_mtime_ns == before


def test_resume_gives_the_uninterrupted_result(two_epochs, tmp_path):
    straight_dir, straight, cfg = two_epochs
    train(cfg.replace(epochs=1), tmp_path / "split", progress=False)
    assert len(pd.read_csv(tmp_path / "split" / "metrics.csv")) == 1
    resumed = train(cfg, tmp_path / "split", progress=False)
    drop = lambda row: {k: v for k, v in row.items() if k not in ("time", "solve_time")}  # noqa: E731
    assert drop(resumed) == drop(straight)
    a, b = _states(straight_dir), _states(tmp_path / "split")
    for part in ("model", "ema", "prior"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key} differs after resume"
    assert [drop(r) for r in a["metrics"]] == [drop(r) for r in b["metrics"]]


# ------------------------------------------------------------------------------ errors
def test_non_finite_loss_stops_with_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(ClassGaussians, "nll", lambda self, z, y: z.sum(1) * math.nan)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(nan\) at epoch 0, step 0.*Lower optim\.lr"):
        train(tiny(), tmp_path, progress=False)
    assert not (tmp_path / "checkpoint.pt").exists()


def test_corrupt_checkpoint(finished, tmp_path):
    good = (finished[0] / "checkpoint.pt").read_bytes()
    for payload in (good[: len(good) // 2], b"not a checkpoint at all"):
        (tmp_path / "checkpoint.pt").write_bytes(payload)
        with pytest.raises(CheckpointError, match="not a readable checkpoint.*delete it"):
            train(tiny(), tmp_path, progress=False)
        with pytest.raises(CheckpointError, match="not a readable checkpoint"):
            load_checkpoint(tmp_path)
    # resume=False starts over instead.
    assert train(tiny(), tmp_path, resume=False, progress=False)["epoch"] == 0


def test_foreign_checkpoint(finished, tmp_path):
    torch.save({"format": "someone-else/3", "state": torch.zeros(2)}, tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="not an nfpi training checkpoint.*'someone-else/3'"):
        train(tiny(), tmp_path, progress=False)
    with pytest.raises(CheckpointError, match="not an nfpi training checkpoint"):
        load_checkpoint(tmp_path / "checkpoint.pt")
    shutil.copy(finished[0] / "checkpoint.pt", tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError, match=r"different run \(dataset: 'digits' in the checkpoint, 'mnist' now.*"
                                              r"model\.hidden: 8 in the checkpoint, 16 now.*resume=False"):
        train(tiny(dataset="mnist", **{"model.hidden": 16}), tmp_path, progress=False)


# ------------------------------------------------------------------------------ the solve
def test_fpi_solve_happens_at_solve_epoch_and_sets_the_fixed_point(two_epochs):
    run_dir, _, cfg = two_epochs
    table = pd.read_csv(run_dir / "metrics.csv")
    assert table["solved"].isna().tolist() == [True, False] and table["solved"][1] == "fpi"
    assert table["solve_converged"][1] and table["solve_iterations"][1] > 1
    ckpt = _states(run_dir)
    (info,) = ckpt["solves"]
    assert info["epoch"] == 1
    # The stored Gaussians are the FPI fixed point of the latents of the non-EMA flow after
    # epoch 1 (the checkpoint holds that flow: the solve came after the last epoch) ...
    model, prior, _ = load_checkpoint(run_dir, ema=False)
    train_set, _ = load_data(cfg)
    stats = class_stats(model, train_set, cfg.bits, cfg.eval_batch_size, noise=info["stats_seed"])
    g = cfg.gaussians
    res = fpi.solve(stats, g.lam, alpha=g.alpha, pi=g.pi, learn=g.learn, rule=g.rule, rho=g.rho, tol=g.tol)
    torch.testing.assert_close(prior.means, res.means.float())
    torch.testing.assert_close(prior.variances, res.variances.float())
    # ... which differs from the data statistics (lambda = 0): every class mean moves by more
    # than 1e-3 class standard deviations (RMS over dimensions), far above float32 rounding.
    data_init = ClassGaussians.from_stats(stats)
    shift = ((prior.means - data_init.means) ** 2 / data_init.variances).mean(1).sqrt()
    assert float(shift.min()) > 1e-3


@pytest.mark.parametrize("kind", ["data", "gd", "random", "fpi-means"])
def test_baseline_priors(tmp_path, kind):
    prior_kind, learn = ("fpi", "means") if kind == "fpi-means" else (kind, "both")
    cfg = tiny(**{"gaussians.prior": prior_kind, "gaussians.learn": learn, "gaussians.gd_steps": 50})
    final = train(cfg, tmp_path, progress=False)
    model, prior, _ = load_checkpoint(tmp_path, ema=False)
    if kind == "random":
        assert final["solved"] is None and not _states(tmp_path)["solves"]
        expected = ClassGaussians.random(10, 64, generator=torch.Generator().manual_seed(cfg.seed))
        torch.testing.assert_close(prior.means, expected.means)
        return
    assert final["solved"] == prior_kind
    seed = _states(tmp_path)["solves"][0]["stats_seed"]
    stats = class_stats(model, load_data(cfg)[0], cfg.bits, cfg.eval_batch_size, noise=seed)
    data_init = ClassGaussians.from_stats(stats)
    if kind == "data":
        torch.testing.assert_close(prior.means, data_init.means)
        torch.testing.assert_close(prior.variances, data_init.variances)
        return
    assert not torch.allclose(prior.means, data_init.means, rtol=1e-3, atol=1e-3)
    if kind == "fpi-means":  # released means-only setting: identity variances throughout
        assert torch.equal(prior.variances, torch.ones_like(prior.variances))


def test_dg_split_fits_the_gaussians_on_dg(tmp_path):
    cfg = tiny(**{"gaussians.dg_fraction": 0.5, "gaussians.merge_epoch": 0})
    train(cfg, tmp_path, progress=False)
    model, prior, _ = load_checkpoint(tmp_path, ema=False)
    train_set = load_data(cfg)[0]
    _, dg_idx = data.stratified_split(train_set.y, 0.5, cfg.seed)
    seed = _states(tmp_path)["solves"][0]["stats_seed"]
    g = cfg.gaussians
    for arrays, same in ((train_set.subset(dg_idx), True), (train_set, False)):
        stats = class_stats(model, arrays, cfg.bits, cfg.eval_batch_size, noise=seed)
        res = fpi.solve(stats, g.lam, alpha=g.alpha, pi=g.pi, learn=g.learn, rule=g.rule, rho=g.rho, tol=g.tol)
        assert torch.allclose(prior.means, res.means.float(), rtol=1e-4, atol=1e-5) == same


def test_solve_schedule():
    g = GaussianConfig(solve_epoch=1, resolve_every=2, dg_fraction=0.1, merge_epoch=4)
    assert [e for e in range(-1, 8) if _solves_after(g, e)] == [1, 3]
    assert [e for e in range(-1, 8) if _solves_after(GaussianConfig(solve_epoch=-1), e)] == [-1]
    assert not any(_solves_after(GaussianConfig(prior="random"), e) for e in range(-1, 8))


# ------------------------------------------------------------------------------ distributed
def _ddp_worker(rank: int, world: int, port: int, cfg_path: str, run_dir: str, init_file: str) -> None:
    """One of ``world`` CPU processes: the CLI run as under torchrun (env-initialised gloo
    group), then the class statistics the solve after epoch 0 saw, recomputed on a new group."""
    torch.set_num_threads(1)  # forked from a process that used OpenMP threads
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    main(["--config", cfg_path, "--run-dir", run_dir, "--no-progress"])
    assert not dist.is_initialized(), "train() must close the process group it opened"
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model, _, cfg = load_checkpoint(run_dir, ema=False)
        seed = torch.load(Path(run_dir) / "checkpoint.pt", weights_only=True)["solves"][0]["stats_seed"]
        stats = class_stats(model, load_data(cfg)[0], cfg.bits, cfg.eval_batch_size, noise=seed)
        torch.save({k: getattr(stats, k) for k in ("count", "total", "total_sq")}, f"{run_dir}/stats.{rank}")
    finally:
        dist.destroy_process_group()


def test_ddp_two_gloo_processes(tmp_path):
    """DDP on CPU: the run completes, only rank 0 writes, and the all-reduced class
    statistics the FPI solve sees are those of a single process."""
    cfg = tiny()
    cfg.to_yaml(tmp_path / "tiny.yaml")
    run_dir = tmp_path / "run"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # fork: the workers inherit the imported modules instead of re-importing torch.
    mp.start_processes(_ddp_worker, args=(2, port, str(tmp_path / "tiny.yaml"), str(run_dir), str(tmp_path / "init")),
                       nprocs=2, start_method="fork")
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert summary["solves"][0]["converged"] and math.isfinite(summary["metrics"]["test_bpd"])
    assert summary["metrics"]["acc_top1"] > 30  # far above chance (10 %) after one epoch and the solve
    ranks = [torch.load(run_dir / f"stats.{r}", weights_only=True) for r in range(2)]
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint.pt", "metrics.csv", "metrics.json",
                                                         "stats.0", "stats.1"]  # no stray temporary files
    model, prior, _ = load_checkpoint(run_dir, ema=False)
    seed = _states(run_dir)["solves"][0]["stats_seed"]
    single = class_stats(model, load_data(cfg)[0], cfg.bits, cfg.eval_batch_size, noise=seed)
    assert torch.equal(ranks[0]["count"], single.count)
    for key in ("count", "total", "total_sq"):
        # Every process holds the same sums, so every process solves the same FPI ...
        assert torch.equal(ranks[0][key], ranks[1][key])
        # ... and they are the single-process sums up to float64 summation order.
        ref = getattr(single, key)
        torch.testing.assert_close(ranks[0][key], ref, rtol=1e-13, atol=1e-13 * float(ref.abs().max()))
    g = cfg.gaussians
    res = fpi.solve(single, g.lam, alpha=g.alpha, pi=g.pi, learn=g.learn, rule=g.rule, rho=g.rho, tol=g.tol)
    torch.testing.assert_close(prior.means, res.means.float())
    torch.testing.assert_close(prior.variances, res.variances.float())
