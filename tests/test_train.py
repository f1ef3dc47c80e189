"""Tests of nfpi.train (docs/method.md §4 training protocol): config, outputs, resume, errors, solve, DDP.

All runs use scikit-learn digits and a tiny Glow (a few seconds each).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from conftest import tiny_config
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.optim.swa_utils import AveragedModel

from nfpi import data, repro
from nfpi.config import OptimConfig, TrainConfig
from nfpi.evaluation import evaluate_flow
from nfpi.flows import Glow
from nfpi.latents import NonFiniteLossError, class_stats
from nfpi.prior import ClassGaussians, ClassStats, fpi
from nfpi.train import (
    CheckpointError,
    config_key,
    fit,
    get_lr,
    keyed_run_dir,
    load_checkpoint,
    load_data,
    load_validation,
    main,
    solves_after,
    train,
)
from nfpi.train.loop import _Run

REPO = Path(__file__).resolve().parents[1]


def tiny(**overrides) -> TrainConfig:
    """The shared tiny config, a little larger: 60 images per class, 2 steps per level."""
    return tiny_config(
        **{
            "per_class": 60,
            "eval_batch_size": 128,
            "init_images": 256,
            "seed": 3,
            "model.steps": 2,
            "optim.ema": 0.99,
            "schedule.solve_epoch": 0,
            **overrides,
        }
    )


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, dict]:
    """A finished one-epoch run shared by the read-only tests."""
    run_dir = tmp_path_factory.mktemp("finished")
    return run_dir, train(tiny(), run_dir, progress=False)


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory) -> tuple[Path, dict, TrainConfig]:
    """A finished two-epoch run whose Gaussians are solved after the second epoch."""
    cfg = tiny(epochs=2, **{"schedule.solve_epoch": 1})
    run_dir = tmp_path_factory.mktemp("two_epochs")
    return run_dir, train(cfg, run_dir, progress=False), cfg


def _untimed(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in ("time", "solve_time")}


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
    with pytest.raises(ValueError, match="dg_fraction and schedule.merge_epoch go together"):
        tiny(**{"schedule.dg_fraction": 0.1})


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = TrainConfig.from_yaml(path)
    text = path.read_text()
    assert text.lstrip().startswith("#"), "every config starts with a comment saying what it is"
    assert cfg.to_dict() == TrainConfig.from_dict(yaml.safe_load(text)).to_dict()


def test_released_solve_keys_reach_the_solver():
    """solver.stop / accel: 'released' / 'none' give the released plain iteration and stopping
    rule (fewer iterations than the default relative tolerance), and bad values are refused."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(4).repeat_interleave(30)
    z = torch.randn(120, 6, generator=g, dtype=torch.float64) + 0.3 * torch.randn(4, 6, generator=g)[y]
    stats = ClassStats.from_latents(z, y, 4)
    released = TrainConfig.from_dict(
        {"gaussians": {"lam": 100.0}, "solver": {"rule": "released", "stop": "released", "accel": "none"}}
    )
    fitted, info = fit(released, stats, 100.0)
    ref = fpi.solve(stats, 100.0, rule="released", stop="released", accel="none")
    torch.testing.assert_close(fitted.means, ref.means.float())
    assert info["iterations"] == ref.iterations and info["change"] <= fpi.RELEASED_TOL
    _, default = fit(
        TrainConfig.from_dict({"gaussians": {"lam": 100.0}, "solver": {"rule": "released"}}), stats, 100.0
    )
    assert default["change"] <= 1e-10 < info["change"] and default["iterations"] > info["iterations"]
    with pytest.raises(ValueError, match="solver.stop must be one of"):
        tiny(**{"solver.stop": "l2"})
    with pytest.raises(ValueError, match="solver.accel must be one of"):
        tiny(**{"solver.accel": "broyden"})


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
    again = evaluate_flow(model, prior, test_set, cfg.bits)
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
    assert table["acc_top1"].isna().tolist() == [True, False] and table["test_bpd"].isna().tolist() == [
        True,
        False,
    ]
    model, prior, _ = load_checkpoint(tmp_path)
    again = evaluate_flow(model, prior, val_set, cfg.bits)
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


