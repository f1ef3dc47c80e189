"""Tests of nfpi.experiments.finetune (paper Tables 5-6 protocol at small scale): offline model building, the
EVA02 cache check, the training sets of the four settings, the SGDR schedule, one training
step, repeatability and the tidy comparison table."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nfpi import data
from nfpi.augment import AugmentConfig
from nfpi.experiments.finetune import (
    PAPER_MODEL,
    SETTINGS,
    FinetuneConfig,
    PretrainedWeightsMissing,
    build_model,
    cached_weights,
    compare,
    make_optimizer,
    train_setting,
    training_set,
    weights_status,
)
from nfpi.flows import Glow
from nfpi.repro import seed_summary

TINY = dict(
    model_kwargs=dict(img_size=8, patch_size=4, embed_dim=16, depth=1, num_heads=2),
    epochs=1,
    batch_size=16,
    eval_batch_size=64,
)


def toy(n: int, seed: int, shape=(1, 8, 8), k: int = 3) -> data.ImageArrays:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % k
    # Class-dependent brightness so that the classes are learnable.
    x = (torch.rand(n, *shape, generator=g) * 80 + 60 * y.view(-1, 1, 1, 1)).to(torch.uint8)
    return data.ImageArrays(x, y, tuple("abc")[:k], "toy")


def test_cpu_default_builds_offline_and_maps_images_to_logits():
    cfg = FinetuneConfig.cpu()
    model = build_model(cfg, 10, (1, 28, 28))
    assert "eva02" in cfg.model and not cfg.pretrained
    out = model(torch.rand(3, 1, 28, 28) * 2 - 1)
    assert out.shape == (3, 10) and torch.isfinite(out).all()
    rgb = build_model(cfg.replace(model_kwargs={**cfg.model_kwargs, "patch_size": 8}), 10, (3, 32, 32))
    assert rgb(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="patch_size"):
        build_model(cfg, 10, (3, 32, 32))


def test_paper_weights_are_reported_missing_in_an_empty_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    assert cached_weights(PAPER_MODEL) is None
    status = weights_status()
    assert "not cached" in status and PAPER_MODEL in status
    with pytest.raises(PretrainedWeightsMissing, match="not cached locally"):
        build_model(FinetuneConfig.paper(), 10, (3, 32, 32))


def test_cache_lookup_finds_weights_in_the_hub_layout(tmp_path):
    repo = tmp_path / f"models--timm--{PAPER_MODEL}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    weights = repo / "snapshots" / "abc123" / "model.safetensors"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"")
    assert cached_weights(PAPER_MODEL, cache_dir=tmp_path) == weights
    assert cached_weights("eva02_tiny_patch14_224", cache_dir=tmp_path) is None


def test_paper_config_and_sgdr_schedule():
    cfg = FinetuneConfig.paper()
    assert (cfg.model, cfg.optimizer, cfg.lr, cfg.clip, cfg.epochs, cfg.batch_size, cfg.copies) == (
        PAPER_MODEL,
        "sgd",
        1e-5,
        1.0,
        3,
        64,
        3,
    )
    optimizer, scheduler = make_optimizer(cfg, [torch.nn.Parameter(torch.zeros(1))])
    lrs = []
    for _ in range(cfg.epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        scheduler.step()
    np.testing.assert_allclose(lrs, [1e-5, 0.75e-5, 0.25e-5], rtol=1e-12)
    with pytest.raises(ValueError, match="optimizer"):
        FinetuneConfig(optimizer="adam")


def test_training_sets_of_the_settings():
    train, nfa = toy(6, 0), toy(12, 1)
    base = training_set("baseline", train, None, 3)
    assert torch.equal(base.x, train.x.repeat(3, 1, 1, 1)) and torch.equal(base.y, train.y.repeat(3))
    mixed = training_set("nfa+sa", train, nfa, 3)
    assert torch.equal(mixed.x, torch.cat([train.x, nfa.x])) and torch.equal(
        mixed.y, torch.cat([train.y, nfa.y])
    )
    with pytest.raises(ValueError, match="needs 12 NFA images"):
        training_set("nfa", train, None, 3)
    with pytest.raises(ValueError, match="copies >= 2"):
        training_set("nfa", train, nfa, 1)
    with pytest.raises(ValueError, match="setting must be one of"):
        training_set("mixup", train, nfa, 3)


@pytest.mark.parametrize("setting", ["baseline", "nfa+sa"])
def test_one_training_step_runs_and_is_repeatable(setting):
    train, test, nfa = toy(24, 0), toy(12, 1), toy(24, 2)
    cfg = FinetuneConfig.cpu(**TINY, copies=2)
    a = train_setting(setting, train, test, 5, cfg, nfa, progress=False, max_steps=1)
    assert a["steps"] == 1 and a["n_train"] == 48 and 0 <= a["top1"] <= a["top5"] <= 100
    assert np.isfinite(a["train_loss"])
    b = train_setting(setting, train, test, 5, cfg, nfa, progress=False, max_steps=1)
    assert {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}


def test_compare_writes_a_tidy_table(tmp_path):
    torch.manual_seed(0)
    flow = Glow((1, 8, 8), levels=2, steps=1, hidden=4)
    train, test = toy(30, 0), toy(15, 1)
    with torch.no_grad():
        flow(data.dequantize(data.quantize(train.x, 5), 5, noise=False))
    flow.eval()
    cfg = FinetuneConfig.cpu(**TINY, copies=2)
    table = compare(
        flow, None, train, test, 5, cfg, AugmentConfig(k=2), seeds=[0, 1], out_dir=tmp_path, progress=False
    )
    assert list(table["setting"]) == list(SETTINGS) * 2 and list(table["seed"]) == [0] * 4 + [1] * 4
    assert {"top1", "top5", "ft_lr", "ft_model.depth", "nfa_k", "nfa_law", "n_train"} <= set(table.columns)
    assert (table["n_train"] == 60).all() and len(list(tmp_path.glob("nfa_toy_*.npz"))) == 2
    s = seed_summary(table, ["top1", "top5"], baseline="baseline")
    assert list(s.index) == list(SETTINGS) and (s["seeds"] == 2).all()
    assert s.loc["baseline", "top1_diff_mean"] == 0
