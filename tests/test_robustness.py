"""Issue 13 / 15: every bad input and fault gets a clear, early answer, and nothing is lost.

A table-driven battery over the public API (:mod:`nfpi.prior.fpi`, :mod:`nfpi.prior.gd`,
:mod:`nfpi.prior`, :mod:`nfpi.data`, :mod:`nfpi.train`) and the command line
(``python -m nfpi.train``). Each case asserts the message (it names the key and the fix) and,
where files are involved, that no file was written, lost or overwritten. Runs use a tiny Glow
on scikit-learn digits (about a second each).
"""

from __future__ import annotations

import io
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from nfpi import data
from nfpi.config import TrainConfig
from nfpi.prior import ClassGaussians, ClassStats, FullGaussians, fpi, gd
from nfpi.train import (
    LOCK_FILE,
    CheckpointError,
    RunDirBusy,
    RunDirError,
    load_checkpoint,
    lock_run_dir,
    main,
    train,
    unlock_run_dir,
)

REPO = Path(__file__).resolve().parents[1]
TINY = {
    "dataset": "digits",
    "bits": 5,
    "per_class": 20,
    "epochs": 1,
    "batch_size": 50,
    "eval_batch_size": 200,
    "init_images": 100,
    "seed": 0,
    "threads": 1,
    "model": {"levels": 1, "steps": 1, "hidden": 8},
    "optim": {"warmup": 2, "ema": 0.9},
    "gaussians": {"prior": "fpi", "lam": 10.0},
    "schedule": {"solve_epoch": 0},
}


def tiny(**overrides) -> TrainConfig:
    return TrainConfig.from_dict(TINY, **overrides)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes: to show that nothing changed."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def untimed(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in ("time", "solve_time")}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, dict]:
    run_dir = tmp_path_factory.mktemp("finished")
    return run_dir, train(tiny(), run_dir, progress=False)


@pytest.fixture(scope="module")
def stats() -> ClassStats:
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(3).repeat_interleave(20)
    z = torch.randn(60, 4, generator=gen, dtype=torch.float64) + y[:, None]
    return ClassStats.from_latents(z, y, 3)


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "nfpi.train", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=REPO,
    )


def write_config(path: Path, **overrides) -> Path:
    text = yaml.safe_dump(tiny(**overrides).to_dict())
    path.write_text("# tiny digits run for the robustness tests\n" + text)
    return path


# ------------------------------------------------------------------ solver arguments
SOLVE_CASES = [  # (keyword arguments, message) for both fpi.solve and gd.solve
    ({"alpha": 0.0}, r"alpha \(kernel temperature\) must be finite and > 0"),
    ({"alpha": -1.0}, r"alpha \(kernel temperature\) must be finite and > 0"),
    ({"alpha": float("nan")}, r"alpha \(kernel temperature\) must be finite and > 0"),
    ({"rho": 0.5}, r"rho must be finite and > 1 \(variances are kept in \[v/rho, v\*rho\]\)"),
    ({"rho": 1.0}, r"rho must be finite and > 1"),
    ({"tol": -1e-3}, r"tol must be finite and >=? 0"),
    ({"tol": float("nan")}, r"tol must be finite"),
    ({"lam": -1.0}, r"lambda must be finite and >= 0"),
    ({"pi": "pairwize"}, r"pi must be one of \['pairwise', 'mean'\], got 'pairwize'"),
    ({"learn": "mean"}, r"learn must be one of \['both', 'means', 'variances'\], got 'mean'"),
]
FPI_CASES = SOLVE_CASES + [
    ({"tol": 0.0}, r"tol must be finite and > 0"),
    ({"max_iter": 0}, r"max_iter must be an integer >= 1"),
    ({"max_iter": 2.5}, r"max_iter must be an integer >= 1"),
    ({"accel": "andersen"}, r"accel must be one of \['anderson', 'none'\], got 'andersen'"),
    ({"covariance": "full_"}, r"covariance must be one of \['diag', 'full'\]"),
    ({"on_fail": "rais"}, r"on_fail must be one of \['warn', 'raise'\]"),
    ({"rule": "releases"}, r"rule must be one of \['paper', 'released'\]"),
    ({"memory": 0}, r"memory \(Anderson history\) must be an integer >= 1"),
    ({"var_floor": -1.0}, r"var_floor must be >= 0"),
]
GD_CASES = SOLVE_CASES + [
    ({"steps": 0}, r"steps must be an integer >= 1"),
    ({"lr": 0.0}, r"lr must be finite and > 0"),
    ({"policy": "linaer"}, r"unknown lr policy 'linaer'; choose one of"),
]