def test_config_keys_name_the_config_alone_and_outlive_new_unset_settings(monkeypatch):
    key = config_key(tiny())
    assert key == config_key(tiny(threads=2, device="cpu"))  # same computation
    assert key != config_key(tiny(seed=1)) and key != config_key(tiny(), trainer="native")
    monkeypatch.setattr(repro, "code_fingerprint", lambda: "0" * 16)
    assert config_key(tiny()) == key  # no code in the key: the maker is recorded beside it
    # A setting added later with an unset default (None) keeps the keys recorded before it.
    assert config_key(tiny(**{"optim.decay_steps": None, "optim.min_lr": None})) == key
    assert config_key(tiny(**{"optim.decay_steps": 5000})) != key


@settings(max_examples=200, deadline=None)
@given(
    lr=st.floats(1e-4, 1.0),
    warmup=st.integers(0, 50),
    length=st.integers(1, 500),
    low=st.floats(0.0, 1.0),
    it=st.integers(0, 1000),
)
def test_get_lr_warms_up_then_decays_by_cosine_to_min_lr(lr, warmup, length, low, it):
    optim = OptimConfig(lr=lr, warmup=warmup, decay_steps=warmup + length, min_lr=low * lr)
    value, after = get_lr(it, optim), get_lr(it + 1, optim)
    assert 0 <= value <= lr + 1e-12
    if it < warmup:
        assert value == pytest.approx(lr * (it + 1) / warmup) and after >= value
    else:
        assert low * lr - 1e-12 <= value and after <= value + 1e-12  # never rises after the warm-up
        assert get_lr(it, dataclasses.replace(optim, decay_steps=None)) == lr  # constant without decay
    assert get_lr(max(warmup, 1) - 1, optim) == pytest.approx(lr)  # lr once warmed up
    assert get_lr(warmup + length + it, optim) == pytest.approx(low * lr)  # min_lr from decay_steps on


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
    assert _untimed(resumed) == _untimed(straight)
    a, b = _states(straight_dir), _states(tmp_path / "split")
    for part in ("model", "ema", "prior"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key} differs after resume"
    assert [_untimed(r) for r in a["metrics"]] == [_untimed(r) for r in b["metrics"]]


_STALL_IN_EPOCH_1 = """
import sys, time
from pathlib import Path
from nfpi.config import OptimConfig, TrainConfig
from nfpi.train import loop as T
cfg, run_dir = TrainConfig.from_yaml(sys.argv[1]), Path(sys.argv[2])
check = T._Run._check_finite
def stall(self, value, what, epoch, step):  # after two of epoch 1's optimizer steps
    check(self, value, what, epoch, step)
    if (epoch, step, what) == (1, 2, "gradient norm"):
        (run_dir / "inside-epoch-1").touch()
        time.sleep(600)
T._Run._check_finite = stall
T.train(cfg, run_dir, progress=False)
"""


@pytest.mark.slow  # a second Python process: ~5 s alone, up to ~20 s on a loaded machine
def test_resume_after_a_kill_in_the_middle_of_an_epoch(two_epochs, tmp_path):
    """SIGKILL a training process inside its second epoch (weights, optimizer and EMA already
    moved past the checkpoint of epoch 1); the resumed run ends bit-identical to an
    uninterrupted one."""
    straight_dir, straight, cfg = two_epochs
    cfg.to_yaml(tmp_path / "cfg.yaml")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", _STALL_IN_EPOCH_1, str(tmp_path / "cfg.yaml"), str(run_dir)]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "inside-epoch-1").exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the training process never reached epoch 1"
            time.sleep(0.05)
    finally:
        proc.kill()  # SIGKILL: no cleanup handlers run
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert _states(run_dir)["epoch"] == 1 and len(pd.read_csv(run_dir / "metrics.csv")) == 1
    resumed = train(cfg, run_dir, progress=False)
    assert _untimed(resumed) == _untimed(straight)
    a, b = _states(straight_dir), _states(run_dir)
    assert a["step"] == b["step"]  # the optimizer step count that get_lr(it) reads
    for part in ("model", "ema", "prior", "optimizer"):
        assert _flat(a[part]).keys() == _flat(b[part]).keys()
        for key, value in _flat(a[part]).items():
            other = _flat(b[part])[key]
            same = torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other
            assert same, f"{part}.{key} differs after the kill and resume"


