"""Run directories and what a training run writes into them (docs/method.md §4.9).

A run directory holds ``checkpoint.pt`` (atomically replaced every epoch, carrying a SHA-256 of
its contents that every load verifies), ``metrics.csv`` (one row per epoch) and
``metrics.json`` (final row, solves, config). The process training in it holds an advisory
lock (``fcntl.flock`` on :data:`LOCK_FILE`). :func:`keyed_run_dir` names one folder per config
and code (:func:`nfpi.repro.run_dir`).

Example:
    >>> from nfpi.data import REPO_ROOT
    >>> flow, gaussians, cfg = load_checkpoint(REPO_ROOT / "tests" / "data" / "legacy_d10b07e")
    >>> z, logdet = flow(x)
    >>> tuple(z.shape), cfg.dataset
    ((6, 64), 'digits')
"""

from __future__ import annotations

import csv
import fcntl
import hashlib
import io
import json
import os
import socket
import tempfile
import typing
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .. import repro
from .._ddp import Layout
from .._util import atomic_write
from ..config import NOT_KEYED, RESUME_FREE, ModelConfig, TrainConfig, upgrade
from ..data import DATASETS
from ..flows import Glow, as_flow, check_flow, class_path, flow_signature, import_object
from ..prior import ClassGaussians

__all__ = [
    "CHECKPOINT_FORMAT",
    "COLUMNS",
    "LOCK_FILE",
    "CheckpointError",
    "RunDirBusy",
    "RunDirError",
    "build_flow",
    "checksum",
    "config_differences",
    "config_key",
    "keyed_run_dir",
    "load_checkpoint",
    "lock_run_dir",
    "prepare_flow",
    "read_checkpoint",
    "resumable_checkpoint",
    "same_flow",
    "take_run_dir",
    "unlock_run_dir",
    "write_run",
]

CHECKPOINT_FORMAT = "nfpi.train/1"
LOCK_FILE = ".nfpi.lock"  # in the run directory while a process trains there (see lock_run_dir)
# The columns of metrics.csv, one row per epoch.
COLUMNS = (
    "epoch",
    "lr",
    "train_nll",
    "train_bpd",
    "grad_norm",
    "val_nll",
    "val_bpd",
    "val_bpd_centres",
    "val_acc_top1",
    "val_acc_top5",
    "test_nll",
    "test_bpd",
    "test_bpd_centres",
    "acc_top1",
    "acc_top5",
    "solved",
    "solve_iterations",
    "solve_converged",
    "solve_bounds_active",
    "solve_time",
    "time",
)


class CheckpointError(RuntimeError):
    """A checkpoint is unreadable, not an nfpi training checkpoint, or from another run."""


class RunDirError(RuntimeError):
    """The run directory cannot be created or written, or another process is training in it."""


class RunDirBusy(RunDirError):
    """Another process holds the run directory's lock: it is training that run now."""


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def keyed_run_dir(
    root: str | os.PathLike[str], name: str, cfg: TrainConfig, model: nn.Module | None = None
) -> Path:
    """``root / "<name>-<key>"``: the run folder of ``cfg`` made by this code, keyed by the
    full config (less :data:`NOT_KEYED`) and the code fingerprint (:func:`nfpi.repro.run_key`):
    a changed parameter or library gets its own run, an identical one is reused. A flow passed
    to ``train(model=...)`` is keyed too, by its class and parameter shapes
    (:func:`nfpi.flows.flow_signature`)."""
    keyed = cfg.to_dict() if model is None else {**cfg.to_dict(), "flow": flow_signature(model)}
    return repro.run_dir(root, name, keyed, ignore=NOT_KEYED)


def config_key(cfg: TrainConfig, **extra: Any) -> str:
    """12 hex digits naming a run by its configuration alone (less :data:`NOT_KEYED`; no code
    fingerprint), with ``extra`` entries (e.g. ``trainer="native"``) keyed beside it: the key of
    a recorded result that later code reuses, the fingerprint that made it recorded beside the
    key, and a fresh run of the current code checked against it (:func:`nfpi.repro.expect_recorded`).
    Unset settings (None, empty) are left out, so that a setting added to the config later with
    such a default keeps the keys of the results recorded before it.

    Example:
        >>> cfg = TrainConfig(dataset="digits")
        >>> config_key(cfg) == config_key(cfg.replace(threads=1)) != config_key(cfg.replace(seed=1))
        True
    """
    return repro.run_key(_set({**extra, **cfg.to_dict()}), ignore=NOT_KEYED, with_code=False)


