"""Training of the class-conditional flow with FPI class Gaussians (SPEC §4-§5; paper Sec. 4.2
"a single fixed point iteration at early training stages", Sec. 5.2 implementation details).

The flow f (:class:`nfpi.flows.Glow`) is trained by minimising the mean class-conditional
negative log-likelihood of paper Eq. 2,

    NLL(x, y) = -log N(f(x); mu_y, s_y) - log|det J_f(x)|          (nats per image),

reported as bits/dim by :func:`nfpi.data.bits_per_dim`. The class Gaussians (mu_y, s_y) are
buffers of :class:`nfpi.priors.ClassGaussians`, never trained by the optimiser. Their
schedule is the released training protocol of SPEC §4:

1. data-dependent ActNorm init on ``init_images`` training images;
2. data init: class means and variances of the latents of the untrained flow (Baseline 1;
   identity variances for the released means-only runs);
3. after epoch ``solve_epoch`` (0 = after the first epoch; -1 = before training), the class
   statistics of the full training set (eval mode, non-EMA weights, float64, all-reduced
   over processes; seeded uniform dequantisation noise, see ``GaussianConfig.stats_noise``)
   are computed and the Gaussians are set to the solution of the chosen ``prior``:

   - ``"fpi"``: :func:`nfpi.fpi.solve` (paper Eqs. 5-7) with lambda = ``lam``;
   - ``"gd"``: :func:`nfpi.gd.solve`, gradient descent on the same objective (Baseline 2);
   - ``"data"``: the lambda = 0 fixed point, i.e. the class statistics (Baseline 1 refitted
     at the same epoch, so that the only difference from ``"fpi"`` is lambda);
   - ``"random"``: random Gaussians (GLEM supplementary), never refitted;
   - ``"standard"``: every class N(0, I), never refitted: a monomodal flow (GLEM's CE
     baseline, with the class codes of ``codes``);

4. the Gaussians stay frozen afterwards, unless ``resolve_every`` asks for repeated solves.
   GLEM's EM schedule (:func:`nfpi.glem.em_overrides`) solves after every epoch, each solve
   starting from the current Gaussians (``warm_start``), with lambda annealed geometrically
   (the n-th solve uses max(``lam_min``, ``lam`` * ``lam_decay``^n)).
   Optionally (paper Sec. 5.2 / GLEM supplementary) the training set is split into D_NF /
   D_G (``dg_fraction`` of each class in D_G); the flow trains on D_NF, the Gaussians are
   fitted on D_G, and D_G joins the training set after epoch ``merge_epoch`` (no solve after
   that).

Conditional encoding (GLEM's CE / CEGLEM, :mod:`nfpi.glem`): with ``codes.rows`` > 0 every
training image gets its class's code image appended below (noisy by ``codes.noise``) and every
test image random code rows; the flow then models (C, H + 2 pad + rows, W).

Optimisation (SPEC §4): Adamax, linear learning-rate warm-up, optional gradient-norm
clipping, and an EMA of the weights (``torch.optim.swa_utils.AveragedModel``) whose decay is
min(beta, (1 + n) / (10 + n)) after n updates, so that short runs are not dominated by the
initial weights; the EMA restarts from the current weights whenever the Gaussians change,
because an average of weights fitted to different priors fits neither. Evaluation (every
epoch, EMA weights, deterministic): test bits/dim under the true class Gaussian as the standard
uniform-dequantisation bound (``test_bpd``, noise from the fixed seed :data:`EVAL_NOISE_SEED`;
what published bits/dim report), the density at the bin centres (``test_bpd_centres``, not
a bound), and NF accuracy top-1/top-5 at the bin centres (argmax_y log N(f(x); mu_y, s_y),
SPEC §6).

Runs write ``metrics.csv`` (one row per epoch), ``metrics.json`` (final row, solves, config)
and an atomically replaced ``checkpoint.pt`` every epoch, carrying a SHA-256 of its contents
that every load verifies; a run resumed from its checkpoint ends bit-identical to an
uninterrupted one (data order and noise are seeded per epoch). A run directory is locked by
the process training in it (``fcntl.flock``), and every configuration or environment error
is raised before any data is read or any epoch is trained.
Under ``torchrun`` (RANK / WORLD_SIZE set, even for one process) training uses
DistributedDataParallel (NCCL on GPU, gloo on CPU); ``batch_size`` is the global batch; only
rank 0 writes files.

Command line::

    python -m nfpi.train --config configs/digits_cpu.yaml [--run-dir DIR] [key=value ...]
    torchrun --nproc_per_node 2 -m nfpi.train --config configs/cifar10.yaml
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import fcntl
import hashlib
import io
import json
import math
import os
import socket
import tempfile
import time
import typing
import warnings
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader, DistributedSampler

from . import data, fpi, gd, repro
from ._progress import tqdm
from .classifiers import topk_accuracy
from .flows import MEMORY_MODES, Glow
from .fpi import ClassStats, FPIDivergenceError, _check_choice
from .glem import ClassCodes, CodeConfig
from .priors import ClassGaussians

__all__ = [
    "CHECKPOINT_FORMAT", "EVAL_NOISE_SEED", "CheckpointError", "GaussianConfig", "LOCK_FILE", "ModelConfig",
    "NonFiniteLossError", "OptimConfig", "RunDirError", "TrainConfig", "check_config", "class_stats",
    "encode", "evaluate", "keyed_run_dir", "load_checkpoint", "load_data", "load_validation", "main", "train",
]

CHECKPOINT_FORMAT = "nfpi.train/1"
LOCK_FILE = ".nfpi.lock"  # in the run directory while a process trains there (see _lock_run_dir)
# Seed of the dequantisation noise of the test bits/dim bound: fixed, so that every evaluation of
# the same model gives the same number.
EVAL_NOISE_SEED = 0
NOISE_BLOCK = 100  # images per generator of the seeded evaluation / statistics noise
PRIORS = ("data", "fpi", "gd", "random", "standard")
# Settings that may change when a run is resumed: they do not alter the computation
# (``epochs`` extends a finished run).
RESUME_FREE = ("epochs", "device", "data_dir", "download", "num_workers", "eval_batch_size", "threads")
# Settings that do not change what a run computes (``epochs`` does: a longer run is another result).
NOT_KEYED = tuple(k for k in RESUME_FREE if k != "epochs")


class CheckpointError(RuntimeError):
    """A checkpoint is unreadable, not an nfpi training checkpoint, or from another run."""


class NonFiniteLossError(FloatingPointError):
    """The training loss or gradient became NaN/inf; training stops instead of continuing."""


class RunDirError(RuntimeError):
    """The run directory cannot be created or written, or another process is training in it."""


# ------------------------------------------------------------------------------ configuration

@dataclass
class ModelConfig:
    """The Glow of :class:`nfpi.flows.Glow` (paper: 3 levels x 8 steps, 128 hidden channels).

    ``blocks``: residual blocks per coupling net, one int or one per level (released: [8, 4, 2]).
    ``matexp_rank``, ``matexp_low_rank_above``: with ``coupling: matexp``, W = A B of rank
    ``matexp_rank`` when the transformed half has more channels than ``matexp_low_rank_above``.
    ``memory``: ``"standard"`` or ``"reversible"`` (activations rebuilt by inverses in backward).
    """

    levels: int = 3
    steps: int = 8
    hidden: int = 128
    conv: str = "lu"
    coupling: str = "affine"
    blocks: int | list[int] = 1
    matexp_rank: int = 3
    matexp_low_rank_above: int = 24
    memory: str = "standard"

    def __post_init__(self) -> None:
        _check_choice("model.memory", self.memory, MEMORY_MODES)
        if isinstance(self.blocks, list) and len(self.blocks) != self.levels:
            raise ValueError(f"model.blocks must be one int or a list of model.levels = {self.levels} "
                             f"ints (one per level), got {self.blocks}")


@dataclass
class OptimConfig:
    """Adamax with linear warm-up over ``warmup`` steps, clipping, EMA decay ``ema`` (beta)."""

    lr: float = 1e-2
    warmup: int = 1000
    grad_clip: float | None = None
    ema: float = 0.9999

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if self.warmup < 0:
            raise ValueError(f"optim.warmup must be >= 0 steps, got {self.warmup}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"optim.grad_clip must be > 0 or null (no clipping), got {self.grad_clip}")
        if not 0 <= self.ema < 1:
            raise ValueError(f"optim.ema (EMA beta) must lie in [0, 1), got {self.ema}")


@dataclass
class GaussianConfig:
    """How and when the class Gaussians are set (SPEC §4-§5; see the module docstring).

    ``lam`` is the un-normalised lambda (divided by K(K-1) inside the solver). ``alpha``,
    ``pi``, ``learn``, ``rule``, ``isotropic_mean_step``, ``rho``, ``tol``, ``max_iter``, ``stop``,
    ``accel`` go to :func:`nfpi.fpi.solve` (``stop: released`` with ``accel: none`` is the
    authors' plain iteration and stopping rule);
    ``gd_policy``, ``gd_steps``, ``gd_lr`` to :func:`nfpi.gd.solve`.
    ``means_only_identity``: with ``learn="means"`` the variances stay at identity (released
    configs) instead of the data variances. ``warm_start``: a solve starts from the current
    Gaussians instead of the data statistics (GLEM's alternating M-steps); ``lam_decay``,
    ``lam_min``: the n-th solve (n = 0, 1, ...) uses lambda = max(lam_min, lam * lam_decay^n).
    ``stats_noise``: the latent statistics use
    seeded uniform dequantisation noise, i.e. the distribution the flow is trained on
    (with the +0.5 offset, pixels that are constant in a class, such as the black borders
    of digits, get zero variance and the training NLL explodes).
    """

    prior: str = "fpi"
    lam: float = 0.0
    alpha: float = 10.0
    pi: str = "pairwise"
    learn: str = "both"
    rule: str = "paper"
    isotropic_mean_step: bool = False
    rho: float = 1e3
    tol: float = 1e-10
    max_iter: int = 1000
    stop: str = "relative"
    accel: str = "anderson"
    solve_epoch: int = 0
    resolve_every: int | None = None
    dg_fraction: float | None = None
    merge_epoch: int | None = None
    means_only_identity: bool = True
    stats_noise: bool = True
    gd_policy: str = "linear"
    gd_steps: int = 1000
    gd_lr: float = 0.05
    warm_start: bool = False
    lam_decay: float = 1.0
    lam_min: float = 0.0

    def __post_init__(self) -> None:
        _check_choice("gaussians.prior", self.prior, PRIORS)
        _check_choice("gaussians.pi", self.pi, ("pairwise", "mean"))
        _check_choice("gaussians.learn", self.learn, ("both", "means", "variances"))
        _check_choice("gaussians.rule", self.rule, ("paper", "released"))
        _check_choice("gaussians.stop", self.stop, ("relative", "released"))
        _check_choice("gaussians.accel", self.accel, ("anderson", "none"))
        _check_choice("gaussians.gd_policy", self.gd_policy, tuple(gd.POLICIES))
        if self.lam < 0 or not math.isfinite(self.lam):
            raise ValueError(f"gaussians.lam must be finite and >= 0, got {self.lam}")
        if not 0 < self.lam_decay <= 1:
            raise ValueError(f"gaussians.lam_decay must lie in (0, 1] (1: constant lambda), got {self.lam_decay}")
        if not 0 <= self.lam_min <= self.lam:
            raise ValueError(f"gaussians.lam_min must lie in [0, lam={self.lam:g}], got {self.lam_min}")
        try:  # the solver's own checks, run now instead of after the first epoch
            fpi.check_solver_args(lam=self.lam, alpha=self.alpha, pi=self.pi, learn=self.learn, rho=self.rho,
                                  tol=self.tol, max_iter=self.max_iter)
        except ValueError as err:
            raise ValueError(f"gaussians.{err}") from None
        if not (isinstance(self.gd_steps, int) and self.gd_steps >= 1):
            raise ValueError(f"gaussians.gd_steps must be an integer >= 1, e.g. 1000; got {self.gd_steps!r}")
        if not (self.gd_lr > 0 and math.isfinite(self.gd_lr)):
            raise ValueError(f"gaussians.gd_lr must be finite and > 0, e.g. 0.05; got {self.gd_lr}")
        if self.solve_epoch < -1:
            raise ValueError(f"gaussians.solve_epoch must be >= -1 (-1: before training), got {self.solve_epoch}")
        if self.resolve_every is not None and self.resolve_every < 1:
            raise ValueError(f"gaussians.resolve_every must be >= 1 or null, got {self.resolve_every}")
        if (self.dg_fraction is None) != (self.merge_epoch is None):
            raise ValueError("gaussians.dg_fraction and gaussians.merge_epoch go together: set both "
                             "(D_NF/D_G split) or neither")
        if self.dg_fraction is not None:
            if not 0 < self.dg_fraction < 1:
                raise ValueError(f"gaussians.dg_fraction must lie in (0, 1), e.g. 0.1; got {self.dg_fraction}")
            if self.merge_epoch < self.solve_epoch:
                raise ValueError(f"gaussians.merge_epoch ({self.merge_epoch}) must be >= solve_epoch "
                                 f"({self.solve_epoch}): the Gaussians are learned on D_G before the merge")


@dataclass
class TrainConfig:
    """Everything one training run needs; plain data, loadable from YAML.

    ``download``: fetch a missing dataset with torchvision (online machines only);
    ``per_class`` / ``test_per_class``: class-balanced subset sizes (None = all images);
    ``pad``: zero pixels added on each side (MNIST 28 -> 32 for 3 levels; bits/dim is then
    over the padded image); ``batch_size`` is global (split over DDP processes);
    ``device``: "auto" (CUDA if available, else CPU), "cpu", "cuda". GPU settings, all off by
    default until measured (``scripts/gpu_check.sh`` measures them): ``amp``: bfloat16 autocast
    of the flow's forward pass in training (the NLL, the log-determinant sum, evaluation and
    the class statistics stay float32/float64; on a CPU it runs, slowly: for tests);
    ``compile``: ``torch.compile`` the training forward pass; ``channels_last``: the flow's
    weights and training batches in channels-last memory format (faster cuDNN convolutions
    under bf16). ``threads``: CPU threads while training (torch.set_num_threads,
    restored afterwards; null keeps torch's default; 1 is fastest on a busy shared CPU);
    ``codes``: GLEM's conditional encoding (:class:`nfpi.glem.CodeConfig`; rows 0 = off);
    ``val_fraction``: a stratified, seeded validation split carved from the training set
    (never trained on): it is evaluated every epoch and is what hyper-parameters are chosen
    on, while the test set is evaluated once, after the last epoch (0: no split, and the
    test set is evaluated every epoch as before).
    """

    dataset: str = "digits"
    data_dir: str | None = None
    download: bool = False
    bits: int = 8
    pad: int = 0
    per_class: int | None = None
    test_per_class: int | None = None
    val_fraction: float = 0.0
    epochs: int = 10
    batch_size: int = 64
    eval_batch_size: int = 500
    init_images: int = 1024
    seed: int = 0
    device: str = "auto"
    amp: bool = False
    compile: bool = False
    channels_last: bool = False
    num_workers: int = 0
    threads: int | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    gaussians: GaussianConfig = field(default_factory=GaussianConfig)
    codes: CodeConfig = field(default_factory=CodeConfig)

    def __post_init__(self) -> None:
        data.check_dataset(self.dataset, self.data_dir)
        _check_choice("device", self.device, ("auto", "cpu", "cuda"))
        if not 1 <= self.bits <= 8:
            raise ValueError(f"bits must lie in 1..8, got {self.bits}")
        for name in ("epochs", "batch_size", "eval_batch_size", "init_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1 or null (torch's default), got {self.threads}")
        for name in ("pad", "num_workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.val_fraction < 0.5:
            raise ValueError(f"val_fraction must lie in [0, 0.5) (e.g. 0.1; 0 = no validation split), "
                             f"got {self.val_fraction}")

    # -- construction -------------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: dict[str, Any], **overrides: Any) -> "TrainConfig":
        """Build from a nested dict; ``overrides`` use dotted keys (``**{"model.hidden": 32}``)
        or nested dicts (``model={"hidden": 32}``). Unknown keys raise a ValueError listing
        the valid ones."""
        merged = _merge(values, overrides)
        return _build(cls, merged, "")

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str], **overrides: Any) -> "TrainConfig":
        """Load a YAML file (nested sections ``model``, ``optim``, ``gaussians``); an empty file or
        invalid YAML raises a one-line ValueError naming the file (and line)."""
        with open(path) as f:
            try:
                values = yaml.safe_load(f)
            except yaml.YAMLError as err:
                mark = getattr(err, "problem_mark", None)
                where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
                problem = getattr(err, "problem", None) or err
                raise ValueError(f"{path}: invalid YAML{where} ({problem}); write `key: value` pairs, "
                                 "sections indented with spaces (see configs/)") from None
        if values is None:
            raise ValueError(f"{path} is empty: a training config must set its options (start from a copy "
                             "of one in configs/) rather than silently train on the defaults")
        if not isinstance(values, dict):
            raise ValueError(f"{path}: a training config must be a YAML mapping, got {type(values).__name__}")
        try:
            return cls.from_dict(values, **overrides)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None

    def replace(self, **overrides: Any) -> "TrainConfig":
        """A copy with ``overrides`` applied (same key forms as :meth:`from_dict`)."""
        return TrainConfig.from_dict(self.to_dict(), **overrides)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML/JSON/checkpoint safe)."""
        return dataclasses.asdict(self)

    def to_yaml(self, path: str | os.PathLike[str]) -> None:
        with open(path, "w") as f:
            yaml.safe_dump(self.to_dict(), f, sort_keys=False)


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``overrides`` (dotted keys or nested dicts) into a copy of ``base``."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for key, value in overrides.items():
        head, _, rest = key.partition(".")
        if rest:
            value = {rest: value}
        if isinstance(value, dict) and isinstance(out.get(head), dict):
            out[head] = _merge(out[head], value)
        else:
            out[head] = value
    return out


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    """Instantiate dataclass ``cls`` from ``values`` with type checks/coercion per field."""
    if not isinstance(values, dict):
        raise ValueError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ValueError(f"unknown config key(s) {[prefix + k for k in unknown]}; valid keys "
                         f"{'in ' + prefix.rstrip('.') if prefix else 'at the top level'}: {names}")
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, hint, prefix + name)
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, name: str) -> Any:
    """Check ``value`` against a field type (int/float/str/bool, optionally ``| None``).

    YAML 1.1 reads ``1e-2`` as a string, so numeric strings are accepted for float fields.
    """
    args = typing.get_args(hint)
    if value is None:
        if type(None) in args:
            return None
        raise ValueError(f"{name} may not be null")
    list_hint = next((a for a in args if typing.get_origin(a) is list), None)
    if list_hint is not None and isinstance(value, (list, tuple)):
        (item,) = typing.get_args(list_hint)
        return [_coerce(v, item, f"{name}[{i}]") for i, v in enumerate(value)]
    base = next((a for a in args if a is not type(None) and a is not list_hint), hint)
    if base is bool:
        if isinstance(value, bool):
            return value
    elif base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif base is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif base is str:
        if isinstance(value, str):
            return value
    raise ValueError(f"{name} must be of type {getattr(hint, '__name__', hint)}, got {value!r}")


