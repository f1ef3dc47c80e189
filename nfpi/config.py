"""Settings of a training run (docs/method.md §4-§5, paper Sec. 5.2) and their YAML / dotted-override loader.

A :class:`TrainConfig` holds plain data in groups that match the code they feed:

- ``model`` (:class:`ModelConfig`): the Glow of :class:`nfpi.flows.Glow`;
- ``optim`` (:class:`OptimConfig`): Adamax, warm-up, clipping, EMA;
- ``gaussians`` (:class:`GaussianConfig`): the objective J of paper Eqs. 3-4 (lambda, alpha, pi)
  and which fit sets the class Gaussians (``prior``);
- ``solver`` (:class:`SolverConfig`): passed as is to :func:`nfpi.prior.fpi.solve` (paper Eqs. 5-7);
- ``gd`` (:class:`GDConfig`): passed as is to :func:`nfpi.prior.gd.solve` (Baseline 2);
- ``schedule`` (:class:`ScheduleConfig`): when the Gaussians are refitted (docs/method.md §4.3, §4.4);
- ``codes`` (:class:`nfpi.data.codes.CodeConfig`): GLEM's conditional encoding.

Before this layout every Gaussian option sat in ``gaussians``; such a key (YAML, ``from_dict`` or
a ``key=value`` override) raises a ValueError naming its new place, and :func:`upgrade` turns a
config dict stored by older code (checkpoints, metrics.json) into the new layout.

Example:
    >>> cfg = TrainConfig.from_yaml("configs/digits_cpu.yaml", **{"gaussians.lam": 3000.0, "gd.lr": 0.1})
    >>> cfg.replace(epochs=5).to_dict()["schedule"]["solve_epoch"]
    0
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from . import data
from ._util import check_choice
from .data import CodeConfig
from .flows import MEMORY_MODES
from .prior import fpi, gd

__all__ = [
    "NOT_KEYED",
    "PRIORS",
    "RESUME_FREE",
    "GDConfig",
    "GaussianConfig",
    "ModelConfig",
    "OptimConfig",
    "ScheduleConfig",
    "SolverConfig",
    "TrainConfig",
    "parse_overrides",
    "upgrade",
]

PRIORS = ("data", "fpi", "gd", "random", "standard")
# Settings that may change when a run is resumed: they do not alter the computation
# (``epochs`` extends a finished run).
RESUME_FREE = ("epochs", "device", "data_dir", "download", "num_workers", "eval_batch_size", "threads")
# Settings that do not change what a run computes (``epochs`` does: a longer run is another result).
NOT_KEYED = tuple(k for k in RESUME_FREE if k != "epochs")
# Old ``gaussians.<key>`` -> its group now (the gd keys also lost their ``gd_`` prefix).
MOVED = {
    **{k: ("solver", k) for k in ("rule", "isotropic_mean_step", "rho", "tol", "max_iter", "stop", "accel")},
    **{f"gd_{k}": ("gd", k) for k in ("policy", "steps", "lr")},
    **{
        k: ("schedule", k)
        for k in (
            "solve_epoch",
            "resolve_every",
            "dg_fraction",
            "merge_epoch",
            "warm_start",
            "lam_decay",
            "lam_min",
            "stats_noise",
        )
    },
}


@dataclass
class ModelConfig:
    """The Glow of :class:`nfpi.flows.Glow` (paper: 3 levels x 8 steps, 128 hidden channels).

    ``blocks``: residual blocks per coupling net, one int or one per level (released: [8, 4, 2]).
    ``matexp_rank``, ``matexp_low_rank_above``: with ``coupling: matexp``, W = A B of rank
    ``matexp_rank`` when the transformed half has more channels than ``matexp_low_rank_above``.
    ``memory``: ``"standard"`` or ``"reversible"`` (activations rebuilt by inverses in backward).
    ``factory``: another flow instead, ``"package.module:callable"`` called as
    ``callable((C, H, W), **kwargs)`` (the Glow keys are then unused; docs/flows.md).
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
    factory: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_choice("model.memory", self.memory, MEMORY_MODES)
        if isinstance(self.blocks, list) and len(self.blocks) != self.levels:
            raise ValueError(
                f"model.blocks must be one int or a list of model.levels = {self.levels} "
                f"ints (one per level), got {self.blocks}"
            )


