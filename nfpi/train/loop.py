"""Training of the class-conditional flow with FPI class Gaussians (docs/method.md §4-§5; paper Sec. 4.2
"a single fixed point iteration at early training stages", Sec. 5.2 implementation details).

The flow f (any :class:`nfpi.flows.Flow` passed as ``train(model=...)``; by default the
:class:`nfpi.flows.Glow` of ``cfg.model``, or its ``model.factory``) is trained by minimising the
mean class-conditional negative log-likelihood of paper Eq. 2,

    NLL(x, y) = -log N(f(x); mu_y, s_y) - log|det J_f(x)|          (nats per image),

reported as bits/dim by :func:`nfpi.data.bits_per_dim`. The class Gaussians (mu_y, s_y) are
buffers of :class:`nfpi.prior.ClassGaussians`, never trained by the optimiser. Their
schedule is the released training protocol of docs/method.md §4:

1. data-dependent ActNorm init on ``init_images`` training images;
2. data init: class means and variances of the latents of the untrained flow (Baseline 1;
   identity variances for the released means-only runs);
3. after epoch ``schedule.solve_epoch`` (0 = after the first epoch; -1 = before training), the
   class statistics of the full training set (eval mode, non-EMA weights, float64, all-reduced
   over processes; seeded uniform dequantisation noise, see ``ScheduleConfig.stats_noise``)
   are computed and the Gaussians are set to the solution of ``gaussians.prior``
   (:mod:`nfpi.train.schedule`):

   - ``"fpi"``: :func:`nfpi.prior.fpi.solve` (paper Eqs. 5-7) with lambda = ``lam`` and ``solver``;
   - ``"gd"``: :func:`nfpi.prior.gd.solve`, gradient descent on the same objective (Baseline 2), ``gd``;
   - ``"data"``: the lambda = 0 fixed point, i.e. the class statistics (Baseline 1 refitted
     at the same epoch, so that the only difference from ``"fpi"`` is lambda);
   - ``"random"``: random Gaussians (GLEM supplementary), never refitted;
   - ``"standard"``: every class N(0, I), never refitted: a monomodal flow (GLEM's CE
     baseline, with the class codes of ``codes``);

4. the Gaussians stay frozen afterwards, unless ``schedule.resolve_every`` asks for repeated
   solves. GLEM's EM schedule (:func:`nfpi.train.schedule.em_overrides`) solves after every epoch, each solve
   starting from the current Gaussians (``warm_start``), with lambda annealed geometrically
   (the n-th solve uses max(``lam_min``, ``lam`` * ``lam_decay``^n)).
   Optionally (paper Sec. 5.2 / GLEM supplementary) the training set is split into D_NF /
   D_G (``dg_fraction`` of each class in D_G); the flow trains on D_NF, the Gaussians are
   fitted on D_G, and D_G joins the training set after epoch ``merge_epoch`` (no solve after
   that).

Conditional encoding (GLEM's CE / CEGLEM, :mod:`nfpi.data.codes`): with ``codes.rows`` > 0 every
training image gets its class's code image appended below (noisy by ``codes.noise``) and every
test image random code rows; the flow then models (C, H + 2 pad + rows, W).

Optimisation (method §4.6, :mod:`nfpi.train.optim`): Adamax, linear learning-rate warm-up,
optional gradient-norm clipping, and an EMA of the weights that restarts from the current weights
whenever the Gaussians change, because an average of weights fitted to different priors fits
neither. Evaluation (every epoch, EMA weights, deterministic): test bits/dim under the true class
Gaussian as the standard uniform-dequantisation bound (``test_bpd``, noise from the fixed seed
:data:`nfpi.evaluation.EVAL_NOISE_SEED`; what published bits/dim report), the density at the bin
centres (``test_bpd_centres``, not a bound), and NF accuracy top-1/top-5 at the bin centres
(argmax_y log N(f(x); mu_y, s_y), docs/method.md §6).

Runs write (:mod:`nfpi.train.runs`) ``metrics.csv`` (one row per epoch), ``metrics.json`` (final row,
solves, config) and an atomically replaced ``checkpoint.pt`` every epoch, carrying a SHA-256 of its contents
that every load verifies; a run resumed from its checkpoint ends bit-identical to an
uninterrupted one (data order and noise are seeded per epoch). A run directory is locked by
the process training in it (``fcntl.flock``), and every configuration or environment error
is raised before any data is read or any epoch is trained.
Under ``torchrun`` (RANK / WORLD_SIZE set, even for one process) training uses
DistributedDataParallel (NCCL on GPU, gloo on CPU); ``batch_size`` is the global batch; only
rank 0 writes files.

Command line: ``python -m nfpi.train --config configs/digits_cpu.yaml [--run-dir DIR] [key=value ...]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader

from .. import repro
from .._ddp import Layout, setup_distributed
from .._progress import tqdm
from .._util import derive_seed, threads
from ..config import TrainConfig, parse_overrides
from ..data import bits_per_dim, dequantize, quantize, split_arrays
from ..evaluation import evaluate_flow
from ..flows import class_path, flow_signature, import_object
from ..latents import NonFiniteLossError, class_stats
from ..prior import ClassGaussians, ClassStats, FPIDivergenceError
from .images import epoch_loader, init_images, splits
from .optim import get_lr, make_ema
from .runs import (
    CHECKPOINT_FORMAT,
    COLUMNS,
    CheckpointError,
    RunDirError,
    prepare_flow,
    resumable_checkpoint,
    same_flow,
    take_run_dir,
    unlock_run_dir,
    write_run,
)
from .schedule import fit, initial_gaussians, solve_lam, solves_after

__all__ = ["check_config", "main", "train"]


def check_config(cfg: TrainConfig) -> None:
    """Cross-field rules :func:`train` checks before it touches data or files (the per-field
    types and ranges are checked when the config is built); one-line ValueErrors."""
    if cfg.model.factory is not None:
        import_object(cfg.model.factory)  # a ValueError saying how to name it
    prior, solve_epoch = cfg.gaussians.prior, cfg.schedule.solve_epoch
    if prior in ("fpi", "gd", "data") and solve_epoch >= cfg.epochs:
        raise ValueError(
            f"schedule.solve_epoch={solve_epoch} is not before the end of training (epochs={cfg.epochs}, "
            f"last epoch {cfg.epochs - 1}), so the prior={prior!r} solve would never happen; set "
            f"schedule.solve_epoch <= {cfg.epochs - 1} (0: after the first epoch, -1: before training) "
            "or raise epochs"
        )


def _check_levels(cfg: TrainConfig, shape: tuple[int, int, int]) -> None:
    """Fail before training when the (padded) image size does not suit ``model.levels``."""
    _, h, w = shape
    step = 2**cfg.model.levels
    if h % step or w % step:
        base_h, base_w = h - 2 * cfg.pad, w - 2 * cfg.pad
        fits = [p for p in range(step) if not (base_h + 2 * p) % step and not (base_w + 2 * p) % step]
        raise ValueError(
            f"images of {cfg.dataset!r} are {h}x{w} after padding (pad={cfg.pad}), not divisible by "
            f"2**model.levels = {step}: lower model.levels (each level halves the size) or change pad so "
            f"that both sides are multiples of {step}" + (f" (e.g. pad={fits[0]})" if fits else "")
        )


class _Run:
    """State of one training run (see :func:`train`): data, flow, EMA, class Gaussians, optimiser."""

    def __init__(
        self, cfg: TrainConfig, run_dir: Path, layout: Layout, progress: bool, model: nn.Module | None
    ):
        self.cfg, self.run_dir, self.layout = cfg, run_dir, layout
        self.device = layout.device
        self.progress = progress and layout.rank == 0
        if cfg.batch_size % layout.world:
            raise ValueError(
                f"batch_size={cfg.batch_size} is the global batch and must be divisible by the "
                f"number of processes ({layout.world})"
            )
        self.train_set, self.val_set, self.test_set = splits(cfg)
        # D_NF trains the flow, D_G fits the Gaussians: the same set without a split.
        self.nf_set, self.g_set = self.train_set, self.train_set
        if cfg.schedule.dg_fraction is not None:
            self.nf_set, self.g_set = split_arrays(self.train_set, 1.0 - cfg.schedule.dg_fraction, cfg.seed)
        if len(self.nf_set) < cfg.batch_size:
            raise ValueError(
                f"batch_size={cfg.batch_size} exceeds the {len(self.nf_set)} training images; "
                "lower batch_size or use more data (per_class)"
            )
        self.shape = self.train_set.shape
        self.dim = math.prod(self.shape)
        if model is None and cfg.model.factory is None:
            _check_levels(cfg, self.shape)

        torch.manual_seed(cfg.seed)
        # The protocol checked on a few training images, before any training step.
        probe = dequantize(quantize(self.nf_set.x[:4], cfg.bits), cfg.bits, noise=False)
        flow, self.flow_info = prepare_flow(cfg, self.shape, probe, model)
        self.model = flow.to(self.device)
        self.memory_format = torch.channels_last if cfg.channels_last else torch.preserve_format
        self.model.to(memory_format=self.memory_format)
        k = self.train_set.num_classes
        self.gaussians = ClassGaussians(torch.zeros(k, self.dim), torch.ones(k, self.dim)).to(self.device)
        self.optimizer = torch.optim.Adamax(self.model.parameters(), lr=get_lr(0, cfg.optim))
        self.ema: AveragedModel | None = None  # made after the ActNorm init, a copy of the flow
        self.step = 0  # optimizer steps taken
        self.epoch = 0  # epochs completed
        self.rows: list[dict[str, Any]] = []
        self.solves: list[dict[str, Any]] = []

    # -- start ------------------------------------------------------------------------
    def initialise(self) -> None:
        """Fresh run: ActNorm init, data-init (or random) Gaussians, optional solve at -1."""
        cfg = self.cfg
        with torch.no_grad():
            self.model(init_images(cfg, self.nf_set).to(self.device))
        self._make_ema()
        stats, seed = self._stats(-1)
        initial = initial_gaussians(cfg, stats)
        self.gaussians.set(initial.means, initial.variances)
        if solves_after(cfg, -1):
            self._solve(-1, stats, seed)

    def resume(self, ckpt: dict[str, Any]) -> None:
        same_flow(ckpt.get("flow"), self.flow_info, self.run_dir / "checkpoint.pt")
        self.model.load_state_dict(ckpt["model"])
        self._make_ema()
        self.ema.load_state_dict(ckpt["ema"])
        self.gaussians.load_state_dict(ckpt["prior"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"])
        if self.device.type == "cuda" and ckpt.get("cuda_rng"):
            torch.cuda.set_rng_state(ckpt["cuda_rng"], self.device)
        self.step, self.epoch = ckpt["step"], ckpt["epoch"]
        self.rows, self.solves = ckpt["metrics"], ckpt["solves"]

    def _make_ema(self) -> None:
        self.ema = make_ema(self.model, self.cfg.optim.ema)

    def _restart_ema(self) -> None:
        """Restart the average from the current weights: an average of weights fitted to
        different Gaussians fits neither."""
        self.ema.n_averaged.zero_()
        self.ema.update_parameters(self.model)

    # -- one epoch --------------------------------------------------------------------
    def _loader(self, epoch: int) -> DataLoader:
        cfg, layout = self.cfg, self.layout
        merged = cfg.schedule.merge_epoch is not None and epoch > cfg.schedule.merge_epoch
        arrays = self.train_set if merged else self.nf_set
        return epoch_loader(cfg, arrays, epoch, layout.rank, layout.world, self.device.type == "cuda")

    def _train_epoch(self, net: nn.Module, epoch: int) -> dict[str, float]:
        """One pass over the training images; the mean loss and gradient norm over processes."""
        cfg = self.cfg
        net.train()
        # Only the flow runs in bf16; z and the log-determinant are cast back before the NLL.
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if cfg.amp else nullcontext()
        clip = cfg.optim.grad_clip or math.inf
        total, norms, count = 0.0, 0.0, 0
        bar = tqdm(self._loader(epoch), desc=f"epoch {epoch}", leave=False, disable=not self.progress)
        for step, (x, y) in enumerate(bar):
            x = x.to(self.device, non_blocking=True, memory_format=self.memory_format)
            y = y.to(self.device, non_blocking=True)
            with autocast:
                z, logdet = net(x)
            loss = (self.gaussians.nll(z.float(), y) - logdet.float()).mean()
            self._check_finite(loss, "loss", epoch, step)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
            self._check_finite(norm, "gradient norm", epoch, step)
            for group in self.optimizer.param_groups:
                group["lr"] = get_lr(self.step, cfg.optim)
            self.optimizer.step()
            self.step += 1
            self.ema.update_parameters(self.model)
            total, norms, count = total + float(loss.detach()), norms + float(norm), count + 1
            if self.progress:
                bar.set_postfix(bpd=f"{float(bits_per_dim(loss.detach(), self.dim, cfg.bits)):.3f}")
        mean, norm_mean = total / count, norms / count
        if self.layout.active:  # report the loss over all processes
            both = torch.tensor([mean, norm_mean], dtype=torch.float64, device=self.device)
            dist.all_reduce(both)
            mean, norm_mean = float(both[0]) / self.layout.world, float(both[1]) / self.layout.world
        return {
            "lr": get_lr(self.step, cfg.optim),
            "train_nll": mean,
            "train_bpd": float(bits_per_dim(torch.tensor(mean), self.dim, cfg.bits)),
            "grad_norm": norm_mean,
        }

    def _check_finite(self, value: Tensor, what: str, epoch: int, step: int) -> None:
        ok = torch.isfinite(value.detach()).to(torch.float32)
        if self.layout.active:  # every process must stop together, or the others hang
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        if not bool(ok):
            optim = self.cfg.optim
            raise NonFiniteLossError(
                f"non-finite {what} ({float(value.detach()):g}) at epoch {epoch}, step {step} (global step "
                f"{self.step}); training stopped instead of continuing on NaN. Lower optim.lr (now "
                f"{optim.lr:g}), set optim.grad_clip (now {optim.grad_clip}), lengthen optim.warmup, "
                f"or lower gaussians.lam (now {self.cfg.gaussians.lam:g}) if it happened after a solve. "
                + (
                    f"The last good state is {self.run_dir / 'checkpoint.pt'} ({self.epoch} epochs)."
                    if self.epoch
                    else "No epoch was completed, so no checkpoint was written."
                )
            )

    # -- the class Gaussians ----------------------------------------------------------
    def _stats(self, epoch: int) -> tuple[ClassStats, int | None]:
        """Statistics of the Gaussians' training set after ``epoch`` and their noise seed."""
        cfg = self.cfg
        seed = derive_seed(cfg.seed, 4, epoch + 1) if cfg.schedule.stats_noise else None
        return class_stats(self.model, self.g_set, cfg.bits, cfg.eval_batch_size, noise=seed), seed

    def _solve(self, epoch: int, stats: ClassStats, seed: int | None) -> dict[str, Any]:
        cfg = self.cfg
        start = time.perf_counter()
        lam = solve_lam(cfg, len(self.solves))
        warm = self.gaussians if cfg.schedule.warm_start and self.solves else None
        fitted, info = fit(cfg, stats, lam, warm)
        info["seconds"] = time.perf_counter() - start
        means, variances = fitted.means, fitted.variances
        if self.layout.active:  # identical Gaussians on every process, whatever the hardware
            means, variances = means.to(self.device), variances.to(self.device)
            dist.broadcast(means, 0)
            dist.broadcast(variances, 0)
        self.gaussians.set(means, variances)
        self._restart_ema()
        info = {"epoch": epoch, "kind": cfg.gaussians.prior, "lam": lam, "stats_seed": seed, **info}
        self.solves.append(info)
        return info

    def _evaluate(self, epoch: int) -> dict[str, float]:
        """Held-out metrics after ``epoch`` (EMA weights): the validation split every epoch and
        the test set once, after the last epoch; without a validation split, the test set
        every epoch."""
        model, cfg = self.ema.module, self.cfg
        out: dict[str, float] = {}
        if self.val_set is not None:
            val = evaluate_flow(model, self.gaussians, self.val_set, cfg.bits, cfg.eval_batch_size)
            out.update({f"val_{k.removeprefix('test_')}": v for k, v in val.items()})
        if self.val_set is None or epoch == cfg.epochs - 1:
            out.update(evaluate_flow(model, self.gaussians, self.test_set, cfg.bits, cfg.eval_batch_size))
        return out

    # -- files and the loop -----------------------------------------------------------
    def save(self) -> None:
        if self.layout.rank != 0:
            return
        cuda_rng = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        ckpt = {
            "format": CHECKPOINT_FORMAT,
            "code": repro.code_fingerprint(),
            "epoch": self.epoch,
            "step": self.step,
            "config": self.cfg.to_dict(),
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "prior": self.gaussians.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng": torch.get_rng_state(),
            "cuda_rng": cuda_rng,
            "metrics": self.rows,
            "solves": self.solves,
            "shape": list(self.shape),
            "flow": self.flow_info,
        }
        summary = {
            "metrics": self.rows[-1],
            "epochs": self.epoch,
            "solves": self.solves,
            "config": self.cfg.to_dict(),
            "code": repro.code_fingerprint(),
        }
        write_run(self.run_dir, ckpt, self.rows, summary)

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
        bar = tqdm(
            range(self.epoch, cfg.epochs),
            desc="training",
            initial=self.epoch,
            total=cfg.epochs,
            disable=not self.progress,
        )
        for epoch in bar:
            start = time.perf_counter()
            row: dict[str, Any] = {"epoch": epoch, **self._train_epoch(net, epoch)}
            if solves_after(cfg, epoch):
                info = self._solve(epoch, *self._stats(epoch))
                row.update(
                    solved=info["kind"],
                    solve_iterations=info["iterations"],
                    solve_converged=info["converged"],
                    solve_bounds_active=info["bounds_active"],
                    solve_time=info["seconds"],
                )
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


