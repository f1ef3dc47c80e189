"""Tests of nfpi.data.codes: GLEM's CE / CEGLEM class codes (GLEM §5.2), and training with them."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_config

from nfpi import data
from nfpi.data import ClassCodes, CodeConfig
from nfpi.train import load_checkpoint, load_data, train


def test_codes_are_deterministic_separated_and_in_range():
    a = ClassCodes.learn(10, (1, 4, 8), seed=3)
    b = ClassCodes.learn(10, (1, 4, 8), seed=3)
    assert torch.equal(a.prototypes, b.prototypes)
    assert a.prototypes.abs().max() <= 0.8
    # Far apart compared with the training noise (0.1 per pixel, mean squared 0.0033).
    assert a.min_distance() > 0.5
    assert not torch.equal(a.prototypes, ClassCodes.learn(10, (1, 4, 8), seed=4).prototypes)


@pytest.mark.parametrize("bits", [3, 5, 8])
def test_code_round_trip_through_quantisation(bits):
    arrays = data.load("digits", "train")
    codes = ClassCodes.learn(10, (1, 4, 8))
    coded = codes.append_arrays(arrays, noise=0.1, seed=0)
    assert coded.shape == (1, 12, 8)
    assert torch.equal(coded.x[:, :, :8], arrays.x)  # the image itself is untouched
    x = data.dequantize(data.quantize(coded.x, bits), bits, noise=False)
    assert torch.equal(codes.decode(x), arrays.y)
    image, rows = codes.split(x)
    assert image.shape[2:] == (8, 8) and rows.shape[2:] == (4, 8)


def test_float_append_and_random_test_rows():
    codes = ClassCodes.learn(3, (1, 2, 4))
    x = torch.zeros(6, 1, 4, 4)
    y = torch.tensor([0, 1, 2, 2, 1, 0])
    assert torch.equal(
        codes.decode(codes.append(x, y, noise=0.2, generator=torch.Generator().manual_seed(0))), y
    )
    arrays = data.ImageArrays(torch.zeros(6, 1, 4, 4, dtype=torch.uint8), y, ("a", "b", "c"))
    rows = codes.append_random(arrays, seed=0).x[:, :, 4:]
    assert rows.float().std() > 30  # uniform 0..255, not the prototypes
    with pytest.raises(ValueError, match=r"\(N, 1, H, 4\)"):
        codes.decode(torch.zeros(2, 1, 6, 5))


def test_code_config_validation():
    with pytest.raises(ValueError, match="codes.noise"):
        CodeConfig(rows=4, amplitude=0.5, noise=0.5)
    with pytest.raises(ValueError, match="codes.rows"):
        CodeConfig(rows=-1)


def test_training_with_codes_and_a_monomodal_prior(tmp_path):
    cfg = tiny_config(**{"codes.rows": 4, "gaussians.prior": "standard"})
    train_set, test_set = load_data(cfg)
    assert train_set.shape == test_set.shape == (1, 12, 8)
    train(cfg, tmp_path, progress=False)
    model, prior, loaded = load_checkpoint(tmp_path)
    assert model.in_shape == (1, 12, 8) and loaded.codes.rows == 4
    # CE baseline: one standard normal for every class, never refitted.
    assert torch.equal(prior.means, torch.zeros_like(prior.means))
    assert torch.equal(prior.variances, torch.ones_like(prior.variances))
    assert json.loads((tmp_path / "metrics.json").read_text())["solves"] == []