@dataclass
class OptimConfig:
    """Adamax; learning rate by :func:`nfpi.train.get_lr` (warm-up, cosine decay); clipping; EMA."""

    lr: float = 1e-2
    warmup: int = 1000
    grad_clip: float | None = None
    ema: float = 0.9999
    decay_steps: int | None = None
    min_lr: float | None = None  # the end of the decay (null: 0)

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if self.warmup < 0:
            raise ValueError(f"optim.warmup must be >= 0 steps, got {self.warmup}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"optim.grad_clip must be > 0 or null (no clipping), got {self.grad_clip}")
        if self.decay_steps is not None and not self.warmup < self.decay_steps:
            raise ValueError(f"optim.decay_steps must be > warmup ({self.warmup}), got {self.decay_steps}")
        if self.min_lr is not None and not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"optim.min_lr must lie in [0, lr = {self.lr}], got {self.min_lr}")
        if not 0 <= self.ema < 1:
            raise ValueError(f"optim.ema (EMA beta) must lie in [0, 1), got {self.ema}")


@dataclass
class GaussianConfig:
    """The objective the class Gaussians minimise and which fit sets them (docs/method.md §2, §4-§5).

    ``prior``: ``"fpi"`` (:func:`nfpi.prior.fpi.solve`), ``"gd"`` (:func:`nfpi.prior.gd.solve`), ``"data"``
    (the lambda = 0 fixed point: the class statistics), ``"random"`` or ``"standard"`` (never
    refitted). ``lam`` is the un-normalised lambda (divided by K(K-1) inside the solver);
    ``alpha``, ``pi``, ``learn`` go to both solvers. ``means_only_identity``: with
    ``learn="means"`` the variances stay at identity (released configs) instead of the data
    variances.
    """

    prior: str = "fpi"
    lam: float = 0.0
    alpha: float = 10.0
    pi: str = "pairwise"
    learn: str = "both"
    means_only_identity: bool = True

    def __post_init__(self) -> None:
        check_choice("gaussians.prior", self.prior, PRIORS)
        check_choice("gaussians.pi", self.pi, ("pairwise", "mean"))
        check_choice("gaussians.learn", self.learn, ("both", "means", "variances"))
        if self.lam < 0 or not math.isfinite(self.lam):
            raise ValueError(f"gaussians.lam must be finite and >= 0, got {self.lam}")


@dataclass
class SolverConfig:
    """Keyword arguments of :func:`nfpi.prior.fpi.solve` (paper Eqs. 5-7), passed as they are.

    ``stop: released`` with ``accel: none`` is the authors' plain iteration and stopping rule.
    ``rho`` is the variance box [v/rho, v*rho] of both solvers: :func:`nfpi.prior.gd.solve`
    gets it too, so that GD and FPI always search the same set.
    """

    rule: str = "paper"
    isotropic_mean_step: bool = False
    rho: float = 1e3
    tol: float = 1e-10
    max_iter: int = 1000
    stop: str = "relative"
    accel: str = "anderson"

    def __post_init__(self) -> None:
        check_choice("solver.rule", self.rule, ("paper", "released"))
        check_choice("solver.stop", self.stop, ("relative", "released"))
        check_choice("solver.accel", self.accel, ("anderson", "none"))


