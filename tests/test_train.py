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

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

from nfpi import data, fpi, repro
from nfpi.priors import ClassGaussians
from nfpi.train import (
    CheckpointError, GaussianConfig, NonFiniteLossError, TrainConfig, _Run, _solves_after, class_stats,
    evaluate, keyed_run_dir, load_checkpoint, load_data, load_validation, main, train,
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


def test_validation_split_is_held_out_and_the_test_set_is_read_once(tmp_path):
    cfg = tiny(epochs=2, val_fraction=0.2)
    everything, test_set = load_data(tiny())
    train_set, same_test = load_data(cfg)
    val_set = load_validation(cfg)
    assert load_validation(tiny()) is None and torch.equal(same_test.x, test_set.x)
    # A stratified partition of the training images: 20 % of each class, nothing lost or shared.
    assert torch.bincount(val_set.y).tolist() == [12] * 10
    rows = sorted(bytes(x.numpy()) for x in torch.cat([train_set.x, val_set.x]))
    assert rows == sorted(bytes(x.numpy()) for x in everything.x)
    assert torch.equal(load_validation(cfg).x, val_set.x)  # seeded: the same split every time
    assert not torch.equal(load_validation(cfg.replace(seed=4)).x, val_set.x)
    final = train(cfg, tmp_path, progress=False)
    table = pd.read_csv(tmp_path / "metrics.csv")
    # Validation every epoch (what settings are chosen on); the test set once, after the last epoch.
    assert table["val_acc_top1"].notna().all() and table["val_bpd"].notna().all()
    assert table["acc_top1"].isna().tolist() == [True, False] and table["test_bpd"].isna().tolist() == [True, False]
    model, prior, _ = load_checkpoint(tmp_path)
    again = evaluate(model, prior, val_set, cfg.bits)
    assert again["acc_top1"] == pytest.approx(final["val_acc_top1"])
    with pytest.raises(ValueError, match=r"val_fraction must lie in \[0, 0.5\)"):
        tiny(val_fraction=0.7)


def test_a_run_made_by_other_code_is_not_reused(finished, monkeypatch):
    run_dir, _ = finished
    assert _states(run_dir)["code"] == repro.code_fingerprint()
    assert json.loads((run_dir / "metrics.json").read_text())["code"] == repro.code_fingerprint()
    monkeypatch.setattr(repro, "code_fingerprint", lambda: "feedfacefeedface")
    with pytest.raises(CheckpointError, match="made by other nfpi code.*resume=False"):
        train(tiny(), run_dir, progress=False)
    load_checkpoint(run_dir)  # inference from it is still allowed


def test_keyed_run_dirs_follow_the_config(tmp_path):
    here = keyed_run_dir(tmp_path, "fpi", tiny())
    assert here == keyed_run_dir(tmp_path, "fpi", tiny(threads=2, device="cpu"))  # same computation
    assert here != keyed_run_dir(tmp_path, "fpi", tiny(**{"gaussians.lam": 41.0}))
    assert here != keyed_run_dir(tmp_path, "fpi", tiny(epochs=2)) and here.name.startswith("fpi-")


def test_finished_run_is_reused(finished):
    run_dir, final = finished
    before = (run_dir / "checkpoint.pt").stat().st_mtime_ns
    assert train(tiny(), run_dir, progress=False) == final
    assert (run_dir / "checkpoint.pt").stat().st_mtime_ns == before


def test_resume_gives_the_uninterrupted_result(two_epochs, tmp_path, monkeypatch):
    straight_dir, straight, cfg = two_epochs
    # Interrupted right after the first epoch's checkpoint (an epochs=1 run is refused: its
    # solve_epoch=1 would never come).
    save = _Run.save

    def save_then_stop(self):
        save(self)
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(_Run, "save", save_then_stop)
        with pytest.raises(KeyboardInterrupt):
            train(cfg, tmp_path / "split", progress=False)
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


@pytest.mark.slow
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


def test_image_size_that_does_not_suit_the_levels_fails_before_training(tmp_path: Path) -> None:
    folder = tmp_path / "own"
    folder.mkdir()
    for split in ("train", "test"):
        np.savez_compressed(folder / f"{split}.npz", x=np.zeros((30, 12, 12, 1), np.uint8),
                            y=np.arange(30) % 3, classes=np.array(["a", "b", "c"]))
    cfg = tiny(dataset=str(folder), per_class=None, test_per_class=None, batch_size=10, **{"model.levels": 3})
    with pytest.raises(ValueError, match=r"12x12 after padding \(pad=0\), not divisible by 2\*\*model.levels = 8.*"
                                         r"\(e.g. pad=2\)"):
        train(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
    np.savez_compressed(folder / "test.npz", x=np.zeros((30, 12, 12, 1), np.uint8), y=np.arange(30) % 2,
                        classes=np.array(["a", "b"]))
    with pytest.raises(data.DatasetFormatError, match="the train and test splits differ"):
        load_data(cfg)


def test_checkpoint_without_shape_still_loads(finished, tmp_path: Path) -> None:
    run_dir, _ = finished
    ckpt = _states(run_dir)
    assert ckpt.pop("shape") == [1, 8, 8]
    del ckpt["sha256"]  # as written before the shape (and the checksum) were stored
    torch.save(ckpt, tmp_path / "checkpoint.pt")
    with pytest.warns(UserWarning, match="checksum"):
        old = load_checkpoint(tmp_path)
    new = load_checkpoint(run_dir)
    assert tuple(old[0].in_shape) == tuple(new[0].in_shape) == (1, 8, 8)
    x = torch.zeros(2, 1, 8, 8)
    assert torch.equal(old[0](x)[0], new[0](x)[0])


def test_dataset_names_folders_and_typos(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert TrainConfig(dataset="FashionMNIST").dataset == "FashionMNIST"  # torchvision's spelling
    assert TrainConfig(dataset="not/yet/there").dataset == "not/yet/there"  # a path: checked when loading
    with pytest.raises(ValueError, match=r"unknown dataset 'fashion_mnst': neither a known dataset .* nor a folder"):
        TrainConfig(dataset="fashion_mnst")
    (tmp_path / "mine").mkdir()
    assert TrainConfig(dataset="mine").dataset == "mine"
    with pytest.raises(FileNotFoundError, match="has neither train.npz nor train/"):
        load_data(TrainConfig(dataset="mine"))