def _flat(state: dict, prefix: str = "") -> dict:
    """A nested state dict flattened to {dotted key: leaf}."""
    out = {}
    for key, value in state.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        elif isinstance(value, (list, tuple)) and value and isinstance(value[0], dict):
            for i, item in enumerate(value):
                out.update(_flat(item, f"{prefix}{key}.{i}."))
        else:
            out[prefix + str(key)] = value
    return out


# ------------------------------------------------------------------------------ EMA
def test_ema_weights_are_the_closed_form_of_the_configured_decay(tmp_path, monkeypatch):
    """After n optimizer steps the EMA weights equal sum_k w_k p_k over the recorded weights
    p_1..p_n, w_k = (1 - d_k) prod_{j > k} d_j with decay d_k = min(beta, (1 + k) / (10 + k))
    at the k-th update after the first (d_0 = 0: the first update copies the weights)."""
    names, trajectory = [], []
    update = AveragedModel.update_parameters

    def record(self, model):
        names[:] = [name for name, _ in model.named_parameters()]
        trajectory.append([p.detach().double().clone() for p in model.parameters()])
        return update(self, model)

    monkeypatch.setattr(AveragedModel, "update_parameters", record)
    beta = 0.6  # (1 + k) / (10 + k) passes beta at k = 13: both regimes of the decay are used
    cfg = tiny(batch_size=40, **{"gaussians.prior": "random", "optim.ema": beta})  # no solve, no restart
    train(cfg, tmp_path, progress=False)
    n = len(trajectory)
    assert n == 600 // 40
    decays = [0.0] + [min(beta, (1 + k) / (10 + k)) for k in range(1, n)]
    weights = [(1 - decays[k]) * math.prod(decays[k + 1 :]) for k in range(n)]
    assert math.isclose(sum(weights), 1.0)
    ema = _states(tmp_path)["ema"]
    assert int(ema["n_averaged"]) == n
    moved = 0
    for i, name in enumerate(names):
        expected = sum(w * step[i] for w, step in zip(weights, trajectory))
        got = ema[f"module.{name}"].double()
        scale = float(expected.abs().max()) + 1e-12
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6 * scale)
        moved += not torch.allclose(got, trajectory[-1][i], rtol=1e-4, atol=1e-6 * scale)
    assert moved > len(names) // 2  # the average is not just the last weights


# ------------------------------------------------------------------------------ GPU settings (run on the CPU)
def test_bf16_autocast_runs_only_the_flow_in_bf16(finished, tmp_path, monkeypatch):
    """amp: the flow's forward runs under bf16 autocast (z in bf16), while its log-determinant
    and the NLL (computed outside autocast) stay float32; the run stays close to float32."""
    seen = {"flow": [], "nll": []}
    forward, nll = Glow.forward, ClassGaussians.nll

    def flow(self, x):
        z, logdet = forward(self, x)
        if self.training and torch.is_grad_enabled():  # training steps, not the ActNorm init
            seen["flow"].append((torch.is_autocast_enabled("cpu"), z.dtype, logdet.dtype))
        return z, logdet

    def class_nll(self, z, y):
        seen["nll"].append((torch.is_autocast_enabled("cpu"), z.dtype))
        return nll(self, z, y)

    monkeypatch.setattr(Glow, "forward", flow)
    monkeypatch.setattr(ClassGaussians, "nll", class_nll)
    final = train(tiny(amp=True), tmp_path, progress=False)
    assert set(seen["flow"]) == {(True, torch.bfloat16, torch.float32)}
    assert set(seen["nll"]) == {(False, torch.float32)}
    # Measured (seeds 3 and 4): bf16 moves the one-epoch train/test bits/dim by <= 0.006 (of ~4.3).
    fp32 = finished[1]
    assert abs(final["train_bpd"] - fp32["train_bpd"]) < 0.05
    assert abs(final["test_bpd"] - fp32["test_bpd"]) < 0.05


