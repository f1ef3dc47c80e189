"""Peer baselines on the same flow (notebook 08; docs/flows.md, "Use FPI with your own flow"): a
normflows ``MultiscaleFlow`` trained by normflows' own objective, its class-conditional base
(``ClassCondDiagGaussian``) learned jointly with the flow by gradient descent, beside the same
flow trained by nfpi with FPI or data-init class Gaussians.

- :func:`train_native`: normflows' ``forward_kld`` (the mean NLL under its learned base), with
  everything else as in :func:`nfpi.train.train`: the same images in the same order and noise
  (:func:`nfpi.train.epoch_loader`), the same ActNorm init images, Adamax with the same warm-up,
  the EMA of the weights, and the same held-out metrics (:func:`nfpi.evaluation.evaluate_flow`
  under the learned base, read as nfpi class Gaussians);
- :func:`compare_arms`: arms (an nfpi run or a native run, one config each) over seeds into one
  results CSV of tidy rows, reusing a row recorded for the same config (by any code: the
  ``code`` column names the maker; notebook 08 retrains a check seed against them).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from .. import repro
from .._progress import tqdm
from .._util import atomic_write, threads
from ..config import TrainConfig
from ..data import bits_per_dim
from ..evaluation import evaluate_flow
from ..latents import NonFiniteLossError
from ..train import (
    build_flow,
    config_key,
    epoch_loader,
    get_lr,
    init_images,
    keyed_run_dir,
    load_checkpoint,
    make_ema,
    splits,
    train,
)
from .tables import append_row, find_row, read_rows

__all__ = ["TRAINERS", "compare_arms", "flow_size", "train_native"]

#: How an arm is trained: ``"nfpi"`` (:func:`nfpi.train.train`) or ``"native"`` (:func:`train_native`).
TRAINERS = ("nfpi", "native")


def flow_size(model: nn.Module) -> int:
    """Parameters of a flow without a base distribution it carries (``flow_parameters()`` of an
    adapter such as :class:`nfpi.flows.NormflowsFlow`), i.e. what both trainers fit by gradient."""
    params = model.flow_parameters() if hasattr(model, "flow_parameters") else model.parameters()
    return sum(p.numel() for p in params)


def _native_epoch(
    model: nn.Module, ema: nn.Module, optimizer: Any, cfg: TrainConfig, arrays, epoch: int, step: int
):
    """One epoch of normflows' objective; (mean loss in nats, optimizer steps so far)."""
    model.train()
    clip = cfg.optim.grad_clip or math.inf
    total, count = 0.0, 0
    for x, y in epoch_loader(cfg, arrays, epoch):
        loss = model.nll(x, y).mean()
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"non-finite loss at epoch {epoch} (global step {step}) of the native run: lower optim.lr"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        for group in optimizer.param_groups:
            group["lr"] = get_lr(step, cfg.optim)
        optimizer.step()
        ema.update_parameters(model)
        total, count, step = total + float(loss.detach()), count + 1, step + 1
    return total / count, step


def train_native(
    cfg: TrainConfig, run_dir: str | os.PathLike[str], model: nn.Module | None = None, progress: bool = False
) -> dict[str, Any]:
    """Train a normflows flow (``model``, default the flow of ``cfg.model``, e.g.
    :func:`nfpi.flows.normflows_glow`) by its own objective for ``cfg.epochs`` epochs and return
    the final metrics row, with the columns :func:`nfpi.train.train` returns (``train_bpd``,
    ``val_*``, ``test_bpd``, ``acc_top1``, ``acc_top5``, ...; NF accuracy under the learned base).

    ``run_dir/metrics.json`` keeps the row with its config and code: a finished run of the same
    config and code is read back instead of trained (CPU only; cfg.gaussians and cfg.schedule
    are unused)."""
    run_dir = Path(run_dir)
    summary = run_dir / "metrics.json"
    if summary.exists():
        done = json.loads(summary.read_text())
        if done["config"] == cfg.to_dict() and done["code"] == repro.code_fingerprint():
            return done["metrics"]
    train_set, val_set, test_set = splits(cfg)
    torch.manual_seed(cfg.seed)
    model = build_flow(cfg.model, train_set.shape) if model is None else model
    if not (hasattr(model, "nll") and hasattr(model, "class_gaussians")):
        raise ValueError(
            f"{type(model).__name__} has no own class-conditional base (nll(x, y), class_gaussians()); "
            "pass an nfpi.flows.NormflowsFlow, e.g. nfpi.flows.normflows_glow(...)"
        )
    start, step, dim = time.perf_counter(), 0, math.prod(train_set.shape)
    with threads(cfg.threads):
        with torch.no_grad():
            model(init_images(cfg, train_set))  # normflows' ActNorm initialises on its first batch
        ema = make_ema(model, cfg.optim.ema)
        optimizer = torch.optim.Adamax(model.parameters(), lr=get_lr(0, cfg.optim))
        for epoch in tqdm(range(cfg.epochs), desc="native", disable=not progress):
            loss, step = _native_epoch(model, ema, optimizer, cfg, train_set, epoch, step)
        flow = ema.module
        row: dict[str, Any] = {"epoch": cfg.epochs - 1, "train_nll": loss}
        row["train_bpd"] = float(bits_per_dim(torch.tensor(loss), dim, cfg.bits))
        if val_set is not None:
            val = evaluate_flow(flow, flow.class_gaussians(), val_set, cfg.bits, cfg.eval_batch_size)
            row.update({f"val_{k.removeprefix('test_')}": v for k, v in val.items()})
        row.update(evaluate_flow(flow, flow.class_gaussians(), test_set, cfg.bits, cfg.eval_batch_size))
    row["time"] = time.perf_counter() - start
    run_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"metrics": row, "config": cfg.to_dict(), "code": repro.code_fingerprint()}, indent=2)
    atomic_write(summary, text.encode())
    return row


