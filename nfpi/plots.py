"""Figures of NFPI: the 2-D toy of paper Fig. 1 and solver convergence (docs/method.md §3, §5), and
figures of a trained class-conditional flow (docs/method.md §6; paper Figs. 1-3, GLEM supplementary
Fig. 32): training curves, t-SNE of latents, class-conditional samples
z = m_s mu_y + T sqrt(s_y) eps, temperature sweeps and rescaled interpolations; NF
augmentation (paper Fig. 2) and the augmentation comparison (paper Tables 5-6).

Every function returns the matplotlib Figure and, given ``path``, also saves it there (PNG,
parent directories created). Images are float tensors (N, C, H, W) in [-1, 1], shown after
:func:`nfpi.data.to_uint8` at the model's bit depth.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter, MaxNLocator
from torch import Tensor, nn

from . import data
from .data import bin_centres, to_uint8
from .prior import ClassGaussians, FPIResult, interpolate

__all__ = [
    "augmentation_grid",
    "class_samples",
    "image_grid",
    "interpolations",
    "latent_tsne",
    "paired_differences",
    "solver_curves",
    "temperature_sweep",
    "toy_panels",
    "training_curves",
]

PathLike = str | os.PathLike[str] | None


def _finish(fig: Figure, path: PathLike) -> Figure:
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=150, bbox_inches="tight")
    return fig


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
    return _finish(fig, path)


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
    return _finish(fig, path)


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
            for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
                axis(FormatStrFormatter("%g"))  # 2, 3, 10 rather than 2 x 10^0
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
    return _finish(fig, path)


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
    return _finish(fig, path)


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
    return _finish(fig, path)


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


def paired_differences(
    summary: pd.DataFrame, metric: str = "top1", baseline: str = "baseline", path: PathLike = None
) -> Figure:
    """Each setting's mean paired difference to ``baseline`` in ``metric`` with its 95 %
    interval (the ``<metric>_diff_*`` columns of :func:`nfpi.repro.seed_summary`, settings as
    its index, top to bottom); a dotted line at 0. An interval that crosses 0 is grey."""
    rows = summary.drop(index=baseline)
    mean, half = rows[f"{metric}_diff_mean"].to_numpy(), rows[f"{metric}_diff_ci95"].to_numpy()
    fig, ax = plt.subplots(figsize=(5.5, 0.35 * len(rows) + 1.2))
    pos = np.arange(len(rows))[::-1]
    for m, h, y in zip(mean, half, pos):
        ax.errorbar(m, y, xerr=h, fmt="o", color="C0" if abs(m) > h else "0.55", capsize=3)
    ax.axvline(0, color="black", linestyle=":", linewidth=1)
    ax.set_yticks(pos, [f"{name} (n={int(n)})" for name, n in zip(rows.index, rows["seeds"])])
    ax.set_xlabel(f"test {metric} - {baseline} (points; mean and 95 % interval over paired seeds)")
    return _finish(fig, path)


def _facet_grid(sns: Any, kind: str, common: dict[str, Any], categories: int, palette: Any) -> Any:
    """The seaborn grid of :func:`metric_grid`: lines, or horizontal bars for ``categories`` settings."""
    if kind == "line":
        return sns.relplot(
            kind="line",
            marker="o",
            aspect=1.1,
            palette=palette,
            errorbar="sd",
            facet_kws={"sharey": False, "sharex": False},
            **common,
        )
    if kind == "bar":
        # Horizontal bars: long setting names stay readable; one category axis for all panels.
        common.update(x="value", y=common["x"], height=0.25 * categories + 1.0)
        return sns.catplot(
            kind="bar",
            errorbar="sd",
            sharex=False,
            sharey=True,
            aspect=3.0 / (0.25 * categories + 1.0),
            palette=palette,
            **common,
        )
    raise ValueError(f"kind must be 'line' or 'bar', got {kind!r}")


def _mark_axes(
    grid: Any, at_zero: pd.DataFrame, row: str | None, hue: str | None, logx: bool, palette: Any, label: str
) -> None:
    """Log x axes, the dashed lines of the results at x = 0 (``label``) and a light grid."""
    for key, ax in grid.axes_dict.items():
        row_name, col_name = key if row else (None, key)
        if logx:
            ax.set_xscale("log")
        here = at_zero[(at_zero["metric"] == col_name) & ((at_zero[row] == row_name) if row else True)]
        # One dashed line per hue at the mean over repeated results (seeds), like the lines' means.
        for colour_key, values in here.groupby(hue)["value"] if hue else [(None, here["value"])]:
            ax.axhline(
                values.mean(),
                ls="--",
                lw=1,
                color=palette[colour_key] if hue else "C0",
                label=label,
            )
        ax.grid(alpha=0.3)


def metric_grid(
    table: pd.DataFrame,
    x: str,
    metrics: Sequence[str],
    row: str | None = None,
    hue: str | None = None,
    kind: str = "line",
    logx: bool = False,
    names: Mapping[str, str] | None = None,
    path: PathLike = None,
) -> Figure:
    """Result tables as seaborn panels (NFPI Tables 1-3, GLEM Tables 1-7): one column per metric
    (each with its own y axis), one row per value of ``row`` (e.g. ours / paper), the metric
    against ``x`` as lines (``kind="line"``, e.g. lambda or temperature) or per ``x`` as bars
    (``kind="bar"``, horizontal bars, e.g. per ablation setting), coloured by ``hue``.
    Repeated results at one ``x`` (seeds) are drawn as their mean with a ±1 std band or bar.

    ``table``: one row per result with columns ``x``, ``row``, ``hue`` and the metrics
    (missing metrics and NaN values are skipped); ``names``: display names of metrics and x.
    ``logx``: log x axis; results at x = 0 (e.g. lambda = 0, Baseline 1) cannot sit on it and
    are drawn as dashed horizontal lines in their hue's colour.
    """
    import seaborn as sns

    names = dict(names or {})
    keep = [m for m in metrics if m in table.columns and table[m].notna().any()]
    ids = list(dict.fromkeys(c for c in (x, row, hue) if c))
    long = table.melt(id_vars=ids, value_vars=keep, var_name="metric", value_name="value").dropna(
        subset=["value"]
    )
    long["metric"] = long["metric"].map(lambda m: names.get(m, m))
    order = [names.get(m, m) for m in keep]
    hues = list(dict.fromkeys(long[hue])) if hue else [None]
    palette = dict(zip(hues, sns.color_palette(n_colors=len(hues)))) if hue else None
    at_zero = long[long[x] == 0] if logx else long.iloc[:0]
    shown = long[long[x] > 0] if logx else long
    common = dict(
        data=shown,
        x=x,
        y="value",
        col="metric",
        col_order=order,
        row=row,
        hue=hue,
        height=2.6,
        col_wrap=None if row or kind == "bar" else min(3, len(order)),
    )
    grid = _facet_grid(sns, kind, common, long[x].nunique(), palette)
    _mark_axes(grid, at_zero, row, hue, logx, palette, f"{names.get(x, x)} = 0")
    grid.set_titles(row_template="{row_name}", col_template="{col_name}")
    grid.set_ylabels("")
    grid.set_xlabels("" if kind == "bar" else names.get(x, x))
    return _finish(grid.figure, path)


__all__ += ["metric_grid"]
