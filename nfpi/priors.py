"""The class-conditional latent prior: one diagonal Gaussian N(mu_y, s_y) per class (SPEC §1, §6).

Implements the class-conditional log-likelihood of the paper's Eq. 2, NF classification
(argmax_y log N(f(x); mu_y, s_y), equal class priors), temperature sampling
z = m_s mu_y + T sqrt(s_y) eps, the rescaled interpolation of SPEC §6, and the three
initialisations of SPEC §4-§5: data init (Baseline 1), an FPI solution, random init.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .fpi import ClassStats, FPIResult

__all__ = ["ClassGaussians", "check_latents", "interpolate"]

_LOG_2PI = math.log(2 * math.pi)


def check_latents(z: Tensor, dim: int, finite: bool = True) -> None:
    """Latents must be (B, dim); with ``finite`` also free of NaN/inf (one-line ValueError).

    Scoring needs ``finite``: an argmax over NaN scores silently picks class 0. The NLL of
    training does not check, so that a diverging loss stops with NonFiniteLossError instead.
    """
    if z.ndim != 2 or z.shape[1] != dim:
        raise ValueError(f"latents must be (B, {dim}), got {tuple(z.shape)}")
    if finite and not bool(torch.isfinite(z).all()):
        rows = (~torch.isfinite(z)).any(1).nonzero().flatten()
        raise ValueError(f"latents contain NaN or inf in {len(rows)} row(s) (first: {rows[:5].tolist()}); "
                         "the flow diverged or its input is corrupt, so no class can be scored")


class ClassGaussians(nn.Module):
    """K diagonal Gaussians over a D-dimensional latent; ``means``/``variances`` are (K, D) buffers.

    Buffers (not parameters): the Gaussians are set by the solver, never by the optimiser,
    and are saved and restored with the flow's checkpoint.
    """

    def __init__(self, means: Tensor, variances: Tensor):
        super().__init__()
        if means.ndim != 2 or means.shape != variances.shape:
            raise ValueError(f"means and variances must both be (K, D), got {tuple(means.shape)} and {tuple(variances.shape)}")
        if not (torch.isfinite(means).all() and torch.isfinite(variances).all()):
            raise ValueError("class Gaussian parameters contain NaN or inf")
        if (variances <= 0).any():
            raise ValueError("class variances must be positive")
        self.register_buffer("means", means.detach().clone().float())
        self.register_buffer("variances", variances.detach().clone().float())

    # --------------------------------------------------------------------- constructors
    @classmethod
    def from_stats(cls, stats: ClassStats, identity_variances: bool = False) -> "ClassGaussians":
        """Data init (Baseline 1): class means and variances of the latents (lambda = 0)."""
        means = stats.mean()
        variances = torch.ones_like(means) if identity_variances else stats.var().clamp_min(1e-8 * stats.var().mean())
        return cls(means, variances)

    @classmethod
    def from_result(cls, result: FPIResult) -> "ClassGaussians":
        """Gaussians from a diagonal :func:`nfpi.fpi.solve` (or :func:`nfpi.gd.solve`) result."""
        if result.variances.ndim != 2:
            raise ValueError("ClassGaussians holds diagonal Gaussians; solve with covariance='diag'")
        return cls(result.means, result.variances)

    @classmethod
    def random(cls, num_classes: int, dim: int, a: float = 1.0, c: float = 0.25,
               generator: torch.Generator | None = None) -> "ClassGaussians":
        """Random init (GLEM supplementary): means U[-1, 1], variances U[(a+c)/10, a+c]."""
        means = torch.rand(num_classes, dim, generator=generator) * 2 - 1
        hi = a + c
        variances = hi / 10 + torch.rand(num_classes, dim, generator=generator) * (hi - hi / 10)
        return cls(means, variances)

    # -------------------------------------------------------------------------- queries
    @property
    def num_classes(self) -> int:
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def set(self, means: Tensor, variances: Tensor) -> None:
        """Replace the Gaussians in place (keeps device and dtype of the buffers)."""
        fresh = ClassGaussians(means, variances)
        self.means.copy_(fresh.means)
        self.variances.copy_(fresh.variances)

    def _check_z(self, z: Tensor, finite: bool = False) -> None:
        check_latents(z, self.dim, finite)

    def _check_y(self, y: Tensor) -> None:
        if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
            raise ValueError(f"labels must be an integer tensor (torch.long), got {y.dtype}; "
                             "convert with y.long() after checking they are whole class indices")
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            raise ValueError(f"labels must lie in [0, {self.num_classes}), got range [{int(y.min())}, {int(y.max())}]")

    def log_prob(self, z: Tensor) -> Tensor:
        """log N(z; mu_y, s_y) for every class, (B, K), in z's dtype.

        Expanded as matrix products (no B x K x D tensor); the means are centred first so the
        expansion does not cancel catastrophically. Raises ValueError for NaN/inf latents.
        """
        self._check_z(z, finite=True)
        mu, s = self.means.to(z.dtype), self.variances.to(z.dtype)
        centre = mu.mean(0)
        zc, mc = z - centre, mu - centre
        prec = s.reciprocal()
        quad = (zc * zc) @ prec.T - 2 * zc @ (mc * prec).T + (mc * mc * prec).sum(1)
        return -0.5 * (quad + s.log().sum(1) + self.dim * _LOG_2PI)

    def nll(self, z: Tensor, y: Tensor) -> Tensor:
        """-log N(z_i; mu_{y_i}, s_{y_i}) per sample, (B,)."""
        self._check_z(z)
        self._check_y(y)
        mu, s = self.means[y].to(z.dtype), self.variances[y].to(z.dtype)
        return 0.5 * (((z - mu) ** 2 / s).sum(1) + s.log().sum(1) + self.dim * _LOG_2PI)

    def predict(self, z: Tensor) -> Tensor:
        """NF classification with equal class priors: argmax_y log N(z; mu_y, s_y), (B,)."""
        return self.log_prob(z).argmax(1)

    def sample(self, y: Tensor, temperature: float = 1.0, mean_scale: float = 1.0,
               generator: torch.Generator | None = None) -> Tensor:
        """z = mean_scale * mu_y + temperature * sqrt(s_y) * eps for labels y (B,); returns (B, D)."""
        self._check_y(y)
        eps = torch.randn(y.shape[0], self.dim, generator=generator, device=self.means.device)
        return mean_scale * self.means[y] + temperature * self.variances[y].sqrt() * eps


def interpolate(z1: Tensor, z2: Tensor, steps: int) -> Tensor:
    """Rescaled interpolation z(t) = (t z1 + (1-t) z2) / sqrt(t^2 + (1-t)^2), t from 0 to 1.

    Keeps the norm of Gaussian latents roughly constant along the path (SPEC §6).
    ``z1``, ``z2``: (D,) or (B, D); returns (steps, *z1.shape).
    """
    t = torch.linspace(0, 1, steps, dtype=z1.dtype, device=z1.device).view(-1, *([1] * z1.ndim))
    return (t * z1 + (1 - t) * z2) / (t ** 2 + (1 - t) ** 2).sqrt()
