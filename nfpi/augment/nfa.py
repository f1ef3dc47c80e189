"""NF augmentation (NFA): same-class mixup inside the principal subspace of a class (docs/method.md §6.4;
paper Sec. 5 "Extra Comparison (Image Augmentation)", Tables 5-6, Fig. 2; GLEM supplementary
§1.1).

For a training image x of class y the flow gives z = f(x). A second latent z' of the same
class (the *partner*) is drawn, and z moves towards z' only inside the span of the top-k
principal axes P_y (D, k) of class y's training latents:

    z_new = z + P_y P_y^T (beta (z' - z)),        x_new = clamp(f^-1(z_new), -1, 1).

The component of z orthogonal to span(P_y) is kept exactly, so the image changes only along
the modes with the largest within-class variance ("more visually diverse and realistic images
than simply adding noise in the latent space", paper Sec. 5). beta is drawn per image from a
mixing law (:class:`AugmentConfig`).

The paper leaves k, the mixing law and the partner source open; we expose them
(docs/method.md §6.4). Defaults and their reasons are on :class:`AugmentConfig`; the
partner is a random latent of the same class from a bank of training latents, or, without a
bank (e.g. when the training latents are too large to keep), a sample of the class Gaussian
N(mu_y, T^2 s_y) of the prior.

Uses: :meth:`NFAugmenter.augment` on batches, :class:`NFADataset` on the fly (probability p),
and :func:`generate_dataset` offline (the paper's protocol: the training set is enlarged with
augmented copies), which writes an npz file (docs/method.md §9) resumably (:mod:`nfpi.augment.generated`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from .._util import check_labels, eval_mode, finite_or_original, flow_device_dtype
from ..data import ImageArrays
from ..flows import ActNorm
from ..latents import encode
from ..prior import ClassGaussians

__all__ = [
    "AugmentConfig",
    "ClassPCA",
    "NFADataset",
    "NFAugmenter",
    "SameClassBank",
    "mix",
    "sample_beta",
]

LAWS = ("uniform", "beta")


@dataclass
class AugmentConfig:
    """Design choices of NFA (docs/method.md §6.4), with the defaults used in this project.

    k: principal axes per class spanning the mixing subspace. Default 8: the paper mixes
        "along the principal variation modes", i.e. a few leading axes; k must stay well below
        the number of training images per class (PCA of n latents has at most n - 1 axes) and
        a small k keeps the variants close to the class manifold (larger k approaches plain
        same-class latent mixup, whose decoded images degrade).
    law: "uniform" draws beta ~ U[0, beta_max]; "beta" draws beta = beta_max * Beta(a, a)
        with a = ``beta_a`` (mixup's law, Zhang et al. 2018; a < 1 favours the ends 0 and
        beta_max).
    beta_a: shape a of the "beta" law (mixup's usual 0.2-1; default 0.4).
    beta_max: largest mixing weight. Default 0.5: the variant is never closer to the partner
        than to its source, so it remains "an augmented variant" of the original image (paper
        Fig. 2); 1.0 allows a full swap of the principal components.
    copies: augmented copies per training image for offline generation. Default 2: the
        original plus two copies triples the data, as in the paper's EVA02 protocol (GLEM
        supplementary: "the dataset is duplicated 3 times with augmented images").
    temperature: scale T of the prior's standard deviations when partners are sampled from
        the class Gaussians (no bank of training latents); 1 samples the Gaussian itself.
    """

    k: int = 8
    law: str = "uniform"
    beta_a: float = 0.4
    beta_max: float = 0.5
    copies: int = 2
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"k (principal axes per class) must be an integer >= 1; got {self.k!r}")
        if self.law not in LAWS:
            raise ValueError(f"law must be one of {list(LAWS)}; got {self.law!r}")
        if not self.beta_a > 0:
            raise ValueError(f"beta_a (shape of the Beta law) must be > 0; got {self.beta_a}")
        if not 0 < self.beta_max <= 1:
            raise ValueError(
                f"beta_max must lie in (0, 1] (1 = move fully to the partner); got {self.beta_max}"
            )
        if isinstance(self.copies, bool) or not isinstance(self.copies, int) or self.copies < 1:
            raise ValueError(f"copies must be an integer >= 1; got {self.copies!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0; got {self.temperature}")


# ------------------------------------------------------------------------------------ PCA
@dataclass(frozen=True)
class ClassPCA:
    """Class-wise PCA of latents: ``means`` (K, D), orthonormal ``axes`` (K, k, D) ordered by
    decreasing ``variances`` (K, k) (population variance of the class latents along each axis),
    and ``total_variances`` (K,) (summed over all D dimensions). Float64. Build with :meth:`fit`."""

    means: Tensor
    axes: Tensor
    variances: Tensor
    total_variances: Tensor

    @property
    def explained(self) -> Tensor:
        """Fraction of each class's latent variance inside its top-k subspace, (K,)."""
        return self.variances.sum(1) / self.total_variances

    @property
    def num_classes(self) -> int:
        return self.axes.shape[0]

    @property
    def k(self) -> int:
        return self.axes.shape[1]

    @property
    def dim(self) -> int:
        return self.axes.shape[2]

    @classmethod
    def fit(cls, z: Tensor, y: Tensor, num_classes: int, k: int) -> ClassPCA:
        """Top-k principal axes of the latents z (N, D) of each class y (N,) in [0, K).

        Computed in float64 by a thin SVD of each class's centred latents (N_y, D). Every
        class needs more than k latents (n centred latents span at most n - 1 directions) and
        k may not exceed D.
        """
        if not isinstance(z, Tensor) or z.dim() != 2 or not z.is_floating_point():
            shape = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
            raise ValueError(f"z must be a float tensor of latents (N, D); got {shape}")
        y = check_labels(y, z.shape[0], num_classes)
        dim = z.shape[1]
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= dim:
            raise ValueError(f"k must be an integer in [1, D={dim}] (the latent dimension); got {k!r}")
        z = z.detach().to(torch.float64)
        means, axes, variances, totals = [], [], [], []
        for c in range(num_classes):
            zc = z[(y == c).to(z.device)]
            if zc.shape[0] <= k:
                raise ValueError(
                    f"class {c} has {zc.shape[0]} latents: a PCA with k={k} axes needs at least "
                    f"k + 1 = {k + 1} per class; lower k or give more training images"
                )
            mean = zc.mean(0)
            _, s, vh = torch.linalg.svd(zc - mean, full_matrices=False)
            means.append(mean)
            axes.append(vh[:k])
            variances.append(s[:k] ** 2 / zc.shape[0])
            totals.append((s**2).sum() / zc.shape[0])
        return cls(torch.stack(means), torch.stack(axes), torch.stack(variances), torch.stack(totals))

    def to(self, device: torch.device | str) -> ClassPCA:
        """The same PCA with tensors on ``device`` (still float64)."""
        return ClassPCA(
            *(t.to(device) for t in (self.means, self.axes, self.variances, self.total_variances))
        )

    def project(self, v: Tensor, y: Tensor) -> Tensor:
        """P_y P_y^T v for vectors v (B, D) of classes y (B,); (B, D) in v's dtype."""
        basis = self.axes.to(device=v.device, dtype=v.dtype)[y.to(v.device)]  # (B, k, D)
        return torch.einsum("bkd,bk->bd", basis, torch.einsum("bkd,bd->bk", basis, v))


