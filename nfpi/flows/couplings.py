"""Coupling layers of the Glow flow of NFPI: x = (x1, x2) -> (x1, g(x2; net(x1))).

Implements the couplings of docs/method.md §4.5: Glow's affine and additive ones
(Kingma & Dhariwal 2018, Sec. 3.3; paper Sec. 3) with their residual conv net, and the
Matrix Exponential Flow's (``"matexp"``, Xiao & Liu 2020, the paper's backbone, Sec. 5):
per pixel x2 <- expm(W(x1)) x2 + b(x1), with W full (c2 x c2) or low-rank W = A B,
expm(A B) = I + A phi(B A) B. Each coupling returns ``(y, log|det dy/dx|)`` like every
layer of :mod:`nfpi.flows.layers` and has ``inverse``.

Conventions: couplings take (B, C, H, W) tensors, C >= 2, x1 = the first C//2 channels,
and return a log-determinant of shape (B,).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import FlowLayer

__all__ = [
    "COUPLINGS",
    "AdditiveCoupling",
    "AffineCoupling",
    "CouplingNet",
    "MatExpCoupling",
    "expm_series",
]


class _ResidualBlock(nn.Module):
    """h + conv1x1(relu(conv3x3(relu(h)))), width preserved."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.conv3 = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.conv1 = nn.Conv2d(hidden, hidden, 1)

    def forward(self, h: Tensor) -> Tensor:
        """h: (B, hidden, H, W) -> (B, hidden, H, W)."""
        return h + self.conv1(F.relu(self.conv3(F.relu(h))))


class CouplingNet(nn.Module):
    """Residual conv net of a coupling (docs/method.md §4.5): conv3x3 -> residual blocks -> zero conv3x3.

    The zero-initialised output conv makes every coupling start as the identity.
    Shapes: (B, in_channels, H, W) -> (B, out_channels, H, W).
    """

    def __init__(self, in_channels: int, out_channels: int, hidden: int, blocks: int) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, hidden, 3, padding=1)
        self.blocks = nn.Sequential(*(_ResidualBlock(hidden) for _ in range(blocks)))
        self.conv_out = nn.Conv2d(hidden, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, in_channels, H, W) -> (B, out_channels, H, W)."""
        return self.conv_out(F.relu(self.blocks(self.conv_in(x))))


class _Coupling(FlowLayer):
    """Shared coupling skeleton: x = (x1, x2) -> (x1, g(x2; net(x1))), x1 = first C//2 channels.

    Subclasses define the elementwise map g through ``_params_per_channel``,
    ``_transform`` and ``_untransform``.
    """

    _params_per_channel: int

    def __init__(self, channels: int, hidden: int = 128, blocks: int = 1, net_out: int | None = None) -> None:
        super().__init__()
        if channels < 2:
            raise ValueError(f"A coupling needs at least 2 channels to split; got {channels}.")
        self.channels = channels
        self.split = channels // 2
        if net_out is None:
            net_out = self._params_per_channel * (channels - self.split)
        self.net = CouplingNet(self.split, net_out, hidden, blocks)

    def _transform(self, x2: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _untransform(self, y2: Tensor, h: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x: (B, C, H, W) -> (y (B, C, H, W), logdet (B,))."""
        self._check_input(x)
        x1, x2 = x[:, : self.split], x[:, self.split :]
        y2, logdet = self._transform(x2, self.net(x1))
        return torch.cat((x1, y2), dim=1), logdet

    def inverse(self, y: Tensor) -> Tensor:
        """y: (B, C, H, W) -> x (B, C, H, W)."""
        self._check_input(y)
        y1, y2 = y[:, : self.split], y[:, self.split :]
        return torch.cat((y1, self._untransform(y2, self.net(y1))), dim=1)

    def recompute(self, y: Tensor) -> tuple[list[Tensor], Tensor, Tensor]:
        """As :meth:`FlowLayer.recompute`, parts (x1, x2), with one net evaluation: x1 = y1,
        so the net output that undoes y2 is the one the recomputed forward needs."""
        self._check_input(y)
        x1 = y[:, : self.split].detach().requires_grad_(True)
        h = self.net(x1)
        with torch.no_grad():
            x2 = self._untransform(y[:, self.split :], h.detach())
        x2 = x2.detach().requires_grad_(True)
        y2, logdet = self._transform(x2, h)
        return [x1, x2], torch.cat((x1, y2), dim=1), logdet


