"""GLEM's own settings as library options (Enescu & Sahbi, "Learning Classwise Untangled
Continuums for Conditional Normalizing Flows", the earlier version of NFPI; SPEC §5-§6).

Three pieces, each usable with any flow trained by :mod:`nfpi.train`:

(a) **EM training** (GLEM §4.3, Algorithm 1; supplementary §3.1): the class Gaussians are
    learned by gradient descent on the latent statistics of D_G (10 % of each class) in an
    M-step after every epoch, alternating with flow training on D_NF (E-step); lambda is
    annealed geometrically from a large start; D_G joins the training set after
    ``merge_epoch`` and the Gaussians are then frozen. :func:`em_overrides` gives this schedule
    as overrides of a :class:`nfpi.train.TrainConfig`: the ``gaussians`` options
    ``prior="gd"``, ``dg_fraction``, ``merge_epoch``, ``resolve_every=1``, ``warm_start``
    (each M-step continues from the current Gaussians) and ``lam_decay`` / ``lam_min``.
    Deviations, stated: the repulsion is NFPI's exp(-KL/(pi alpha)) term of SPEC §2, minimised
    by :func:`nfpi.gd.solve`, not GLEM's plain -KL (GLEM Eq. 4), which is unbounded below and
    needs the sigmoid bounds to stay finite; the Gaussians start from data init (SPEC §4 step
    2), not from GLEM's overlapping standard Gaussians.

(b) **RFCM**, the re-estimated full covariance matrices (GLEM Tables 5-6): after training,
    each class's mean and full covariance are re-estimated from its training latents and
    used to sample (z = m_s mu_y + T L_y eps) and classify. :class:`FullGaussians` stores
    Sigma_y = W_y W_y^T + diag(d_y): with ``rank=None`` this is the exact empirical
    covariance (eigenvalues below ``floor`` times their mean are raised to it, so that a
    class with fewer samples than dimensions still has a density); with ``rank=r`` it is
    the top-r principal axes plus the residual per-dimension variance, whose diagonal
    equals the empirical variances. Full covariances need K x D x D memory (K=10, D=3072:
    0.75 GB in float64), hence ``rank`` for CIFAR-sized latents.

(c) **CE / CEGLEM**, conditional encoding (GLEM §5.2 Baselines 1 and 3, Fig. 3 bottom,
    supplementary Fig. 39): a learned class-code image of ``rows`` rows is appended below
    every training image, so the flow sees (C, H + rows, W). :class:`ClassCodes` learns K
    prototype codes (GLEM: "placements obtained by minimising a regularised mean squared
    error, then perturbed with uniform noise smaller than the prototypes"; the objective is
    not given, ours is in :meth:`ClassCodes.learn`). The label of a generated image is the
    prototype nearest to its code rows. Test images get uniformly random code rows, because
    their label is unknown (GLEM: "appending irrelevant, e.g. random, code values"). CE is a
    monomodal flow (``gaussians.prior="standard"``: every class is N(0, I)): it samples
    unconditionally and reads the label from the generated code. CEGLEM combines the codes
    with class Gaussians (conditioning by the Gaussian, the code gives a second label).
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from . import data
from .priors import check_latents

__all__ = ["ClassCodes", "CodeConfig", "FullGaussians", "em_overrides"]


# ---------------------------------------------------------------------------- (a) EM training
def em_overrides(lam: float, merge_epoch: int, lam_decay: float = 0.5, lam_min: float = 0.0,
                 dg_fraction: float = 0.1, gd_steps: int = 100, gd_lr: float = 0.05,
                 gd_policy: str = "linear") -> dict[str, Any]:
    """TrainConfig overrides (``cfg.replace(**em_overrides(...))``) for GLEM's EM schedule.

    After every epoch up to ``merge_epoch``: ``gd_steps`` Adam steps on J for the statistics of
    D_G (``dg_fraction`` of each class), starting from the current Gaussians, at lambda
    max(lam_min, lam * lam_decay^t) for the t-th M-step (t = 0, 1, ...). Afterwards D_G joins
    the training set and the Gaussians stay as they are.
    """
    return {"gaussians.prior": "gd", "gaussians.lam": lam, "gaussians.lam_decay": lam_decay,
            "gaussians.lam_min": lam_min, "gaussians.solve_epoch": 0, "gaussians.resolve_every": 1,
            "gaussians.warm_start": True, "gaussians.dg_fraction": dg_fraction,
            "gaussians.merge_epoch": merge_epoch, "gaussians.gd_steps": gd_steps, "gaussians.gd_lr": gd_lr,
            "gaussians.gd_policy": gd_policy}


# ---------------------------------------------------------------------------- (b) RFCM
class FullGaussians(nn.Module):
    """K Gaussians N(mu_y, Sigma_y), Sigma_y = W_y W_y^T + diag(d_y), as (K, D), (K, D, r), (K, D).

    Same interface as :class:`nfpi.priors.ClassGaussians` (``log_prob``, ``nll``, ``predict``,
    ``sample``), so :func:`nfpi.train.evaluate` and the samplers accept either.
    """

    def __init__(self, means: Tensor, factor: Tensor, diag: Tensor):
        super().__init__()
        k, d = means.shape
        if factor.ndim != 3 or factor.shape[:2] != (k, d) or diag.shape != (k, d):
            raise ValueError(f"need means (K, D), factor (K, D, r), diag (K, D); got {tuple(means.shape)}, "
                             f"{tuple(factor.shape)}, {tuple(diag.shape)}")
        if (diag <= 0).any():
            raise ValueError("the diagonal part of the covariances must be positive")
        self.register_buffer("means", means.detach().float().clone())
        self.register_buffer("factor", factor.detach().float().clone())
        self.register_buffer("diag", diag.detach().float().clone())

    @classmethod
    def fit(cls, class_latents: Iterable[Tensor], rank: int | None = None, floor: float = 1e-6,
            max_full_dim: int = 2048) -> "FullGaussians":
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
                raise ValueError(f"full {d}x{d} covariances for every class are too large (max_full_dim="
                                 f"{max_full_dim}); pass rank=r for the low-rank + diagonal form (e.g. 64)")
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
    def from_latents(cls, z: Tensor, y: Tensor, num_classes: int, **kwargs: Any) -> "FullGaussians":
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
            self.means.double(), self.factor.double(), self.diag.double(), validate_args=False)
        return dist.log_prob(z.double()[:, None, :]).to(z.dtype)

    def nll(self, z: Tensor, y: Tensor) -> Tensor:
        """-log N(z_i; mu_{y_i}, Sigma_{y_i}), (B,)."""
        return -self.log_prob(z).gather(1, y[:, None].to(z.device)).squeeze(1)

    def predict(self, z: Tensor) -> Tensor:
        """argmax_y log N(z; mu_y, Sigma_y) with equal class priors, (B,)."""
        return self.log_prob(z).argmax(1)

    def sample(self, y: Tensor, temperature: float = 1.0, mean_scale: float = 1.0,
               generator: torch.Generator | None = None) -> Tensor:
        """z = mean_scale mu_y + temperature (W_y eps_r + sqrt(d_y) eps_D), y (B,) -> (B, D)."""
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            raise ValueError(f"labels must lie in [0, {self.num_classes})")
        device = self.means.device
        eps_r = torch.randn(y.shape[0], self.rank, generator=generator, device=device)
        eps_d = torch.randn(y.shape[0], self.dim, generator=generator, device=device)
        noise = (self.factor[y] @ eps_r[:, :, None]).squeeze(2) + self.diag[y].sqrt() * eps_d
        return mean_scale * self.means[y] + temperature * noise


# ---------------------------------------------------------------------------- (c) CE / CEGLEM
@dataclass
class CodeConfig:
    """Conditional encoding of :mod:`nfpi.train` data (the ``codes`` section of a TrainConfig).

    ``rows``: code rows appended below each image (0 = off; the flow needs
    H + 2 pad + rows divisible by 2^levels); ``amplitude``: prototypes lie in
    [-amplitude, amplitude] (pixel range [-1, 1]); ``noise``: per-image uniform perturbation
    U(-noise, noise) of the training codes (must be smaller than ``amplitude``); ``seed``: of
    the prototypes; ``steps``: Adam steps that place them.
    """

    rows: int = 0
    amplitude: float = 0.8
    noise: float = 0.1
    seed: int = 0
    steps: int = 100

    def __post_init__(self) -> None:
        if self.rows < 0:
            raise ValueError(f"codes.rows must be >= 0 (0 = no conditional encoding), got {self.rows}")
        if not 0 < self.amplitude <= 1:
            raise ValueError(f"codes.amplitude must lie in (0, 1], got {self.amplitude}")
        if not 0 <= self.noise < self.amplitude:
            raise ValueError(f"codes.noise must lie in [0, amplitude={self.amplitude}), got {self.noise}")
        if self.steps < 0:
            raise ValueError(f"codes.steps must be >= 0, got {self.steps}")


class ClassCodes:
    """K prototype code images (K, C, rows, W) and the operations of CE.

    Images here are floats (N, C, H, W) in [-1, 1] or uint8 :class:`nfpi.data.ImageArrays`.
    """

    def __init__(self, prototypes: Tensor):
        if prototypes.ndim != 4:
            raise ValueError(f"prototypes must be (K, C, rows, W), got {tuple(prototypes.shape)}")
        self.prototypes = prototypes.detach().float().cpu()

    @classmethod
    def learn(cls, num_classes: int, shape: tuple[int, int, int], amplitude: float = 0.8,
              steps: int = 100, seed: int = 0, reg: float = 0.01, tau: float = 0.05) -> "ClassCodes":
        """Place K codes of ``shape`` (C, rows, W): P = amplitude tanh(theta) minimising

            tau log sum_{y<y'} exp(-MSE(P_y, P_y') / tau) + reg mean(P^2),

        a soft minimum of the pairwise mean squared errors (pushed up: every pair of codes far
        apart) regularised towards small codes (fewer saturated pixels for the flow to model).
        Deterministic: seeded float64 CPU computation.
        """
        if num_classes < 2:
            raise ValueError("conditional encoding needs at least 2 classes")
        g = torch.Generator().manual_seed(seed)
        theta = torch.randn(num_classes, *shape, generator=g, dtype=torch.float64).requires_grad_(True)
        opt = torch.optim.Adam([theta], lr=0.05)
        iu = torch.triu_indices(num_classes, num_classes, 1)
        for _ in range(steps):
            p = amplitude * torch.tanh(theta).flatten(1)
            sq = p.pow(2).sum(1)
            # Gram form of the pairwise squared distances: cdist's backward is far slower here.
            mse = (sq[:, None] + sq[None, :] - 2 * p @ p.T)[iu[0], iu[1]] / p.shape[1]
            loss = tau * torch.logsumexp(-mse / tau, 0) + reg * p.pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            return cls(amplitude * torch.tanh(theta))

    @classmethod
    def for_config(cls, codes: CodeConfig, num_classes: int, channels: int, width: int) -> "ClassCodes":
        """The codes of a training config's ``codes`` section (recomputed, deterministic)."""
        return cls.learn(num_classes, (channels, codes.rows, width), codes.amplitude, codes.steps, codes.seed)

    @property
    def rows(self) -> int:
        return self.prototypes.shape[2]

    @property
    def num_classes(self) -> int:
        return self.prototypes.shape[0]

    def min_distance(self) -> float:
        """Smallest pairwise mean squared error between two prototypes."""
        p = self.prototypes.flatten(1).double()
        dist = torch.cdist(p, p).pow(2) / p.shape[1]
        return float(dist[~torch.eye(len(p), dtype=torch.bool)].min())

    def codes(self, y: Tensor, noise: float = 0.0, generator: torch.Generator | None = None) -> Tensor:
        """Code images of labels y (N,): prototypes + U(-noise, noise), (N, C, rows, W)."""
        c = self.prototypes[y.cpu()]
        if noise:
            c = c + noise * (2 * torch.rand(c.shape, generator=generator) - 1)
        return c.clamp(-1, 1)

    def append(self, x: Tensor, y: Tensor, noise: float = 0.0,
               generator: torch.Generator | None = None) -> Tensor:
        """Images x (N, C, H, W) in [-1, 1] -> (N, C, H + rows, W) with the codes of y below."""
        self._check_width(x)
        return torch.cat([x, self.codes(y, noise, generator).to(x)], dim=2)

    def append_arrays(self, arrays: data.ImageArrays, noise: float = 0.0, seed: int = 0) -> data.ImageArrays:
        """uint8 images with the codes of their labels appended, stored as 8-bit pixels.

        The flow's quantisation then keeps the codes' top ``bits`` bits, i.e. a code pixel is
        moved by less than one ``bits``-bit level.
        """
        codes = self.codes(arrays.y, noise, torch.Generator().manual_seed(seed))
        return self._with_rows(arrays, data.to_uint8(codes, 8))

    def append_random(self, arrays: data.ImageArrays, seed: int = 0) -> data.ImageArrays:
        """uint8 images with uniformly random code rows (test images: their label is unknown)."""
        n, c, _, w = arrays.x.shape
        rows = torch.randint(0, 256, (n, c, self.rows, w), generator=torch.Generator().manual_seed(seed),
                             dtype=torch.uint8)
        return self._with_rows(arrays, rows)

    def _with_rows(self, arrays: data.ImageArrays, rows: Tensor) -> data.ImageArrays:
        self._check_width(arrays.x)
        return data.ImageArrays(torch.cat([arrays.x, rows], dim=2), arrays.y, arrays.classes, arrays.name)

    def split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(N, C, H + rows, W) -> images (N, C, H, W) and code rows (N, C, rows, W)."""
        return x[:, :, :-self.rows], x[:, :, -self.rows:]

    def decode(self, x: Tensor) -> Tensor:
        """Labels (N,) of images with codes (N, C, H + rows, W): the nearest prototype (MSE)."""
        self._check_width(x)
        code = self.split(x)[1].flatten(1).float().cpu()
        return torch.cdist(code, self.prototypes.flatten(1)).argmin(1)

    def _check_width(self, x: Tensor) -> None:
        c, w = self.prototypes.shape[1], self.prototypes.shape[3]
        if x.ndim != 4 or x.shape[1] != c or x.shape[3] != w:
            raise ValueError(f"images must be (N, {c}, H, {w}) to carry these codes, got {tuple(x.shape)}")
