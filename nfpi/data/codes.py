"""Conditional encoding: GLEM's CE and CEGLEM class codes (GLEM §5.2 Baselines 1 and 3, Fig. 3
bottom, supplementary Fig. 39; docs/method.md §5-§6).

A learned class-code image of ``rows`` rows is appended below every training image, so the flow
sees (C, H + rows, W). :class:`ClassCodes` learns K prototype codes (GLEM: "placements obtained
by minimising a regularised mean squared error, then perturbed with uniform noise smaller than
the prototypes"; the objective is not given, ours is in :meth:`ClassCodes.learn`). The label of
a generated image is the prototype nearest to its code rows. Test images get uniformly random
code rows, because their label is unknown (GLEM: "appending irrelevant, e.g. random, code
values"). CE is a monomodal flow (``gaussians.prior="standard"``: every class is N(0, I)): it
samples unconditionally and reads the label from the generated code. CEGLEM combines the codes
with class Gaussians (conditioning by the Gaussian, the code gives a second label).

Example:
    >>> codes = ClassCodes.learn(num_classes=10, shape=(1, 4, 8))
    >>> x_with_codes = codes.append(x, y)          # (N, 1, H + 4, 8)
    >>> tuple(x_with_codes.shape)
    (6, 1, 12, 8)
    >>> bool((codes.decode(x_with_codes) == y).all())   # (N,) labels
    True
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .arrays import ImageArrays
from .preprocess import to_uint8

__all__ = ["ClassCodes", "CodeConfig"]


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
    def learn(
        cls,
        num_classes: int,
        shape: tuple[int, int, int],
        amplitude: float = 0.8,
        steps: int = 100,
        seed: int = 0,
        reg: float = 0.01,
        tau: float = 0.05,
    ) -> ClassCodes:
        """Place K codes of ``shape`` (C, rows, W): P = amplitude tanh(theta) minimising

            tau log sum_{y<y'} exp(-MSE(P_y, P_y') / tau) + reg mean(P^2),

        a soft minimum of the pairwise mean squared errors (pushed up: every pair of codes far
        apart) regularised towards small codes (fewer saturated pixels for the flow to model).
        Deterministic: seeded float64 CPU computation.
        """
        if num_classes < 2:
            raise ValueError("conditional encoding needs at least 2 classes")
        gen = torch.Generator().manual_seed(seed)
        theta = torch.randn(num_classes, *shape, generator=gen, dtype=torch.float64).requires_grad_(True)
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
    def for_config(cls, codes: CodeConfig, num_classes: int, channels: int, width: int) -> ClassCodes:
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

    def append(
        self, x: Tensor, y: Tensor, noise: float = 0.0, generator: torch.Generator | None = None
    ) -> Tensor:
        """Images x (N, C, H, W) in [-1, 1] -> (N, C, H + rows, W) with the codes of y below."""
        self._check_width(x)
        return torch.cat([x, self.codes(y, noise, generator).to(x)], dim=2)

    def append_arrays(self, arrays: ImageArrays, noise: float = 0.0, seed: int = 0) -> ImageArrays:
        """uint8 images with the codes of their labels appended, stored as 8-bit pixels.

        The flow's quantisation then keeps the codes' top ``bits`` bits, i.e. a code pixel is
        moved by less than one ``bits``-bit level.
        """
        codes = self.codes(arrays.y, noise, torch.Generator().manual_seed(seed))
        return self._with_rows(arrays, to_uint8(codes, 8))

    def append_random(self, arrays: ImageArrays, seed: int = 0) -> ImageArrays:
        """uint8 images with uniformly random code rows (test images: their label is unknown)."""
        n, c, _, w = arrays.x.shape
        rows = torch.randint(
            0, 256, (n, c, self.rows, w), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8
        )
        return self._with_rows(arrays, rows)

    def _with_rows(self, arrays: ImageArrays, rows: Tensor) -> ImageArrays:
        self._check_width(arrays.x)
        return ImageArrays(torch.cat([arrays.x, rows], dim=2), arrays.y, arrays.classes, arrays.name)

    def split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(N, C, H + rows, W) -> images (N, C, H, W) and code rows (N, C, rows, W)."""
        return x[:, :, : -self.rows], x[:, :, -self.rows :]

    def decode(self, x: Tensor) -> Tensor:
        """Labels (N,) of images with codes (N, C, H + rows, W): the nearest prototype (MSE)."""
        self._check_width(x)
        code = self.split(x)[1].flatten(1).float().cpu()
        return torch.cdist(code, self.prototypes.flatten(1)).argmin(1)

    def _check_width(self, x: Tensor) -> None:
        c, w = self.prototypes.shape[1], self.prototypes.shape[3]
        if x.ndim != 4 or x.shape[1] != c or x.shape[3] != w:
            raise ValueError(f"images must be (N, {c}, H, {w}) to carry these codes, got {tuple(x.shape)}")
