"""nfpi: class-conditional normalizing flows with class Gaussians learned by fixed-point
iteration (NFPI, BMVC 2024) and its earlier version GLEM. See README.md and docs/method.md §1.

The parts, one subpackage each (its ``__init__`` is its public face): :mod:`nfpi.flows` (the
flow), :mod:`nfpi.prior` (the class Gaussians and their solvers), :mod:`nfpi.data` (images,
subsets and splits, preprocessing), :mod:`nfpi.train` (training runs), :mod:`nfpi.evaluation`
(every metric), :mod:`nfpi.augment` (NF augmentation and its alternatives) and
:mod:`nfpi.experiments` (result rows, grids, the papers' tables, the NFA studies) and
:mod:`nfpi.plots` (every figure); cross-cutting modules at the top: :mod:`nfpi.config`,
:mod:`nfpi.latents`, :mod:`nfpi.repro`, :mod:`nfpi.pretrained`, :mod:`nfpi.cli`.
"""

__version__ = "0.1.0"