class AffineCoupling(_Coupling):
    """Affine coupling x2 <- x2 * exp(log_s(x1)) + t(x1) (paper Sec. 3, Glow).

    log_s = b * tanh(raw / b) (a soft clamp, b = ``scale_bound``) instead of
    Glow's sigmoid(raw + 2): it is exactly the identity at the zero init (the
    sigmoid form starts at scale 0.88), it bounds the per-layer scale to
    (e^-b, e^b) in both directions so neither f nor f^-1 can blow up or divide
    by a vanishing scale, and the log-determinant is log_s itself with no log of
    a saturating sigmoid.
    """

    _params_per_channel = 2

    def __init__(self, channels: int, hidden: int = 128, blocks: int = 1, scale_bound: float = 2.0) -> None:
        super().__init__(channels, hidden, blocks)
        if not scale_bound > 0:
            raise ValueError(f"scale_bound must be positive; got {scale_bound}.")
        self.scale_bound = scale_bound

    def _log_scale_shift(self, h: Tensor) -> tuple[Tensor, Tensor]:
        raw, shift = h.chunk(2, dim=1)
        return self.scale_bound * torch.tanh(raw / self.scale_bound), shift

    def _transform(self, x2: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        log_s, shift = self._log_scale_shift(h)
        return torch.addcmul(shift, x2, log_s.exp()), log_s.flatten(1).sum(1)

    def _untransform(self, y2: Tensor, h: Tensor) -> Tensor:
        log_s, shift = self._log_scale_shift(h)
        return (y2 - shift) * torch.exp(-log_s)


class AdditiveCoupling(_Coupling):
    """Additive (volume-preserving) coupling x2 <- x2 + t(x1); log|det| = 0."""

    _params_per_channel = 1

    def _transform(self, x2: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        return x2 + h, x2.new_zeros(x2.shape[0])

    def _untransform(self, y2: Tensor, h: Tensor) -> Tensor:
        return y2 - h


def expm_series(w: Tensor, terms: int = 12) -> Tensor:
    """expm of a batch of matrices (..., n, n) -> (..., n, n): scaling and squaring of a Taylor series.

    Each matrix is scaled by 2^-s so that its 1-norm is <= 1/2 (truncation error
    < 0.5^13/13! ~ 2e-14 with 12 terms), expanded by Horner's rule, then squared s times.
    For the many small bounded matrices of the MEF coupling it is as accurate as
    ``torch.linalg.matrix_exp`` and 1.2-4x faster forward+backward (``benchmarks/bench_flow.py
    --report coupling``), whose backward is a matrix_exp of a 2n x 2n block matrix.
    """
    eye = torch.eye(w.shape[-1], dtype=w.dtype, device=w.device)
    # The scaling is a constant for autograd (log2 of a zero norm would give NaN gradients).
    norm = w.detach().abs().sum(-2).amax(-1)
    squarings = torch.log2(norm / 0.5).ceil().clamp_min(0)
    x = w / (2.0**squarings)[..., None, None]
    result = eye.expand_as(w)
    for k in range(terms, 0, -1):
        result = eye + x @ result / k
    for i in range(int(squarings.max().item()) if squarings.numel() else 0):
        result = torch.where((squarings > i)[..., None, None], result @ result, result)
    return result


def _phi(x: Tensor) -> Tensor:
    """phi(X) = sum_n X^n / (n+1)! of square matrices (..., k, k) -> (..., k, k).

    Read off expm([[X, I], [0, 0]]) = [[expm(X), phi(X)], [0, I]], so it inherits
    matrix_exp's scaling and squaring: accurate for any norm, unlike a truncated series.
    """
    k = x.shape[-1]
    block = x.new_zeros(*x.shape[:-2], 2 * k, 2 * k)
    block[..., :k, :k] = x
    block[..., :k, k:] = torch.eye(k, dtype=x.dtype, device=x.device)
    return torch.linalg.matrix_exp(block)[..., :k, k:]


class MatExpCoupling(_Coupling):
    """Matrix Exponential Flow coupling (Xiao & Liu 2020; method §4.5): per pixel x2 <- expm(W) x2 + b.

    The net predicts, from x1 and per pixel, a shift b (c2) and W (c2 x c2, c2 = channels
    of x2) whose raw entries r are bounded elementwise as W = a tanh(s r + t) + u with
    learned scalars (a, s, t, u), so |W_ij| <= |a| + |u| and expm(W) stays finite.
    log|det| = sum over pixels of trace(W); the inverse is x2 = expm(-W) (y2 - b).

    For c2 > ``low_rank_above`` (24, as released) W = A B with A (c2 x k), B (k x c2),
    k = ``rank`` (3, as released), each factor bounded with its own scalars. Then
    expm(A B) = I + A phi(B A) B, phi(X) = sum_n X^n/(n+1)!, expm(-A B) = I - A phi(-B A) B
    and log|det| = sum over pixels of trace(B A): only k x k exponentials, O(c2 k) per pixel.

    Init: (s, t, u) = (1, 0, 0) and the zero output conv give W = 0 (full) or B = 0
    (low rank), so the layer is exactly the identity. a starts at 1/c2 (full; 1/k for A
    and 1/c2 for B), so that ||W||_inf <= 1: expm(W) and its inverse then have norms
    <= e and the layer is well conditioned. With a = 1, a W saturated at +-1 has an
    eigenvalue up to c2 and expm(W) a condition number up to e^(2 c2) (~1e20 at c2 = 24;
    the float64 inverse then loses every digit). The released initial scalars are not
    recorded in docs/method.md §4.5. Learned, a and u still bound ||W||_inf <= c2 (|a| + |u|) (low rank:
    k c2 (|a_A| + |u_A|)(|a_B| + |u_B|)), so the layer stays finite. In the low-rank form the output
    conv's bias for A is drawn at random (A = tanh(bias) != 0): with A = B = 0 both
    factors' gradients, B^T dL/dW and A^T dL/dW, would vanish for ever.
    """

    def __init__(
        self,
        channels: int,
        hidden: int = 128,
        blocks: int = 1,
        low_rank_above: int = 24,
        rank: int = 3,
    ) -> None:
        c2 = channels - channels // 2
        if rank < 1:
            raise ValueError(f"rank must be >= 1; got {rank}.")
        low_rank = c2 > low_rank_above
        matrix = 2 * rank * c2 if low_rank else c2 * c2
        super().__init__(channels, hidden, blocks, net_out=c2 + matrix)
        self.rank = rank if low_rank else None
        # Rows: (a, s, t, u) of W, or of A and of B in the low-rank form; a such that
        # ||W||_inf <= 1 while u = 0 (see the class docstring).
        scales = [1.0 / rank, 1.0 / c2] if low_rank else [1.0 / c2]
        self.bound = nn.Parameter(torch.tensor([[a, 1.0, 0.0, 0.0] for a in scales]))
        if low_rank:
            with torch.no_grad():
                bias_a = self.net.conv_out.bias[c2 : c2 + rank * c2]
                bias_a.copy_(torch.randn(rank * c2) / math.sqrt(rank))

    @staticmethod
    def _bounded(raw: Tensor, scalars: Tensor) -> Tensor:
        a, s, t, u = scalars
        return a * torch.tanh(s * raw + t) + u

    def _matrices(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """h (B, c2 + matrix, H, W) -> shift (B, H, W, c2), W or A (B, H, W, c2, c2 or k), B or None."""
        c2 = self.channels - self.split
        # Under bf16/fp16 autocast the net output is half precision, in which matrix_exp's
        # backward gives NaN: the matrix part always runs in float32 or better.
        h = h.to(torch.promote_types(h.dtype, torch.float32))
        h = h.permute(0, 2, 3, 1).contiguous()  # matrix_exp needs contiguous matrices
        shift, raw = h[..., :c2], h[..., c2:]
        if self.rank is None:
            return shift, self._bounded(raw.unflatten(-1, (c2, c2)), self.bound[0]), None
        k = self.rank
        a = self._bounded(raw[..., : k * c2].unflatten(-1, (c2, k)), self.bound[0])
        b = self._bounded(raw[..., k * c2 :].unflatten(-1, (k, c2)), self.bound[1])
        return shift, a, b

    def _apply_expm(self, x2: Tensor, w: Tensor, b: Tensor | None, sign: float) -> Tensor:
        """expm(sign * W) v per pixel, v = x2 as (B, H, W, c2, 1)."""
        if b is None:
            return expm_series(sign * w) @ x2
        # A is fed to phi(sign B A) unscaled and applied with its sign.
        return x2 + sign * (w @ (_phi(sign * (b @ w)) @ (b @ x2)))

    def _transform(self, x2: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        with torch.autocast(h.device.type, enabled=False):
            shift, w, b = self._matrices(h)
            v = x2.permute(0, 2, 3, 1).to(w.dtype).unsqueeze(-1)
            y2 = self._apply_expm(v, w, b, 1.0).squeeze(-1) + shift
            if b is None:
                trace = torch.diagonal(w, dim1=-2, dim2=-1).sum(-1)
            else:
                trace = (w * b.transpose(-1, -2)).sum((-2, -1))  # trace(A B) = trace(B A)
        return y2.permute(0, 3, 1, 2), trace.flatten(1).sum(1)

    def _untransform(self, y2: Tensor, h: Tensor) -> Tensor:
        with torch.autocast(h.device.type, enabled=False):
            shift, w, b = self._matrices(h)
            v = (y2.permute(0, 2, 3, 1).to(w.dtype) - shift).unsqueeze(-1)
            return self._apply_expm(v, w, b, -1.0).squeeze(-1).permute(0, 3, 1, 2)


COUPLINGS: dict[str, type[_Coupling]] = {
    "affine": AffineCoupling,
    "additive": AdditiveCoupling,
    "matexp": MatExpCoupling,
}