@dataclass
class GDConfig:
    """Keyword arguments of :func:`nfpi.prior.gd.solve` (Baseline 2): lr ``policy``, Adam ``steps``,
    ``lr``."""

    policy: str = "linear"
    steps: int = 1000
    lr: float = 0.05

    def __post_init__(self) -> None:
        check_choice("gd.policy", self.policy, tuple(gd.POLICIES))
        if not (isinstance(self.steps, int) and self.steps >= 1):
            raise ValueError(f"gd.steps must be an integer >= 1, e.g. 1000; got {self.steps!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"gd.lr must be finite and > 0, e.g. 0.05; got {self.lr}")


@dataclass
class ScheduleConfig:
    """When the class Gaussians are fitted (docs/method.md §4.3, §4.4; :mod:`nfpi.train.schedule`).

    ``solve_epoch``: the first solve, after that epoch (0: after the first, -1: before
    training); ``resolve_every``: solve again every that many epochs (null: frozen after the
    first). ``dg_fraction`` / ``merge_epoch``: the D_NF / D_G split (paper Sec. 5.2) and the
    epoch after which D_G joins the training set. ``warm_start``: a solve starts from the
    current Gaussians instead of the data statistics (GLEM's alternating M-steps);
    ``lam_decay``, ``lam_min``: the n-th solve (n = 0, 1, ...) uses lambda =
    max(lam_min, lam * lam_decay^n). ``stats_noise``: the latent statistics use seeded uniform
    dequantisation noise, i.e. the distribution the flow is trained on (with the +0.5 offset,
    pixels that are constant in a class, such as the black borders of digits, get zero
    variance and the training NLL explodes).
    """

    solve_epoch: int = 0
    resolve_every: int | None = None
    dg_fraction: float | None = None
    merge_epoch: int | None = None
    warm_start: bool = False
    lam_decay: float = 1.0
    lam_min: float = 0.0
    stats_noise: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.lam_decay <= 1:
            raise ValueError(f"schedule.lam_decay must lie in (0, 1] (1: constant), got {self.lam_decay}")
        if self.solve_epoch < -1:
            raise ValueError(f"schedule.solve_epoch must be >= -1 (-1: before training): {self.solve_epoch}")
        if self.resolve_every is not None and self.resolve_every < 1:
            raise ValueError(f"schedule.resolve_every must be >= 1 or null, got {self.resolve_every}")
        if (self.dg_fraction is None) != (self.merge_epoch is None):
            raise ValueError(
                "schedule.dg_fraction and schedule.merge_epoch go together: set both "
                "(D_NF/D_G split) or neither"
            )
        if self.dg_fraction is not None:
            if not 0 < self.dg_fraction < 1:
                raise ValueError(f"schedule.dg_fraction must lie in (0, 1), e.g. 0.1; got {self.dg_fraction}")
            if self.merge_epoch < self.solve_epoch:
                raise ValueError(
                    f"schedule.merge_epoch ({self.merge_epoch}) must be >= solve_epoch "
                    f"({self.solve_epoch}): the Gaussians are learned on D_G before the merge"
                )


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
    ``codes``: GLEM's conditional encoding (:class:`nfpi.data.codes.CodeConfig`; rows 0 = off);
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
    solver: SolverConfig = field(default_factory=SolverConfig)
    gd: GDConfig = field(default_factory=GDConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    codes: CodeConfig = field(default_factory=CodeConfig)

    def __post_init__(self) -> None:
        data.check_dataset(self.dataset, self.data_dir)
        check_choice("device", self.device, ("auto", "cpu", "cuda"))
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
            raise ValueError(
                f"val_fraction must lie in [0, 0.5) (e.g. 0.1; 0 = no validation split), "
                f"got {self.val_fraction}"
            )
        self._check_groups()

    def _check_groups(self) -> None:
        """Rules across the gaussians / solver / schedule groups."""
        gs, sched = self.gaussians, self.schedule
        if not 0 <= sched.lam_min <= gs.lam:
            raise ValueError(f"schedule.lam_min must lie in [0, gaussians.lam={gs.lam:g}]: {sched.lam_min}")
        try:  # the solver's own checks, run now instead of after the first epoch
            fpi.check_solver_args(
                lam=gs.lam,
                alpha=gs.alpha,
                pi=gs.pi,
                learn=gs.learn,
                rho=self.solver.rho,
                tol=self.solver.tol,
                max_iter=self.solver.max_iter,
            )
        except ValueError as err:
            group = "solver" if str(err).split()[0] in ("rho", "tol", "max_iter") else "gaussians"
            raise ValueError(f"{group}.{err}") from None

    # -- construction -------------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: dict[str, Any], **overrides: Any) -> TrainConfig:
        """Build from a nested dict; ``overrides`` use dotted keys (``**{"model.hidden": 32}``)
        or nested dicts (``model={"hidden": 32}``). Unknown keys raise a ValueError listing
        the valid ones."""
        merged = _merge(values, overrides)
        return _build(cls, merged, "")

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str], **overrides: Any) -> TrainConfig:
        """Load a YAML file (nested sections ``model``, ``optim``, ``gaussians``, ...); an empty file or
        invalid YAML raises a one-line ValueError naming the file (and line)."""
        with open(path) as f:
            try:
                values = yaml.safe_load(f)
            except yaml.YAMLError as err:
                mark = getattr(err, "problem_mark", None)
                where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
                problem = getattr(err, "problem", None) or err
                raise ValueError(
                    f"{path}: invalid YAML{where} ({problem}); write `key: value` pairs, "
                    "sections indented with spaces (see configs/)"
                ) from None
        if values is None:
            raise ValueError(
                f"{path} is empty: a training config must set its options (start from a copy "
                "of one in configs/) rather than silently train on the defaults"
            )
        if not isinstance(values, dict):
            raise ValueError(f"{path}: a training config must be a YAML mapping, got {type(values).__name__}")
        try:
            return cls.from_dict(values, **overrides)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None

    def replace(self, **overrides: Any) -> TrainConfig:
        """A copy with ``overrides`` applied (same key forms as :meth:`from_dict`)."""
        return TrainConfig.from_dict(self.to_dict(), **overrides)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML/JSON/checkpoint safe)."""
        return dataclasses.asdict(self)

    def to_yaml(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`to_dict` as YAML (loadable with :meth:`from_yaml`)."""
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
    moved = [k for k in unknown if cls is GaussianConfig and k in MOVED]
    if moved:
        raise ValueError("; ".join(f"gaussians.{k} moved to {'.'.join(MOVED[k])}" for k in moved))
    if unknown:
        raise ValueError(
            f"unknown config key(s) {[prefix + k for k in unknown]}; valid keys "
            f"{'in ' + prefix.rstrip('.') if prefix else 'at the top level'}: {names}"
        )
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
    if typing.get_origin(hint) is dict:
        if isinstance(value, dict):
            return dict(value)
        raise ValueError(f"{name} must be a mapping, got {value!r}")
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


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["key=value", ...]`` of the command line -> {dotted key: YAML-parsed value};
    SystemExit on bad syntax."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"override {item!r} must look like key=value (e.g. gaussians.lam=10 epochs=5)")
        try:
            out[key] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise SystemExit(
                f"error: override {item!r}: {value!r} is not a YAML value; quote strings "
                "(key='a b') and close brackets"
            ) from None
    return out


def upgrade(values: dict[str, Any]) -> dict[str, Any]:
    """A config dict stored by code before the solver / gd / schedule groups (flat ``gaussians``
    keys: old checkpoints and metrics.json) in the current layout; a current one unchanged.

    Example:
        >>> upgrade({"gaussians": {"lam": 1.0, "gd_lr": 0.1}})
        {'gaussians': {'lam': 1.0}, 'gd': {'lr': 0.1}}
    """
    old = values.get("gaussians")
    if not isinstance(old, dict) or not set(old) & set(MOVED):
        return values
    out = {k: v for k, v in values.items() if k != "gaussians"}
    out["gaussians"] = {k: v for k, v in old.items() if k not in MOVED}
    for key, (group, name) in MOVED.items():
        if key in old:
            out.setdefault(group, {})[name] = old[key]
    return out
