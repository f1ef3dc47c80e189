"""Per-class latent statistics (docs/method.md §2.1, §4.3): the count N_y, mean m_y and variance
v_y (or full covariance) of each class's latents, the data that the class Gaussians of the
NFPI paper's Eqs. 5-7 are fitted to.

They are kept as float64 sums, so batches add and processes all-reduce exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["ClassStats"]


@dataclass
class ClassStats:
    """Sum-based per-class statistics of latents, float64.

    ``count`` (K,), ``total`` (K, D) = sum z, ``total_sq`` (K, D) = sum z**2 and, when built
    with ``full=True``, ``total_outer`` (K, D, D) = sum z z^T. Because they are plain sums,
    ``a + b`` merges batches and :meth:`all_reduce` merges processes exactly.
    """

    count: Tensor
    total: Tensor
    total_sq: Tensor
    total_outer: Tensor | None = None

    @classmethod
    def from_latents(cls, z: Tensor, y: Tensor, num_classes: int, full: bool = False) -> ClassStats:
        """Statistics of latents ``z`` (N, D) with labels ``y`` (N,) in [0, num_classes)."""
        if z.ndim != 2:
            raise ValueError(f"latents must have shape (N, D), got {tuple(z.shape)}; flatten images first")
        if y.ndim != 1 or y.shape[0] != z.shape[0]:
            raise ValueError(f"labels must have shape ({z.shape[0]},), got {tuple(y.shape)}")
        if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
            # .long() would truncate 2.7 to class 2 without a word
            raise ValueError(f"labels must be an integer tensor (torch.long), got {y.dtype}")
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise ValueError(
                f"labels must lie in [0, {num_classes}); found range [{int(y.min())}, {int(y.max())}]. "
                "Check num_classes or remap the labels."
            )
        if not torch.isfinite(z).all():
            raise ValueError("latents contain NaN or inf; the flow diverged or the input is corrupt")
        z = z.detach().to(torch.float64)
        y = y.to(z.device, torch.long)
        k, d = num_classes, z.shape[1]
        ones = torch.ones_like(y, dtype=torch.float64)
        count = torch.zeros(k, dtype=torch.float64, device=z.device).index_add_(0, y, ones)
        total = torch.zeros(k, d, dtype=torch.float64, device=z.device).index_add_(0, y, z)
        total_sq = torch.zeros(k, d, dtype=torch.float64, device=z.device).index_add_(0, y, z * z)
        outer = None
        if full:
            outer = torch.zeros(k, d, d, dtype=torch.float64, device=z.device).index_add_(
                0, y, z[:, :, None] * z[:, None, :]
            )
        return cls(count, total, total_sq, outer)

    def __add__(self, other: ClassStats) -> ClassStats:
        if self.total.shape != other.total.shape:
            raise ValueError(
                f"cannot merge statistics of shapes {tuple(self.total.shape)} and {tuple(other.total.shape)}"
            )
        outer = None
        if self.total_outer is not None and other.total_outer is not None:
            outer = self.total_outer + other.total_outer
        return ClassStats(
            self.count + other.count, self.total + other.total, self.total_sq + other.total_sq, outer
        )

    def all_reduce(self) -> ClassStats:
        """Sum the statistics over all torch.distributed processes (exact: they are sums)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            for t in (self.count, self.total, self.total_sq, self.total_outer):
                if t is not None:
                    dist.all_reduce(t)
        return self

    @property
    def num_classes(self) -> int:
        return self.total.shape[0]

    @property
    def dim(self) -> int:
        return self.total.shape[1]

    def mean(self) -> Tensor:
        """Class means m_y, (K, D)."""
        self._require_class_counts(1)
        return self.total / self.count[:, None]

    def var(self) -> Tensor:
        """Population (biased) per-dimension class variances v_y, (K, D)."""
        self._require_class_counts(2)
        m = self.mean()
        return (self.total_sq / self.count[:, None] - m * m).clamp_min(0.0)

    def cov(self) -> Tensor:
        """Population class covariances, (K, D, D); needs ``full=True`` statistics."""
        if self.total_outer is None:
            raise ValueError("full covariances need ClassStats.from_latents(..., full=True)")
        self._require_class_counts(2)
        m = self.mean()
        return self.total_outer / self.count[:, None, None] - m[:, :, None] * m[:, None, :]

    def _require_class_counts(self, minimum: int) -> None:
        small = (self.count < minimum).nonzero().flatten().tolist()
        if small:
            raise ValueError(
                f"classes {small} have fewer than {minimum} samples "
                f"(counts {[int(self.count[i]) for i in small]}); a class Gaussian needs at least 2. "
                "Use more data per class or drop those classes."
            )
