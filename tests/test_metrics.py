"""Tests of nfpi.evaluation.classifiers and nfpi.evaluation.metrics (docs/method.md §7: CNN-Acc, oracle, FID,
Coverage, Label Reliability)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import scipy.linalg
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from nfpi.evaluation import (
    ClassifierConfig,
    classifiers,
    cnn_accuracy,
    coverage,
    evaluate,
    extract_features,
    fid,
    generated_metrics,
    label_reliability,
    load_or_train_oracle,
    resnet18_small,
    topk_accuracy,
    train_classifier,
)

TINY = dict(width=4, batch_size=25, device="cpu", flip=False)


pytestmark = pytest.mark.usefixtures("single_thread")


def band_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """8x8 grey images of 3 classes: the bright horizontal band (top/middle/bottom) is the class.

    Flip-invariant and robust to 1-pixel crops, so the augmented training problem stays separable.
    """
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = 0.3 * torch.randn(n, 1, 8, 8, generator=g) - 0.6
    for cls, rows in enumerate((slice(0, 2), slice(3, 5), slice(6, 8))):
        x[y == cls, :, rows, :] += 1.4
    return x.clamp(-1, 1), y


# --------------------------------------------------------------------------- classifiers


@pytest.mark.parametrize(("channels", "size", "width"), [(1, 8, 4), (1, 28, 2), (3, 32, 8)])
def test_resnet18_small_shapes(channels: int, size: int, width: int) -> None:
    model = resnet18_small(num_classes=7, in_channels=channels, width=width)
    x = torch.randn(3, channels, size, size)
    assert model.features(x).shape == (3, 8 * width)
    assert model(x).shape == (3, 7)
    assert model.num_features == 8 * width


def test_resnet18_small_paper_width_is_cifar_resnet18() -> None:
    model = resnet18_small(num_classes=10)
    # The standard CIFAR ResNet-18 (3x3 stem, no max-pool) has exactly this many parameters.
    assert sum(p.numel() for p in model.parameters()) == 11_173_962
    assert model.features(torch.randn(2, 3, 8, 8)).shape == (2, 512)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    stem = model.stem[0]
    assert stem.kernel_size == (3, 3) and stem.stride == (1, 1)


@pytest.mark.parametrize(
    "bad", [dict(num_classes=0), dict(num_classes=3, width=0), dict(num_classes=3, in_channels=-1)]
)
def test_resnet18_small_rejects_bad_sizes(bad: dict) -> None:
    with pytest.raises(ValueError, match="positive int"):
        resnet18_small(**bad)


def test_classifier_learns_separable_problem() -> None:
    x, y = band_images(150, seed=0)
    x_test, y_test = band_images(60, seed=1)
    model = train_classifier(x, y, 3, ClassifierConfig(epochs=8, **TINY), progress=False)
    acc = evaluate(model, x_test, y_test)
    assert acc["top1"] >= 90.0
    assert acc["top5"] == 100.0  # clipped to K=3


def test_training_is_seeded_and_deterministic() -> None:
    x, y = band_images(60, seed=0)
    state = torch.get_rng_state()
    runs = [
        train_classifier(x, y, 3, ClassifierConfig(epochs=1, seed=s, **TINY), progress=False).state_dict()
        for s in (5, 5, 6)
    ]
    assert torch.equal(state, torch.get_rng_state())  # global RNG untouched
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert not all(torch.equal(runs[0][k], runs[2][k]) for k in runs[0])


def test_recipe_keeps_momentum_fixed_while_the_lr_cycles(monkeypatch) -> None:
    """The paper's SGD momentum is a fixed 0.9; OneCycleLR cycles it unless told not to."""
    seen = []
    step = torch.optim.SGD.step

    def record(self, *args, **kwargs):
        seen.append((self.param_groups[0]["lr"], self.param_groups[0]["momentum"]))
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", record)
    x, y = band_images(50, seed=0)
    train_classifier(x, y, 3, ClassifierConfig(epochs=2, **TINY), progress=False)
    lrs, momenta = zip(*seen)
    assert len(seen) == 4 and max(lrs) > 10 * min(lrs)  # the one-cycle schedule is on
    assert set(momenta) == {0.9}