@pytest.mark.parametrize("kwargs, message", FPI_CASES, ids=lambda c: str(c)[:40])
def test_fpi_solve_rejects_bad_arguments(stats, kwargs, message):
    kwargs = {"lam": 1.0, **kwargs}
    with pytest.raises(ValueError, match=message):
        fpi.solve(stats, **kwargs)


@pytest.mark.parametrize("kwargs, message", GD_CASES, ids=lambda c: str(c)[:40])
def test_gd_solve_rejects_bad_arguments(stats, kwargs, message):
    kwargs = {"lam": 1.0, "steps": 3, **kwargs}
    with pytest.raises(ValueError, match=message):
        gd.solve(stats, **kwargs)


@given(alpha=st.floats(allow_nan=True), rho=st.floats(allow_nan=True), tol=st.floats(allow_nan=True))
@settings(max_examples=200, deadline=None)
def test_solver_arguments_are_refused_exactly_outside_their_range(alpha, rho, tol):
    valid = {
        "alpha": alpha > 0 and math.isfinite(alpha),
        "rho": rho > 1 and math.isfinite(rho),
        "tol": tol > 0 and math.isfinite(tol),
    }
    try:
        fpi.check_solver_args(
            lam=1.0, alpha=alpha, pi="pairwise", learn="both", rho=rho, tol=tol, max_iter=10
        )
    except ValueError as err:
        # the first invalid argument, in the order checked, is named
        assert str(err).startswith(next(name for name, ok in valid.items() if not ok))
    else:
        assert all(valid.values())


def test_valid_boundary_arguments_still_run(stats):
    """The checks do not reject what is valid: rho just above 1, tol = 0 for GD (never stop early)."""
    with pytest.warns(fpi.FPIWarning, match="did not converge in 1 iterations"):
        assert fpi.solve(stats, 1.0, rho=1.5, max_iter=1).iterations == 1
    assert gd.solve(stats, 1.0, steps=2, tol=0.0).iterations == 2


# ------------------------------------------------------------------ the prior
@pytest.mark.parametrize("kind", ["diagonal", "RFCM"])
def test_predict_and_log_prob_refuse_non_finite_latents(kind):
    means = torch.tensor([[0.0, 0.0], [3.0, 3.0]])
    if kind == "diagonal":
        prior = ClassGaussians(means, torch.ones(2, 2))
    else:
        gen = torch.Generator().manual_seed(0)
        y = torch.arange(2).repeat_interleave(30)
        prior = FullGaussians.from_latents(means[y] + torch.randn(60, 2, generator=gen), y, 2)
    good = torch.tensor([[3.0, 3.0], [0.1, 0.0]])
    assert prior.predict(good).tolist() == [1, 0]
    for bad in (float("nan"), float("inf"), -float("inf")):
        z = good.clone()
        z[1, 0] = bad
        with pytest.raises(ValueError, match=r"latents contain NaN or inf in 1 row\(s\) \(first: \[1\]\)"):
            prior.predict(z)
        with pytest.raises(ValueError, match="latents contain NaN or inf"):
            prior.log_prob(z)


@pytest.mark.parametrize(
    "labels", [torch.tensor([0.0, 1.7]), torch.tensor([True, False])], ids=["float", "bool"]
)
def test_non_integer_labels_are_refused_not_truncated(labels):
    prior = ClassGaussians(torch.zeros(2, 2), torch.ones(2, 2))
    message = r"labels must be an integer tensor \(torch.long\), got torch\.(float|bool)"
    with pytest.raises(ValueError, match=message):
        prior.nll(torch.zeros(2, 2), labels)
    with pytest.raises(ValueError, match="labels must be an integer tensor"):
        prior.sample(labels)
    with pytest.raises(ValueError, match="labels must be an integer tensor"):
        ClassStats.from_latents(torch.zeros(2, 2), labels, 2)