def mix(z: Tensor, y: Tensor, z_partner: Tensor, pca: ClassPCA, beta: Tensor | float) -> Tensor:
    """z + P_y P_y^T (beta (z_partner - z)) for latents z, z_partner (B, D) of classes y (B,).

    ``beta``: a float or a tensor (B,) of mixing weights. The part of z orthogonal to class
    y's principal subspace is unchanged; beta = 0 returns z, beta = 1 gives z's in-span
    coordinates to the partner. Computed in z's dtype.
    """
    if z.dim() != 2 or z_partner.shape != z.shape:
        raise ValueError(
            f"z and z_partner must both be (B, D); got {tuple(z.shape)} and {tuple(z_partner.shape)}"
        )
    if z.shape[1] != pca.dim:
        raise ValueError(
            f"latents have D={z.shape[1]} but the PCA was fitted on D={pca.dim}; "
            "fit ClassPCA on latents of the same flow"
        )
    y = check_labels(y, z.shape[0], pca.num_classes)
    beta = torch.as_tensor(beta, dtype=z.dtype, device=z.device)
    if beta.dim() > 1 or (beta.dim() == 1 and beta.shape[0] != z.shape[0]):
        raise ValueError(
            f"beta must be a scalar or one weight per latent ({z.shape[0]},); got {tuple(beta.shape)}"
        )
    weight = beta[:, None] if beta.dim() == 1 else beta
    return z + pca.project(weight * (z_partner - z), y)


def sample_beta(cfg: AugmentConfig, n: int, generator: torch.Generator | None = None) -> Tensor:
    """n mixing weights (n,) float64 on the CPU drawn from ``cfg.law`` (see :class:`AugmentConfig`)."""
    if cfg.law == "uniform":
        return cfg.beta_max * torch.rand(n, generator=generator, dtype=torch.float64)
    # torch's Beta sampler takes no generator; numpy's does, seeded from the torch generator
    # so that a given generator state always yields the same weights.
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return cfg.beta_max * torch.from_numpy(np.random.default_rng(seed).beta(cfg.beta_a, cfg.beta_a, n))


