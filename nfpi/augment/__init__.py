"""Data augmentation with a trained flow (docs/method.md §6; paper Sec. 5, Tables 5-6, Fig. 2; GLEM Table 4).

- :mod:`nfpi.augment.nfa`: NF augmentation (NFA), same-class latent mixup inside the class's
  principal subspace: :class:`NFAugmenter`, on the fly :class:`NFADataset`;
- :mod:`nfpi.augment.alternatives`: what NFA is compared with at equal budget (latent noise,
  pixel mixup, class samples). A new augmentation goes here, with the
  ``augment(x, y, generator)`` interface;
- :mod:`nfpi.augment.generated`: NFA datasets generated offline, resumably, as npz files (docs/method.md §9).

Example:
    >>> import torch
    >>> cfg = AugmentConfig(k=4)
    >>> beta = sample_beta(cfg, 3, torch.Generator().manual_seed(0))
    >>> tuple(beta.shape), bool(((beta >= 0) & (beta <= 1)).all())
    ((3,), True)
"""

from .alternatives import ClassSamples, LatentNoise, PixelMixup
from .generated import generate_dataset, generation_fingerprint, load_generated
from .nfa import AugmentConfig, ClassPCA, NFADataset, NFAugmenter, SameClassBank, mix, sample_beta

__all__ = [
    "AugmentConfig",
    "ClassPCA",
    "ClassSamples",
    "LatentNoise",
    "NFADataset",
    "NFAugmenter",
    "PixelMixup",
    "SameClassBank",
    "generate_dataset",
    "generation_fingerprint",
    "load_generated",
    "mix",
    "sample_beta",
]