# ------------------------------------------------------------------ config (built before training)
CONFIG_CASES = [  # (override, message naming the key)
    ({"gaussians.alpha": 0}, r"gaussians\.alpha \(kernel temperature\) must be finite and > 0"),
    ({"gaussians.alpha": -2}, r"gaussians\.alpha .* > 0"),
    ({"solver.rho": 0.5}, r"solver\.rho must be finite and > 1"),
    ({"solver.tol": 0}, r"solver\.tol must be finite and > 0"),
    ({"solver.max_iter": 0}, r"solver\.max_iter must be an integer >= 1"),
    ({"gd.steps": 0}, r"gd\.steps must be an integer >= 1"),
    ({"gd.lr": -1}, r"gd\.lr must be finite and > 0"),
    ({"gaussians.pi": "means"}, r"gaussians\.pi must be one of \['pairwise', 'mean'\]"),
    ({"gaussians.learn": "all"}, r"gaussians\.learn must be one of"),
    ({"solver.rule": "x"}, r"solver\.rule must be one of"),
    ({"gd.policy": "x"}, r"gd\.policy must be one of"),
    ({"gaussians.prior": "fp"}, r"gaussians\.prior must be one of"),
    ({"gaussians.lam": -1}, r"gaussians\.lam must be finite and >= 0"),
    ({"epoch": 3}, r"unknown config key.*'epoch'.*valid keys.*'epochs'"),  # held before
    ({"epochs": "three"}, r"epochs must be of type int"),  # held before
    ({"optim.lr": 0}, r"optim\.lr must be > 0"),  # held before
    ({"optim.warmup": 100, "optim.decay_steps": 100}, r"optim\.decay_steps must be > warmup \(100\)"),
    ({"optim.min_lr": 0.5}, r"optim\.min_lr must lie in \[0, lr"),
]


@pytest.mark.parametrize("override, message", CONFIG_CASES, ids=lambda c: str(c)[:40])
def test_config_values_are_checked_when_built(override, message):
    with pytest.raises(ValueError, match=message):
        tiny(**override)


def test_solve_after_the_last_epoch_is_refused_before_anything_is_written(tmp_path):
    run_dir = tmp_path / "run"
    for prior in ("fpi", "gd", "data"):
        with pytest.raises(
            ValueError,
            match=r"schedule\.solve_epoch=1 is not before the end of training "
            r"\(epochs=1, .*would never happen; set schedule\.solve_epoch",
        ):
            train(tiny(**{"schedule.solve_epoch": 1, "gaussians.prior": prior}), run_dir, progress=False)
    assert not run_dir.exists()
    # random/standard Gaussians are never solved: any solve_epoch is fine for them.
    assert (
        train(tiny(**{"schedule.solve_epoch": 5, "gaussians.prior": "standard"}), run_dir, progress=False)[
            "solved"
        ]
        is None
    )


