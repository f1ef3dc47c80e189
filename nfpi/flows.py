"""Invertible flow layers and the multi-scale Glow encoder f of NFPI.

Implements SPEC §4 ("Flow"): the Glow skeleton (Kingma & Dhariwal 2018) used by
the NFPI paper -- per level a squeeze, K steps of ActNorm -> invertible 1x1
convolution -> coupling, then a split of half the channels after every level
but the last -- with the two 1x1 convolutions named there:

* ``"lu"``:     W = P L (U + diag(sign * exp(log_s))),  log|det| = H W sum(log_s)
* ``"matexp"``: W = expm(M) (Matrix Exponential Flow, Xiao & Liu 2020, the
  paper's backbone, Sec. 5), log|det| = H W trace(M).

and three couplings: Glow's affine and additive ones and the Matrix Exponential
Flow's (``"matexp"``, SPEC §4): per pixel x2 <- expm(W(x1)) x2 + b(x1), with W
full (c2 x c2) or low-rank W = A B, expm(A B) = I + A phi(B A) B.

``Glow(..., memory="reversible")`` trains with activation memory that does not
grow with the number of steps per level: each level's steps run under a custom
autograd function (:class:`_ReversibleSteps`) that keeps only the level's output
and, in backward, rebuilds each layer's input with its inverse and recomputes the
layer (as in i-RevNet / memcnn / Glow's memory-saving mode).

Every layer maps x to ``(y, log|det dy/dx|)`` so that the change-of-variables
term of the paper's Eqs. (1)-(2), log p(x|y) = log p_Z(f(x)|y) + log|det J_f(x)|,
is the sum of the per-layer terms. The split-off halves get no prior of their
own: SPEC §1/§4 put one diagonal Gaussian per class over all D = C*H*W latent
dimensions, so :class:`Glow` reassembles every factored-out part and the final
output into one flat latent z of shape (B, D), ordered as
[level-1 split-off part, ..., level-(L-1) split-off part, final output], each
part flattened in (C, H, W) order.

Conventions: layers take (B, C, H, W) tensors and return a log-determinant of
shape (B,) in the input's dtype and device; ``inverse(y)`` returns x only.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "FlowLayer",
    "FlowSequence",
    "Squeeze",
    "ActNorm",
    "InvConv1x1LU",
    "InvConv1x1MatExp",
    "AffineCoupling",
    "AdditiveCoupling",
    "MatExpCoupling",
    "CouplingNet",
    "FlowStep",
    "Glow",
    "CONVS",
    "COUPLINGS",
    "MEMORY_MODES",
    "expm_series",
    "saved_activation_bytes",
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
    """Invertible 1x1 convolution W = expm(M) (Matrix Exponential Flow; SPEC §4).

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
    """Residual conv net of a coupling (SPEC §4): conv3x3 -> residual blocks -> zero conv3x3.

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

    def __init__(
        self, channels: int, hidden: int = 128, blocks: int = 1, net_out: int | None = None
    ) -> None:
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

    def __init__(
        self, channels: int, hidden: int = 128, blocks: int = 1, scale_bound: float = 2.0
    ) -> None:
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
    x = w / (2.0 ** squarings)[..., None, None]
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
    """Matrix Exponential Flow coupling (Xiao & Liu 2020; SPEC §4): per pixel x2 <- expm(W) x2 + b.

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
    recorded in SPEC §4. Learned, a and u still bound ||W||_inf <= c2 (|a| + |u|) (low rank:
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


CONVS: dict[str, type[FlowLayer]] = {"lu": InvConv1x1LU, "matexp": InvConv1x1MatExp}
COUPLINGS: dict[str, type[_Coupling]] = {
    "affine": AffineCoupling, "additive": AdditiveCoupling, "matexp": MatExpCoupling,
}
MEMORY_MODES = ("standard", "reversible")


def _lookup(table: dict[str, type], name: str, what: str) -> type:
    if name not in table:
        raise ValueError(f"Unknown {what} {name!r}; choose one of {sorted(table)}.")
    return table[name]


class FlowStep(FlowSequence):
    """One Glow step of flow (SPEC §4): ActNorm -> invertible 1x1 conv -> coupling.

    ``conv`` is ``"lu"`` or ``"matexp"``; ``coupling`` is ``"affine"``, ``"additive"`` or
    ``"matexp"``; ``coupling_options`` are extra keyword arguments of the coupling class
    (e.g. ``rank``, ``low_rank_above`` of :class:`MatExpCoupling`).
    Shapes: (B, channels, H, W) -> (B, channels, H, W).
    """

    def __init__(
        self,
        channels: int,
        hidden: int = 128,
        conv: str = "lu",
        coupling: str = "affine",
        blocks: int = 1,
        coupling_options: dict | None = None,
    ) -> None:
        conv_cls = _lookup(CONVS, conv, "conv")
        coupling_cls = _lookup(COUPLINGS, coupling, "coupling")
        coupling_layer = coupling_cls(channels, hidden, blocks, **(coupling_options or {}))
        super().__init__([ActNorm(channels), conv_cls(channels), coupling_layer])
        self.channels = channels


def _autocast_state(device_type: str) -> tuple[bool, torch.dtype]:
    return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


def _leaf_layers(layer: FlowLayer) -> list[FlowLayer]:
    """The layers of nested FlowSequences in forward order (Squeeze, ActNorm, conv, coupling, ...)."""
    if isinstance(layer, FlowSequence):
        return [leaf for child in layer.layers for leaf in _leaf_layers(child)]
    return [layer]


class _ReversibleSteps(torch.autograd.Function):
    """Run a :class:`FlowSequence` keeping only its output; backward rebuilds the inputs.

    ``forward(x, layers, *params) -> (y, logdet)`` runs under ``no_grad``, so none of the
    layers' intermediate activations is stored: only y (which the caller holds anyway).
    ``backward`` walks the single layers (ActNorm, conv, coupling, ...) from last to first:
    :meth:`FlowLayer.recompute` rebuilds the layer's input from its output with the inverse
    and re-runs the layer under autograd (a coupling evaluates its net once for both), under
    the forward's autocast state, and ``torch.autograd.grad`` gives the gradients of the
    input and of the layer's parameters. Peak memory is then one layer's activations plus
    y, independent of the depth; the extra cost is about one forward of the flow.
    Gradients are exact up to the reconstruction error of the inverses (float64:
    ~1e-13 relative; float32: see the README). ``params`` must be every parameter of
    ``layers`` that requires grad, so that autograd routes their gradients (and DDP's hooks).
    """

    @staticmethod
    def forward(ctx, x: Tensor, layers: FlowSequence, *params: Tensor) -> tuple[Tensor, Tensor]:
        ctx.layers, ctx.params = layers, params
        ctx.autocast = (x.device.type, *_autocast_state(x.device.type))
        with torch.no_grad():
            y, logdet = layers(x)
        ctx.save_for_backward(y)
        return y, logdet

    @staticmethod
    def backward(ctx, grad_y: Tensor | None, grad_logdet: Tensor | None):
        y = ctx.saved_tensors[0].detach()
        device_type, autocast, autocast_dtype = ctx.autocast
        grad_y = torch.zeros_like(y) if grad_y is None else grad_y
        if grad_logdet is None:
            grad_logdet = y.new_zeros(y.shape[0])
        index = {id(p): i for i, p in enumerate(ctx.params)}
        grads: list[Tensor | None] = [None] * len(ctx.params)
        # The forward's autocast state for both the inverse and the recomputation: a coupling
        # can only be undone with the very net output (same precision) its forward used.
        amp = torch.autocast(device_type, autocast_dtype, autocast)
        for layer in reversed(_leaf_layers(ctx.layers)):
            params = [p for p in layer.parameters() if id(p) in index]
            with torch.enable_grad(), amp:
                parts, out, logdet = layer.recompute(y)
                # A volume-preserving layer's log-det (e.g. Squeeze's zeros) has no graph.
                pairs = [(t, g) for t, g in ((out, grad_y), (logdet, grad_logdet)) if t.requires_grad]
                outputs, out_grads = zip(*pairs)
                layer_grads = torch.autograd.grad(
                    outputs, (*parts, *params), out_grads, allow_unused=True
                )
            part_grads = [torch.zeros_like(t) if g is None else g
                          for t, g in zip(parts, layer_grads[: len(parts)])]
            grad_y = part_grads[0] if len(parts) == 1 else torch.cat(part_grads, dim=1)
            y = parts[0].detach() if len(parts) == 1 else torch.cat(parts, dim=1).detach()
            for p, g in zip(params, layer_grads[len(parts) :]):
                i = index[id(p)]
                if g is not None:
                    grads[i] = g if grads[i] is None else grads[i] + g
        return (grad_y, None, *grads)


class Glow(nn.Module):
    """Multi-scale Glow mapping images (B, C, H, W) to one flat latent (B, C*H*W) (SPEC §4).

    Level l (1..L): squeeze, ``steps`` FlowSteps, then (for l < L) half of the
    channels are factored out. All factored-out parts and the final output are
    concatenated into z (see the module docstring for the order), because the
    class Gaussians of NFPI cover every latent dimension.

    Args:
        in_shape: (C, H, W) of the images; H and W must be divisible by 2**levels.
        levels: number of levels L (paper: 3).
        steps: flow steps per level K (paper: 8).
        hidden: hidden channels of the coupling nets (paper: 128).
        conv: ``"lu"`` (Glow) or ``"matexp"`` (Matrix Exponential Flow).
        coupling: ``"affine"``, ``"additive"`` or ``"matexp"`` (:class:`MatExpCoupling`).
        blocks: residual blocks per coupling net: one int for every level, or one per
            level (released configs: ``[8, 4, 2]``).
        matexp_rank, matexp_low_rank_above: with ``coupling="matexp"``, W is low-rank
            (rank ``matexp_rank``) when the transformed half has more than
            ``matexp_low_rank_above`` channels (released: 3 and 24).
        memory: ``"standard"`` (autograd stores every activation) or ``"reversible"``
            (while gradients are recorded, each level's steps run under
            :class:`_ReversibleSteps`: activation memory independent of ``steps``, at the
            cost of one extra forward and one inverse per step in backward). ActNorm's
            data-dependent init always runs in a standard forward.

    Attributes: ``in_shape``, ``latent_dim`` (D), ``part_shapes`` (the (C, H, W)
    of each block of z, in order), ``config`` (the constructor arguments:
    ``Glow(**model.config)`` rebuilds the architecture for ``load_state_dict``).
    """

    def __init__(
        self,
        in_shape: Sequence[int],
        levels: int = 3,
        steps: int = 8,
        hidden: int = 128,
        conv: str = "lu",
        coupling: str = "affine",
        blocks: int | Sequence[int] = 1,
        matexp_rank: int = 3,
        matexp_low_rank_above: int = 24,
        memory: str = "standard",
    ) -> None:
        super().__init__()
        in_shape = tuple(int(s) for s in in_shape)
        if len(in_shape) != 3 or min(in_shape) < 1:
            raise ValueError(f"in_shape must be (C, H, W) with positive sizes; got {in_shape}.")
        for name, value, low in (("levels", levels, 1), ("steps", steps, 1), ("hidden", hidden, 1)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}; got {value!r}.")
        level_blocks = [blocks] * levels if isinstance(blocks, int) else blocks
        if not isinstance(level_blocks, (list, tuple)) or len(level_blocks) != levels or not all(
            isinstance(b, int) and not isinstance(b, bool) and b >= 0 for b in level_blocks
        ):
            raise ValueError(
                f"blocks must be an integer >= 0 or a list of {levels} such integers (one per "
                f"level); got {blocks!r}."
            )
        _lookup(CONVS, conv, "conv")
        _lookup(COUPLINGS, coupling, "coupling")
        if memory not in MEMORY_MODES:
            raise ValueError(f"Unknown memory mode {memory!r}; choose one of {list(MEMORY_MODES)}.")
        c, h, w = in_shape
        if h % 2**levels or w % 2**levels:
            raise ValueError(
                f"Image size {h}x{w} is not divisible by 2**levels = {2**levels}; "
                f"use fewer levels or pad/crop the images."
            )
        self.in_shape = in_shape
        self.latent_dim = c * h * w
        # Constructor arguments, so a checkpoint can store how to rebuild the model.
        self.config = dict(in_shape=in_shape, levels=levels, steps=steps, hidden=hidden,
                           conv=conv, coupling=coupling, blocks=blocks, matexp_rank=matexp_rank,
                           matexp_low_rank_above=matexp_low_rank_above, memory=memory)
        self.memory = memory

        options = (dict(rank=matexp_rank, low_rank_above=matexp_low_rank_above)
                   if coupling == "matexp" else None)
        levels_list = []
        #: (C, H, W) of each factored-out part, then of the final output, in latent order.
        self.part_shapes: list[tuple[int, int, int]] = []
        for level in range(levels):
            c, h, w = 4 * c, h // 2, w // 2
            levels_list.append(
                FlowSequence(
                    [Squeeze()]
                    + [FlowStep(c, hidden, conv, coupling, level_blocks[level], options)
                       for _ in range(steps)]
                )
            )
            if level < levels - 1:
                self.part_shapes.append((c - c // 2, h, w))
                c = c // 2
        self.part_shapes.append((c, h, w))
        self.level_flows = nn.ModuleList(levels_list)
        self._part_sizes = [math.prod(s) for s in self.part_shapes]
        self._actnorms = [m for m in self.modules() if isinstance(m, ActNorm)]

    def _run_level(self, level: FlowSequence, x: Tensor) -> tuple[Tensor, Tensor]:
        """One level's squeeze and steps, through :class:`_ReversibleSteps` when it saves memory."""
        params = [p for p in level.parameters() if p.requires_grad]
        reversible = (
            self.memory == "reversible" and torch.is_grad_enabled() and bool(params)
            # The ActNorm init needs a standard forward (it reads the batch once, no inverse).
            and all(m.is_initialized() for m in self._actnorms)
        )
        if reversible:
            return _ReversibleSteps.apply(x, level, *params)
        return level(x)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x: (B, C, H, W) -> (z (B, D), logdet (B,)), D = C*H*W."""
        if x.dim() != 4 or tuple(x.shape[1:]) != self.in_shape:
            raise ValueError(
                f"Glow(in_shape={self.in_shape}) expects input of shape (B, "
                f"{', '.join(map(str, self.in_shape))}); got {tuple(x.shape)}."
            )
        parts = []
        logdet = x.new_zeros(x.shape[0])
        last = len(self.level_flows) - 1
        for index, level in enumerate(self.level_flows):
            x, level_logdet = self._run_level(level, x)
            logdet = logdet + level_logdet
            if index < last:
                keep = x.shape[1] // 2
                parts.append(x[:, keep:].flatten(1))
                x = x[:, :keep]
        parts.append(x.flatten(1))
        return torch.cat(parts, dim=1), logdet

    def inverse(self, z: Tensor) -> Tensor:
        """z: (B, D) -> x (B, C, H, W)."""
        if z.dim() != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(
                f"Glow.inverse expects latents of shape (B, {self.latent_dim}); "
                f"got {tuple(z.shape)}."
            )
        batch = z.shape[0]
        parts = [
            p.reshape(batch, *shape)
            for p, shape in zip(z.split(self._part_sizes, dim=1), self.part_shapes)
        ]
        x = parts[-1]
        last = len(self.level_flows) - 1
        for index in reversed(range(last + 1)):
            if index < last:
                x = torch.cat((x, parts[index]), dim=1)
            x = self.level_flows[index].inverse(x)
        return x


def saved_activation_bytes(model: nn.Module, x: Tensor) -> int:
    """Bytes of the non-parameter tensors autograd keeps for the backward pass of one training
    loss ``0.5 |z|^2 - logdet`` on ``x`` (B, C, H, W): what ``memory="reversible"`` reduces.

    Counted with saved-tensor hooks; a storage saved by several nodes counts once.
    """
    seen = {p.untyped_storage().data_ptr() for p in model.parameters()}
    total = 0

    def pack(t: Tensor) -> Tensor:
        nonlocal total
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        z, logdet = model(x)
        loss = 0.5 * z.pow(2).sum() - logdet.sum()
    loss.backward()
    return total