# ------------------------------------------------------------------------------ augmenter
class SameClassBank:
    """Rows (N, ...) sorted by class with per-class offsets and counts, so that a random row of
    class y is one index ``offset[y] + floor(u * count[y])`` (u uniform, float64, from a CPU
    generator) without a Python loop per sample: NFA's partner latents, pixel mixup's partner
    images. ``what`` names the rows in errors.

    Example:
        >>> z = torch.arange(8.0)[:, None].repeat(1, 3)                      # (N, D) rows
        >>> bank = SameClassBank(z, torch.tensor([0, 1] * 4), num_classes=2)
        >>> partners = bank.draw(torch.tensor([1, 1, 0]), torch.Generator().manual_seed(0))
        >>> [int(p[0]) % 2 for p in partners]                                # (B, D), same class
        [1, 1, 0]
    """

    def __init__(self, rows: Tensor, y: Tensor, num_classes: int, what: str = "rows") -> None:
        y = check_labels(y, rows.shape[0], num_classes, f"labels of the {what}")
        self.counts = torch.bincount(y, minlength=num_classes)
        if (self.counts == 0).any():
            missing = (self.counts == 0).nonzero().flatten().tolist()
            raise ValueError(f"no {what} of class(es) {missing}: every class needs partners")
        self.offsets = torch.cumsum(self.counts, 0) - self.counts
        self.rows = rows[torch.argsort(y, stable=True)]

    def tensors(self) -> tuple[Tensor, Tensor, Tensor]:
        """(sorted rows, offsets, counts): what determines :meth:`draw`."""
        return self.rows, self.offsets, self.counts

    def draw(self, y: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """One random row of class y_i per label of y (B,) (CPU int64); (B, ...) on the rows' device."""
        u = torch.rand(y.shape[0], generator=generator, dtype=torch.float64)
        pick = self.offsets[y] + (u * self.counts[y]).long().clamp_max(self.counts[y] - 1)
        return self.rows[pick.to(self.rows.device)]


class NFAugmenter:
    """NFA with a trained flow: ``augment(x, y, generator)`` maps images to same-class variants.

    Args:
        flow: the trained flow (:class:`nfpi.flows.Glow`: ``forward(x) -> (z, logdet)``,
            ``inverse(z) -> x``, attribute ``in_shape``), used in eval mode without gradients
            on its own device and dtype.
        prior: the class Gaussians; needed only when ``bank`` is None (partners are then
            sampled from N(mu_y, T^2 s_y)).
        pca: :class:`ClassPCA` of the training latents (same D and K).
        cfg: :class:`AugmentConfig`.
        bank: (z (N, D), y (N,)) training latents to draw same-class partners from.
    """

    def __init__(
        self,
        flow: nn.Module,
        prior: ClassGaussians | None,
        pca: ClassPCA,
        cfg: AugmentConfig | None = None,
        bank: tuple[Tensor, Tensor] | None = None,
    ) -> None:
        self.cfg = cfg or AugmentConfig()
        self.flow = flow
        self.device, self.dtype = flow_device_dtype(flow)
        self.in_shape = tuple(int(s) for s in flow.in_shape)
        dim = math.prod(self.in_shape)
        if any(isinstance(m, ActNorm) and not bool(m.initialized) for m in flow.modules()):
            raise ValueError(
                "the flow has uninitialised ActNorm layers (an untrained flow would initialise them "
                "on the first batch it augments); load a trained checkpoint or run one forward "
                "pass on training images first"
            )
        if pca.dim != dim:
            raise ValueError(
                f"the PCA has D={pca.dim} but the flow's latents have D={dim} for images "
                f"{self.in_shape}; fit ClassPCA on this flow's latents"
            )
        self.num_classes = pca.num_classes
        self.pca = pca.to(self.device)
        self.prior = prior
        if bank is None:
            if prior is None:
                raise ValueError(
                    "NFA needs partners: pass bank=(z, y) of training latents or the prior "
                    "(class Gaussians) to sample partners from"
                )
            if (prior.num_classes, prior.dim) != (self.num_classes, dim):
                raise ValueError(
                    f"the prior has K={prior.num_classes}, D={prior.dim} but the PCA has "
                    f"K={self.num_classes}, D={dim}"
                )
            self._bank = None
            self._prior64 = prior.cpu64()
        else:
            z, y = bank
            if z.dim() != 2 or z.shape[1] != dim:
                raise ValueError(f"bank latents must be (N, {dim}); got {tuple(z.shape)}")
            self._bank = SameClassBank(z.to(self.device, self.dtype), y, self.num_classes, "bank latents")

    @classmethod
    def from_arrays(
        cls,
        flow: nn.Module,
        arrays: ImageArrays,
        bits: int,
        cfg: AugmentConfig | None = None,
        prior: ClassGaussians | None = None,
        batch_size: int = 500,
    ) -> NFAugmenter:
        """Encode the training images ``arrays`` (+0.5 dequantisation at ``bits``), fit the
        class-wise PCA on their latents and keep them as the partner bank."""
        cfg = cfg or AugmentConfig()
        if tuple(arrays.shape) != tuple(flow.in_shape):
            raise ValueError(
                f"images have shape {arrays.shape} but the flow expects {tuple(flow.in_shape)}; "
                "pad/crop them as in the flow's training config (TrainConfig.pad)"
            )
        z, _ = encode(flow, arrays, bits, batch_size)
        pca = ClassPCA.fit(z, arrays.y, arrays.num_classes, cfg.k)
        return cls(flow, prior, pca, cfg, bank=(z, arrays.y))

    def sample_partners(self, y: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """One same-class partner latent per label y (B,) (CPU int64): a random bank latent of
        class y_i, or a sample of N(mu_y, T^2 s_y) without a bank; (B, D) on the flow's device."""
        y = check_labels(y.cpu() if isinstance(y, Tensor) else y, len(y), self.num_classes)
        if self._bank is None:
            return self._prior64.sample(y, self.cfg.temperature, generator=generator).to(
                self.device, self.dtype
            )
        return self._bank.draw(y, generator)

    @torch.no_grad()
    def augment(self, x: Tensor, y: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Same-class variants of images x (B, C, H, W) in [-1, 1] with labels y (B,).

        Returns images of x's shape, dtype and device, clamped to [-1, 1]. Random draws
        (partners, beta) come from the CPU ``generator`` (None: torch's global RNG), so a
        seeded generator gives the same variants on any device. A variant whose inverse is
        not finite is replaced by its original image, with a warning.
        """
        if not isinstance(x, Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != self.in_shape:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(
                f"images must be (B, {', '.join(map(str, self.in_shape))}) to match the flow; got {shape}"
            )
        if not x.is_floating_point():
            raise ValueError(f"images must be floats in [-1, 1] (nfpi.data.dequantize); got dtype {x.dtype}")
        y = check_labels(y.cpu() if isinstance(y, Tensor) else y, x.shape[0], self.num_classes)
        with eval_mode(self.flow):
            xin = x.to(self.device, self.dtype)
            out = self.flow.inverse(self.move(self.flow(xin)[0], y, generator))
        return finite_or_original(out, xin, "NFA").clamp_(-1.0, 1.0).to(x.device, x.dtype)

    def move(self, z: Tensor, y: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The NFA step in latent space: z (B, D) of classes y (B,) moved a random beta towards a
        random same-class partner inside the class's principal subspace (:func:`mix`)."""
        partners = self.sample_partners(y, generator)
        beta = sample_beta(self.cfg, y.shape[0], generator).to(self.device, self.dtype)
        return mix(z, y.to(self.device), partners, self.pca, beta)


# -------------------------------------------------------------------------- on the fly
class NFADataset(Dataset):
    """Wrap a dataset of (x (C, H, W) in [-1, 1], y) items: item i is NFA-augmented with
    probability ``p``, else returned as is. Randomness comes from a generator seeded with
    ``seed`` (reseeded per DataLoader worker from the worker's seed)."""

    def __init__(self, base: Dataset, augmenter: NFAugmenter, p: float = 0.5, seed: int = 0) -> None:
        if not 0 <= p <= 1:
            raise ValueError(f"p (probability of augmenting an item) must lie in [0, 1]; got {p}")
        self.base, self.augmenter, self.p = base, augmenter, p
        self.generator = torch.Generator().manual_seed(seed)
        self._worker_id: int | None = None

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        worker = torch.utils.data.get_worker_info()
        if worker is not None and self._worker_id != worker.id:
            # Workers start from copies of one generator state and would repeat each other.
            self.generator.manual_seed(worker.seed)
            self._worker_id = worker.id
        x, y = self.base[i]
        if float(torch.rand((), generator=self.generator)) < self.p:
            x = self.augmenter.augment(x[None], torch.tensor([int(y)]), self.generator)[0]
        return x, int(y)
