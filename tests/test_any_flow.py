"""FPI class Gaussians for any flow (docs/flows.md, "Use FPI with your own flow"): a flow nfpi has
never seen trains, classifies, samples, resumes and reloads through ``train(cfg, run_dir,
model=...)``; a flow that breaks the protocol is refused before training; run keys and
checkpoints tell flows apart; the normflows and zuko adapters train through the protocol
(skipped when the package is not installed)."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from conftest import tiny_config
from torch import nn

from nfpi import cli, repro
from nfpi.data import bin_centres
from nfpi.experiments import compare_arms, peers, train_native
from nfpi.flows import FlowError, Glow, check_flow
from nfpi.train import CheckpointError, keyed_run_dir, load_checkpoint, load_data, train

pytestmark = pytest.mark.usefixtures("single_thread")


class PixelFlow(nn.Module):
    """A user's flow, written against the protocol only: per-pixel affine, then an additive
    coupling of the two halves of the image; latents (B, 2, 4, 8), not flat."""

    def __init__(self, dim: int = 64, hidden: int = 32) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.zeros(dim))
        self.shift = nn.Parameter(torch.zeros(dim))
        self.net = nn.Sequential(nn.Linear(dim // 2, hidden), nn.Tanh(), nn.Linear(hidden, dim // 2))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = x.flatten(1) * self.log_scale.exp() + self.shift
        a, b = h.chunk(2, 1)
        z = torch.cat([a, b + self.net(a)], 1)
        return z.reshape(len(x), 2, 4, 8), self.log_scale.sum().expand(len(x))

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        a, b = z.flatten(1).chunk(2, 1)
        h = torch.cat([a, b - self.net(a)], 1)
        return ((h - self.shift) * (-self.log_scale).exp()).reshape(len(z), 1, 8, 8)


def user_flow(seed: int = 0) -> PixelFlow:
    torch.manual_seed(seed)
    return PixelFlow()


@pytest.fixture(scope="module")
def user_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("user") / "run"
    cfg = tiny_config(epochs=2)
    return cfg, run_dir, train(cfg, run_dir, progress=False, model=user_flow())


def test_a_user_flow_trains_classifies_and_samples(user_run):
    cfg, run_dir, row = user_run
    assert row["epoch"] == 1 and row["solved"] is None and 60 < row["acc_top1"] <= 100, row
    model, prior, loaded = load_checkpoint(run_dir, model=user_flow(seed=5))  # weights come from the file
    _, test_set = load_data(loaded)
    z, logdet = model(bin_centres(test_set.x, cfg.bits))
    assert z.shape == (len(test_set), 64) and logdet.shape == (len(test_set),)
    accuracy = 100 * prior.predict(z).eq(test_set.y).float().mean()
    assert float(accuracy) == pytest.approx(row["acc_top1"], abs=1e-4)  # the run's NF accuracy
    samples = model.inverse(prior.sample(torch.arange(10)))
    assert samples.shape == (10, 1, 8, 8) and torch.isfinite(samples).all()


def test_a_user_flow_resumes_bit_identically(user_run, tmp_path):
    cfg, run_dir, row = user_run
    first = tmp_path / "resumed"
    train(cfg.replace(epochs=1), first, progress=False, model=user_flow())
    resumed = train(cfg, first, progress=False, model=user_flow(seed=7))  # the checkpoint's weights win
    assert resumed["acc_top1"] == row["acc_top1"] and resumed["test_bpd"] == row["test_bpd"]
    a = load_checkpoint(first, model=user_flow())[0].state_dict()
    b = load_checkpoint(run_dir, model=user_flow())[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_user_flow_checkpoint_says_what_to_pass(user_run):
    _, run_dir, _ = user_run
    with pytest.raises(CheckpointError, match=r"PixelFlow.*model="):
        load_checkpoint(run_dir)
    with pytest.raises(CheckpointError, match="another flow"):
        load_checkpoint(run_dir, model=PixelFlow(hidden=16))
    with pytest.raises(CheckpointError, match="another flow"):
        train(tiny_config(epochs=3), run_dir, progress=False, model=PixelFlow(hidden=16))


def test_run_keys_tell_flows_apart(tmp_path):
    cfg = tiny_config()
    keys = {keyed_run_dir(tmp_path, "r", cfg, model=m) for m in (PixelFlow(), PixelFlow(hidden=16), None)}
    assert len(keys) == 3
    assert keyed_run_dir(tmp_path, "r", cfg, model=PixelFlow()) == keyed_run_dir(
        tmp_path, "r", cfg, model=PixelFlow()
    )


class Broken(PixelFlow):
    def __init__(self, fault: str) -> None:
        super().__init__()
        self.fault = fault

    def forward(self, x):
        z, logdet = super().forward(x)
        return {
            "tensor": z,
            "logdet": (z, logdet[:, None]),
            "nan": (z * math.nan, logdet),
            "dims": (z.flatten(1)[:, :32], logdet),
        }.get(self.fault, (z, logdet))

    def inverse(self, z):
        return super().inverse(z) * (1.1 if self.fault == "inverse" else 1.0)


@pytest.mark.parametrize(
    "fault, message",
    [
        ("tensor", "not a pair of tensors"),
        ("logdet", r"logdet has shape \(4, 1\)"),
        ("nan", "non-finite"),
        ("dims", "32 dimensions per image"),
        ("inverse", r"inverse\(forward\(x\)\) differs"),
    ],
)
def test_a_flow_breaking_the_protocol_is_refused_before_training(fault, message, tmp_path):
    with pytest.raises(FlowError, match=message):
        train(tiny_config(), tmp_path / "run", progress=False, model=Broken(fault))
    assert not (tmp_path / "run").exists()  # nothing trained, nothing written


def test_check_flow_refuses_what_is_not_a_flow():
    x = torch.rand(4, 1, 8, 8)
    with pytest.raises(FlowError, match="no inverse"):
        check_flow(nn.Identity(), x)
    with pytest.raises(FlowError, match="torch.nn.Module"):
        check_flow(lambda t: (t, t), x)
    assert check_flow(Glow((1, 8, 8), levels=2, steps=1, hidden=8), x) == (64,)


def test_a_factory_and_a_model_are_not_both_given(tmp_path):
    cfg = tiny_config(**{"model.factory": "nfpi.flows:normflows_glow"})
    with pytest.raises(ValueError, match="not both"):
        train(cfg, tmp_path, model=PixelFlow())
    with pytest.raises(ValueError, match="cannot import 'no_such_module:flow'"):
        train(tiny_config(**{"model.factory": "no_such_module:flow"}), tmp_path)


def _needs(name: str):
    return pytest.mark.skipif(
        importlib.util.find_spec(name) is None, reason=f"{name} not installed (bench extra)"
    )


@_needs("normflows")
def test_normflows_glow_trains_through_the_protocol_and_the_cli(tmp_path, capsys):
    cfg = tiny_config(
        epochs=2,
        model={"factory": "nfpi.flows:normflows_glow", "kwargs": {"levels": 2, "steps": 1, "hidden": 8}},
    )
    row = train(cfg, tmp_path, progress=False)
    assert row["solved"] is None and row["acc_top1"] > 60, row
    model, prior, _ = load_checkpoint(tmp_path)  # rebuilt from model.factory
    assert type(model).__name__ == "NormflowsFlow" and prior.means.shape == (10, 64)
    metrics = cli.main(["eval", str(tmp_path)])["metrics"]
    assert metrics["acc_top1"] == pytest.approx(row["acc_top1"])
    out = cli.main(["sample", str(tmp_path), "-n", "2", "--out", str(tmp_path / "s.png")])
    assert out.stat().st_size > 0


@_needs("zuko")
def test_a_zuko_flow_trains_through_the_protocol(tmp_path):
    kwargs = {"kind": "RealNVP", "transforms": 2, "hidden_features": [32]}
    cfg = tiny_config(epochs=2, model={"factory": "nfpi.flows:zuko_flow", "kwargs": kwargs})
    row = train(cfg, tmp_path, progress=False)
    assert row["acc_top1"] > 60, row
    model, prior, _ = load_checkpoint(tmp_path)
    samples = model.inverse(prior.sample(torch.arange(10)))
    assert samples.shape == (10, 1, 8, 8) and torch.isfinite(samples).all()


@_needs("normflows")
def test_normflows_own_base_trains_like_nfpi_and_rows_are_reused(tmp_path, monkeypatch):
    glow = {"factory": "nfpi.flows:normflows_glow", "kwargs": {"levels": 2, "steps": 1, "hidden": 8}}
    cfg = tiny_config(epochs=2, val_fraction=0.1, model=glow)
    arms = {
        "native": ("native", cfg),
        "fpi": ("nfpi", cfg),
        "data": ("nfpi", cfg.replace(**{"gaussians.prior": "data"})),
    }
    rows = compare_arms(arms, [1, 2], tmp_path / "runs", tmp_path / "h2h.csv")
    assert list(rows["run"]) == [
        "native_seed1",
        "native_seed2",
        "fpi_seed1",
        "fpi_seed2",
        "data_seed1",
        "data_seed2",
    ]
    assert (rows["params"] == rows["params"].iloc[0]).all()  # one flow, its base not counted
    native = rows[rows["setting"] == "native"]
    assert (native["acc_top1"] > 30).all() and native["val_acc_top1"].notna().all(), native
    assert native["acc_top1"].iloc[0] != native["acc_top1"].iloc[1]  # the seed reaches the native run
    # Same config, other code: every row is read back (its `code` names the maker), nothing is
    # trained; notebook 08 checks the current code by a fresh seed against such rows.
    monkeypatch.setattr(peers, "_arm_row", lambda *a: pytest.fail("a finished row was recomputed"))
    monkeypatch.setattr(repro, "code_fingerprint", lambda: "0" * 16)
    again = compare_arms(arms, [1, 2], tmp_path / "runs", tmp_path / "h2h.csv")
    assert again["acc_top1"].tolist() == rows["acc_top1"].tolist()
    assert (again["code"] == rows["code"]).all() and (rows["code"] != "0" * 16).all()
    # Another config, or the same config under another trainer, is another row: trained.
    for changed in ({"native": ("native", cfg.replace(epochs=3))}, {"native": ("nfpi", cfg)}):
        monkeypatch.setattr(peers, "_arm_row", _trained)
        with pytest.raises(_Trained):
            compare_arms(changed, [1], tmp_path / "runs", tmp_path / "h2h.csv")


class _Trained(Exception):
    """Raised in place of training an arm: the row was not reused."""


def _trained(*args):
    raise _Trained


@_needs("normflows")
def test_the_native_trainer_refuses_a_flow_without_its_own_base(tmp_path):
    with pytest.raises(ValueError, match="no own class-conditional base"):
        train_native(tiny_config(), tmp_path, model=PixelFlow())


def test_a_passed_flow_is_not_answered_with_another_flows_finished_run(user_run):
    cfg, run_dir, _ = user_run
    with pytest.raises(CheckpointError, match="another flow"):
        train(cfg, run_dir, progress=False, model=PixelFlow(hidden=16))
