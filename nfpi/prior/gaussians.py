"""The class-conditional latent prior: one diagonal Gaussian N(mu_y, s_y) per class (docs/method.md §1, §6).

Implements the class-conditional log-likelihood of the paper's Eq. 2, NF classification
(argmax_y log N(f(x); mu_y, s_y), equal class priors), temperature sampling
z = m_s mu_y + T sqrt(s_y) eps, the rescaled interpolation of docs/method.md §6.3, and the three
initialisations of docs/method.md §4-§5: data init (Baseline 1), an FPI solution, random init.

:class:`FullGaussians` is GLEM's RFCM, the re-estimated full covariance matrices (GLEM Tables
5-6): after training, each class's mean and full covariance are re-estimated from its training
latents and used to sample (z = m_s mu_y + T L_y eps) and classify. It stores
Sigma_y = W_y W_y^T + diag(d_y): with ``rank=None`` this is the exact empirical covariance
(eigenvalues below ``floor`` times their mean are raised to it, so that a class with fewer
samples than dimensions still has a density); with ``rank=r`` it is the top-r principal axes
plus the residual per-dimension variance, whose diagonal equals the empirical variances. Full
covariances need K x D x D memory (K=10, D=3072: 0.75 GB in float64), hence ``rank`` for
CIFAR-sized latents.

Example:
    >>> y = torch.arange(3).repeat(20)
    >>> z = torch.randn(60, 2, generator=torch.Generator().manual_seed(0)) + 4 * torch.eye(3, 2)[y]
    >>> gaussians = ClassGaussians.from_stats(ClassStats.from_latents(z, y, 3))   # data init
    >>> bool((gaussians.predict(z) == y).float().mean() > 0.9)                     # (B,) NF classification
    True
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from .._util import check_labels
from .fpi import FPIResult
from .stats import ClassStats

__all__ = ["ClassGaussians", "FullGaussians", "check_latents", "interpolate"]

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
        raise ValueError(
            f"latents contain NaN or inf in {len(rows)} row(s) (first: {rows[:5].tolist()}); "
            "the flow diverged or its input is corrupt, so no class can be scored"
        )


def _check_finite(*params: Tensor) -> None:
    """Class Gaussian parameters (means, variances or factors) must be free of NaN/inf."""
    if not all(bool(torch.isfinite(t).all()) for t in params):
        raise ValueError("class Gaussian parameters contain NaN or inf")


class ClassGaussians(nn.Module):
    """K diagonal Gaussians over a D-dimensional latent; ``means``/``variances`` are (K, D) buffers.

    Buffers (not parameters): the Gaussians are set by the solver, never by the optimiser,
    and are saved and restored with the flow's checkpoint.
    """

    def __init__(self, means: Tensor, variances: Tensor):
        super().__init__()
        if means.ndim != 2 or means.shape != variances.shape:
            raise ValueError(
                f"means and variances must both be (K, D), got {tuple(means.shape)} and "
                f"{tuple(variances.shape)}"
            )
        _check_finite(means, variances)
        if (variances <= 0).any():
            raise ValueError("class variances must be positive")
        self.register_buffer("means", means.detach().clone().float())
        self.register_buffer("variances", variances.detach().clone().float())

    # --------------------------------------------------------------------- constructors
    @classmethod
    def from_stats(cls, stats: ClassStats, identity_variances: bool = False) -> ClassGaussians:
        """Data init (Baseline 1): class means and variances of the latents (lambda = 0)."""
        means = stats.mean()
        variances = (
            torch.ones_like(means) if identity_variances else stats.var().clamp_min(1e-8 * stats.var().mean())
        )
        return cls(means, variances)

    @classmethod
    def from_result(cls, result: FPIResult) -> ClassGaussians:
        """Gaussians from a diagonal :func:`nfpi.prior.fpi.solve` (or :func:`nfpi.prior.gd.solve`) result."""
        if result.variances.ndim != 2:
            raise ValueError("ClassGaussians holds diagonal Gaussians; solve with covariance='diag'")
        return cls(result.means, result.variances)

    @classmethod
    def random(
        cls,
        num_classes: int,
        dim: int,
        a: float = 1.0,
        c: float = 0.25,
        generator: torch.Generator | None = None,
    ) -> ClassGaussians:
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
        check_labels(y, num_classes=self.num_classes)

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

    def sample(
        self,
        y: Tensor,
        temperature: float = 1.0,
        mean_scale: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """z = mean_scale * mu_y + temperature * sqrt(s_y) * eps for labels y (B,); returns (B, D)
        in the buffers' dtype and device (a :meth:`cpu64` copy draws the same z on any device)."""
        self._check_y(y)
        eps = torch.randn(
            y.shape[0], self.dim, generator=generator, device=self.means.device, dtype=self.means.dtype
        )
        return mean_scale * self.means[y] + temperature * self.variances[y].sqrt() * eps

    def cpu64(self) -> ClassGaussians:
        """A float64 CPU copy: its :meth:`sample` with a seeded CPU generator gives the same
        latents whatever device the flow is on (the augmenters draw through it)."""
        return copy.deepcopy(self).cpu().double()