def test_augmentation_crops_and_flips_within_padding() -> None:
    x = torch.arange(64.0).view(1, 1, 8, 8).repeat(200, 1, 1, 1) / 64
    out = classifiers._augment(x, 1, 1, True, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    # Each output is the image shifted by at most one pixel (border filled with -1), maybe flipped.
    centre = out[:, 0, 1:7, 1:7]
    candidates = [
        img[0, 1 + dy : 7 + dy, 1 + dx : 7 + dx]
        for img in (x[0], x[0].flip(2))
        for dy in (-1, 0, 1)
        for dx in (-1, 0, 1)
    ]
    assert all(any(torch.equal(c, cand) for cand in candidates) for c in centre)
    assert len({tuple(c.flatten().tolist()) for c in centre}) == 18  # all 9 shifts x 2 flips occur


def test_train_classifier_rejects_bad_labels() -> None:
    x, y = band_images(30, seed=0)
    with pytest.raises(ValueError, match=r"\[0, 1\].*\[0, 2\]"):
        train_classifier(x, y, 2, ClassifierConfig(epochs=1, **TINY), progress=False)
    with pytest.raises(ValueError, match="integer"):
        train_classifier(x, y.float(), 3, ClassifierConfig(epochs=1, **TINY), progress=False)
    with pytest.raises(ValueError, match="float tensor"):
        train_classifier(x[:, 0], y, 3, ClassifierConfig(epochs=1, **TINY), progress=False)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        ClassifierConfig(batch_size=1)
    with pytest.raises(ValueError, match="lr"):
        ClassifierConfig(lr=0.5, max_lr=0.1)


# --------------------------------------------------------------------------- top-k


def test_topk_accuracy_hand_case() -> None:
    scores = torch.tensor(
        [
            [0.9, 0.05, 0.03, 0.02],  # label 0: rank 0
            [0.1, 0.2, 0.3, 0.4],  # label 1: rank 2
            [0.5, 0.1, 0.3, 0.1],  # label 3: rank 3 (its tie with class 1 counts against it)
            [0.0, 0.0, 0.0, 0.0],  # label 2: all tied -> rank 3
        ]
    )
    y = torch.tensor([0, 1, 3, 2])
    acc = topk_accuracy(scores, y, ks=(1, 2, 3, 4, 5))
    assert acc == {"top1": 25.0, "top2": 25.0, "top3": 50.0, "top4": 100.0, "top5": 100.0}


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 20),
    k=st.integers(1, 8),
    seed=st.integers(0, 2**31 - 1),
    integer_scores=st.booleans(),
)
def test_topk_accuracy_monotone_and_full_at_k(n: int, k: int, seed: int, integer_scores: bool) -> None:
    g = torch.Generator().manual_seed(seed)
    # Integer-valued scores make ties common, the case where a naive top-k is not monotone.
    if integer_scores:
        scores = torch.randint(0, 3, (n, k), generator=g).float()
    else:
        scores = torch.randn(n, k, generator=g)
    y = torch.randint(0, k, (n,), generator=g)
    acc = topk_accuracy(scores, y, ks=tuple(range(1, k + 2)))
    values = [acc[f"top{j}"] for j in range(1, k + 2)]
    assert all(a <= b for a, b in zip(values, values[1:]))
    assert values[k - 1] == 100.0 and values[k] == 100.0
    expected_top1 = 100.0 * np.mean(
        [all(scores[i, y[i]] > scores[i, j] for j in range(k) if j != y[i]) for i in range(n)]
    )
    assert acc["top1"] == pytest.approx(expected_top1)