def test_channels_last_matches_the_default_layout(finished, tmp_path, monkeypatch):
    """channels_last changes the memory layout of the convolution weights, not the result."""
    layouts = set()
    forward = Glow.forward

    def flow(self, x):
        if self.training and torch.is_grad_enabled():  # training steps, not the ActNorm init
            weights = [p for p in self.parameters() if p.dim() == 4]
            layouts.add(
                (
                    all(p.is_contiguous(memory_format=torch.channels_last) for p in weights),
                    all(p.is_contiguous() for p in weights),
                )
            )
        return forward(self, x)

    monkeypatch.setattr(Glow, "forward", flow)
    final = train(tiny(channels_last=True), tmp_path, progress=False)
    assert layouts == {(True, False)}
    fp32 = finished[1]
    for key in ("train_bpd", "test_bpd", "test_bpd_centres", "acc_top1"):
        assert final[key] == pytest.approx(fp32[key], rel=1e-4, abs=1e-3), key


@pytest.mark.slow  # TorchDynamo tracing: ~4 s alone, more on a loaded machine
def test_compile_wraps_the_training_forward(finished, tmp_path, monkeypatch):
    """compile: the training forward goes through torch.compile (here TorchDynamo with the eager
    backend: the same graph capture, without the minutes of CPU code generation)."""
    compiled = []
    real = torch.compile

    def compile_eager(module, **kwargs):
        compiled.append(type(module).__name__)
        return real(module, backend="eager")

    monkeypatch.setattr(torch, "compile", compile_eager)
    final = train(tiny(compile=True), tmp_path, progress=False)
    assert compiled == ["Glow"]
    fp32 = finished[1]
    for key in ("train_bpd", "test_bpd", "acc_top1"):
        assert final[key] == pytest.approx(fp32[key], rel=1e-5, abs=1e-4), key


# ------------------------------------------------------------------------------ errors
def test_non_finite_loss_stops_with_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(ClassGaussians, "nll", lambda self, z, y: z.sum(1) * math.nan)
    with pytest.raises(
        NonFiniteLossError, match=r"non-finite loss \(nan\) at epoch 0, step 0.*Lower optim\.lr"
    ):
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
    with pytest.raises(
        CheckpointError,
        match=r"different run \(dataset: 'digits' in the checkpoint, 'mnist' now.*"
        r"model\.hidden: 8 in the checkpoint, 16 now.*resume=False",
    ):
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
    gs = cfg.gaussians
    res = fpi.solve(stats, gs.lam, alpha=gs.alpha, pi=gs.pi, learn=gs.learn, **dataclasses.asdict(cfg.solver))
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
    cfg = tiny(**{"gaussians.prior": prior_kind, "gaussians.learn": learn, "gd.steps": 50})
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
    cfg = tiny(**{"schedule.dg_fraction": 0.5, "schedule.merge_epoch": 0})
    train(cfg, tmp_path, progress=False)
    model, prior, _ = load_checkpoint(tmp_path, ema=False)
    train_set = load_data(cfg)[0]
    _, dg_idx = data.stratified_split(train_set.y, 0.5, cfg.seed)
    seed = _states(tmp_path)["solves"][0]["stats_seed"]
    gs = cfg.gaussians
    for arrays, same in ((train_set.subset(dg_idx), True), (train_set, False)):
        stats = class_stats(model, arrays, cfg.bits, cfg.eval_batch_size, noise=seed)
        res = fpi.solve(
            stats, gs.lam, alpha=gs.alpha, pi=gs.pi, learn=gs.learn, **dataclasses.asdict(cfg.solver)
        )
        assert torch.allclose(prior.means, res.means.float(), rtol=1e-4, atol=1e-5) == same


