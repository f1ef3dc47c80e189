"""The alternatives NF augmentation is compared with (paper Sec. 5 "Extra Comparison
(Image Augmentation)"; GLEM Table 4), with the ``augment(x, y, generator)`` interface of
:class:`nfpi.augment.NFAugmenter`:

- :class:`LatentNoise`: Gaussian noise in the latent space, x_new = f^-1(z + sigma eps), the
  alternative the paper argues against; :meth:`LatentNoise.matched` moves latents as far (in
  mean square) as a given NFA does, so the two differ only in direction;
- :class:`PixelMixup`: within-class mixup in pixel space, x_new = x + beta (x' - x);
- :class:`ClassSamples`: images decoded from the class Gaussians, f^-1(z), z ~ N(mu_y, T^2 s_y).

Example:
    >>> nfa = NFAugmenter.from_arrays(flow, train_set, cfg.bits, AugmentConfig(k=4))
    >>> noise = LatentNoise.matched(nfa, train_set, cfg.bits)
    >>> tuple(noise.augment(x, y, torch.Generator().manual_seed(0)).shape)
    (6, 1, 8, 8)

References:
    Paper (NFPI) Sec. 5; GLEM Table 4.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .._util import check_labels, eval_mode, finite_or_original, flow_device_dtype
from ..data import ImageArrays, bin_centres
from ..latents import encode
from ..prior import ClassGaussians
from .nfa import AugmentConfig, NFAugmenter, SameClassBank, sample_beta

__all__ = ["ClassSamples", "LatentNoise", "PixelMixup"]


class LatentNoise:
    """The alternative the paper argues against (Sec. 5: NFA gives "more visually diverse and
    realistic images than simply adding noise in the latent space"): x_new = f^-1(z + sigma
    eps), eps ~ N(0, I_D), clamped to [-1, 1]. Same ``augment(x, y, generator)`` interface
    as :class:`NFAugmenter`.

    Example:
        >>> nfa = NFAugmenter.from_arrays(flow, train_set, cfg.bits, AugmentConfig(k=4))
        >>> noise = LatentNoise.matched(nfa, train_set, cfg.bits)   # as far from z as NFA moves it
        >>> variants = noise.augment(x, y, torch.Generator().manual_seed(0))
        >>> bool(variants.abs().max() <= 1)
        True
    """

    def __init__(self, flow: nn.Module, sigma: float) -> None:
        if not sigma > 0:
            raise ValueError(f"sigma (latent noise std) must be > 0; got {sigma}")
        self.flow, self.sigma = flow, float(sigma)
        self.device, self.dtype = flow_device_dtype(flow)

    @classmethod
    def matched(
        cls, nfa: NFAugmenter, arrays: ImageArrays, bits: int, seed: int = 0, batch_size: int = 500
    ) -> LatentNoise:
        """Noise whose mean squared latent displacement equals NFA's on ``arrays``:
        sigma^2 = E ||move(z) - z||^2 / D over the images' latents (one NFA draw each), so
        the two differ in direction only, not in how far they move a latent."""
        z, _ = encode(nfa.flow, arrays, bits, batch_size)
        z = z.to(nfa.device, nfa.dtype)
        moved = nfa.move(z, arrays.y, torch.Generator().manual_seed(seed))
        return cls(nfa.flow, float((moved - z).pow(2).mean().sqrt()))

    @torch.no_grad()
    def augment(self, x: Tensor, y: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Noisy-latent variants of images x (B, C, H, W) in [-1, 1]; y is not used."""
        with eval_mode(self.flow):
            xin = x.to(self.device, self.dtype)
            z = self.flow(xin)[0]
            eps = torch.randn(z.shape, generator=generator, dtype=torch.float64).to(self.device, self.dtype)
            out = self.flow.inverse(z + self.sigma * eps)
        return finite_or_original(out, xin, "latent noise").clamp_(-1.0, 1.0).to(x.device, x.dtype)


class PixelMixup:
    """Within-class mixup in pixel space: x_new = x + beta (x' - x), x' a random training image
    of the same class, beta from ``cfg``'s law (:func:`sample_beta`; k and temperature unused).
    The label stays y, so no soft labels are needed. Same interface as :class:`NFAugmenter`.

    Example:
        >>> mixup = PixelMixup(train_set, cfg.bits, AugmentConfig(beta_max=0.5))
        >>> tuple(mixup.augment(x, y, torch.Generator().manual_seed(0)).shape)
        (6, 1, 8, 8)
    """

    def __init__(self, arrays: ImageArrays, bits: int, cfg: AugmentConfig | None = None) -> None:
        self.cfg = cfg or AugmentConfig()
        self.bank = SameClassBank(
            bin_centres(arrays.x, bits), arrays.y, arrays.num_classes, "training images"
        )
        self.num_classes = arrays.num_classes

    def augment(self, x: Tensor, y: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Same-class pixel mixtures of images x (B, C, H, W) in [-1, 1] with labels y (B,)."""
        y = check_labels(y.cpu() if isinstance(y, Tensor) else y, x.shape[0], self.num_classes)
        if tuple(x.shape[1:]) != tuple(self.bank.rows.shape[1:]):
            raise ValueError(f"images must be (B, {tuple(self.bank.rows.shape[1:])}); got {tuple(x.shape)}")
        partners = self.bank.draw(y, generator).to(x.device, x.dtype)  # drawn before beta, as NFA
        beta = sample_beta(self.cfg, y.shape[0], generator).to(x.dtype)[:, None, None, None]
        return x + beta.to(x.device) * (partners - x)


class ClassSamples:
    """Images decoded from the class Gaussians, f^-1(z) with z ~ N(mu_y, T^2 s_y): the
    generated training images of GLEM Table 4 (CNN accuracy against their number). ``x`` only
    sets the batch; the variants depend on y alone. Same interface as :class:`NFAugmenter`."""

    def __init__(self, flow: nn.Module, prior: ClassGaussians, temperature: float = 1.0) -> None:
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0; got {temperature}")
        self.flow, self.prior, self.temperature = flow, prior, float(temperature)
        self.device, self.dtype = flow_device_dtype(flow)
        self._prior64 = prior.cpu64()

    @torch.no_grad()
    def augment(self, x: Tensor, y: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """One sample of class y_i per row of x (B, C, H, W); returns (B, C, H, W) in [-1, 1]."""
        y = check_labels(y.cpu() if isinstance(y, Tensor) else y, x.shape[0], self.prior.num_classes)
        z = self._prior64.sample(y, self.temperature, generator=generator).to(self.device, self.dtype)
        with eval_mode(self.flow):
            out = self.flow.inverse(z)
        return (
            finite_or_original(out, x.to(out.device, out.dtype), "class samples")
            .clamp_(-1.0, 1.0)
            .to(x.device, x.dtype)
        )
