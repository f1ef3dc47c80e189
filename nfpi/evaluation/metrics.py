"""Metrics for generated data (docs/method.md §7; GLEM paper §5.1, Tables 2-5); top-k accuracy is in
:mod:`nfpi.evaluation.accuracy`.

* :func:`fid` - Frechet distance between Gaussians fitted to *oracle* features (GLEM: FID
  on the 512-d penultimate layer of a ResNet-18 trained on the real data, not Inception;
  numbers are therefore not comparable to Inception FIDs). Computed by torchmetrics'
  ``FrechetInceptionDistance`` fed with precomputed features.
* :func:`coverage` - precision, recall, density and coverage of Naeem et al. 2020
  ("Reliable Fidelity and Diversity Metrics for Generative Models") via the ``prdc`` package.
* :func:`label_reliability` - percent of generated images that the oracle assigns to their
  conditioning class.
* :func:`cnn_accuracy` - CNN-Acc: ResNet-18 trained only on generated images, tested on
  the real test set.
* :func:`generated_metrics` - FID, PRDC and Label Reliability in one call.

Sample-size policy. FID needs at least 2 samples per set (a covariance needs two). With
fewer samples than feature dimensions the covariances are rank-deficient and FID is biased
upward and noisy, but still defined: a ``UserWarning`` is issued rather than an error, so
small smoke runs work (the paper uses 10,000+ samples). The k-NN metrics need more than
``k`` samples in each set (every point needs k neighbours besides itself).

Features are (N, F) tensors or arrays; images are float tensors (N, C, H, W) in [-1, 1].
"""

from __future__ import annotations

import contextlib
import io
import warnings

import numpy as np
import prdc
import torch
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance

from .accuracy import topk_accuracy
from .classifiers import ClassifierConfig, apply_batched, check_images, evaluate, train_classifier

__all__ = [
    "cnn_accuracy",
    "coverage",
    "extract_features",
    "fid",
    "generated_metrics",
    "label_reliability",
]

FeatureArray = Tensor | np.ndarray


def _check_counts(n_real: int, n_fake: int, minimum: int, metric: str) -> None:
    if n_real < minimum or n_fake < minimum:
        raise ValueError(
            f"{metric} needs at least {minimum} real and {minimum} generated samples, "
            f"got {n_real} real and {n_fake} generated: use more samples"
        )


def _check_k(k: int) -> None:
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k (nearest neighbours) must be a positive int, got {k!r}")


def _as_features(feats: FeatureArray, name: str) -> Tensor:
    """Validate one feature set and return it as a float64 CPU tensor (N, F)."""
    t = torch.as_tensor(feats).detach().cpu()
    if t.ndim != 2 or t.shape[1] == 0 or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(
            f"{name} features must be a real-valued (N, F) array with F >= 1, "
            f"got dtype {t.dtype} and shape {tuple(t.shape)}"
        )
    t = t.to(torch.float64)
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} features contain NaN or inf; check the feature extractor's inputs")
    return t


def _feature_pair(real: FeatureArray, fake: FeatureArray, minimum: int, metric: str) -> tuple[Tensor, Tensor]:
    r, f = _as_features(real, "real"), _as_features(fake, "generated")
    if r.shape[1] != f.shape[1]:
        raise ValueError(
            f"{metric}: real and generated features differ in dimension ({r.shape[1]} vs {f.shape[1]}); "
            "extract both with the same model"
        )
    _check_counts(r.shape[0], f.shape[0], minimum, metric)
    return r, f