def train(
    cfg: TrainConfig,
    run_dir: str | os.PathLike[str],
    resume: bool = True,
    progress: bool = True,
    model: nn.Module | None = None,
) -> dict[str, Any]:
    """Train (or resume, or just reload) the run of ``cfg`` in ``run_dir``.

    ``model``: the flow to train, any module following :class:`nfpi.flows.Flow` (untrained, or
    the same untrained flow again to resume); default: the flow of ``cfg.model`` (a Glow, or
    ``model.factory``). It is checked on a few training images before training
    (:func:`nfpi.flows.check_flow`: a FlowError saying what is wrong).

    With ``resume`` an existing ``run_dir/checkpoint.pt`` of the same run (same config up to
    :data:`nfpi.config.RESUME_FREE` keys) is continued up to ``cfg.epochs``; a finished run
    returns at once (a longer one: the row of epoch ``cfg.epochs - 1``, with a warning).
    ``resume=False`` starts over and overwrites it. Returns the last metrics row (epoch,
    train/test NLL and bits/dim, NF accuracy top-1/top-5 in %, solve info, time).
    Before any data is read: :func:`check_config`, then the run directory is created, checked
    to be writable and locked for this process (RunDirError when another process holds it).
    Raises CheckpointError for a corrupt (checksum), empty, truncated or foreign checkpoint,
    NonFiniteLossError when the loss diverges.

    Example:
        >>> import tempfile
        >>> tiny = {"per_class": 20, "test_per_class": 5, "epochs": 1, "batch_size": 50, "init_images": 100}
        >>> model = {"levels": 2, "steps": 1, "hidden": 8}
        >>> cfg = TrainConfig.from_dict({"dataset": "digits", **tiny, "model": model})
        >>> with tempfile.TemporaryDirectory() as run_dir:
        ...     row = train(cfg, run_dir, progress=False)
        >>> row["epoch"], row["solved"], 0 <= row["acc_top1"] <= 100
        (0, 'fpi', True)
    """
    check_config(cfg)
    if model is not None and cfg.model.factory is not None:
        raise ValueError(f"pass model= or set model.factory ({cfg.model.factory}), not both")
    run_dir = Path(run_dir)
    layout = setup_distributed(cfg.device)
    lock = None
    try:
        with threads(cfg.threads):
            lock = take_run_dir(run_dir, layout)
            ckpt = resumable_checkpoint(cfg, run_dir) if resume else None
            if ckpt is not None and model is not None:  # the config does not name a passed flow
                given = {"class": class_path(model), "signature": flow_signature(model)}
                same_flow(ckpt.get("flow"), given, run_dir / "checkpoint.pt")
            if ckpt is not None and ckpt["epoch"] >= cfg.epochs:
                return ckpt["metrics"][cfg.epochs - 1]
            run = _Run(cfg, run_dir, layout, progress, model)
            if ckpt is None:
                run.initialise()
            else:
                run.resume(ckpt)
            return run.run()
    finally:
        if lock is not None:
            unlock_run_dir(lock, run_dir)
        if layout.owns_group:
            dist.destroy_process_group()


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
    parser.add_argument(
        "overrides", nargs="*", help="key=value settings, dotted for sections (model.hidden=64)"
    )
    args = parser.parse_intermixed_args(argv)
    try:
        cfg = TrainConfig.from_yaml(args.config, **parse_overrides(args.overrides))
        run_dir = args.run_dir or Path("runs") / Path(args.config).stem
        metrics = train(cfg, run_dir, resume=not args.no_resume, progress=not args.no_progress)
    except _USER_ERRORS as err:
        raise SystemExit(f"error: {err}") from None
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(metrics, indent=2))
    return metrics
