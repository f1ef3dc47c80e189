"""Adapters that make the flows of peer libraries follow nfpi's flow protocol
(:mod:`nfpi.flows.protocol`), so that FPI class Gaussians can be fitted to their latents.

- :class:`NormflowsFlow`: a normflows ``MultiscaleFlow`` (its normalising direction is
  ``inverse_and_log_det``); the per-level latents are flattened and concatenated in level
  order, and :meth:`NormflowsFlow.class_gaussians` reads its class-conditional base
  (``ClassCondDiagGaussian`` per level) in that same order. :func:`normflows_glow` builds the
  Glow of normflows' examples (GlowBlock, Squeeze, Merge, one ``ClassCondDiagGaussian`` per level).
- :class:`ZukoFlow`: an unconditional zuko ``Flow`` on flattened images (z = its transform
  of x); :func:`zuko_flow` builds one of zuko's flows (``"MAF"``, ``"NSF"``, ``"RealNVP"``, ...).

normflows and zuko are optional (``pip install -e '.[bench]'``): they are imported when a
factory is called, with an ImportError saying what to install.

Example:
    >>> import torch
    >>> flow = normflows_glow((1, 8, 8), levels=2, steps=1, hidden=8)
    >>> z, logdet = flow(torch.rand(3, 1, 8, 8))
    >>> tuple(z.shape), tuple(logdet.shape)
    ((3, 64), (3,))
"""

from __future__ import annotations

import copy
import importlib
import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..prior import ClassGaussians

__all__ = ["NormflowsFlow", "ZukoFlow", "normflows_glow", "zuko_flow"]


def _peer(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError:
        raise ImportError(
            f"{name} is not installed: pip install {name} (or pip install -e '.[bench]')"
        ) from None


class NormflowsFlow(nn.Module):
    """A normflows ``MultiscaleFlow`` as an nfpi flow: x (B, C, H, W) -> z (B, D), logdet (B,).

    ``shape``: the image shape (C, H, W); the per-level latent shapes are read from one pass
    of a copy of the flow (so a data-dependent ActNorm init is left to training)."""

    def __init__(self, flow: nn.Module, shape: Sequence[int]) -> None:
        super().__init__()
        self.flow = flow
        with torch.no_grad():
            zs, _ = copy.deepcopy(flow).eval().inverse_and_log_det(torch.zeros(2, *shape))
        self.level_shapes = [tuple(z.shape[1:]) for z in zs]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        zs, logdet = self.flow.inverse_and_log_det(x)
        return torch.cat([z.flatten(1) for z in zs], 1), logdet

    def inverse(self, z: Tensor) -> Tensor:
        sizes = [math.prod(s) for s in self.level_shapes]
        parts = [p.reshape(len(z), *s) for p, s in zip(z.split(sizes, 1), self.level_shapes)]
        return self.flow.forward_and_log_det(parts)[0]

    def nll(self, x: Tensor, y: Tensor) -> Tensor:
        """Per-image NLL (B,) under normflows' own class-conditional base (``forward_kld``'s terms)."""
        return -self.flow.log_prob(x, y)

    def flow_parameters(self) -> list[nn.Parameter]:
        """The parameters of the flow without its base distributions (what nfpi trains)."""
        base = {id(p) for p in self.flow.q0.parameters()}
        return [p for p in self.parameters() if id(p) not in base]

    @torch.no_grad()
    def class_gaussians(self) -> ClassGaussians:
        """normflows' ``ClassCondDiagGaussian`` bases as nfpi class Gaussians (K, D), in the
        order of :meth:`forward`'s latents."""
        means = torch.cat([q.loc.movedim(-1, 0).flatten(1) for q in self.flow.q0], 1)
        log_scales = torch.cat([q.log_scale.movedim(-1, 0).flatten(1) for q in self.flow.q0], 1)
        return ClassGaussians(means.float(), (2 * log_scales).exp().float())


def normflows_glow(
    shape: Sequence[int], levels: int = 2, steps: int = 2, hidden: int = 32, num_classes: int = 10
) -> NormflowsFlow:
    """normflows' multi-scale Glow for images (C, H, W) (as in normflows' Glow example: per
    level ``steps`` GlowBlocks with affine couplings of ``hidden`` channels and a squeeze, a
    split between levels, a ``ClassCondDiagGaussian`` base per level), adapted.

    Example:
        >>> flow = normflows_glow((1, 8, 8), levels=2, steps=1, hidden=8)
        >>> flow.level_shapes
        [(8, 2, 2), (2, 4, 4)]
    """
    nf = _peer("normflows")
    c, h, w = shape
    if h % 2**levels or w % 2**levels:
        raise ValueError(
            f"images of {h}x{w} are not divisible by 2**levels = {2**levels}: lower levels or pad"
        )
    with warnings.catch_warnings():  # normflows' LU init calls the deprecated torch.lu
        warnings.filterwarnings("ignore", message="torch.lu is deprecated")
        return _glow(nf, shape, levels, steps, hidden, num_classes)


def _glow(
    nf: Any, shape: Sequence[int], levels: int, steps: int, hidden: int, num_classes: int
) -> NormflowsFlow:
    """The levels of :func:`normflows_glow`, with the channel and size bookkeeping of normflows'
    Glow example: level i (0 = the coarsest) runs at c 2^(levels + 1 - i) channels, and its
    base covers the part split off there (all of it at level 0)."""
    c, h, w = shape
    q0, flows, merges = [], [], []
    for i in range(levels):
        width = c * 2 ** (levels + 1 - i)
        flows.append(
            [nf.flows.GlowBlock(width, hidden, split_mode="channel", scale=True) for _ in range(steps)]
            + [nf.flows.Squeeze()]
        )
        if i > 0:
            merges.append(nf.flows.Merge())
            size = (c * 2 ** (levels - i), h // 2 ** (levels - i), w // 2 ** (levels - i))
        else:
            size = (c * 2 ** (levels + 1), h // 2**levels, w // 2**levels)
        q0.append(nf.distributions.ClassCondDiagGaussian(size, num_classes))
    return NormflowsFlow(nf.MultiscaleFlow(q0, flows, merges), shape)


class ZukoFlow(nn.Module):
    """An unconditional zuko ``Flow`` on flattened images as an nfpi flow: x (B, *shape) ->
    z (B, D) = its transform of x.flatten(1), logdet (B,) its log|det|; inverse reshapes back."""

    def __init__(self, flow: nn.Module, shape: Sequence[int]) -> None:
        super().__init__()
        self.flow = flow
        self.shape = tuple(int(s) for s in shape)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.flow.transform().call_and_ladj(x.flatten(1))

    def inverse(self, z: Tensor) -> Tensor:
        return self.flow.transform().inv(z).reshape(len(z), *self.shape)


def zuko_flow(shape: Sequence[int], kind: str = "RealNVP", **kwargs: Any) -> ZukoFlow:
    """zuko's ``kind`` flow (``zuko.flows.<kind>(features=D, **kwargs)``) on images (C, H, W)
    flattened to D = C H W, adapted.

    Example:
        >>> flow = zuko_flow((1, 4, 4), "MAF", transforms=1, hidden_features=(8,))
        >>> tuple(flow(torch.rand(2, 1, 4, 4))[0].shape)
        (2, 16)
    """
    zuko = _peer("zuko")
    if not hasattr(zuko.flows, kind):
        raise ValueError(f"zuko.flows has no flow {kind!r}; e.g. 'MAF', 'NSF', 'RealNVP'")
    return ZukoFlow(getattr(zuko.flows, kind)(features=math.prod(shape), **kwargs), shape)