# -------------------------------------------------------------------------- distributed
@dataclass
class _Dist:
    """Process layout: ``rank``/``world`` (1 without torch.distributed), the device, and
    whether a process group is in use (``active``: DDP and collectives, even for one process)."""

    rank: int
    world: int
    device: torch.device
    owns_group: bool
    active: bool = False


def _resolve_device(pref: str) -> torch.device:
    if pref == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was requested but CUDA is not available; use device=auto or cpu")
    if pref == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def _setup_distributed(pref: str) -> _Dist:
    """Join the process group of ``torchrun`` (or one initialised by the caller). Under
    torchrun a group is opened even for one process, so a one-GPU run exercises NCCL and DDP."""
    device = _resolve_device(pref)
    owns = False
    torchrun = all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))
    if not (dist.is_available() and dist.is_initialized()) and torchrun:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        owns = True
    if not (dist.is_available() and dist.is_initialized()):
        return _Dist(0, 1, device, False)
    rank, world = dist.get_rank(), dist.get_world_size()
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count())))
        torch.cuda.set_device(device)
    return _Dist(rank, world, device, owns, active=True)


# --------------------------------------------------------------------------------- data
def load_data(cfg: TrainConfig) -> tuple[data.ImageArrays, data.ImageArrays]:
    """Train and test images of ``cfg`` (class-balanced subsets, padding, class codes applied).

    With ``cfg.val_fraction`` > 0 the training images exclude the validation split
    (:func:`load_validation`)."""
    train_set, _, test_set = _splits(cfg)
    return train_set, test_set


