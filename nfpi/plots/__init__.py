"""Figures of NFPI (docs/method.md §3, §5-§6; paper Figs. 1-3, GLEM supplementary Fig. 32).

- :mod:`nfpi.plots.curves`: the 2-D toy of paper Fig. 1, solver convergence, training curves,
  the t-SNE of latents;
- :mod:`nfpi.plots.images`: a trained flow's images: class-conditional samples
  z = m_s mu_y + T sqrt(s_y) eps, temperature sweeps, rescaled interpolations, NF augmentation
  (paper Fig. 2);
- :mod:`nfpi.plots.results`: results tables as figures: paired differences, metric grids
  (paper Tables 2-6).

Every function returns the matplotlib Figure and, given ``path``, also saves it there (PNG,
parent directories created).

Example:
    >>> import pandas as pd
    >>> run = pd.DataFrame({"epoch": [0, 1], "train_bpd": [3.0, 2.5], "test_bpd": [3.1, 2.6],
    ...                     "acc_top1": [40.0, 60.0], "solved": [1.0, None], "time": [60.0, 60.0]})
    >>> fig = training_curves({"run": run})
    >>> len(fig.axes)
    3
"""

from .curves import latent_tsne, solver_curves, toy_panels, training_curves
from .images import augmentation_grid, class_samples, image_grid, interpolations, temperature_sweep
from .results import metric_grid, paired_differences

__all__ = [
    "augmentation_grid",
    "class_samples",
    "image_grid",
    "interpolations",
    "latent_tsne",
    "metric_grid",
    "paired_differences",
    "solver_curves",
    "temperature_sweep",
    "toy_panels",
    "training_curves",
]