class FullGaussians(nn.Module):
    """K Gaussians N(mu_y, Sigma_y), Sigma_y = W_y W_y^T + diag(d_y), as (K, D), (K, D, r), (K, D).

    Same interface as :class:`nfpi.prior.ClassGaussians` (``log_prob``, ``nll``, ``predict``,
    ``sample``), so :func:`nfpi.evaluation.evaluate_flow` and the samplers accept either.
    """

    def __init__(self, means: Tensor, factor: Tensor, diag: Tensor):
        super().__init__()
        k, d = means.shape
        if factor.ndim != 3 or factor.shape[:2] != (k, d) or diag.shape != (k, d):
            raise ValueError(
                f"need means (K, D), factor (K, D, r), diag (K, D); got {tuple(means.shape)}, "
                f"{tuple(factor.shape)}, {tuple(diag.shape)}"
            )
        _check_finite(means, factor, diag)
        if (diag <= 0).any():
            raise ValueError("the diagonal part of the covariances must be positive")
        self.register_buffer("means", means.detach().float().clone())
        self.register_buffer("factor", factor.detach().float().clone())
        self.register_buffer("diag", diag.detach().float().clone())

    @classmethod
    def fit(
        cls,
        class_latents: Iterable[Tensor],
        rank: int | None = None,
        floor: float = 1e-6,
        max_full_dim: int = 2048,
    ) -> FullGaussians:
        """Re-estimate mean and covariance of each class from its latents.

        ``class_latents`` yields, for y = 0..K-1, the latents of class y (N_y, D) (a generator
        keeps one class in memory at a time). Population covariance (divided by N_y), float64.
        ``rank=None``: exact covariance, eigenvalues raised to ``floor`` x their mean;
        ``rank=r``: top-r principal axes + residual diagonal (diag(Sigma) = empirical variances).
        """
        means, factors, diags = [], [], []
        for y, z in enumerate(class_latents):
            if z.ndim != 2 or z.shape[0] < 2:
                raise ValueError(f"class {y}: need latents (N_y >= 2, D), got {tuple(z.shape)}")
            z = z.detach().double()
            n, d = z.shape
            if rank is None and d > max_full_dim:
                raise ValueError(
                    f"full {d}x{d} covariances for every class are too large (max_full_dim="
                    f"{max_full_dim}); pass rank=r for the low-rank + diagonal form (e.g. 64)"
                )
            if rank is not None and not 1 <= rank <= d:
                raise ValueError(f"rank must lie in [1, D={d}] or be None (full), got {rank}")
            mean = z.mean(0)
            centred = z - mean
            if rank is None:
                evals, evecs = torch.linalg.eigh(centred.T @ centred / n)
                delta = floor * evals.clamp_min(0).mean().clamp_min(1e-300)
                # Sigma = U diag(max(evals, delta)) U^T = W W^T + delta I exactly.
                factor = evecs * (evals - delta).clamp_min(0).sqrt()
                diag = torch.full((d,), float(delta), dtype=z.dtype)
            else:
                _, sv, vh = torch.linalg.svd(centred, full_matrices=False)
                factor = vh[:rank].T * (sv[:rank] / math.sqrt(n))
                var = centred.pow(2).mean(0)
                delta = floor * var.mean().clamp_min(1e-300)
                diag = (var - factor.pow(2).sum(1)).clamp_min(float(delta))
            means.append(mean)
            factors.append(factor)
            diags.append(diag)
        if len(means) < 2:
            raise ValueError("RFCM needs the latents of at least 2 classes")
        return cls(torch.stack(means), torch.stack(factors), torch.stack(diags))

    @classmethod
    def from_latents(cls, z: Tensor, y: Tensor, num_classes: int, **kwargs: Any) -> FullGaussians:
        """:meth:`fit` for all latents z (N, D) with labels y (N,) in memory."""
        return cls.fit((z[y == c] for c in range(num_classes)), **kwargs)

    @property
    def num_classes(self) -> int:
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def rank(self) -> int:
        return self.factor.shape[2]

    def covariance(self) -> Tensor:
        """The (K, D, D) covariances (small D only)."""
        return self.factor @ self.factor.mT + torch.diag_embed(self.diag)

    def log_prob(self, z: Tensor) -> Tensor:
        """log N(z; mu_y, Sigma_y) for every class, z (B, D) -> (B, K); B x K x D memory.

        Float64 inside: the Woodbury identity behind it subtracts terms of order |z|^2 / d,
        which float32 cannot resolve when d is a small floor (exact full covariances).
        """
        check_latents(z, self.dim)
        dist = torch.distributions.LowRankMultivariateNormal(
            self.means.double(), self.factor.double(), self.diag.double(), validate_args=False
        )
        return dist.log_prob(z.double()[:, None, :]).to(z.dtype)

    def nll(self, z: Tensor, y: Tensor) -> Tensor:
        """-log N(z_i; mu_{y_i}, Sigma_{y_i}), (B,)."""
        scores = self.log_prob(z)
        y = check_labels(y, num_classes=self.num_classes)
        return -scores.gather(1, y[:, None].to(z.device)).squeeze(1)

    def predict(self, z: Tensor) -> Tensor:
        """argmax_y log N(z; mu_y, Sigma_y) with equal class priors, (B,)."""
        return self.log_prob(z).argmax(1)

    def sample(
        self,
        y: Tensor,
        temperature: float = 1.0,
        mean_scale: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """z = mean_scale mu_y + temperature (W_y eps_r + sqrt(d_y) eps_D), y (B,) -> (B, D)."""
        check_labels(y, num_classes=self.num_classes)
        device = self.means.device
        eps_r = torch.randn(y.shape[0], self.rank, generator=generator, device=device)
        eps_d = torch.randn(y.shape[0], self.dim, generator=generator, device=device)
        noise = (self.factor[y] @ eps_r[:, :, None]).squeeze(2) + self.diag[y].sqrt() * eps_d
        return mean_scale * self.means[y] + temperature * noise


def interpolate(z1: Tensor, z2: Tensor, steps: int) -> Tensor:
    """Rescaled interpolation z(t) = (t z1 + (1-t) z2) / sqrt(t^2 + (1-t)^2), t from 0 to 1.

    Keeps the norm of Gaussian latents roughly constant along the path (docs/method.md §6.3).
    ``z1``, ``z2``: (D,) or (B, D); returns (steps, *z1.shape).
    """
    t = torch.linspace(0, 1, steps, dtype=z1.dtype, device=z1.device).view(-1, *([1] * z1.ndim))
    return (t * z1 + (1 - t) * z2) / (t**2 + (1 - t) ** 2).sqrt()