class _Precomputed(nn.Module):
    """Identity 'feature extractor' so torchmetrics' FID consumes features computed elsewhere."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features  # read by torchmetrics instead of a dummy forward pass

    def forward(self, feats: Tensor) -> Tensor:
        return feats


def extract_features(model: nn.Module, x: Tensor, batch_size: int = 500, progress: bool = False) -> Tensor:
    """``model.features`` of images x (N, C, H, W) as float64 on CPU, shape (N, F)."""
    check_images(x)
    if not callable(getattr(model, "features", None)):
        raise ValueError(
            f"{type(model).__name__} has no features() method; use a network from "
            "nfpi.evaluation.classifiers.resnet18_small (e.g. the oracle)"
        )
    return apply_batched(model, x, batch_size, method="features", progress=progress).double()


def fid(real_feats: FeatureArray, fake_feats: FeatureArray) -> float:
    """Frechet distance between Gaussians fitted to real (N1, F) and generated (N2, F) features.

    Needs N1, N2 >= 2; warns when fewer samples than feature dimensions (see module doc).
    """
    real, fake = _feature_pair(real_feats, fake_feats, 2, "FID")
    dim = real.shape[1]
    n_min = min(real.shape[0], fake.shape[0])
    if n_min < dim:
        warnings.warn(
            f"FID from {n_min} samples in {dim} feature dimensions: the covariance is rank-deficient, "
            f"so FID is biased upward and noisy; use at least {dim} (better 10x more) samples",
            UserWarning,
            stacklevel=2,
        )
    metric = FrechetInceptionDistance(feature=_Precomputed(dim))
    metric.update(real, real=True)
    metric.update(fake, real=False)
    return float(metric.compute())


def coverage(real_feats: FeatureArray, fake_feats: FeatureArray, k: int = 5) -> dict[str, float]:
    """Precision, recall, density and coverage (Naeem et al. 2020) with k nearest neighbours.

    Inputs: real (N1, F) and generated (N2, F) features, N1, N2 > k. Returns
    ``{"precision", "recall", "density", "coverage"}``; all but density lie in [0, 1].
    """
    _check_k(k)
    real, fake = _feature_pair(real_feats, fake_feats, k + 1, f"Coverage with k={k}")
    # prdc prints the sample counts on every call; keep library output quiet.
    with contextlib.redirect_stdout(io.StringIO()):
        scores = prdc.compute_prdc(real_features=real.numpy(), fake_features=fake.numpy(), nearest_k=k)
    return {name: float(value) for name, value in scores.items()}


def label_reliability(
    oracle: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 500, progress: bool = False
) -> float:
    """Percent of generated images (N, C, H, W) that ``oracle`` classifies as their label (N,)."""
    check_images(images, labels)
    logits = apply_batched(oracle, images, batch_size, progress=progress)
    return topk_accuracy(logits, labels, (1,))["top1"]


def cnn_accuracy(
    x_gen: Tensor,
    y_gen: Tensor,
    x_test: Tensor,
    y_test: Tensor,
    num_classes: int,
    cfg: ClassifierConfig | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """CNN-Acc: train ResNet-18 on generated images only, test on the real test set.

    x_gen (N, C, H, W) with conditioning labels y_gen (N,); x_test (M, C, H, W), y_test (M,).
    Returns ``{"top1", "top5"}`` in percent.
    """
    check_images(x_gen, y_gen, num_classes, name="generated images")
    check_images(x_test, y_test, num_classes, name="test images")
    if x_gen.shape[1:] != x_test.shape[1:]:
        raise ValueError(
            f"generated images {tuple(x_gen.shape[1:])} and test images {tuple(x_test.shape[1:])} "
            "must have the same (C, H, W)"
        )
    model = train_classifier(x_gen, y_gen, num_classes, cfg, progress=progress)
    return evaluate(model, x_test, y_test)


def generated_metrics(
    oracle: nn.Module,
    x_real: Tensor,
    x_gen: Tensor,
    y_gen: Tensor,
    k: int = 5,
    batch_size: int = 500,
    progress: bool = True,
) -> dict[str, float]:
    """FID, precision/recall/density/coverage and Label Reliability of generated images.

    x_real (N1, C, H, W) are real images, x_gen (N2, C, H, W) generated ones with
    conditioning labels y_gen (N2,). Oracle features of each set are extracted once.
    Returns ``{"fid", "precision", "recall", "density", "coverage", "label_reliability"}``.
    """
    check_images(x_real, name="real images")
    check_images(x_gen, y_gen, name="generated images")
    if x_real.shape[1:] != x_gen.shape[1:]:
        raise ValueError(
            f"real images {tuple(x_real.shape[1:])} and generated images {tuple(x_gen.shape[1:])} "
            "must have the same (C, H, W)"
        )
    _check_k(k)
    # Fail on sample counts before the (possibly long) feature extraction.
    _check_counts(x_real.shape[0], x_gen.shape[0], 2, "FID")
    _check_counts(x_real.shape[0], x_gen.shape[0], k + 1, f"Coverage with k={k}")
    real_feats = extract_features(oracle, x_real, batch_size, progress)
    gen_feats = extract_features(oracle, x_gen, batch_size, progress)
    return {
        "fid": fid(real_feats, gen_feats),
        **coverage(real_feats, gen_feats, k),
        "label_reliability": label_reliability(oracle, x_gen, y_gen, batch_size, progress),
    }