def _arm_row(trainer: str, cfg: TrainConfig, runs_dir: Path, progress: bool) -> dict[str, Any]:
    """Train (or reuse the run folder of) one arm at one seed; its tidy row without the key. The
    folder is named by the trainer and config alone, so arms of the same config share one run."""
    folder = keyed_run_dir(runs_dir, trainer, cfg)
    start = time.perf_counter()
    if trainer == "native":
        final = train_native(cfg, folder, progress=progress)
        size = flow_size(build_flow(cfg.model, splits(cfg)[0].shape))
    else:
        final = train(cfg, folder, progress=progress)
        size = flow_size(load_checkpoint(folder)[0])
    return {
        "trainer": trainer,
        "prior": "normflows" if trainer == "native" else cfg.gaussians.prior,
        "lam": cfg.gaussians.lam if trainer == "nfpi" and cfg.gaussians.prior in ("fpi", "gd") else math.nan,
        "flow": cfg.model.factory or "nfpi.flows:Glow",
        "params": size,
        "seconds": time.perf_counter() - start,
        **final,
    }


def compare_arms(
    arms: Mapping[str, tuple[str, TrainConfig]],
    seeds: Sequence[int],
    runs_dir: str | os.PathLike[str],
    results_csv: str | os.PathLike[str],
    progress: bool = False,
) -> pd.DataFrame:
    """Every arm (name -> (trainer in :data:`TRAINERS`, config)) at every seed (``seed``
    overridden), as rows ``<arm>_seed<s>`` of ``results_csv`` (eval tag ``"final"``): ``setting``
    (the arm), ``seed``, ``trainer``, ``prior``, ``lam``, ``flow`` (the factory), ``params``
    (:func:`flow_size`), ``seconds`` (wall time of the call that made the row: its training, or
    about 0 when its run folder was already trained by another arm of the same config), ``code``
    (the fingerprint of the code that made the row), ``config_hash`` (the trainer and config,
    :func:`nfpi.train.config_key`) and the final metrics. A row of the same ``config_hash`` is
    reused whatever code made it, so that a results table outlives library edits: check the
    current code by a fresh run against it (a ``runs_dir`` and ``results_csv`` of their own, then
    :func:`nfpi.repro.expect_recorded`). Any other row is trained in ``runs_dir`` and appended at
    once. Returns the rows in arm, seed order."""
    for arm, (trainer, _) in arms.items():
        if trainer not in TRAINERS:
            raise ValueError(f"arm {arm!r}: trainer must be one of {TRAINERS}, got {trainer!r}")
    table, keys = read_rows(results_csv), []
    for arm, (trainer, base) in arms.items():
        for seed in seeds:
            cfg, run = base.replace(seed=seed), f"{arm}_seed{seed}"
            digest = config_key(cfg, trainer=trainer)
            keys.append(run)
            done = find_row(table, run, "final")
            if done is not None and done.get("config_hash") == digest:
                continue
            row = _arm_row(trainer, cfg, Path(runs_dir), progress)
            key = {"run": run, "eval": "final", "setting": arm, "seed": seed}
            table = append_row(
                results_csv, {**key, **row, "code": repro.code_fingerprint(), "config_hash": digest}
            )
    table = read_rows(results_csv)
    return pd.DataFrame([find_row(table, run, "final") for run in keys]).reset_index(drop=True)