def load_validation(cfg: TrainConfig) -> data.ImageArrays | None:
    """The validation split of ``cfg`` (``val_fraction`` of each class of the training set,
    stratified and seeded by ``cfg.seed``), or None without one."""
    return _splits(cfg)[1]


def _splits(cfg: TrainConfig) -> tuple[data.ImageArrays, data.ImageArrays | None, data.ImageArrays]:
    """(train, validation or None, test) images of ``cfg``."""
    train_set = data.load(cfg.dataset, "train", cfg.data_dir, download=cfg.download)
    test_set = data.load(cfg.dataset, "test", cfg.data_dir, download=cfg.download)
    if (train_set.shape, train_set.classes) != (test_set.shape, test_set.classes):
        raise data.DatasetFormatError(
            f"dataset {cfg.dataset!r}: the train and test splits differ (images {train_set.shape} vs "
            f"{test_set.shape}, classes {train_set.classes} vs {test_set.classes}); both need the same")
    if cfg.per_class is not None:
        train_set = train_set.subset(data.class_balanced_indices(train_set.y, cfg.per_class, cfg.seed))
    if cfg.test_per_class is not None:
        test_set = test_set.subset(data.class_balanced_indices(test_set.y, cfg.test_per_class, cfg.seed))
    val_set = None
    if cfg.val_fraction:
        keep, held = data.stratified_split(train_set.y, 1.0 - cfg.val_fraction, cfg.seed)
        train_set, val_set = train_set.subset(keep), train_set.subset(held)
    held_out = [test_set] if val_set is None else [test_set, val_set]
    if cfg.pad:
        p = cfg.pad
        train_set, *held_out = (data.ImageArrays(F.pad(a.x, (p, p, p, p)), a.y, a.classes, a.name)
                                for a in (train_set, *held_out))
    if cfg.codes.rows:
        c, _, w = train_set.shape
        codes = ClassCodes.for_config(cfg.codes, train_set.num_classes, c, w)
        train_set = codes.append_arrays(train_set, cfg.codes.noise, seed=cfg.seed)
        # Held-out images are judged like test images: random code rows, never their class's.
        held_out = [codes.append_random(a, seed=cfg.seed) for a in held_out]
    test_set, val_set = held_out[0], (held_out[1] if len(held_out) > 1 else None)
    return train_set, val_set, test_set