def test_solve_schedule():
    every_2 = TrainConfig.from_dict(
        {"schedule": {"solve_epoch": 1, "resolve_every": 2, "dg_fraction": 0.1, "merge_epoch": 4}}
    )
    assert [e for e in range(-1, 8) if solves_after(every_2, e)] == [1, 3]
    before = TrainConfig.from_dict({"schedule": {"solve_epoch": -1}})
    assert [e for e in range(-1, 8) if solves_after(before, e)] == [-1]
    assert not any(
        solves_after(TrainConfig.from_dict({"gaussians": {"prior": "random"}}), e) for e in range(-1, 8)
    )


# ------------------------------------------------------------------------------ distributed
def _ddp_worker(rank: int, world: int, port: int, cfg_path: str, run_dir: str, init_file: str) -> None:
    """One of ``world`` CPU processes: the CLI run as under torchrun (env-initialised gloo
    group), then the class statistics the solve after epoch 0 saw, recomputed on a new group."""
    torch.set_num_threads(1)  # forked from a process that used OpenMP threads
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
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
    mp.start_processes(
        _ddp_worker,
        args=(2, port, str(tmp_path / "tiny.yaml"), str(run_dir), str(tmp_path / "init")),
        nprocs=2,
        start_method="fork",
    )
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert summary["solves"][0]["converged"] and math.isfinite(summary["metrics"]["test_bpd"])
    assert summary["metrics"]["acc_top1"] > 30  # far above chance (10 %) after one epoch and the solve
    ranks = [torch.load(run_dir / f"stats.{r}", weights_only=True) for r in range(2)]
    assert sorted(p.name for p in run_dir.iterdir()) == [
        "checkpoint.pt",
        "metrics.csv",
        "metrics.json",
        "stats.0",
        "stats.1",
    ]  # no stray temporary files
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
    gs = cfg.gaussians
    res = fpi.solve(
        single, gs.lam, alpha=gs.alpha, pi=gs.pi, learn=gs.learn, **dataclasses.asdict(cfg.solver)
    )
    torch.testing.assert_close(prior.means, res.means.float())
    torch.testing.assert_close(prior.variances, res.variances.float())
    # The test metrics gathered from the two shards are a single process's: the seeded noise of
    # the bits/dim bound depends on the image, not on the process that evaluates it.
    ema_model, ema_prior, _ = load_checkpoint(run_dir)
    alone = evaluate_flow(ema_model, ema_prior, load_data(cfg)[1], cfg.bits, cfg.eval_batch_size)
    for key in ("test_bpd", "test_bpd_centres", "acc_top1", "acc_top5"):
        assert summary["metrics"][key] == pytest.approx(alone[key], rel=1e-6), key