@pytest.mark.parametrize(
    "text, message",
    [
        ("dataset: digits\nepochs: [1\n", r"invalid YAML at line 3, column 1"),
        ("dataset: digits\n  epochs: 1\n", r"invalid YAML at line 2, column 9"),
        ("", r"is empty: a training config must set its options"),
        ("# only a comment\n", r"is empty"),
        ("- a list\n", r"must be a YAML mapping"),  # held before
    ],
)
def test_bad_yaml_files_get_one_line_errors(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as err:
        TrainConfig.from_yaml(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


# ------------------------------------------------------------------ the run directory
def test_unwritable_run_directory_fails_before_data_or_training(tmp_path, monkeypatch):
    """As root chmod does not block writes, so the run directory lies under a regular file."""
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    monkeypatch.setattr("nfpi.train.loop.splits", lambda cfg: pytest.fail("data loaded before the check"))
    with pytest.raises(RunDirError, match=r"directory .*a_file/run is not writable \(.*Error.*choose"):
        train(tiny(), blocker / "run", progress=False)


def test_a_locked_run_directory_is_refused_with_the_holder_pid(finished, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished[0], run_dir)
    before = snapshot(run_dir)
    handle = lock_run_dir(run_dir)  # another holder (flock locks are per open file)
    try:
        for cfg in (tiny(), tiny(**{"gaussians.lam": 99.0})):  # same run or another config
            # RunDirBusy (a RunDirError): scripts/full_data.py then trains another run meanwhile
            with pytest.raises(RunDirBusy, match=rf"in use by another training process \(pid {os.getpid()}"):
                train(cfg, run_dir, resume=False, progress=False)
        assert {k: v for k, v in snapshot(run_dir).items() if k != LOCK_FILE} == before
    finally:
        unlock_run_dir(handle, run_dir)
    assert snapshot(run_dir) == before  # the lock file goes with the lock
    assert train(tiny(), run_dir, progress=False) == finished[1]


def test_a_stale_lock_of_a_killed_process_is_taken_over_and_a_live_one_named(finished, tmp_path):
    """A process holding the lock is refused by the CLI with its PID; SIGKILL leaves the lock file
    behind, which the next run takes over."""
    run_dir = tmp_path / "run"
    shutil.copytree(finished[0], run_dir)
    config = write_config(tmp_path / "c.yaml")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; import nfpi.train.runs as t; "
            "lock = t.lock_run_dir(Path(sys.argv[1])); print('locked', flush=True); time.sleep(600)",
            str(run_dir),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = snapshot(run_dir)
        busy = cli("--config", str(config), "--run-dir", str(run_dir), "--no-progress", "--no-resume")
        assert busy.returncode == 1 and busy.stdout == ""
        assert busy.stderr.strip().splitlines() == [
            f"error: run directory {run_dir} is in use by another training process (pid {holder.pid} on "
            f"{os.uname().nodename}); wait for it to finish or use another run directory"
        ]
        assert snapshot(run_dir) == before
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        holder.stdout.close()
    assert (run_dir / LOCK_FILE).exists()  # stale
    assert train(tiny(), run_dir, progress=False) == finished[1]
    assert not (run_dir / LOCK_FILE).exists()


@pytest.mark.slow
def test_two_cli_runs_started_together_never_mix(tmp_path):
    """The issue's worst case: two configs, one run directory, started at once. One run owns
    the directory; the other is refused (lock, or a checkpoint of another run) and every file
    left there belongs to the owner."""
    run_dir = tmp_path / "run"
    procs = []
    for lam in (10.0, 50.0):
        config = write_config(tmp_path / f"{lam}.yaml", epochs=3, per_class=60, **{"gaussians.lam": lam})
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "nfpi.train",
                    "--config",
                    str(config),
                    "--run-dir",
                    str(run_dir),
                    "--no-progress",
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
            )
        )
    outs = [p.communicate(timeout=300) for p in procs]
    codes = [p.returncode for p in procs]
    assert sorted(codes) == [0, 1], outs
    owner = [10.0, 50.0][codes.index(0)]
    refused = outs[codes.index(1)][1].strip().splitlines()
    assert len(refused) == 1 and (
        "is in use by another training process" in refused[0] or "belongs to a different run" in refused[0]
    )
    summary = yaml.safe_load((run_dir / "metrics.json").read_text())
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert summary["config"]["gaussians"]["lam"] == ckpt["config"]["gaussians"]["lam"] == owner
    assert len((run_dir / "metrics.csv").read_text().splitlines()) == 1 + 3
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint.pt", "metrics.csv", "metrics.json"]


# ------------------------------------------------------------------ checkpoints
def test_a_full_disk_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    """Held before (atomic writes), now with the checksum: a failed save leaves the previous,
    verifiable checkpoint and no temporary file; the run resumes from it."""
    replace, calls = os.replace, []

    def full_after_first_epoch(src, dst):
        calls.append(dst)
        if len(calls) > 3:  # epoch 0 wrote checkpoint, metrics.csv, metrics.json
            raise OSError(28, "No space left on device")
        replace(src, dst)

    monkeypatch.setattr("nfpi._util.os.replace", full_after_first_epoch)
    with pytest.raises(OSError, match="No space left on device"):
        train(tiny(epochs=2), tmp_path, progress=False)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "metrics.csv", "metrics.json"]
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["epoch"] == 1
    load_checkpoint(tmp_path)  # verifies
    assert train(tiny(epochs=2), tmp_path, progress=False)["epoch"] == 1