def _batches(arrays: data.ImageArrays, bits: int, batch_size: int, device: torch.device,
             noise: int | None = None, sharded: bool = True) -> Iterator[tuple[Tensor, Tensor]]:
    """Dequantised (x (B, C, H, W), y (B,)) batches of ``arrays`` in index order.

    ``noise=None``: the deterministic +0.5 offset; otherwise uniform noise that depends only on
    (noise, image index) (:func:`_image_noise`), not on ``batch_size`` or the number of
    processes. Chunks of ``batch_size`` consecutive images are dealt to the processes
    round-robin when ``sharded`` under torch.distributed, so every image also gets the same
    batch companions whatever the number of processes.
    """
    rank, world = 0, 1
    if sharded and dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    for chunk, start in enumerate(range(0, len(arrays), batch_size)):
        if chunk % world != rank:
            continue
        xq = data.quantize(arrays.x[start:start + batch_size], bits)
        x = data.dequantize(xq, bits, noise=False)
        if noise is not None:  # bin centre + (u - 1/2) bin widths = 2 (xq + u) / 2^bits - 1
            x += (_image_noise(noise, start, start + len(xq), xq.shape[1:]) - 0.5) * (2.0 / (1 << bits))
        yield x.to(device), arrays.y[start:start + batch_size].to(device)


def _image_noise(seed: int, start: int, stop: int, shape: torch.Size) -> Tensor:
    """U[0, 1) noise (stop - start, *shape) of images start..stop-1 of a set: image i's noise
    depends on (seed, i) only. Blocks of :data:`NOISE_BLOCK` images share a seeded generator."""
    first = start // NOISE_BLOCK
    blocks = [torch.rand((NOISE_BLOCK, *shape), generator=torch.Generator().manual_seed(_noise_seed(seed, b)))
              for b in range(first, (stop - 1) // NOISE_BLOCK + 1)]
    return torch.cat(blocks)[start - first * NOISE_BLOCK:stop - first * NOISE_BLOCK]


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def encode(model: nn.Module, arrays: data.ImageArrays, bits: int, batch_size: int = 500,
           noise: int | None = None) -> tuple[Tensor, Tensor]:
    """Latents z (N, D) and log-determinants (N,) of all images, float32 on the CPU, in eval
    mode (``noise``: see :func:`class_stats`). Holds every latent: for small sets (figures)."""
    was_training = model.training
    model.eval()
    zs, lds = [], []
    for x, _ in _batches(arrays, bits, batch_size, _model_device(model), noise, sharded=False):
        z, logdet = model(x)
        zs.append(z.float().cpu())
        lds.append(logdet.float().cpu())
    model.train(was_training)
    return torch.cat(zs), torch.cat(lds)


@torch.no_grad()
def class_stats(model: nn.Module, arrays: data.ImageArrays, bits: int, batch_size: int = 500,
                noise: int | None = None) -> ClassStats:
    """Float64 class statistics of the latents of ``arrays`` in eval mode.

    ``noise``: seed of uniform dequantisation noise (the distribution the flow is trained
    on), or None for the +0.5 offset. Under torch.distributed every process encodes its
    share of the chunks and the sums are all-reduced, so every process gets the statistics
    of the whole set: per-image latents are identical to a single process's, the sums equal
    up to float64 summation order.
    """
    was_training = model.training
    model.eval()
    stats = None
    for x, y in _batches(arrays, bits, batch_size, _model_device(model), noise):
        part = ClassStats.from_latents(model(x)[0], y, arrays.num_classes)
        stats = part if stats is None else stats + part
    if stats is None:  # a process without data still takes part in the all-reduce
        d = math.prod(arrays.shape)
        stats = ClassStats.from_latents(torch.empty(0, d, device=_model_device(model)),
                                        torch.empty(0, dtype=torch.long), arrays.num_classes)
    model.train(was_training)
    return stats.all_reduce()


@torch.no_grad()
def _test_pass(model: nn.Module, prior: ClassGaussians, arrays: data.ImageArrays, bits: int, batch_size: int,
               noise: int | None) -> tuple[Tensor, Tensor, Tensor]:
    """Per-image NLL (N,), class log-densities (N, K) and labels (N,) of the whole set, float32
    on the CPU (gathered from every process under torch.distributed)."""
    nlls, scores, labels = [], [], []
    for x, y in _batches(arrays, bits, batch_size, _model_device(model), noise):
        z, logdet = model(x)
        z, logdet = z.float(), logdet.float()
        nlls.append((prior.nll(z, y) - logdet).cpu())
        # Non-finite latents make the NLL non-finite, which raises below after all processes
        # gathered; scoring them as 0 here keeps log_prob's NaN check from failing one rank alone.
        scores.append(prior.log_prob(torch.where(torch.isfinite(z), z, 0.0)).cpu())
        labels.append(y.cpu())
    parts = [(torch.cat(nlls), torch.cat(scores), torch.cat(labels))] if nlls else []
    if dist.is_available() and dist.is_initialized():
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, parts)
        parts = [p for g in gathered for p in g]
    nll, score, y = (torch.cat(t) for t in zip(*parts))
    if not torch.isfinite(nll).all():
        raise NonFiniteLossError("the test NLL is not finite: the model or the Gaussians diverged "
                                 "(lower optim.lr or gaussians.lam)")
    return nll, score, y


@torch.no_grad()
def evaluate(model: nn.Module, prior: ClassGaussians, arrays: data.ImageArrays, bits: int,
             batch_size: int = 500, noise: int = EVAL_NOISE_SEED) -> dict[str, float]:
    """Test metrics under the true class Gaussian, eval mode, deterministic (two passes):

    - ``test_nll`` (nats/image) and ``test_bpd``: the uniform-dequantisation bound that
      published bits/dim use (Glow: 3.35 on CIFAR-10), -log p(x + u) with one u ~ U[0, 1)^D
      per image drawn from generators seeded by ``noise`` (the same noise every call);
    - ``test_bpd_centres``: the density at the bin centres (u = 0.5), not a bound;
    - ``acc_top1`` / ``acc_top5``: NF accuracy (%) at the bin centres (SPEC §6).

    Under torch.distributed the per-image results of all shards are gathered so every
    process returns the full-set metrics (the noise of an image does not depend on the
    number of processes).
    """
    was_training = model.training
    model.eval()
    try:
        nll, _, _ = _test_pass(model, prior, arrays, bits, batch_size, noise)
        centres, score, y = _test_pass(model, prior, arrays, bits, batch_size, None)
    finally:
        model.train(was_training)
    dim = math.prod(arrays.shape)
    acc = topk_accuracy(score, y, ks=(1, 5))
    return {"test_nll": float(nll.mean()), "test_bpd": float(data.bits_per_dim(nll.mean(), dim, bits)),
            "test_bpd_centres": float(data.bits_per_dim(centres.mean(), dim, bits)),
            "acc_top1": acc["top1"], "acc_top5": acc["top5"]}


# --------------------------------------------------------------------------------- Gaussians
def _fit(g: GaussianConfig, stats: ClassStats, lam: float,
         start: ClassGaussians | None = None) -> tuple[ClassGaussians, dict[str, Any]]:
    """The Gaussians of ``g.prior`` for latent statistics ``stats`` (step 3 of SPEC §4) at
    lambda ``lam``, iterating from ``start`` when given (else the data statistics)."""
    if g.prior == "data":
        return ClassGaussians.from_stats(stats), {"iterations": 0, "converged": True, "bounds_active": 0,
                                                  "lam_normalised": 0.0, "change": 0.0}
    init = None
    if start is not None:
        init = (start.means.double().cpu(), start.variances.double().cpu())
    elif g.learn == "means" and g.means_only_identity:
        init = (stats.mean(), torch.ones_like(stats.total))
    if g.prior == "fpi":
        res = fpi.solve(stats, lam, alpha=g.alpha, pi=g.pi, learn=g.learn, init=init, rule=g.rule,
                        isotropic_mean_step=g.isotropic_mean_step, rho=g.rho, tol=g.tol,
                        max_iter=g.max_iter, stop=g.stop, accel=g.accel,
                        on_fail="warn")
    elif g.prior == "gd":
        res = gd.solve(stats, lam, alpha=g.alpha, pi=g.pi, learn=g.learn, init=init, policy=g.gd_policy,
                       steps=g.gd_steps, lr=g.gd_lr)
    else:
        raise ValueError(f"prior {g.prior!r} is not fitted to statistics")
    variances = res.variances
    if init is not None and g.learn == "means":
        # Means-only runs keep identity variances; both solvers clip unlearned variances into
        # their box [v/rho, v*rho] too, which would move them where a data variance v < 1/rho.
        variances = init[1]
    return ClassGaussians(res.means, variances), {"iterations": res.iterations, "converged": res.converged,
                                             "bounds_active": res.bounds_active,
                                             "lam_normalised": res.lam_normalised,
                                             "change": res.history["change"][-1]}


def _initial_prior(cfg: TrainConfig, stats: ClassStats) -> ClassGaussians:
    """Step 2 of SPEC §4: data init (identity variances for released means-only runs), or
    the random Gaussians of the GLEM supplementary."""
    g = cfg.gaussians
    if g.prior == "random":
        gen = torch.Generator().manual_seed(cfg.seed)
        return ClassGaussians.random(stats.num_classes, stats.dim, generator=gen)
    if g.prior == "standard":
        return ClassGaussians(torch.zeros(stats.num_classes, stats.dim), torch.ones(stats.num_classes, stats.dim))
    identity = g.prior in ("fpi", "gd") and g.learn == "means" and g.means_only_identity
    return ClassGaussians.from_stats(stats, identity_variances=identity)


def _solves_after(g: GaussianConfig, epoch: int) -> bool:
    """Whether the Gaussians are fitted after epoch ``epoch`` (-1: before training)."""
    if g.prior in ("random", "standard") or epoch < g.solve_epoch:
        return False
    if g.merge_epoch is not None and epoch > g.merge_epoch:
        return False
    if epoch == g.solve_epoch:
        return True
    return g.resolve_every is not None and (epoch - g.solve_epoch) % g.resolve_every == 0


# --------------------------------------------------------------------------------- EMA
def _ema_avg_fn(beta: float):
    """EMA update for AveragedModel(multi_avg_fn=...): decay min(beta, (1+n)/(10+n))."""

    @torch.no_grad()
    def update(ema_params: list[Tensor], params: list[Tensor], n_averaged: Tensor) -> None:
        n = float(n_averaged)
        decay = min(beta, (1.0 + n) / (10.0 + n))
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)

    return update


