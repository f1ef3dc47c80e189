"""Shared test settings: one thread for tiny tensors, float64 where precision is the point, the
tiny training config that the training, schedule, code and experiment tests start from, and
latents with class-specific full covariances (full-covariance prior tests)."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from nfpi.config import TrainConfig

# A digits run that trains in about a second: 1 epoch, a 2-level Glow with one 8-channel step per
# level, FPI Gaussians solved after epoch 0. Tests override what they exercise.
TINY_TRAIN: dict[str, Any] = {
    "dataset": "digits",
    "bits": 5,
    "per_class": 40,
    "epochs": 1,
    "batch_size": 100,
    "eval_batch_size": 200,
    "init_images": 200,
    "seed": 1,
    "threads": 1,
    "model": {"levels": 2, "steps": 1, "hidden": 8},
    "optim": {"warmup": 5, "ema": 0.9},
    "gaussians": {"prior": "fpi", "lam": 40.0},
}


def script(name: str) -> ModuleType:
    """``scripts/<name>.py`` imported as the module ``name`` (once per session)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            name, Path(__file__).parents[1] / "scripts" / f"{name}.py"
        )
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


def tiny_config(**overrides: Any) -> TrainConfig:
    """:data:`TINY_TRAIN` with ``overrides`` (dotted keys or nested dicts, as TrainConfig.from_dict)."""
    return TrainConfig.from_dict(TINY_TRAIN, **overrides)


def correlated(n: int, d: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents (n, d) of k classes with class-specific full covariances, float64."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % k
    mix = torch.randn(k, d, d, generator=gen, dtype=torch.float64)
    z = (mix[y] @ torch.randn(n, d, 1, generator=gen, dtype=torch.float64)).squeeze(2)
    return z + 3 * torch.randn(k, d, generator=gen, dtype=torch.float64)[y], y


@pytest.fixture(scope="module")
def single_thread() -> Iterator[None]:
    """One intra-op thread: tiny tensors gain nothing from threads, and on a busy 2-core machine
    OpenMP spin-waiting makes them 10-100x slower (vmap-batched Jacobians especially)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def float64() -> Iterator[None]:
    """float64 by default, for checks whose point is precision (stationarity, fixed points)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)
