"""Shipped flows (checkpoints/): recorded metrics recomputed, hashes enforced, export round trip."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from nfpi import pretrained
from nfpi.config import TrainConfig, upgrade
from nfpi.evaluation import evaluate_flow
from nfpi.train import load_data, train

TINY = {
    "dataset": "digits",
    "bits": 5,
    "per_class": 30,
    "test_per_class": 10,
    "epochs": 1,
    "batch_size": 100,
    "eval_batch_size": 128,
    "init_images": 128,
    "seed": 1,
    "threads": 1,
    "model": {"levels": 2, "steps": 1, "hidden": 8},
    "optim": {"warmup": 2, "ema": 0.9},
    "gaussians": {"prior": "fpi", "lam": 40.0},
    "schedule": {"solve_epoch": 0},
}


@pytest.mark.slow
@pytest.mark.parametrize("name", pretrained.names())
def test_shipped_flow_matches_its_recorded_metrics(name: str) -> None:
    entry = pretrained.manifest()[name]
    now = pretrained.evaluate_shipped(name)
    _, test_set = load_data(TrainConfig.from_dict(upgrade(entry["config"])))
    assert len(test_set) == entry["test_images"]
    for key in pretrained.RECORDED:
        tol = pretrained.tolerance(entry, key)
        assert abs(now[key] - entry[key]) <= tol, f"{name}: {key} {now[key]:.4f}, recorded {entry[key]:.4f}"


def test_the_shipped_flows_are_listed_and_small() -> None:
    entries = pretrained.manifest()
    assert "digits" in entries
    for name, entry in entries.items():
        path = pretrained.root() / entry["file"]
        assert path.stat().st_size == entry["bytes"] <= pretrained.MAX_BYTES, name
        assert entry["commands"] and entry["dataset"] == entry["config"]["dataset"]


@pytest.fixture(scope="module")
def shipped(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny run exported into a fresh folder: (folder, run_dir)."""
    root = tmp_path_factory.mktemp("pretrained")
    run_dir = root / "run"
    train(TrainConfig.from_dict(TINY), run_dir, progress=False)
    pretrained.export(run_dir, "tiny", "tests/test_pretrained.py TINY", folder=root / "ckpt")
    return root / "ckpt", run_dir


def test_export_then_load_gives_the_run_s_ema_flow(shipped) -> None:
    folder, run_dir = shipped
    model, prior, cfg = pretrained.load("tiny", folder=folder)
    assert cfg == TrainConfig.from_dict(TINY) and not model.training
    _, test_set = load_data(cfg)
    metrics = evaluate_flow(model, prior, test_set, cfg.bits)
    entry = pretrained.manifest(folder)["tiny"]
    for key in pretrained.RECORDED:  # same machine, same code: the recorded numbers exactly
        assert round(metrics[key], 4) == entry[key]
    ema = torch.load(run_dir / "checkpoint.pt", weights_only=True)["ema"]
    for key, value in model.state_dict().items():
        assert torch.equal(value, ema[f"module.{key}"]), key


def test_a_changed_file_is_refused(shipped, tmp_path) -> None:
    folder = tmp_path / "ckpt"
    shutil.copytree(shipped[0], folder)
    payload = bytearray((folder / "tiny.pt").read_bytes())
    payload[len(payload) // 2] ^= 0xFF
    (folder / "tiny.pt").write_bytes(bytes(payload))
    with pytest.raises(pretrained.PretrainedError, match="SHA-256.*git checkout checkpoints/"):
        pretrained.load("tiny", folder=folder)


def test_unknown_and_missing_names_say_what_exists(shipped, tmp_path) -> None:
    with pytest.raises(pretrained.PretrainedError, match="no shipped flow named 'cifar1000'.*tiny"):
        pretrained.load("cifar1000", folder=shipped[0])
    folder = tmp_path / "ckpt"
    shutil.copytree(shipped[0], folder)
    (folder / "tiny.pt").unlink()
    with pytest.raises(pretrained.PretrainedError, match="missing"):
        pretrained.load("tiny", folder=folder)


def test_an_oversized_flow_is_not_shipped(shipped, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(pretrained, "MAX_BYTES", 1000)
    with pytest.raises(pretrained.PretrainedError, match="over the"):
        pretrained.export(shipped[1], "big", "x", folder=tmp_path)
    assert not (tmp_path / "big.pt").exists() and pretrained.names(tmp_path) == []
