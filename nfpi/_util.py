"""Small infrastructure shared by the nfpi modules, one copy each: atomic file writes, the
device choice, CPU thread counts, eval mode for a block, seed derivation, label and choice
checks, a flow's device and dtype, the fallback for decoded images that are not finite. None
of it is paper-specific.

Example:
    >>> with threads(1), eval_mode(flow):
    ...     z, logdet = flow(x)
    >>> tuple(z.shape), flow.training
    ((6, 64), False)
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "atomic_write",
    "check_choice",
    "check_labels",
    "derive_seed",
    "eval_mode",
    "finite_or_original",
    "flow_device_dtype",
    "pick_device",
    "threads",
]


def atomic_write(path: str | os.PathLike[str], payload: bytes | Callable[[IO[bytes]], object]) -> None:
    """Write ``payload`` (bytes, or a function writing to a binary file) to a temp file beside
    ``path``, then os.replace it: a crash never leaves a half-written file under the final name."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(payload, bytes):
                f.write(payload)
            else:
                payload(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def pick_device(pref: str | None = "auto") -> torch.device:
    """``"auto"`` / None: CUDA when available, else the CPU; ``"cpu"``; ``"cuda"`` (a ValueError
    without CUDA); any other torch device string as given (e.g. ``"cuda:1"``)."""
    if pref in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if pref == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was requested but CUDA is not available; use device=auto or cpu")
    return torch.device(pref)


@contextmanager
def threads(n: int | None) -> Iterator[None]:
    """torch's CPU threads set to ``n`` for the block (None: unchanged), then restored."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode for the block; its train/eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def derive_seed(*keys: int) -> int:
    """An independent 63-bit seed for each tuple of integers (seed, epoch, rank, chunk, ...).

    Example:
        >>> derive_seed(1, 0) == derive_seed(1, 0) != derive_seed(1, 1)
        True
        >>> gen = torch.Generator().manual_seed(derive_seed(1, 0))  # seed 1, epoch 0
    """
    # The first 64-bit word of the stream is the same for any number of words drawn.
    return int(np.random.SeedSequence(list(keys)).generate_state(1, np.uint64)[0] >> np.uint64(1))


def check_choice(name: str, value: object, choices: tuple) -> None:
    """One-line ValueError unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def check_labels(
    y: Tensor,
    n: int | None = None,
    num_classes: int | None = None,
    name: str = "labels",
    nonempty: bool = False,
) -> Tensor:
    """``y`` as int64 (n,), or a one-line ValueError: a 1-D integer tensor of ``n`` class indices
    (any length for None; at least one with ``nonempty``), in [0, num_classes) (>= 0 for None)."""
    if not isinstance(y, Tensor) or y.dim() != 1 or (n is not None and y.shape[0] != n):
        shape = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
        size = "" if n is None else f"{n} class indices, shape ({n},) to match the data"
        raise ValueError(f"{name} must be a 1-D tensor of {size or 'class indices'}; got {shape}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(
            f"{name} must be an integer tensor (torch.long), got {y.dtype}: 1-D integer class "
            "indices; convert with y.long() after checking they are whole numbers"
        )
    if nonempty and not y.numel():
        raise ValueError(f"{name} must be a non-empty 1-D integer tensor of class indices; got an empty one")
    if y.numel():
        lo, hi = int(y.min()), int(y.max())
        if num_classes is None and lo < 0:
            raise ValueError(f"{name} must be non-negative class indices; got values in [{lo}, {hi}]")
        if num_classes is not None and (lo < 0 or hi >= num_classes):
            raise ValueError(
                f"{name} must lie in [0, {num_classes}), i.e. [0, {num_classes - 1}], for "
                f"{num_classes} classes; got values in [{lo}, {hi}]"
            )
    return y.long()


def flow_device_dtype(flow: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and dtype of a flow's parameters; a clear error for a flow without any."""
    param = next(flow.parameters(), None)
    if param is None:
        raise ValueError("the flow has no parameters; pass a trained nfpi.flows.Glow")
    return param.device, param.dtype


def finite_or_original(out: Tensor, original: Tensor, what: str) -> Tensor:
    """``out`` with every variant that is not finite replaced by its original, with a warning."""
    bad = ~torch.isfinite(out.flatten(1)).all(1)
    if bad.any():
        warnings.warn(
            f"{what}: {int(bad.sum())} of {len(bad)} variants were not finite after f^-1 and were "
            "replaced by their originals",
            RuntimeWarning,
            stacklevel=3,
        )
        out[bad] = original[bad]
    return out
