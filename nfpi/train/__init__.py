"""Training a flow under class Gaussians (docs/method.md §4-§5; paper Sec. 4.2, Sec. 5.2).

- :mod:`nfpi.train.loop`: :func:`train` (the training loop, ActNorm and data init, EMA,
  evaluation every epoch) and ``python -m nfpi.train`` (:func:`main`);
- :mod:`nfpi.train.schedule`: when and how the class Gaussians are fitted (data init, FPI /
  GD / data solves, lambda decay, GLEM's EM preset);
- :mod:`nfpi.train.optim`: the learning rate with warm-up and the EMA of the weights;
- :mod:`nfpi.train.images`: the train / validation / test images of a config;
- :mod:`nfpi.train.runs`: run directories, their lock, checkpoints with checksum, metric files.

Command line::

    python -m nfpi.train --config configs/digits_cpu.yaml [--run-dir DIR] [key=value ...]

Example:
    >>> from nfpi.config import TrainConfig
    >>> cfg = TrainConfig(dataset="digits", per_class=20, test_per_class=5)
    >>> check_config(cfg)
    >>> get_lr(0, cfg.optim) < cfg.optim.lr
    True
"""

from .images import epoch_loader, init_images, load_data, load_validation, splits
from .loop import check_config, main, train
from .optim import ema_avg_fn, get_lr, make_ema
from .runs import (
    CHECKPOINT_FORMAT,
    LOCK_FILE,
    CheckpointError,
    RunDirBusy,
    RunDirError,
    build_flow,
    checksum,
    config_key,
    keyed_run_dir,
    load_checkpoint,
    lock_run_dir,
    read_checkpoint,
    unlock_run_dir,
)
from .schedule import em_overrides, fit, initial_gaussians, solves_after

__all__ = [
    "CHECKPOINT_FORMAT",
    "LOCK_FILE",
    "CheckpointError",
    "RunDirBusy",
    "RunDirError",
    "build_flow",
    "check_config",
    "checksum",
    "config_key",
    "em_overrides",
    "ema_avg_fn",
    "epoch_loader",
    "fit",
    "get_lr",
    "init_images",
    "initial_gaussians",
    "keyed_run_dir",
    "load_checkpoint",
    "load_data",
    "load_validation",
    "lock_run_dir",
    "main",
    "make_ema",
    "read_checkpoint",
    "solves_after",
    "splits",
    "train",
    "unlock_run_dir",
]
