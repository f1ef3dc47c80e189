"""Curves and scatter plots of the method (docs/method.md §3, §5; paper Fig. 1): the 2-D toy of
the class Gaussians, solver convergence, training curves (bits/dim, NF accuracy per epoch or
CPU-minute) and the t-SNE of latents (paper Fig. 3)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter, MaxNLocator, NullFormatter
from torch import Tensor

from ..prior import FPIResult
from ._figure import PathLike, finish

__all__ = [
    "latent_tsne",
    "solver_curves",
    "toy_panels",
    "training_curves",
]


def _ellipse(ax, mean: np.ndarray, cov: np.ndarray, colour, n_std: float = 2.0) -> None:
    """The n_std contour of a 2-D Gaussian (full (2, 2) or diagonal (2,) covariance)."""
    cov = np.diag(cov) if cov.ndim == 1 else cov
    w, v = np.linalg.eigh(cov)
    t = np.linspace(0, 2 * np.pi, 100)
    pts = mean[:, None] + v @ (
        n_std * np.sqrt(np.clip(w, 0, None))[:, None] * np.stack([np.cos(t), np.sin(t)])
    )
    ax.plot(pts[0], pts[1], color=colour, lw=1.5)
    ax.plot(*mean, marker="x", color=colour, ms=6)


def toy_panels(
    z: Tensor,
    y: Tensor,
    fits: Mapping[str, FPIResult],
    samples_per_class: int = 150,
    seed: int = 0,
    path: PathLike = None,
) -> Figure:
    """Paper Fig. 1 in 2-D: (a) the points z (N, 2) coloured by class y (N,), then one panel
    per fit (title -> result with means (K, 2), covariances (K, 2, 2)) showing
    ``samples_per_class`` samples of each class Gaussian and its 2-sigma ellipse. Panels share
    their limits so the shrinkage and repulsion are comparable; ``seed`` fixes the samples."""
    cmap = plt.get_cmap("tab10")
    fig, axes = plt.subplots(
        1, 1 + len(fits), figsize=(4.2 * (1 + len(fits)), 4.2), squeeze=False, sharex=True, sharey=True
    )
    axes = axes[0]
    axes[0].scatter(*z.double().numpy().T, s=3, c=[cmap(int(k) % 10) for k in y], alpha=0.8)
    axes[0].set_title("(a) data")
    gen = torch.Generator().manual_seed(seed)
    for j, (ax, (label, res)) in enumerate(zip(axes[1:], fits.items())):
        for k in range(res.means.shape[0]):
            mean, cov = res.means[k].double(), res.variances[k].double()
            eps = torch.randn(samples_per_class, 2, generator=gen, dtype=torch.float64)
            pts = mean + eps @ torch.linalg.cholesky(cov).T
            ax.scatter(*pts.numpy().T, s=3, color=cmap(k % 10), alpha=0.5)
            _ellipse(ax, mean.numpy(), cov.numpy(), cmap(k % 10))
        ax.set_title(f"({chr(ord('b') + j)}) {label}")
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_aspect("equal")
    fig.tight_layout()
    return finish(fig, path)


def solver_curves(
    runs: Mapping[str, FPIResult],
    x: str = "iteration",
    y: str = "change",
    relative_to: float | None = None,
    path: PathLike = None,
) -> Figure:
    """Solver histories on a log scale: ``y`` ("change" or "objective", minus ``relative_to``
    when given) against ``x`` ("iteration" or "time" in seconds)."""
    if x not in ("iteration", "time") or y not in ("change", "objective"):
        raise ValueError("x must be 'iteration' or 'time' and y 'change' or 'objective'")
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, res in runs.items():
        values = np.asarray(res.history[y], dtype=float)
        if relative_to is not None:
            values = values - relative_to
        xs = np.asarray(res.history["time"]) if x == "time" else np.arange(1, len(values) + 1)
        ax.plot(xs, values, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("wall time (s)" if x == "time" else "iteration")
    ax.set_ylabel(y if relative_to is None else f"{y} above reference")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return finish(fig, path)


def training_curves(
    tables: Mapping[str, pd.DataFrame],
    against: str = "epoch",
    path: PathLike = None,
    families: Mapping[str, str] | None = None,
) -> Figure:
    """Train and held-out bits/dim and NF accuracy per epoch for several runs.

    ``tables``: run label -> the run's ``metrics.csv`` as a DataFrame. ``against``: ``"epoch"``,
    or ``"minutes"`` of training wall time (the cumulative ``time`` column: learning curves of
    candidates with different costs per epoch, compared per CPU-minute). The held-out curves
    are the validation split's when the runs have one (the test set is then evaluated only
    after the last epoch), else the test set's. Epochs after which the Gaussians were fitted
    are marked with a dot on the accuracy curve. ``families``: run label -> its family (e.g.
    the setting of several seeds), drawn in one colour with one legend entry; default: each
    run its own. A bits/dim panel whose curves span more than a factor 3 has a log scale.
    """
    first = next(iter(tables.values()))
    held, bpd, acc = (
        ("validation", "val_bpd", "val_acc_top1")
        if first.get("val_bpd", pd.Series()).notna().any()
        else ("test", "test_bpd", "acc_top1")
    )
    family = {label: (families or {}).get(label, label) for label in tables}
    colours = {f: f"C{i % 10}" for i, f in enumerate(dict.fromkeys(family.values()))}
    styles = {f: ("-", "--", ":")[i // 10 % 3] for i, f in enumerate(colours)}  # 10 colours, then dashes
    columns = min(len(colours), 3)
    rows = -(-len(colours) // columns)  # of the legend, below the panels
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6 + 0.22 * rows))
    for label, t in tables.items():
        f = family[label]
        line = {"color": colours[f], "linestyle": styles[f]}
        x = t["epoch"] if against == "epoch" else t["time"].cumsum() / 60
        axes[0].plot(x, t["train_bpd"], **line)
        axes[1].plot(x, t[bpd], **line)
        axes[2].plot(x, t[acc], **line)
        solved = t["solved"].notna()
        axes[2].scatter(x[solved], t[acc][solved], color=colours[f], zorder=3)
    for ax, column in zip(axes[:2], ("train_bpd", bpd)):
        values = pd.concat([t[column] for t in tables.values()]).dropna()
        if len(values) and values.min() > 0 and values.max() > 3 * values.min():
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))  # 10 rather than 10^1
            # 2, 3, ... 9 labelled within a decade; over several, one label per decade is legible
            within = values.max() < 10 * values.min()
            ax.yaxis.set_minor_formatter(FormatStrFormatter("%g") if within else NullFormatter())
    for ax, title in zip(
        axes,
        (
            "train bits/dim (noisy dequantisation)",
            f"{held} bits/dim (EMA)",
            f"{held} NF accuracy top-1 % (EMA; dot = Gaussians fitted)",
        ),
    ):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch" if against == "epoch" else "training wall time (minutes)")
        if against == "epoch":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no half epochs
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], color=colours[f], linestyle=styles[f]) for f in colours]
    fig.legend(handles, list(colours), loc="lower center", ncol=columns, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.22 * rows / (3.6 + 0.22 * rows) + 0.01, 1, 1))
    return finish(fig, path)


def latent_tsne(
    latents: Mapping[str, tuple[Tensor, Tensor]],
    classes: Sequence[str],
    path: PathLike = None,
    perplexity: float = 30.0,
    seed: int = 0,
) -> Figure:
    """One t-SNE panel per entry of ``latents``: label -> (z (N, D), y (N,)), coloured by class."""
    from sklearn.manifold import TSNE

    fig, axes = plt.subplots(1, len(latents), figsize=(5.2 * len(latents), 5), squeeze=False)
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    for ax, (label, (z, y)) in zip(axes[0], latents.items()):
        emb = TSNE(
            n_components=2, perplexity=min(perplexity, (len(z) - 1) / 3), init="pca", random_state=seed
        ).fit_transform(z.double().numpy())
        y = y.numpy()
        for k, name in enumerate(classes):
            pts = emb[y == k]
            ax.scatter(pts[:, 0], pts[:, 1], s=6, color=cmap(k % cmap.N), label=name)
        ax.set_title(label)
        ax.set_xticks([])
        ax.set_yticks([])
    if len(classes) <= 20:
        axes[0, -1].legend(markerscale=3, fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    return finish(fig, path)