def flip_tensor_bytes(path: Path, count: int = 64) -> None:
    """Invert ``count`` bytes in the middle of the largest tensor record of a torch zip file."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    name_len, extra_len = np.frombuffer(bytes(raw[info.header_offset + 26 : info.header_offset + 30]), "<u2")
    start = info.header_offset + 30 + int(name_len) + int(extra_len) + info.file_size // 2 - count // 2
    raw[start : start + count] = bytes(b ^ 0xFF for b in raw[start : start + count])
    path.write_bytes(bytes(raw))


def test_flipped_tensor_bytes_are_caught_by_the_checksum(finished, tmp_path):
    shutil.copytree(finished[0], tmp_path / "run")
    path = tmp_path / "run" / "checkpoint.pt"
    flip_tensor_bytes(path)
    torch.load(path, weights_only=True)  # torch itself does not notice: only the checksum can
    before = snapshot(tmp_path / "run")
    message = r"checkpoint\.pt fails its SHA-256 check: its contents changed .*delete it or restore a good"
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(tmp_path / "run")
    with pytest.raises(CheckpointError, match=message):  # resume of a finished run: no old metrics
        train(tiny(), tmp_path / "run", progress=False)
    with pytest.raises(CheckpointError, match=message):  # extending it: no training on damaged weights
        train(tiny(epochs=2), tmp_path / "run", progress=False)
    assert snapshot(tmp_path / "run") == before
    assert untimed(train(tiny(), tmp_path / "run", resume=False, progress=False)) == untimed(finished[1])


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda good: b"", r"not a readable checkpoint \(it is empty, 0 bytes\)"),
        (
            lambda good: good[: len(good) // 2],
            r"not a readable checkpoint \(.*\)\. It is probably truncated or",
        ),
        (lambda good: good[:100], r"not a readable checkpoint"),
        (lambda good: b"\n", r"not a readable checkpoint"),
    ],
    ids=["empty", "half", "100 bytes", "newline"],
)
def test_empty_and_truncated_checkpoints(finished, tmp_path, damage, message):
    good = (finished[0] / "checkpoint.pt").read_bytes()
    (tmp_path / "checkpoint.pt").write_bytes(damage(good))
    for call in (lambda: load_checkpoint(tmp_path), lambda: train(tiny(), tmp_path, progress=False)):
        with pytest.raises(CheckpointError, match=message) as err:
            call()
        assert "\n" not in str(err.value) and "--no-resume" in str(err.value)


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_foreign_objects_and_old_checkpoints(finished, tmp_path):
    buffer = io.BytesIO()
    torch.save({"format": "nfpi.train/1", "x": Evil()}, buffer)  # held before: weights_only refuses it
    (tmp_path / "checkpoint.pt").write_bytes(buffer.getvalue())
    with pytest.raises(CheckpointError, match="not a readable checkpoint .*Unpickling"):
        load_checkpoint(tmp_path)
    # A checkpoint from before checksums loads with a warning that it cannot be verified.
    old = torch.load(finished[0] / "checkpoint.pt", weights_only=True)
    del old["sha256"]
    torch.save(old, tmp_path / "checkpoint.pt")
    with pytest.warns(UserWarning, match="has no checksum .* cannot be verified"):
        load_checkpoint(tmp_path)
    # Any other change to the contents, e.g. an edited metrics history, is caught.
    changed = torch.load(finished[0] / "checkpoint.pt", weights_only=True)
    changed["metrics"][0]["acc_top1"] = 100.0
    torch.save(changed, tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="fails its SHA-256 check"):
        load_checkpoint(tmp_path)


def test_fewer_epochs_than_a_finished_run_warns_and_returns_that_epoch(tmp_path):
    two = train(tiny(epochs=2), tmp_path, progress=False)
    with pytest.warns(
        UserWarning,
        match=r"holds a finished 2-epoch run and epochs=1 asks for fewer: "
        r"returning the metrics of epoch 0, but the checkpoint holds the "
        r"weights after 2",
    ):
        one = train(tiny(), tmp_path, progress=False)
    assert one["epoch"] == 0 and two["epoch"] == 1
    assert one == torch.load(tmp_path / "checkpoint.pt", weights_only=True)["metrics"][0]


# ------------------------------------------------------------------ data
def test_offline_download_is_one_line(tmp_path, monkeypatch):
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise urllib.error.URLError(OSError(-3, "Temporary failure in name resolution"))

    monkeypatch.setattr(torchvision.datasets, "MNIST", offline)
    with pytest.raises(
        ConnectionError,
        match=r"could not download mnist \(train\) .*URLError.*copy "
        r"mnist_train\.npz into .* NFPI_DATA",
    ) as err:
        data.load("mnist", "train", data_dir=tmp_path, download=True)
    assert err.value.__cause__ is None and "\n" not in str(err.value)
    assert list(tmp_path.rglob("*.npz")) == []


def test_missing_and_malformed_data_files(tmp_path, monkeypatch):
    """Held before: a missing file names itself and NFPI_DATA; a malformed one is reported."""
    monkeypatch.setenv("NFPI_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"mnist_train\.npz not found.*NFPI_DATA"):
        train(tiny(dataset="mnist"), tmp_path / "run", progress=False)
    (tmp_path / "mnist_train.npz").write_bytes(b"PK\x03\x04 garbage")
    with pytest.raises(data.DatasetFormatError, match="not a readable npz archive"):
        train(tiny(dataset="mnist"), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()  # nothing written: the empty run directory is removed too


# ------------------------------------------------------------------ the command line
def test_cli_overrides_on_both_sides_of_options(tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml", epochs=3)
    metrics = main(
        [
            "--config",
            str(config),
            "epochs=1",
            "--run-dir",
            str(tmp_path / "run"),
            "model.hidden=8",
            "--no-progress",
            "gaussians.lam=10",
        ]
    )
    assert metrics["epoch"] == 0 and '"epoch": 0' in capsys.readouterr().out


def with_config(d: Path) -> Path:
    return write_config(d / "c.yaml")


def empty_checkpoint(d: Path) -> None:
    with_config(d)
    (d / "run").mkdir()
    (d / "run" / "checkpoint.pt").write_bytes(b"")


CONFIG = ["--config", "{d}/c.yaml"]


@pytest.mark.parametrize(
    "setup, argv, message",
    [
        (lambda d: d.joinpath("c.yaml").write_text("epochs: [1\n"), CONFIG, r"invalid YAML at line 2"),
        (lambda d: d.joinpath("c.yaml").write_text(""), CONFIG, r"c\.yaml is empty"),
        (lambda d: None, ["--config", "{d}/missing.yaml"], r"No such file or directory: '.*missing\.yaml'"),
        (with_config, CONFIG + ["gaussians.alpha=0"], r"gaussians\.alpha"),
        (with_config, CONFIG + ["epochs=[1"], r"is not a YAML value"),
        (
            lambda d: (with_config(d), d.joinpath("f").write_text("")),
            CONFIG + ["--run-dir", "{d}/f/run"],
            r"run directory .*f/run is not writable",
        ),
        (
            empty_checkpoint,
            CONFIG + ["--run-dir", "{d}/run"],
            r"checkpoint\.pt is not a readable checkpoint \(it is empty",
        ),
    ],
    ids=["yaml syntax", "empty yaml", "missing yaml", "alpha=0", "bad override", "unwritable", "0-byte ckpt"],
)
def test_cli_errors_are_one_line(tmp_path, capsys, setup, argv, message):
    setup(tmp_path)
    with pytest.raises(SystemExit, match=r"^error: .*" + message) as err:
        main([a.format(d=tmp_path) for a in argv] + ["--no-progress"])
    assert "\n" not in str(err.value.code)
    if (tmp_path / "run" / "checkpoint.pt").exists():
        assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == b""  # nothing overwritten


def test_cli_subprocess_exit_status_and_stderr(tmp_path):
    """Through ``python -m nfpi.train``: exit status 1 and one stderr line, no traceback."""
    config = write_config(tmp_path / "c.yaml", **{"schedule.solve_epoch": 4})
    start = time.perf_counter()
    result = cli("--config", str(config), "--run-dir", str(tmp_path / "run"))
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        "error: schedule.solve_epoch=4 is not before the end of training (epochs=1, last epoch 0), so the "
        "prior='fpi' solve would never happen; set schedule.solve_epoch <= 0 (0: after the first epoch, -1: "
        "before training) or raise epochs"
    ]
    assert not (tmp_path / "run").exists() and time.perf_counter() - start < 60