def _set(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` without its None and empty entries, at every level."""
    nested = {k: _set(v) if isinstance(v, dict) else v for k, v in values.items()}
    return {k: v for k, v in nested.items() if v is not None and v != {} and v != []}


def lock_run_dir(run_dir: Path) -> typing.IO[str]:
    """Create ``run_dir``, check that it is writable and take its advisory lock (fcntl.flock on
    :data:`LOCK_FILE`, holding the PID; released by :func:`unlock_run_dir`). The OS drops the
    lock when its process dies, so the lock file a killed run leaves behind is taken over."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=run_dir, prefix=".nfpi-write-test.")  # as the atomic writes do
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise RunDirError(
            f"run directory {run_dir} is not writable ({_first_line(err)}); choose another "
            "run directory (CLI --run-dir)"
        ) from None
    path = run_dir / LOCK_FILE
    while True:
        handle = os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT, 0o644), "r+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = handle.read().strip() or "PID not yet written"
            handle.close()
            raise RunDirBusy(
                f"run directory {run_dir} is in use by another training process ({holder}); "
                "wait for it to finish or use another run directory"
            ) from None
        except OSError as err:
            handle.close()
            raise RunDirError(
                f"cannot lock run directory {run_dir} ({_first_line(err)}); use a run "
                "directory on a local file system"
            ) from None
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


def unlock_run_dir(handle: typing.IO[str], run_dir: Path) -> None:
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


def take_run_dir(run_dir: Path, layout: Layout) -> typing.IO[str] | None:
    """Rank 0 locks ``run_dir`` (the only rank that writes files); every process raises
    together when it cannot, or the others would hang."""
    lock, problem = None, None
    if layout.rank == 0:
        try:
            lock = lock_run_dir(run_dir)
        except RunDirError as err:
            problem = err
    if layout.active:
        ok = torch.tensor([float(problem is None)], device=layout.device)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        if not bool(ok) and problem is None:
            problem = RunDirError(f"rank 0 could not take run directory {run_dir}; see its error")
    if problem is not None:
        raise problem
    return lock


def resumable_checkpoint(cfg: TrainConfig, run_dir: Path) -> dict[str, Any] | None:
    """The checkpoint in ``run_dir`` to continue, or None; CheckpointError when it belongs to
    another run (config differences outside :data:`nfpi.config.RESUME_FREE`) or other code."""
    path = run_dir / "checkpoint.pt"
    if not path.exists():
        return None
    ckpt = read_checkpoint(path)
    # Through TrainConfig, options added after the checkpoint was written get their defaults.
    diff = config_differences(TrainConfig.from_dict(upgrade(ckpt["config"])).to_dict(), cfg.to_dict())
    if diff:
        raise CheckpointError(
            f"{path} belongs to a different run ({'; '.join(diff)}). Use another run directory, "
            "or pass resume=False (CLI: --no-resume) to start over and overwrite it."
        )
    if ckpt.get("code") != repro.code_fingerprint():
        raise CheckpointError(
            f"{path} was made by other nfpi code (fingerprint {ckpt.get('code')}, now "
            f"{repro.code_fingerprint()}), so its results are not this code's. Use another run directory "
            "(nfpi.repro.run_dir names one per config and code), or pass resume=False "
            "(CLI: --no-resume) to start over and overwrite it."
        )
    if ckpt["epoch"] > cfg.epochs:
        warnings.warn(
            f"{run_dir} holds a finished {ckpt['epoch']}-epoch run and epochs={cfg.epochs} "
            f"asks for fewer: returning the metrics of epoch {cfg.epochs - 1}, but the checkpoint "
            f"holds the weights after {ckpt['epoch']} epochs. Use another run directory for a "
            f"{cfg.epochs}-epoch checkpoint.",
            stacklevel=3,
        )
    return ckpt


def _feed(h: hashlib._Hash, obj: Any) -> None:
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


def checksum(ckpt: dict[str, Any]) -> str:
    """SHA-256 of a checkpoint's contents (tensor bytes included), without its ``sha256`` entry.

    Computed on the contents rather than the file bytes so that a checkpoint stays an ordinary
    ``torch.load``-able dict; torch's zip reader checks no CRC, so flipped bytes in tensor data
    would otherwise load silently."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in ckpt.items() if k != "sha256"})
    return h.hexdigest()


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Load and verify a checkpoint (weights_only=True; its SHA-256 must match its contents)."""
    redo = (
        "delete it or restore a good copy, or start the run again in another run directory "
        "(or with resume=False, CLI --no-resume, which overwrites it)"
    )
    try:
        size = path.stat().st_size
        ckpt = torch.load(path, map_location="cpu", weights_only=True) if size else None
    except Exception as err:  # any failure to parse is a damaged file; none may escape as a traceback
        raise CheckpointError(
            f"{path} is not a readable checkpoint ({_first_line(err)}). It is probably "
            f"truncated or corrupt: {redo}."
        ) from err
    if ckpt is None:
        raise CheckpointError(f"{path} is not a readable checkpoint (it is empty, 0 bytes): {redo}.")
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        tag = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(
            f"{path} is not an nfpi training checkpoint (format {tag!r}, expected {CHECKPOINT_FORMAT!r}). "
            "Point to a run directory written by nfpi.train, or use another run directory."
        )
    if "sha256" not in ckpt:
        warnings.warn(
            f"{path} has no checksum (written before nfpi checkpoints carried one), so its "
            "contents cannot be verified; it is loaded as is. Retrain to get a verified one.",
            stacklevel=3,
        )
    elif ckpt["sha256"] != checksum(ckpt):
        raise CheckpointError(
            f"{path} fails its SHA-256 check: its contents changed after it was written "
            f"(disk or copy corruption), so its weights cannot be trusted; {redo}."
        )
    return ckpt


def config_differences(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """Keys (dotted) whose values differ, ignoring :data:`RESUME_FREE` top-level keys."""
    out = []
    for key in sorted(set(a) | set(b)):
        if not prefix and key in RESUME_FREE:
            continue
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += config_differences(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key}: {va!r} in the checkpoint, {vb!r} now")
    return out


def build_flow(cfg: ModelConfig, shape: tuple[int, int, int]) -> nn.Module:
    """The untrained flow of ``cfg`` for images (C, H, W): ``cfg.factory(shape, **cfg.kwargs)``
    when a factory is named (:func:`nfpi.flows.import_object`), else the :class:`nfpi.flows.Glow`
    of the Glow keys."""
    if cfg.factory is not None:
        return import_object(cfg.factory)(tuple(shape), **cfg.kwargs)
    return Glow(
        shape,
        levels=cfg.levels,
        steps=cfg.steps,
        hidden=cfg.hidden,
        conv=cfg.conv,
        coupling=cfg.coupling,
        blocks=cfg.blocks,
        matexp_rank=cfg.matexp_rank,
        matexp_low_rank_above=cfg.matexp_low_rank_above,
        memory=cfg.memory,
    )


def prepare_flow(
    cfg: TrainConfig, shape: tuple[int, int, int], probe: Tensor, model: nn.Module | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """The flow a run trains (``model``, else :func:`build_flow` of ``cfg.model``) checked on the
    images ``probe`` (B, C, H, W) (:func:`nfpi.flows.check_flow`) and with flat latents
    (:func:`nfpi.flows.as_flow`), and what its checkpoint records of it: its class
    (``module:qualname``), :func:`nfpi.flows.flow_signature` and latent shape."""
    flow = build_flow(cfg.model, shape) if model is None else model
    latent_shape = check_flow(flow, probe)
    info = {"class": class_path(flow), "signature": flow_signature(flow), "latent_shape": list(latent_shape)}
    return as_flow(flow, latent_shape), info


def same_flow(held: dict[str, Any] | None, given: dict[str, Any], path: Path) -> None:
    """CheckpointError unless the flow recorded in checkpoint ``path`` (``held``; None for a
    checkpoint before the flow protocol, always a Glow) has the ``given`` flow's signature."""
    if held is not None and held["signature"] != given["signature"]:
        raise CheckpointError(
            f"{path} holds another flow ({held['class']}, signature {held['signature']}) than the given "
            f"{given['class']} ({given['signature']}). Pass model= an untrained flow built as for that run, "
            "or use another run directory (keyed_run_dir(..., model=...) names one per flow) or resume=False."
        )


def write_run(
    run_dir: Path, ckpt: dict[str, Any], rows: Sequence[Mapping[str, Any]], summary: Mapping[str, Any]
) -> None:
    """Write ``checkpoint.pt`` (with its checksum), ``metrics.csv`` (``rows``, :data:`COLUMNS`)
    and ``metrics.json`` (``summary``) into ``run_dir``, each atomically."""
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt = {**ckpt, "sha256": checksum(ckpt)}
    buffer = io.BytesIO()
    torch.save(ckpt, buffer)
    atomic_write(run_dir / "checkpoint.pt", buffer.getvalue())
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(run_dir / "metrics.csv", table.getvalue().encode())
    atomic_write(run_dir / "metrics.json", json.dumps(summary, indent=2).encode())


def _flow_of(
    info: dict[str, Any] | None,
    cfg: TrainConfig,
    shape: tuple[int, int, int],
    path: Path,
    model: nn.Module | None,
) -> nn.Module:
    """The untrained flow a checkpoint's weights load into: ``model`` when given (it must have
    the recorded signature), else rebuilt from the config; flattened as in training."""
    if info is None:  # written before the flow protocol: always a Glow
        return build_flow(cfg.model, shape) if model is None else model
    if model is None and cfg.model.factory is None and info["class"] != class_path(Glow):
        raise CheckpointError(
            f"{path} holds a flow of class {info['class']} passed to train(model=...), which nfpi cannot "
            "rebuild on its own: pass an untrained instance, load_checkpoint(path, model=...) (the same "
            "for train), or train it with model.factory naming a function that builds it"
        )
    if model is None:
        try:
            model = build_flow(cfg.model, shape)
        except ValueError as err:
            raise CheckpointError(f"{path}: its flow cannot be rebuilt ({err}); pass model=...") from None
    same_flow(info, {"class": class_path(model), "signature": flow_signature(model)}, path)
    return as_flow(model, info["latent_shape"])


def load_checkpoint(
    path: str | os.PathLike[str],
    ema: bool = True,
    device: str | torch.device = "cpu",
    model: nn.Module | None = None,
) -> tuple[nn.Module, ClassGaussians, TrainConfig]:
    """The flow (EMA weights by default, eval mode), its class Gaussians (K, D) and the config of a
    ``checkpoint.pt`` (or of the run directory holding it). A config stored by older code is
    upgraded to the current layout (:func:`nfpi.config.upgrade`). The flow is rebuilt from the
    config (a Glow or ``model.factory``); a flow that was passed to ``train(model=...)`` is
    rebuilt by passing an untrained one as ``model`` (CheckpointError otherwise, saying so)."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.is_file():
        raise FileNotFoundError(
            f"no checkpoint at {path}; train a run first (nfpi.train.train or "
            "python -m nfpi.train --config ...)"
        )
    ckpt = read_checkpoint(path)
    cfg = TrainConfig.from_dict(upgrade(ckpt["config"]))
    if "shape" in ckpt:  # the flow's input (C, H, W), as trained
        c, h, w = ckpt["shape"]
    else:  # checkpoints before datasets were read from the data: registered datasets only
        c, h, w = DATASETS[cfg.dataset].shape
        h, w = h + 2 * cfg.pad + cfg.codes.rows, w + 2 * cfg.pad
    model = _flow_of(ckpt.get("flow"), cfg, (c, h, w), path, model)
    if ema:
        state = {k.removeprefix("module."): v for k, v in ckpt["ema"].items() if k.startswith("module.")}
    else:
        state = ckpt["model"]
    model.load_state_dict(state)
    gaussians = ClassGaussians(ckpt["prior"]["means"], ckpt["prior"]["variances"])
    return model.to(device).eval(), gaussians.to(device), cfg
