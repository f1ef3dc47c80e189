"""Images of a trained class-conditional flow (docs/method.md §6; paper Figs. 1-2, GLEM
supplementary Fig. 32): image grids, class-conditional samples z = m_s mu_y + T sqrt(s_y) eps,
temperature sweeps, rescaled interpolations and NF augmentation. Images are float tensors
(N, C, H, W) in [-1, 1], shown after :func:`nfpi.data.to_uint8` at the model's bit depth."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor, nn

from .. import data
from ..data import bin_centres, to_uint8
from ..prior import ClassGaussians, interpolate
from ._figure import PathLike, finish

__all__ = [
    "augmentation_grid",
    "class_samples",
    "image_grid",
    "interpolations",
    "temperature_sweep",
]


def image_grid(
    images: Tensor,
    bits: int,
    ncols: int,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    title: str | None = None,
    path: PathLike = None,
) -> Figure:
    """Images (N, C, H, W) in [-1, 1], row-major in a grid of ``ncols`` columns."""
    pixels = to_uint8(images.detach().cpu(), bits).permute(0, 2, 3, 1).numpy()
    n, h, w, c = pixels.shape
    nrows = -(-n // ncols)
    canvas = np.full((nrows * (h + 1) - 1, ncols * (w + 1) - 1, c), 255, dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, ncols)
        canvas[r * (h + 1) : r * (h + 1) + h, q * (w + 1) : q * (w + 1) + w] = pixels[i]
    cell = 0.6  # inches per image whatever its pixel size: small images are upscaled (nearest)
    fig, ax = plt.subplots(figsize=(ncols * cell + 1.0, nrows * cell + 0.7))
    ax.imshow(
        canvas.squeeze(-1) if c == 1 else canvas,
        cmap="gray" if c == 1 else None,
        interpolation="nearest",
        vmin=0,
        vmax=255,
    )
    ax.set_xticks([(w + 1) * q + w / 2 for q in range(ncols)] if col_labels else [])
    ax.set_xticklabels(col_labels or [], fontsize=8)
    ax.set_yticks([(h + 1) * r + h / 2 for r in range(nrows)] if row_labels else [])
    ax.set_yticklabels(row_labels or [], fontsize=8)
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return finish(fig, path)


@torch.no_grad()
def _decode(model: nn.Module, z: Tensor) -> Tensor:
    device = next(model.parameters()).device
    return model.inverse(z.to(device)).cpu()


def class_samples(
    model: nn.Module,
    prior: ClassGaussians,
    bits: int,
    classes: Sequence[str],
    per_class: int = 10,
    temperature: float = 0.7,
    mean_scale: float = 1.0,
    seed: int = 0,
    path: PathLike = None,
) -> Figure:
    """A row of ``per_class`` samples x = f^-1(m_s mu_y + T sqrt(s_y) eps) for every class y."""
    k = prior.num_classes
    y = torch.arange(k, device=prior.means.device).repeat_interleave(per_class)
    gen = torch.Generator(device=prior.means.device).manual_seed(seed)
    z = prior.sample(y, temperature=temperature, mean_scale=mean_scale, generator=gen)
    return image_grid(
        _decode(model, z),
        bits,
        per_class,
        row_labels=list(classes),
        title=f"class-conditional samples, T = {temperature:g}, mean scale {mean_scale:g}",
        path=path,
    )


def temperature_sweep(
    model: nn.Module,
    prior: ClassGaussians,
    bits: int,
    classes: Sequence[str],
    temperatures: Sequence[float] = (1.0, 0.8, 0.6, 0.4, 0.2, 0.1),
    mean_scale: float = 1.0,
    seed: int = 0,
    path: PathLike = None,
) -> Figure:
    """One row per class, one column per temperature; the same noise eps along each row."""
    k = prior.num_classes
    device = prior.means.device
    eps = torch.randn(k, prior.dim, generator=torch.Generator(device=device).manual_seed(seed), device=device)
    z = torch.stack([mean_scale * prior.means + t * prior.variances.sqrt() * eps for t in temperatures], 1)
    images = _decode(model, z.flatten(0, 1))
    return image_grid(
        images,
        bits,
        len(temperatures),
        row_labels=list(classes),
        col_labels=[f"T={t:g}" for t in temperatures],
        title="temperature sweep (same eps along a row)",
        path=path,
    )


def interpolations(
    model: nn.Module,
    prior: ClassGaussians,
    arrays: data.ImageArrays,
    bits: int,
    pairs: Sequence[tuple[int, int]],
    steps: int = 8,
    centred: bool = True,
    path: PathLike = None,
) -> Figure:
    """Rescaled interpolations (docs/method.md §6.3) between the latents of two test images per row.

    ``pairs``: (class a, class b); a == b interpolates between the first two images of the
    class, a != b between the first image of each. ``centred``: the rescaled formula
    z(t) = (t z1 + (1-t) z2) / sqrt(t^2 + (1-t)^2) preserves the norm of zero-mean Gaussian
    latents, so it is applied to the deviations from the class means, which themselves move
    linearly (mu(t) = t mu_a + (1-t) mu_b); ``centred=False`` applies it to the raw latents.
    """
    device = next(model.parameters()).device
    rows, labels = [], []
    for a, b in pairs:
        ia = (arrays.y == a).nonzero().flatten()
        ib = (arrays.y == b).nonzero().flatten()
        first, second = (int(ia[0]), int(ia[1])) if a == b else (int(ia[0]), int(ib[0]))
        x = bin_centres(arrays.x[[first, second]], bits).to(device)
        with torch.no_grad():
            z = model(x)[0].float()
        mu_a, mu_b = prior.means[a].to(device), prior.means[b].to(device)
        if centred:
            t = torch.linspace(0, 1, steps, device=device)[:, None]
            path_z = t * mu_a + (1 - t) * mu_b + interpolate(z[0] - mu_a, z[1] - mu_b, steps)
        else:
            path_z = interpolate(z[0], z[1], steps)
        # interpolate() runs from its second argument (t = 0) to its first: flip to go a -> b.
        rows.append(torch.cat([x[0:1].cpu(), _decode(model, path_z.flip(0)), x[1:2].cpu()]))
        labels.append(f"{arrays.classes[a]} → {arrays.classes[b]}")
    return image_grid(
        torch.cat(rows),
        bits,
        steps + 2,
        row_labels=labels,
        col_labels=["image"] + [""] * steps + ["image"],
        title="rescaled interpolation between two test images (ends: the images)",
        path=path,
    )


def augmentation_grid(
    augmenters: Mapping[str, Any],
    arrays: data.ImageArrays,
    bits: int,
    classes: Sequence[int] | None = None,
    variants: int = 2,
    seed: int = 0,
    path: PathLike = None,
) -> Figure:
    """Paper Fig. 2 / GLEM supplementary Figs. 6-12, side by side: per row the first training
    image of a class in ``classes`` (default: all), then ``variants`` variants by each augmenter
    (name -> object with ``augment(x, y, generator)``, e.g. :class:`nfpi.augment.NFAugmenter`,
    :class:`nfpi.augment.LatentNoise`, :class:`nfpi.augment.PixelMixup`). Images are shown at
    ``bits`` bits; ``seed`` fixes the variants."""
    classes = list(range(arrays.num_classes)) if classes is None else list(classes)
    firsts = []
    for c in classes:
        members = (arrays.y == c).nonzero().flatten()
        if len(members) == 0:
            raise ValueError(f"class {c} has no image in the set")
        firsts.append(int(members[0]))
    x, y = bin_centres(arrays.x[firsts], bits), arrays.y[firsts]
    columns = [x]
    for augmenter in augmenters.values():
        gen = torch.Generator().manual_seed(seed)
        columns += [augmenter.augment(x, y, gen).cpu() for _ in range(variants)]
    return image_grid(
        torch.stack(columns, 1).flatten(0, 1),
        bits,
        len(columns),
        row_labels=[arrays.classes[c] for c in classes],
        col_labels=["original"] + [f"{name} {j + 1}" for name in augmenters for j in range(variants)],
        path=path,
    )