def test_topk_accuracy_errors() -> None:
    scores = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        topk_accuracy(scores, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        topk_accuracy(scores, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="NaN"):
        topk_accuracy(torch.full((4, 3), float("nan")), torch.tensor([0, 1, 2, 0]))
    with pytest.raises(ValueError, match="positive int"):
        topk_accuracy(scores, torch.tensor([0, 1, 2, 0]), ks=(0,))


# --------------------------------------------------------------------------- FID


def scipy_fid(a: np.ndarray, b: np.ndarray) -> float:
    """Reference Frechet distance (Heusel et al. 2017) with scipy's matrix square root."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


def test_fid_identical_sets_is_zero() -> None:
    feats = torch.randn(200, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert abs(fid(feats, feats)) < 1e-8


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fid_matches_scipy_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(12, 12))
    a = rng.normal(size=(300, 12)) @ mix
    b = rng.normal(size=(250, 12)) @ (mix + 0.3 * rng.normal(size=(12, 12))) + rng.normal(size=12)
    assert fid(a, b) == pytest.approx(scipy_fid(a, b), rel=1e-6)


def test_fid_grows_with_mean_shift() -> None:
    g = torch.Generator().manual_seed(0)
    real = torch.randn(400, 8, generator=g, dtype=torch.float64)
    fake = torch.randn(400, 8, generator=g, dtype=torch.float64)
    values = [fid(real, fake + shift) for shift in (0.0, 0.5, 1.0, 2.0)]
    assert all(a < b for a, b in zip(values, values[1:]))
    # A shift s in all 8 dims adds ~8 s^2 (sampling noise in the means is small at N=400).
    assert values[3] - values[0] == pytest.approx(8 * 4.0, rel=0.1)


def test_fid_sample_and_dimension_checks() -> None:
    feats = torch.randn(10, 4)
    with pytest.raises(ValueError, match="at least 2"):
        fid(feats, feats[:1])
    with pytest.raises(ValueError, match=r"dimension \(4 vs 3\)"):
        fid(feats, feats[:, :3])
    with pytest.raises(ValueError, match="NaN or inf"):
        fid(feats, torch.full((10, 4), float("nan")))
    with pytest.warns(UserWarning, match="rank-deficient"):
        fid(torch.randn(5, 16), torch.randn(5, 16))


# --------------------------------------------------------------------------- Coverage / PRDC


def test_coverage_perfect_when_fake_equals_real() -> None:
    feats = np.random.default_rng(0).normal(size=(100, 6))
    scores = coverage(feats, feats, k=5)
    assert scores["coverage"] == 1.0 and scores["precision"] == 1.0 and scores["recall"] == 1.0
    assert set(scores) == {"precision", "recall", "density", "coverage"}


def test_coverage_zero_for_far_away_fakes() -> None:
    rng = np.random.default_rng(0)
    real = rng.normal(size=(100, 6))
    scores = coverage(real, rng.normal(size=(80, 6)) + 50.0, k=5)
    assert scores == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


def test_coverage_half_when_fakes_cover_one_mode() -> None:
    rng = np.random.default_rng(0)
    real = np.concatenate([rng.normal(size=(100, 4)), rng.normal(size=(100, 4)) + 100.0])
    scores = coverage(real, rng.normal(size=(300, 4)), k=5)
    assert scores["coverage"] == pytest.approx(0.5, abs=0.05)
    assert scores["precision"] > 0.9


def test_coverage_needs_more_than_k_samples() -> None:
    feats = torch.randn(5, 3)
    with pytest.raises(ValueError, match="at least 6"):
        coverage(feats, torch.randn(50, 3), k=5)
    with pytest.raises(ValueError, match="positive int"):
        coverage(feats, feats, k=0)


# --------------------------------------------------------------------------- Label Reliability


def stub_oracle() -> nn.Module:
    """Linear 'oracle' on 1x2x2 images whose logits are the first three pixels."""
    linear = nn.Linear(4, 3, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.eye(3, 4))
    return nn.Sequential(nn.Flatten(), linear)


def test_label_reliability_matches_hand_count() -> None:
    predicted = torch.tensor([0, 1, 2, 2, 1, 0, 0, 1, 2, 1])
    images = -torch.ones(10, 1, 2, 2)
    images.view(10, 4)[torch.arange(10), predicted] = 1.0  # brightest of the first three pixels wins
    labels = predicted.clone()
    labels[[1, 4, 8]] = torch.tensor([0, 2, 0])  # 3 of 10 disagree with the oracle
    assert label_reliability(stub_oracle(), images, labels, batch_size=3) == pytest.approx(70.0)
    # Percent, not a fraction, at both ends: all labels agree -> 100, none -> 0.
    assert label_reliability(stub_oracle(), images, predicted) == 100.0
    assert label_reliability(stub_oracle(), images, (predicted + 1) % 3) == 0.0


def test_label_reliability_rejects_out_of_range_labels() -> None:
    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        label_reliability(stub_oracle(), torch.zeros(2, 1, 2, 2), torch.tensor([0, 3]))


# --------------------------------------------------------------------------- features and combined metrics


def test_extract_features_dtype_shape_and_mode() -> None:
    torch.manual_seed(0)
    model = resnet18_small(3, 1, width=2).train()
    x, _ = band_images(7, seed=0)
    feats = extract_features(model, x, batch_size=3)
    assert feats.dtype == torch.float64 and feats.device.type == "cpu" and feats.shape == (7, 16)
    assert model.training  # mode restored
    # Eval-mode features do not depend on how the data are batched (train-mode batch norm would).
    assert torch.allclose(feats, extract_features(model, x, batch_size=7), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="features"):
        extract_features(stub_oracle(), torch.zeros(2, 1, 2, 2))


def test_generated_metrics_combines_all_metrics() -> None:
    torch.manual_seed(0)
    oracle = resnet18_small(3, 1, width=2).eval()
    x, y = band_images(60, seed=0)
    with pytest.warns(UserWarning, match="rank-deficient"):  # 15 samples < 16 feature dims
        out = generated_metrics(oracle, x, x[:15], y[:15], k=3, progress=False)
    assert set(out) == {"fid", "precision", "recall", "density", "coverage", "label_reliability"}
    assert out["precision"] == 1.0  # generated = a subset of the real set
    assert out["label_reliability"] == pytest.approx(label_reliability(oracle, x[:15], y[:15]))
    same = generated_metrics(oracle, x, x, y, k=3, progress=False)
    assert abs(same["fid"]) < 1e-6 and same["coverage"] == 1.0


def test_generated_metrics_checks_before_extracting() -> None:
    x, y = band_images(10, seed=0)

    class NoFeatures(nn.Module):
        def features(self, x: torch.Tensor) -> torch.Tensor:
            raise AssertionError("features must not be extracted for invalid input")

    with pytest.raises(ValueError, match="at least 6"):
        generated_metrics(NoFeatures(), x, x[:5], y[:5], k=5, progress=False)
    with pytest.raises(ValueError, match="same"):
        generated_metrics(NoFeatures(), x, x[:, :, :4], y, k=5, progress=False)


def test_cnn_accuracy_trains_on_generated_and_tests_on_real() -> None:
    x_gen, y_gen = band_images(150, seed=2)
    x_test, y_test = band_images(60, seed=3)
    acc = cnn_accuracy(x_gen, y_gen, x_test, y_test, 3, ClassifierConfig(epochs=8, **TINY), progress=False)
    assert set(acc) == {"top1", "top5"} and acc["top1"] >= 90.0
    with pytest.raises(ValueError, match="same"):
        cnn_accuracy(x_gen, y_gen, x_test[:, :, :4], y_test, 3, ClassifierConfig(epochs=1, **TINY))


# --------------------------------------------------------------------------- oracle cache


ORACLE_CFG = ClassifierConfig(epochs=1, width=2, batch_size=20, device="cpu", flip=False)


def test_oracle_cache_round_trip(tmp_path, monkeypatch, caplog) -> None:
    x, y = band_images(40, seed=0)
    path = tmp_path / "oracles" / "digits.pt"
    meta = {"dataset": "digits", "bits": 5}
    trained = load_or_train_oracle(x, y, 3, ORACLE_CFG, path, meta, progress=False)
    assert path.exists() and [p.name for p in path.parent.iterdir()] == ["digits.pt"]  # no temp file left

    def no_training(*args, **kwargs):
        raise AssertionError("a matching cached oracle must be loaded, not retrained")

    monkeypatch.setattr(classifiers, "train_classifier", no_training)
    with caplog.at_level(logging.INFO, logger="nfpi.evaluation.classifiers"):
        loaded = load_or_train_oracle(x, y, 3, ORACLE_CFG, path, meta, progress=False)
    assert "loaded cached oracle" in caplog.text
    assert not loaded.training
    a, b = trained.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(trained(x), loaded(x))

    saved = torch.load(path, weights_only=True)
    assert saved["meta"]["dataset"] == "digits" and saved["meta"]["num_classes"] == 3
    assert saved["meta"]["image_shape"] == [1, 8, 8] and saved["meta"]["config"]["width"] == 2


def test_oracle_meta_mismatch(tmp_path, monkeypatch) -> None:
    x, y = band_images(40, seed=0)
    path = tmp_path / "oracle.pt"
    load_or_train_oracle(x, y, 3, ORACLE_CFG, path, {"dataset": "digits"}, progress=False)
    with pytest.raises(ValueError, match=r"dataset: cached 'digits' vs requested 'mnist'"):
        load_or_train_oracle(x, y, 3, ORACLE_CFG, path, {"dataset": "mnist"}, progress=False)
    with pytest.raises(ValueError, match=r"num_classes: cached 3 vs requested 4"):
        load_or_train_oracle(x, y, 4, ORACLE_CFG, path, {"dataset": "digits"}, progress=False)
    x_big = torch.nn.functional.interpolate(x, size=(16, 16))
    with pytest.raises(ValueError, match=r"image_shape: cached \[1, 8, 8\] vs requested \[1, 16, 16\]"):
        load_or_train_oracle(x_big, y, 3, ORACLE_CFG, path, {"dataset": "digits"}, progress=False)
    with pytest.raises(ValueError, match="disagrees"):
        load_or_train_oracle(x, y, 3, ORACLE_CFG, path, {"dataset": "digits", "num_classes": 10})

    calls = []
    real_train = classifiers.train_classifier
    monkeypatch.setattr(
        classifiers, "train_classifier", lambda *a, **k: calls.append(1) or real_train(*a, **k)
    )
    load_or_train_oracle(x, y, 3, ORACLE_CFG, path, {"dataset": "mnist"}, overwrite=True, progress=False)
    assert calls == [1]
    assert torch.load(path, weights_only=True)["meta"]["dataset"] == "mnist"


@pytest.mark.parametrize("content", [b"not a checkpoint at all", b""])
def test_oracle_corrupt_file(tmp_path, content: bytes) -> None:
    x, y = band_images(40, seed=0)
    path = tmp_path / "oracle.pt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="corrupt"):
        load_or_train_oracle(x, y, 3, ORACLE_CFG, path, {"dataset": "digits"}, progress=False)
    model = load_or_train_oracle(
        x, y, 3, ORACLE_CFG, path, {"dataset": "digits"}, overwrite=True, progress=False
    )
    assert isinstance(model, nn.Module)
    assert torch.load(path, weights_only=True)["format"] == classifiers.ORACLE_FORMAT


def test_oracle_rejects_foreign_checkpoint(tmp_path) -> None:
    x, y = band_images(40, seed=0)
    path = tmp_path / "oracle.pt"
    torch.save({"weights": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match="not an nfpi oracle checkpoint"):
        load_or_train_oracle(x, y, 3, ORACLE_CFG, path, {"dataset": "digits"}, progress=False)


def test_oracle_meta_must_be_plain(tmp_path) -> None:
    x, y = band_images(40, seed=0)
    with pytest.raises(ValueError, match="plain types"):
        load_or_train_oracle(
            x, y, 3, ORACLE_CFG, tmp_path / "o.pt", {"dataset": torch.zeros(1)}, progress=False
        )
