"""The flow protocol: what nfpi needs of any invertible network to fit class Gaussians to its
latents (docs/flows.md, "Use FPI with your own flow").

A flow is any :class:`torch.nn.Module` whose ``forward(x)`` returns ``(z, logdet)``, z the latent
of x (any shape with the batch first; the class Gaussians cover it flattened) and logdet the
per-image log|det df/dx| of shape (B,), and whose ``inverse(z)`` maps latents back to images.
:class:`nfpi.flows.Glow` is one such flow. :func:`check_flow` tests a flow on a batch before
training starts, :func:`as_flow` flattens non-flat latents (:class:`Flattened`), and
:func:`flow_signature` / :func:`import_object` name a flow in checkpoints and run keys.

Example:
    >>> import torch
    >>> class Scale(torch.nn.Module):  # z = 2 x, log|det| = D log 2
    ...     def forward(self, x):
    ...         return 2 * x, torch.full((len(x),), x[0].numel() * math.log(2.0))
    ...     def inverse(self, z):
    ...         return z / 2
    >>> check_flow(Scale(), torch.rand(4, 1, 8, 8))
    (1, 8, 8)
    >>> flow = as_flow(Scale(), (1, 8, 8))
    >>> tuple(flow(torch.rand(4, 1, 8, 8))[0].shape), tuple(flow.inverse(torch.zeros(4, 64)).shape)
    ((4, 64), (4, 1, 8, 8))
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import math
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

__all__ = [
    "Flattened",
    "Flow",
    "FlowError",
    "as_flow",
    "check_flow",
    "class_path",
    "flow_signature",
    "import_object",
]


@runtime_checkable
class Flow(Protocol):
    """An invertible network nfpi can train: ``forward(x) -> (z, logdet)`` with x (B, ...),
    z (B, ...) and logdet (B,); ``inverse(z) -> x``. It must also be a :class:`torch.nn.Module`."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]: ...

    def inverse(self, z: Tensor) -> Tensor: ...


class FlowError(ValueError):
    """A module does not follow the flow protocol (see :class:`Flow`)."""


def class_path(obj: object) -> str:
    """``"module:qualname"`` of a class, or of ``obj``'s class (what a checkpoint records of a flow)."""
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{cls.__module__}:{cls.__qualname__}"


def import_object(path: str) -> Any:
    """The object named by ``"package.module:qualname"`` (or ``"package.module.name"``); a
    ValueError saying what to write when it cannot be imported."""
    module, sep, name = path.partition(":")
    if not sep:
        module, _, name = path.rpartition(".")
    try:
        obj: Any = importlib.import_module(module)
        for part in name.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(
            f"cannot import {path!r} ({type(err).__name__}: {err}); name an importable callable as "
            "'package.module:function' (a module on sys.path / PYTHONPATH, not a notebook cell)"
        ) from None
    return obj


def flow_signature(model: nn.Module) -> str:
    """A digest of a flow's class and its parameter and buffer names and shapes: two flows with
    the same signature have interchangeable state dicts (what a run key and a resume compare)."""
    h = hashlib.sha256(class_path(model).encode())
    for name, t in model.state_dict().items():
        h.update(f"{name}{tuple(t.shape)}{t.dtype};".encode())
    return h.hexdigest()[:12]


def _fail(model: nn.Module, problem: str) -> FlowError:
    return FlowError(
        f"{class_path(model)} does not follow nfpi's flow protocol: {problem}. A flow's forward(x) "
        "returns (z, logdet) with z (B, ...) and logdet (B,), and inverse(z) returns x "
        "(docs/flows.md, 'Use FPI with your own flow'; nfpi.flows has adapters for normflows and zuko)"
    )


@torch.no_grad()
def check_flow(model: nn.Module, x: Tensor, rtol: float = 1e-3) -> tuple[int, ...]:
    """Check the flow protocol on a batch x (B, ...) and return the latent shape (without B).

    Runs on a copy in eval mode, so a data-dependent init (ActNorm) is left to training, and
    leaves the global random stream as it was. Raises :class:`FlowError` naming the problem:
    not a module, no ``inverse``, a forward that does not return (z, logdet), a z of another
    dimension than x, a logdet not of shape (B,), non-finite outputs, or an inverse that does
    not give x back to ``rtol`` (relative, max norm)."""
    if not isinstance(model, nn.Module):
        raise FlowError(
            f"model must be a torch.nn.Module following the flow protocol, got {type(model).__name__}"
        )
    if not callable(getattr(model, "inverse", None)):
        raise _fail(model, "it has no inverse(z) method")
    with torch.random.fork_rng(devices=[]):
        return _check(copy.deepcopy(model).eval(), model, x, rtol)


def _check(probe: nn.Module, model: nn.Module, x: Tensor, rtol: float) -> tuple[int, ...]:
    out = probe(x)
    if not (isinstance(out, Sequence) and len(out) == 2 and all(isinstance(t, Tensor) for t in out)):
        raise _fail(model, f"forward(x) returned {type(out).__name__}, not a pair of tensors (z, logdet)")
    z, logdet = out
    b = len(x)
    if z.dim() < 2 or z.shape[0] != b:
        raise _fail(model, f"z has shape {tuple(z.shape)}, not (B={b}, ...)")
    if math.prod(z.shape[1:]) != math.prod(x.shape[1:]):
        raise _fail(
            model, f"z has {math.prod(z.shape[1:])} dimensions per image, x has {math.prod(x.shape[1:])}"
        )
    if tuple(logdet.shape) != (b,):
        raise _fail(model, f"logdet has shape {tuple(logdet.shape)}, not (B,) = ({b},): one value per image")
    if not (torch.isfinite(z).all() and torch.isfinite(logdet).all()):
        raise _fail(model, "forward(x) gave non-finite z or logdet on a training batch")
    back = probe.inverse(z)
    if not isinstance(back, Tensor) or back.shape != x.shape:
        shape = tuple(back.shape) if isinstance(back, Tensor) else type(back).__name__
        raise _fail(model, f"inverse(z) returned {shape}, not x's shape {tuple(x.shape)}")
    error = float((back.float() - x.float()).abs().max() / x.float().abs().max().clamp_min(1e-12))
    if not error <= rtol:  # also catches NaN
        raise _fail(
            model, f"inverse(forward(x)) differs from x by {error:.3g} (relative, max norm > {rtol:g})"
        )
    return tuple(z.shape[1:])


class Flattened(nn.Module):
    """A flow with latents (B, *latent_shape) seen as flat latents (B, D): what the class
    Gaussians, the statistics and the samplers use."""

    def __init__(self, flow: nn.Module, latent_shape: Sequence[int]) -> None:
        super().__init__()
        self.flow = flow
        self.latent_shape = tuple(int(s) for s in latent_shape)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z, logdet = self.flow(x)
        return z.flatten(1), logdet

    def inverse(self, z: Tensor) -> Tensor:
        return self.flow.inverse(z.reshape(len(z), *self.latent_shape))


def as_flow(model: nn.Module, latent_shape: Sequence[int]) -> nn.Module:
    """``model`` itself when its latents are flat (``latent_shape`` of one dimension), else
    :class:`Flattened`; ``latent_shape`` as :func:`check_flow` returns it."""
    return model if len(latent_shape) == 1 else Flattened(model, latent_shape)