def test_image_size_that_does_not_suit_the_levels_fails_before_training(tmp_path: Path) -> None:
    folder = tmp_path / "own"
    folder.mkdir()
    for split in ("train", "test"):
        np.savez_compressed(
            folder / f"{split}.npz",
            x=np.zeros((30, 12, 12, 1), np.uint8),
            y=np.arange(30) % 3,
            classes=np.array(["a", "b", "c"]),
        )
    cfg = tiny(dataset=str(folder), per_class=None, test_per_class=None, batch_size=10, **{"model.levels": 3})
    with pytest.raises(
        ValueError,
        match=r"12x12 after padding \(pad=0\), not divisible by 2\*\*model.levels = 8.*"
        r"\(e.g. pad=2\)",
    ):
        train(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
    np.savez_compressed(
        folder / "test.npz",
        x=np.zeros((30, 12, 12, 1), np.uint8),
        y=np.arange(30) % 2,
        classes=np.array(["a", "b"]),
    )
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
    with pytest.raises(
        ValueError, match=r"unknown dataset 'fashion_mnst': neither a known dataset .* nor a folder"
    ):
        TrainConfig(dataset="fashion_mnst")
    (tmp_path / "mine").mkdir()
    assert TrainConfig(dataset="mine").dataset == "mine"
    with pytest.raises(FileNotFoundError, match="has neither train.npz nor train/"):
        load_data(TrainConfig(dataset="mine"))


# ------------------------------------------------------------------------------ evaluation
class _IdentityFlow(torch.nn.Module):
    """z = x flattened, log-determinant 0: the test NLL is that of the prior on the pixels."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(()))  # gives the module a device

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x.flatten(1), x.new_zeros(x.shape[0])


def _constant_images(levels: list[int], per_class: int, size: int = 4) -> data.ImageArrays:
    """Class c: ``per_class`` single-channel images with every pixel equal to levels[c]."""
    y = torch.arange(len(levels)).repeat_interleave(per_class)
    x = torch.tensor(levels, dtype=torch.uint8)[y].view(-1, 1, 1, 1).expand(-1, 1, size, size).contiguous()
    return data.ImageArrays(x, y, tuple(str(c) for c in range(len(levels))))


def test_test_bpd_is_the_uniform_dequantisation_bound():
    """For z = x and N(0, I) the expected NLL over u ~ U[0, 1) exceeds the bin-centre NLL by
    w^2 / 24 nats per dimension (w = 2 / 2^bits, the bin width): 0.5 E[(c + d)^2] with d
    uniform on (-w/2, w/2). A wrong noise range or offset moves the mean by >> 5 sigma."""
    bits, per_class = 2, 300
    pixels = torch.randint(
        0, 256, (per_class * 3, 1, 4, 4), generator=torch.Generator().manual_seed(0), dtype=torch.uint8
    )
    arrays = data.ImageArrays(pixels, torch.arange(3).repeat(per_class), ("a", "b", "c"))
    prior = ClassGaussians(torch.zeros(3, 16), torch.ones(3, 16))
    out = evaluate_flow(_IdentityFlow(), prior, arrays, bits, batch_size=64)
    d = 16 * math.log(2.0)  # nats per bit/dim
    excess = (out["test_bpd"] - out["test_bpd_centres"]) * d / 16  # nats per dimension
    w = 2.0 / 2**bits
    centres = data.dequantize(data.quantize(arrays.x, bits), bits, noise=False)
    # The fluctuating term c * d has standard deviation rms(c) w / sqrt(12) per dimension.
    sigma = float(centres.pow(2).mean().sqrt()) * w / math.sqrt(12) / math.sqrt(centres.numel())
    assert abs(excess - w**2 / 24) < 5 * sigma and w**2 / 24 > 10 * sigma
    # Deterministic, and the same whatever the batch size.
    again = evaluate_flow(_IdentityFlow(), prior, arrays, bits, batch_size=500)
    assert again["test_bpd"] == pytest.approx(out["test_bpd"], rel=1e-6)
    assert again["test_bpd_centres"] == pytest.approx(out["test_bpd_centres"], rel=1e-6)


def test_metric_units_at_the_boundaries():
    """NF accuracy in percent: a perfect classifier gives 100, a always-wrong one 0; a flow that
    is uniform on [-1, 1]^D codes b-bit data in exactly b bits/dim."""
    bits, levels = 8, [30, 128, 220]
    arrays = _constant_images(levels, per_class=20)
    means = data.dequantize(torch.tensor(levels).view(3, 1).expand(3, 16), bits, noise=False)
    variances = torch.full((3, 16), 0.01)
    right = evaluate_flow(_IdentityFlow(), ClassGaussians(means, variances), arrays, bits)
    assert right["acc_top1"] == 100.0 and right["acc_top5"] == 100.0  # top-5 clipped to K = 3
    wrong = evaluate_flow(_IdentityFlow(), ClassGaussians(means.roll(1, 0), variances), arrays, bits)
    assert wrong["acc_top1"] == 0.0 and wrong["acc_top5"] == 100.0
    assert 0 < right["test_bpd"] < wrong["test_bpd"]
    assert float(data.bits_per_dim(torch.tensor(16 * math.log(2.0)), 16, bits)) == pytest.approx(bits)
