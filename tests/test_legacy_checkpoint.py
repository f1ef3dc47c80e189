"""Runs written before the solver / gd / schedule config groups still load: their stored config
(flat ``gaussians`` keys) is upgraded, and their flows give the outputs they gave then."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import script

from nfpi.config import TrainConfig, upgrade
from nfpi.evaluation import evaluate_flow
from nfpi.latents import encode
from nfpi.train import load_checkpoint, load_data, read_checkpoint

REPO = Path(__file__).resolve().parents[1]
portability = script("portability")
LEGACY = Path(__file__).parent / "data" / "legacy_d10b07e"
# The command line that made the checkpoint (see its README), in the current layout.
NEW_LAYOUT = {
    "epochs": 1,
    "model.hidden": 8,
    "model.steps": 1,
    "per_class": 20,
    "test_per_class": 10,
    "batch_size": 32,
    "eval_batch_size": 200,
    "init_images": 64,
    "solver.max_iter": 500,
    "gd.steps": 50,
    "gd.lr": 0.1,
}


def test_legacy_config_upgrades_to_the_new_layout():
    stored = read_checkpoint(LEGACY / "checkpoint.pt")["config"]
    assert "gd_lr" in stored["gaussians"] and "solver" not in stored  # really the old layout
    expected = TrainConfig.from_yaml(REPO / "configs" / "digits_cpu.yaml", **NEW_LAYOUT)
    assert TrainConfig.from_dict(upgrade(stored)) == expected
    assert load_checkpoint(LEGACY)[2] == expected


def legacy_tolerance(metric: str, floor: float) -> float:
    """10x the largest difference to the stored outputs measured on the 12 emulated machines of
    ``results/portability.csv`` (other ATen kernels, oneDNN ISA, threads), never below ``floor``."""
    return max(10 * float(portability.spread("legacy", metric).max()), floor)


def test_legacy_checkpoint_gives_the_same_flow_outputs():
    """The stored outputs were made on another processor: equal up to float32 rounding, which
    another machine's kernels change (measured), not bit for bit."""
    model, gaussians, cfg = load_checkpoint(LEGACY)
    reference = torch.load(LEGACY / "outputs.pt", weights_only=True)
    test_set = load_data(cfg)[1]
    z, logdet = encode(model, test_set, cfg.bits, 500)
    eps = torch.finfo(torch.float32).eps  # floors: 8 float32 ulps of the largest stored value
    z_tol = legacy_tolerance("z", 8 * eps * float(reference["z"].abs().max()))
    logdet_tol = legacy_tolerance("logdet", 8 * eps * float(reference["logdet"].abs().max()))
    assert torch.allclose(z[:40], reference["z"], rtol=0, atol=z_tol), float(
        (z[:40] - reference["z"]).abs().max()
    )
    assert torch.allclose(logdet[:40], reference["logdet"], rtol=0, atol=logdet_tol)
    metrics = evaluate_flow(model, gaussians, test_set, cfg.bits, 500)
    one_image = 100 / len(test_set)  # an accuracy moves by whole images: one boundary flip
    for key, value in reference["metrics"].items():
        floor = one_image if key.startswith("acc") else 8 * eps * abs(value)
        assert abs(metrics[key] - value) <= legacy_tolerance(key, floor), (key, metrics[key], value)


@pytest.mark.parametrize(
    "old, new",
    [
        ("gaussians.gd_lr", "gd.lr"),
        ("gaussians.tol", "solver.tol"),
        ("gaussians.solve_epoch", "schedule.solve_epoch"),
    ],
)
def test_old_keys_name_their_new_place(tmp_path, old, new):
    with pytest.raises(ValueError, match=rf"{old} moved to {new}"):
        TrainConfig.from_dict({}, **{old: 1})
    group, key = old.split(".")
    with pytest.raises(ValueError, match=rf"{old} moved to {new}"):
        TrainConfig.from_dict({group: {key: 1}})
    path = tmp_path / "old.yaml"
    path.write_text(f"{group}:\n  {key}: 1\n")
    with pytest.raises(ValueError, match=rf"old.yaml: {old} moved to {new}"):
        TrainConfig.from_yaml(path)


def test_upgrade_leaves_a_current_config_alone():
    current = TrainConfig().to_dict()
    assert upgrade(current) is current