def _ema_restart(ema: AveragedModel, model: nn.Module) -> None:
    """Restart the average from the current weights (next update copies them)."""
    ema.n_averaged.zero_()
    ema.update_parameters(model)


# --------------------------------------------------------------------------------- checkpoints
def _atomic_write(path: Path, payload: bytes) -> None:
    """Write ``payload`` to a temp file beside ``path``, then os.replace it: a crash never
    leaves a half-written file under the final name."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _feed(h: "hashlib._Hash", obj: Any) -> None:
    """Hash ``obj`` (nested dicts/lists of tensors and plain values) in a canonical order:
    tensors by dtype, shape and raw bytes, other values by type and repr."""
    if isinstance(obj, Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(obj, dict):
        h.update(b"D%d" % len(obj))
        for key, value in obj.items():  # insertion order: torch.save/load keeps it
            _feed(h, key)
            _feed(h, value)
    elif isinstance(obj, (list, tuple)):
        h.update(b"L%d" % len(obj))
        for value in obj:
            _feed(h, value)
    else:
        h.update(f"{type(obj).__name__}:{obj!r};".encode())


def _checksum(ckpt: dict[str, Any]) -> str:
    """SHA-256 of a checkpoint's contents (tensor bytes included), without its ``sha256`` entry.

    Computed on the contents rather than the file bytes so that a checkpoint stays an ordinary
    ``torch.load``-able dict; torch's zip reader checks no CRC, so flipped bytes in tensor data
    would otherwise load silently."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in ckpt.items() if k != "sha256"})
    return h.hexdigest()


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def _read_checkpoint(path: Path) -> dict[str, Any]:
    """Load and verify a checkpoint (weights_only=True; its SHA-256 must match its contents)."""
    redo = ("delete it or restore a good copy, or start the run again in another run directory "
            "(or with resume=False, CLI --no-resume, which overwrites it)")
    try:
        size = path.stat().st_size
        ckpt = torch.load(path, map_location="cpu", weights_only=True) if size else None
    except Exception as err:  # any failure to parse is a damaged file; none may escape as a traceback
        raise CheckpointError(f"{path} is not a readable checkpoint ({_first_line(err)}). It is probably "
                              f"truncated or corrupt: {redo}.") from err
    if ckpt is None:
        raise CheckpointError(f"{path} is not a readable checkpoint (it is empty, 0 bytes): {redo}.")
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        tag = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(
            f"{path} is not an nfpi training checkpoint (format {tag!r}, expected {CHECKPOINT_FORMAT!r}). "
            "Point to a run directory written by nfpi.train, or use another run directory.")
    if "sha256" not in ckpt:
        warnings.warn(f"{path} has no checksum (written before nfpi checkpoints carried one), so its "
                      "contents cannot be verified; it is loaded as is. Retrain to get a verified one.",
                      stacklevel=3)
    elif ckpt["sha256"] != _checksum(ckpt):
        raise CheckpointError(f"{path} fails its SHA-256 check: its contents changed after it was written "
                              f"(disk or copy corruption), so its weights cannot be trusted; {redo}.")
    return ckpt


