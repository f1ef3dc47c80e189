"""Invertible layers of the Glow flow of NFPI: the layer protocol, squeeze, ActNorm and the 1x1 convolutions.

Implements the per-step layers of docs/method.md §4.5 other than the couplings: Glow's
(Kingma & Dhariwal 2018) space-to-depth squeeze, ActNorm with data-dependent init (Sec. 3.1)
and the two invertible 1x1 convolutions named in docs/method.md §4.5 (Glow Sec. 3.2):

* ``"lu"``:     W = P L (U + diag(sign * exp(log_s))),  log|det| = H W sum(log_s)
* ``"matexp"``: W = expm(M) (Matrix Exponential Flow, Xiao & Liu 2020, the
  paper's backbone, Sec. 5), log|det| = H W trace(M).

Every layer maps x to ``(y, log|det dy/dx|)`` so that the change-of-variables
term of the paper's Eqs. (1)-(2), log p(x|y) = log p_Z(f(x)|y) + log|det J_f(x)|,
is the sum of the per-layer terms. The couplings are in :mod:`nfpi.flows.couplings`, the
multi-scale :class:`nfpi.flows.Glow` in :mod:`nfpi.flows.glow`.

Conventions: layers take (B, C, H, W) tensors and return a log-determinant of
shape (B,) in the input's dtype and device; ``inverse(y)`` returns x only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "CONVS",
    "ActNorm",
    "FlowLayer",
    "FlowSequence",
    "InvConv1x1LU",
    "InvConv1x1MatExp",
    "Squeeze",
]


class FlowLayer(nn.Module):
    """Base class of invertible layers: ``forward(x) -> (y, logdet)``, ``inverse(y) -> x``.

    ``channels`` is the channel count the layer accepts (``None``: any).
    """

    channels: int | None = None

    def inverse(self, y: Tensor) -> Tensor:
        """Inverse map y -> x, same shapes as the corresponding forward."""
        raise NotImplementedError

    def recompute(self, y: Tensor) -> tuple[list[Tensor], Tensor, Tensor]:
        """Rebuild the input of output y and re-run the forward on it under autograd.

        Returns (parts, y', logdet): x = cat(parts, dim=1), each part a fresh leaf that
        requires grad, and (y', logdet) = forward(x) with its graph (used by
        :class:`_ReversibleSteps`). Here x = inverse(y) as one part.
        """
        with torch.no_grad():
            x = self.inverse(y)
        x = x.detach().requires_grad_(True)
        return [x], *self(x)

    def _check_input(self, x: Tensor) -> None:
        """Raise a ValueError naming the expected shape instead of a deep torch error."""
        if x.dim() != 4 or (self.channels is not None and x.shape[1] != self.channels):
            channels = "C" if self.channels is None else self.channels
            raise ValueError(
                f"{type(self).__name__} expects input of shape (B, {channels}, H, W); "
                f"got {tuple(x.shape)}. Reshape the input or build the layer for "
                f"{x.shape[1] if x.dim() == 4 else '?'} channels."
            )


class FlowSequence(FlowLayer):
    """Composition of flow layers; log-determinants add, inverse runs in reverse order."""

    def __init__(self, layers: Sequence[FlowLayer]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x: (B, C, H, W) -> (y of the last layer's shape, logdet (B,))."""
        logdet = x.new_zeros(x.shape[0])
        for layer in self.layers:
            x, layer_logdet = layer(x)
            logdet = logdet + layer_logdet
        return x, logdet

    def inverse(self, y: Tensor) -> Tensor:
        """Inverse of :meth:`forward`: y -> x."""
        for layer in reversed(self.layers):
            y = layer.inverse(y)
        return y


class Squeeze(FlowLayer):
    """Space-to-depth 2x2: (B, C, H, W) -> (B, 4C, H/2, W/2); volume preserving.

    Output channel ``4c + 2i + j`` holds pixel (i, j) of each 2x2 block of input channel c.
    """

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x: (B, C, H, W) with H, W even -> (y (B, 4C, H/2, W/2), zeros (B,))."""
        self._check_input(x)
        if x.shape[2] % 2 or x.shape[3] % 2:
            raise ValueError(
                f"Squeeze needs even height and width; got input of shape {tuple(x.shape)}. "
                "Use image sizes divisible by 2**levels."
            )
        return F.pixel_unshuffle(x, 2), x.new_zeros(x.shape[0])

    def inverse(self, y: Tensor) -> Tensor:
        """y: (B, 4C, H/2, W/2) -> x (B, C, H, W)."""
        self._check_input(y)
        if y.shape[1] % 4:
            raise ValueError(
                f"Squeeze.inverse needs a channel count divisible by 4; got shape {tuple(y.shape)}."
            )
        return F.pixel_shuffle(y, 2)


class ActNorm(FlowLayer):
    """Per-channel affine y = x * exp(log_scale) + bias with data-dependent init (Glow).

    The first forward call sets the parameters so that the output of that batch
    has zero mean and unit variance per channel. ``initialized`` is a buffer, so
    a model restored with ``load_state_dict`` keeps its trained parameters.
    Calling :meth:`inverse` before any forward uses the identity parameters.
    """

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.channels = channels
        self.eps = eps
        self.log_scale = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.register_buffer("initialized", torch.tensor(False))
        # Python mirror of the buffer: reading a CUDA bool in every forward would
        # force a host-device sync per layer; reset whenever a state dict is loaded.
        self._initialized_cache = False

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._initialized_cache = False

    def is_initialized(self) -> bool:
        """Whether the data-dependent init has run (reads the buffer once after a load)."""
        if not self._initialized_cache:
            self._initialized_cache = bool(self.initialized)
        return self._initialized_cache

    @torch.no_grad()
    def _initialize(self, x: Tensor) -> None:
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        std = x.std(dim=(0, 2, 3), keepdim=True, unbiased=False)
        log_scale = -torch.log(std + self.eps)
        self.log_scale.copy_(log_scale)
        self.bias.copy_(-mean * log_scale.exp())
        self.initialized.fill_(True)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x: (B, C, H, W) -> (y (B, C, H, W), logdet (B,))."""
        self._check_input(x)
        if not self.is_initialized():
            self._initialize(x)
            self._initialized_cache = True
        y = torch.addcmul(self.bias, x, self.log_scale.exp())
        logdet = (self.log_scale.sum() * (x.shape[2] * x.shape[3])).repeat(x.shape[0])
        return y, logdet

    def inverse(self, y: Tensor) -> Tensor:
        """y: (B, C, H, W) -> x (B, C, H, W)."""
        self._check_input(y)
        return (y - self.bias) * torch.exp(-self.log_scale)


class InvConv1x1LU(FlowLayer):
    """Invertible 1x1 convolution with W = P L (U + diag(sign * exp(log_s))) (Glow, LU form).

    Initialised from a random orthogonal matrix, so it starts as a volume-preserving
    channel mixing (log|det| = 0). P and sign are fixed buffers.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels
        q, _ = torch.linalg.qr(torch.randn(channels, channels, dtype=torch.float64))
        p, lower, upper = torch.linalg.lu(q)
        diag = torch.diagonal(upper)
        # Row permutation as indices (P A == A[perm]): no C x C matmul per forward.
        self.register_buffer("perm", p.argmax(dim=1))
        self.register_buffer("sign", torch.sign(diag).float())
        self.lower = nn.Parameter(torch.tril(lower, -1).float())
        self.upper = nn.Parameter(torch.triu(upper, 1).float())
        self.log_s = nn.Parameter(torch.log(diag.abs()).float())

    def _factors(self) -> tuple[Tensor, Tensor]:
        eye = torch.eye(self.channels, dtype=self.lower.dtype, device=self.lower.device)
        lower = torch.tril(self.lower, -1) + eye
        upper = torch.triu(self.upper, 1) + torch.diag(self.sign * self.log_s.exp())
        return lower, upper

    def weight(self) -> Tensor:
        """W, shape (C, C)."""
        lower, upper = self._factors()
        return (lower @ upper)[self.perm]

    def inverse_weight(self) -> Tensor:
        """W^-1 = U^-1 L^-1 P^T by triangular solves (better conditioned than inv(W)), (C, C)."""
        lower, upper = self._factors()
        eye = torch.eye(self.channels, dtype=lower.dtype, device=lower.device)
        inv_lower = torch.linalg.solve_triangular(lower, eye, upper=False, unitriangular=True)
        inv_lu = torch.linalg.solve_triangular(upper, inv_lower, upper=True)
        # (A P^T)[:, k] = A[:, perm[k]].
        return inv_lu[:, self.perm]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x: (B, C, H, W) -> (y (B, C, H, W), logdet (B,))."""
        self._check_input(x)
        c = self.channels
        y = F.conv2d(x, self.weight().view(c, c, 1, 1))
        logdet = (self.log_s.sum() * (x.shape[2] * x.shape[3])).repeat(x.shape[0])
        return y, logdet

    def inverse(self, y: Tensor) -> Tensor:
        """y: (B, C, H, W) -> x (B, C, H, W)."""
        self._check_input(y)
        c = self.channels
        return F.conv2d(y, self.inverse_weight().view(c, c, 1, 1))


class InvConv1x1MatExp(FlowLayer):
    """Invertible 1x1 convolution W = expm(M) (Matrix Exponential Flow; docs/method.md §4.5).

    log|det W| = trace(M) for any M, and W^-1 = expm(-M), so the layer is
    invertible without constraints on M. M is initialised skew-symmetric with
    small entries (std 1/sqrt(C)): expm of a skew-symmetric matrix is a rotation,
    so the layer starts as a well-conditioned volume-preserving channel mixing,
    the role Glow's random orthogonal init plays (M = 0 would make every coupling
    of a level transform the same channel half until M is learned).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels
        a = torch.randn(channels, channels) / math.sqrt(2 * channels)
        self.M = nn.Parameter(a - a.T)

    def weight(self) -> Tensor:
        """W = expm(M), shape (C, C)."""
        return torch.linalg.matrix_exp(self.M)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x: (B, C, H, W) -> (y (B, C, H, W), logdet (B,))."""
        self._check_input(x)
        c = self.channels
        y = F.conv2d(x, self.weight().view(c, c, 1, 1))
        logdet = (torch.trace(self.M) * (x.shape[2] * x.shape[3])).repeat(x.shape[0])
        return y, logdet

    def inverse(self, y: Tensor) -> Tensor:
        """y: (B, C, H, W) -> x (B, C, H, W)."""
        self._check_input(y)
        c = self.channels
        return F.conv2d(y, torch.linalg.matrix_exp(-self.M).view(c, c, 1, 1))


CONVS: dict[str, type[FlowLayer]] = {"lu": InvConv1x1LU, "matexp": InvConv1x1MatExp}