def _config_differences(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """Keys (dotted) whose values differ, ignoring :data:`RESUME_FREE` top-level keys."""
    out = []
    for key in sorted(set(a) | set(b)):
        if not prefix and key in RESUME_FREE:
            continue
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _config_differences(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key}: {va!r} in the checkpoint, {vb!r} now")
    return out


def _check_levels(cfg: TrainConfig, shape: tuple[int, int, int]) -> None:
    """Fail before training when the (padded) image size does not suit ``model.levels``."""
    _, h, w = shape
    step = 2 ** cfg.model.levels
    if h % step or w % step:
        base_h, base_w = h - 2 * cfg.pad, w - 2 * cfg.pad
        fits = [p for p in range(step) if not (base_h + 2 * p) % step and not (base_w + 2 * p) % step]
        raise ValueError(
            f"images of {cfg.dataset!r} are {h}x{w} after padding (pad={cfg.pad}), not divisible by "
            f"2**model.levels = {step}: lower model.levels (each level halves the size) or change pad so "
            f"that both sides are multiples of {step}" + (f" (e.g. pad={fits[0]})" if fits else ""))


def _build_model(cfg: TrainConfig, shape: tuple[int, int, int]) -> Glow:
    m = cfg.model
    return Glow(shape, levels=m.levels, steps=m.steps, hidden=m.hidden, conv=m.conv,
                coupling=m.coupling, blocks=m.blocks, matexp_rank=m.matexp_rank,
                matexp_low_rank_above=m.matexp_low_rank_above, memory=m.memory)


def load_checkpoint(path: str | os.PathLike[str], ema: bool = True,
                    device: str | torch.device = "cpu") -> tuple[Glow, ClassGaussians, TrainConfig]:
    """The flow (EMA weights by default, eval mode), its class Gaussians and the config of a
    ``checkpoint.pt`` (or of the run directory holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}; train a run first (nfpi.train.train or "
                                "python -m nfpi.train --config ...)")
    ckpt = _read_checkpoint(path)
    cfg = TrainConfig.from_dict(ckpt["config"])
    if "shape" in ckpt:  # the flow's input (C, H, W), as trained
        c, h, w = ckpt["shape"]
    else:  # checkpoints before datasets were read from the data: registered datasets only
        c, h, w = data.DATASETS[cfg.dataset].shape
        h, w = h + 2 * cfg.pad + cfg.codes.rows, w + 2 * cfg.pad
    model = _build_model(cfg, (c, h, w))
    if ema:
        state = {k.removeprefix("module."): v for k, v in ckpt["ema"].items() if k.startswith("module.")}
    else:
        state = ckpt["model"]
    model.load_state_dict(state)
    prior = ClassGaussians(ckpt["prior"]["means"], ckpt["prior"]["variances"])
    return model.to(device).eval(), prior.to(device), cfg


# --------------------------------------------------------------------------------- training
COLUMNS = ("epoch", "lr", "train_nll", "train_bpd", "grad_norm", "val_nll", "val_bpd", "val_bpd_centres",
           "val_acc_top1", "val_acc_top5", "test_nll", "test_bpd", "test_bpd_centres", "acc_top1", "acc_top5",
           "solved", "solve_iterations", "solve_converged", "solve_bounds_active", "solve_time", "time")


def _noise_seed(*keys: int) -> int:
    """An independent 63-bit seed for each (seed, epoch, rank, ...) tuple."""
    return int(np.random.SeedSequence(list(keys)).generate_state(2, np.uint64)[0] >> np.uint64(1))


class _Run:
    """State of one training run (see :func:`train`)."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, layout: _Dist, progress: bool):
        self.cfg, self.run_dir, self.layout = cfg, run_dir, layout
        self.device = layout.device
        self.progress = progress and layout.rank == 0
        world = layout.world
        if cfg.batch_size % world:
            raise ValueError(f"batch_size={cfg.batch_size} is the global batch and must be divisible by the "
                             f"number of processes ({world})")
        self.train_set, self.val_set, self.test_set = _splits(cfg)
        g = cfg.gaussians
        self.nf_set, self.g_set = self.train_set, self.train_set
        if g.dg_fraction is not None:
            nf_idx, g_idx = data.stratified_split(self.train_set.y, 1.0 - g.dg_fraction, cfg.seed)
            self.nf_set, self.g_set = self.train_set.subset(nf_idx), self.train_set.subset(g_idx)
        if len(self.nf_set) < cfg.batch_size:
            raise ValueError(f"batch_size={cfg.batch_size} exceeds the {len(self.nf_set)} training images; "
                             "lower batch_size or use more data (per_class)")
        self.shape = self.train_set.shape
        self.dim = math.prod(self.shape)
        _check_levels(cfg, self.shape)

        torch.manual_seed(cfg.seed)
        self.model = _build_model(cfg, self.shape).to(self.device)
        self.memory_format = torch.channels_last if cfg.channels_last else torch.preserve_format
        self.model.to(memory_format=self.memory_format)
        k = self.train_set.num_classes
        self.prior = ClassGaussians(torch.zeros(k, self.dim), torch.ones(k, self.dim)).to(self.device)
        self.optimizer = torch.optim.Adamax(self.model.parameters(), lr=cfg.optim.lr)
        warmup = cfg.optim.warmup
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0)
        self.ema: AveragedModel | None = None
        self.epoch = 0  # epochs completed
        self.rows: list[dict[str, Any]] = []
        self.solves: list[dict[str, Any]] = []

    # -- setup ------------------------------------------------------------------------
    def _make_ema(self) -> None:
        self.ema = AveragedModel(self.model, multi_avg_fn=_ema_avg_fn(self.cfg.optim.ema), use_buffers=False)

    def initialise(self) -> None:
        """Fresh run: ActNorm init, data-init (or random) Gaussians, optional solve at -1."""
        cfg = self.cfg
        gen = torch.Generator().manual_seed(_noise_seed(cfg.seed, 1))
        n = min(cfg.init_images, len(self.nf_set))
        idx = torch.randperm(len(self.nf_set), generator=gen)[:n]
        xq = data.quantize(self.nf_set.x[idx], cfg.bits)
        with torch.no_grad():
            self.model(data.dequantize(xq, cfg.bits, noise=True, generator=gen).to(self.device))
        self._make_ema()
        stats, seed = self._stats(-1)
        initial = _initial_prior(cfg, stats)
        self.prior.set(initial.means, initial.variances)
        if _solves_after(cfg.gaussians, -1):
            self._solve(-1, stats, seed)

    def resume(self, ckpt: dict[str, Any]) -> None:
        self.model.load_state_dict(ckpt["model"])
        self._make_ema()
        self.ema.load_state_dict(ckpt["ema"])
        self.prior.load_state_dict(ckpt["prior"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        torch.set_rng_state(ckpt["rng"])
        if self.device.type == "cuda" and ckpt.get("cuda_rng"):
            torch.cuda.set_rng_state(ckpt["cuda_rng"], self.device)
        self.epoch = ckpt["epoch"]
        self.rows = ckpt["metrics"]
        self.solves = ckpt["solves"]

    # -- one epoch --------------------------------------------------------------------
    def _loader(self, epoch: int) -> DataLoader:
        cfg, layout = self.cfg, self.layout
        merged = cfg.gaussians.merge_epoch is not None and epoch > cfg.gaussians.merge_epoch
        arrays = self.train_set if merged else self.nf_set
        noise = torch.Generator().manual_seed(_noise_seed(cfg.seed, 2, epoch, layout.rank))
        dataset = data.FlowDataset(arrays, cfg.bits, train=True, generator=noise)
        sampler = DistributedSampler(dataset, num_replicas=layout.world, rank=layout.rank, shuffle=True,
                                     seed=cfg.seed, drop_last=True)
        sampler.set_epoch(epoch)
        workers = torch.Generator().manual_seed(_noise_seed(cfg.seed, 3, epoch, layout.rank))
        return DataLoader(dataset, batch_size=cfg.batch_size // layout.world, sampler=sampler,
                          drop_last=True, num_workers=cfg.num_workers, generator=workers,
                          pin_memory=self.device.type == "cuda")

    def _train_epoch(self, net: nn.Module, epoch: int) -> dict[str, float]:
        cfg = self.cfg
        net.train()
        loader = self._loader(epoch)
        # Only the flow runs in bf16; z and the log-determinant are cast back before the NLL.
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if cfg.amp else nullcontext()
        clip = cfg.optim.grad_clip or math.inf
        total, norms, count = 0.0, 0.0, 0
        bar = tqdm(loader, desc=f"epoch {epoch}", leave=False, disable=not self.progress)
        for step, (x, y) in enumerate(bar):
            x = x.to(self.device, non_blocking=True, memory_format=self.memory_format)
            y = y.to(self.device, non_blocking=True)
            with autocast:
                z, logdet = net(x)
            loss = (self.prior.nll(z.float(), y) - logdet.float()).mean()
            self._check_finite(loss, "loss", epoch, step)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
            self._check_finite(norm, "gradient norm", epoch, step)
            self.optimizer.step()
            self.scheduler.step()
            self.ema.update_parameters(self.model)
            total += float(loss.detach())
            norms += float(norm)
            count += 1
            if self.progress:
                bar.set_postfix(bpd=f"{float(data.bits_per_dim(loss.detach(), self.dim, cfg.bits)):.3f}")
        mean = total / count
        if self.layout.active:  # report the loss over all processes
            t = torch.tensor([mean, norms / count], dtype=torch.float64, device=self.device)
            dist.all_reduce(t)
            mean, norms, count = float(t[0]) / self.layout.world, float(t[1]) / self.layout.world, 1
        return {"lr": self.optimizer.param_groups[0]["lr"], "train_nll": mean,
                "train_bpd": float(data.bits_per_dim(torch.tensor(mean), self.dim, cfg.bits)),
                "grad_norm": norms / count}

    def _check_finite(self, value: Tensor, what: str, epoch: int, step: int) -> None:
        ok = torch.isfinite(value.detach()).to(torch.float32)
        if self.layout.active:  # every process must stop together, or the others hang
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        if not bool(ok):
            g = self.cfg.gaussians
            raise NonFiniteLossError(
                f"non-finite {what} ({float(value.detach()):g}) at epoch {epoch}, step {step} (global step "
                f"{self.scheduler.last_epoch}); training stopped instead of continuing on NaN. Lower "
                f"optim.lr (now {self.cfg.optim.lr:g}), set optim.grad_clip (now {self.cfg.optim.grad_clip}), "
                f"lengthen optim.warmup, or lower gaussians.lam (now {g.lam:g}) if it happened after a solve. "
                + (f"The last good state is {self.run_dir / 'checkpoint.pt'} ({self.epoch} epochs)."
                   if self.epoch else "No epoch was completed, so no checkpoint was written."))

    def _stats(self, epoch: int) -> tuple[ClassStats, int | None]:
        """Statistics of the Gaussians' training set after ``epoch`` and their noise seed."""
        cfg = self.cfg
        seed = _noise_seed(cfg.seed, 4, epoch + 1) if cfg.gaussians.stats_noise else None
        return class_stats(self.model, self.g_set, cfg.bits, cfg.eval_batch_size, noise=seed), seed

    def _solve(self, epoch: int, stats: ClassStats, seed: int | None) -> dict[str, Any]:
        cfg = self.cfg
        start = time.perf_counter()
        g = cfg.gaussians
        lam = max(g.lam_min, g.lam * g.lam_decay ** len(self.solves))
        fitted, info = _fit(g, stats, lam, self.prior if g.warm_start and self.solves else None)
        info["seconds"] = time.perf_counter() - start
        means, variances = fitted.means, fitted.variances
        if self.layout.active:  # identical Gaussians on every process, whatever the hardware
            means, variances = means.to(self.device), variances.to(self.device)
            dist.broadcast(means, 0)
            dist.broadcast(variances, 0)
        self.prior.set(means, variances)
        _ema_restart(self.ema, self.model)
        info = {"epoch": epoch, "kind": g.prior, "lam": lam, "stats_seed": seed, **info}
        self.solves.append(info)
        return info

    def _evaluate(self, epoch: int) -> dict[str, float]:
        """Held-out metrics after ``epoch`` (EMA weights): the validation split every epoch and
        the test set once, after the last epoch; without a validation split, the test set
        every epoch."""
        model, cfg = self.ema.module, self.cfg
        out: dict[str, float] = {}
        if self.val_set is not None:
            val = evaluate(model, self.prior, self.val_set, cfg.bits, cfg.eval_batch_size)
            out.update({f"val_{k.removeprefix('test_')}": v for k, v in val.items()})
        if self.val_set is None or epoch == cfg.epochs - 1:
            out.update(evaluate(model, self.prior, self.test_set, cfg.bits, cfg.eval_batch_size))
        return out

    # -- bookkeeping ------------------------------------------------------------------
    def _checkpoint(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT, "code": repro.code_fingerprint(), "epoch": self.epoch,
            "config": self.cfg.to_dict(),
            "model": self.model.state_dict(), "ema": self.ema.state_dict(), "prior": self.prior.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
            "metrics": self.rows, "solves": self.solves, "shape": list(self.shape),
        }

    def _summary(self) -> dict[str, Any]:
        return {"metrics": self.rows[-1], "epochs": self.epoch, "solves": self.solves,
                "config": self.cfg.to_dict(), "code": repro.code_fingerprint()}

    def save(self) -> None:
        if self.layout.rank != 0:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        ckpt = self._checkpoint()
        ckpt["sha256"] = _checksum(ckpt)
        buffer = io.BytesIO()
        torch.save(ckpt, buffer)
        _atomic_write(self.run_dir / "checkpoint.pt", buffer.getvalue())
        table = io.StringIO()
        writer = csv.DictWriter(table, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        _atomic_write(self.run_dir / "metrics.csv", table.getvalue().encode())
        _atomic_write(self.run_dir / "metrics.json", json.dumps(self._summary(), indent=2).encode())

    def network(self) -> nn.Module:
        """The module the training steps run: the flow, wrapped in DDP under a process group,
        then compiled when ``compile`` is set (evaluation and statistics run the plain flow)."""
        net: nn.Module = self.model
        if self.layout.active:
            ids = [self.device.index] if self.device.type == "cuda" else None
            # The only buffers (ActNorm flags, LU permutations) are fixed after init.
            net = nn.parallel.DistributedDataParallel(self.model, device_ids=ids, broadcast_buffers=False)
        return torch.compile(net) if self.cfg.compile else net

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        net = self.network()
        bar = tqdm(range(self.epoch, cfg.epochs), desc="training", initial=self.epoch, total=cfg.epochs,
                   disable=not self.progress)
        for epoch in bar:
            start = time.perf_counter()
            row: dict[str, Any] = {"epoch": epoch, **self._train_epoch(net, epoch)}
            if _solves_after(cfg.gaussians, epoch):
                info = self._solve(epoch, *self._stats(epoch))
                row.update(solved=info["kind"], solve_iterations=info["iterations"],
                           solve_converged=info["converged"], solve_bounds_active=info["bounds_active"],
                           solve_time=info["seconds"])
            row.update(self._evaluate(epoch))
            row["time"] = time.perf_counter() - start
            self.rows.append({c: row.get(c) for c in COLUMNS})
            self.epoch = epoch + 1
            self.save()
            held = ("val_bpd", "val_acc_top1") if self.val_set is not None else ("test_bpd", "acc_top1")
            bar.set_postfix(bpd=f"{row[held[0]]:.3f}", acc=f"{row[held[1]]:.1f}")
        if self.layout.active:
            dist.barrier()
        return self.rows[-1]


def keyed_run_dir(root: str | os.PathLike[str], name: str, cfg: TrainConfig) -> Path:
    """``root / "<name>-<key>"``: the run folder of ``cfg`` made by this code, keyed by the
    full config (less :data:`NOT_KEYED`) and the code fingerprint (:func:`nfpi.repro.run_key`):
    a changed parameter or library gets its own run, an identical one is reused."""
    return repro.run_dir(root, name, cfg.to_dict(), ignore=NOT_KEYED)


def check_config(cfg: TrainConfig) -> None:
    """Cross-field rules :func:`train` checks before it touches data or files (the per-field
    types and ranges are checked when the config is built); one-line ValueErrors."""
    g = cfg.gaussians
    if g.prior in ("fpi", "gd", "data") and g.solve_epoch >= cfg.epochs:
        raise ValueError(
            f"gaussians.solve_epoch={g.solve_epoch} is not before the end of training (epochs={cfg.epochs}, "
            f"last epoch {cfg.epochs - 1}), so the prior={g.prior!r} solve would never happen; set "
            f"gaussians.solve_epoch <= {cfg.epochs - 1} (0: after the first epoch, -1: before training) "
            "or raise epochs")


def _lock_run_dir(run_dir: Path) -> typing.IO[str]:
    """Create ``run_dir``, check that it is writable and take its advisory lock (fcntl.flock on
    :data:`LOCK_FILE`, holding the PID; released by :func:`_unlock_run_dir`). The OS drops the
    lock when its process dies, so the lock file a killed run leaves behind is taken over."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=run_dir, prefix=".nfpi-write-test.")  # as the atomic writes do
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise RunDirError(f"run directory {run_dir} is not writable ({_first_line(err)}); choose another "
                          "run directory (CLI --run-dir)") from None
    path = run_dir / LOCK_FILE
    while True:
        handle = os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT, 0o644), "r+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = handle.read().strip() or "PID not yet written"
            handle.close()
            raise RunDirError(f"run directory {run_dir} is in use by another training process ({holder}); "
                              "wait for it to finish or use another run directory") from None
        except OSError as err:
            handle.close()
            raise RunDirError(f"cannot lock run directory {run_dir} ({_first_line(err)}); use a run "
                              "directory on a local file system") from None
        # The previous holder removes the file on release: if that happened between our open and
        # flock, we locked a deleted file and must retry on the new one.
        try:
            if os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        handle.close()
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    return handle


def _unlock_run_dir(handle: typing.IO[str], run_dir: Path) -> None:
    """Remove the lock file while still holding the lock, then release it; a run directory
    left empty (the run failed before writing anything) is removed too."""
    try:
        os.unlink(run_dir / LOCK_FILE)
    except OSError:  # already gone, or the directory turned read-only: the lock still goes
        pass
    handle.close()
    try:
        run_dir.rmdir()  # only succeeds when nothing was written
    except OSError:
        pass


def train(cfg: TrainConfig, run_dir: str | os.PathLike[str], resume: bool = True,
          progress: bool = True) -> dict[str, Any]:
    """Train (or resume, or just reload) the run of ``cfg`` in ``run_dir``.

    With ``resume`` an existing ``run_dir/checkpoint.pt`` of the same run (same config up to
    :data:`RESUME_FREE` keys) is continued up to ``cfg.epochs``; a finished run returns at
    once (a longer one: the row of epoch ``cfg.epochs - 1``, with a warning). ``resume=False``
    starts over and overwrites it. Returns the last metrics row (epoch, train/test NLL and
    bits/dim, NF accuracy top-1/top-5 in %, solve info, time).
    Before any data is read: :func:`check_config`, then the run directory is created, checked
    to be writable and locked for this process (RunDirError when another process holds it).
    Raises CheckpointError for a corrupt (checksum), empty, truncated or foreign checkpoint,
    NonFiniteLossError when the loss diverges.
    """
    check_config(cfg)
    run_dir = Path(run_dir)
    layout = _setup_distributed(cfg.device)
    threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    lock = None
    try:
        problem = None
        if layout.rank == 0:  # only rank 0 writes files, so only it holds the lock
            try:
                lock = _lock_run_dir(run_dir)
            except RunDirError as err:
                problem = err
        if layout.active:  # every process stops together, or the others hang
            ok = torch.tensor([float(problem is None)], device=layout.device)
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
            if not bool(ok) and problem is None:
                problem = RunDirError(f"rank 0 could not take run directory {run_dir}; see its error")
        if problem is not None:
            raise problem
        path = run_dir / "checkpoint.pt"
        ckpt = _read_checkpoint(path) if resume and path.exists() else None
        if ckpt is not None:
            # Through TrainConfig, options added after the checkpoint was written get their defaults.
            diff = _config_differences(TrainConfig.from_dict(ckpt["config"]).to_dict(), cfg.to_dict())
            if diff:
                raise CheckpointError(
                    f"{path} belongs to a different run ({'; '.join(diff)}). Use another run directory, "
                    "or pass resume=False (CLI: --no-resume) to start over and overwrite it.")
            if ckpt.get("code") != repro.code_fingerprint():
                raise CheckpointError(
                    f"{path} was made by other nfpi code (fingerprint {ckpt.get('code')}, now "
                    f"{repro.code_fingerprint()}), so its results are not this code's. Use another run directory "
                    "(nfpi.repro.run_dir names one per config and code), or pass resume=False "
                    "(CLI: --no-resume) to start over and overwrite it.")
            if ckpt["epoch"] > cfg.epochs:
                warnings.warn(
                    f"{run_dir} holds a finished {ckpt['epoch']}-epoch run and epochs={cfg.epochs} "
                    f"asks for fewer: returning the metrics of epoch {cfg.epochs - 1}, but the checkpoint "
                    f"holds the weights after {ckpt['epoch']} epochs. Use another run directory for a "
                    f"{cfg.epochs}-epoch checkpoint.", stacklevel=2)
            if ckpt["epoch"] >= cfg.epochs:
                return ckpt["metrics"][cfg.epochs - 1]
        run = _Run(cfg, run_dir, layout, progress)
        if ckpt is None:
            run.initialise()
        else:
            run.resume(ckpt)
        return run.run()
    finally:
        if lock is not None:
            _unlock_run_dir(lock, run_dir)
        torch.set_num_threads(threads)
        if layout.owns_group:
            dist.destroy_process_group()


# --------------------------------------------------------------------------------- CLI
def _parse_overrides(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"override {item!r} must look like key=value (e.g. gaussians.lam=10 epochs=5)")
        try:
            out[key] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise SystemExit(f"error: override {item!r}: {value!r} is not a YAML value; quote strings "
                             "(key='a b') and close brackets") from None
    return out


# What a user can fix gets one line on the command line; anything else keeps its traceback.
_USER_ERRORS = (CheckpointError, RunDirError, NonFiniteLossError, FPIDivergenceError, ValueError, OSError)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """``python -m nfpi.train --config FILE [--run-dir DIR] [--no-resume] [key=value ...]``.

    Options and key=value overrides may be mixed in any order. Errors the user can fix exit
    with status 1 and a one-line ``error: ...`` message."""
    parser = argparse.ArgumentParser(prog="python -m nfpi.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="YAML training config (see configs/)")
    parser.add_argument("--run-dir", help="output directory (default runs/<config name>)")
    parser.add_argument("--no-resume", action="store_true", help="start over even if a checkpoint exists")
    parser.add_argument("--no-progress", action="store_true", help="disable the progress bars")
    parser.add_argument("overrides", nargs="*", help="key=value settings, dotted for sections (model.hidden=64)")
    args = parser.parse_intermixed_args(argv)
    try:
        cfg = TrainConfig.from_yaml(args.config, **_parse_overrides(args.overrides))
        run_dir = args.run_dir or Path("runs") / Path(args.config).stem
        metrics = train(cfg, run_dir, resume=not args.no_resume, progress=not args.no_progress)
    except _USER_ERRORS as err:
        raise SystemExit(f"error: {err}") from None
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(metrics, indent=2))
    return metrics


if __name__ == "__main__":
    main()
