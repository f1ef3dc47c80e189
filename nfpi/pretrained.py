"""Pretrained flows shipped with the repository: export, verify, load.

A shipped flow is one file under ``checkpoints/`` holding the EMA weights of a trained Glow,
its class Gaussians (the prior of docs/method.md §3, as learned by FPI or set from the data) and its
config; ``checkpoints/manifest.yaml`` records, for each name, the file's SHA-256, the data set,
the test NF accuracy (top-1 / top-5, docs/method.md §6.1) and bits/dim (the dequantisation bound) measured
when it was exported, and the commands that made it. :func:`load` refuses a file whose hash
differs from the manifest's.

Example:
    >>> from nfpi import pretrained
    >>> model, prior, cfg = pretrained.load("digits")
    >>> "digits" in pretrained.names(), cfg.dataset, prior.num_classes
    (True, 'digits', 10)

Make one from a finished run (``python -m nfpi.pretrained export RUN NAME --command "..."``)
and re-check every shipped flow on its test set (``python -m nfpi.pretrained check``).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
from pathlib import Path
from typing import Any

import torch
import yaml

from . import repro
from ._util import atomic_write
from .config import TrainConfig, upgrade
from .evaluation import evaluate_flow
from .flows import Glow
from .prior import ClassGaussians
from .train import build_flow, load_checkpoint, load_data

__all__ = [
    "PretrainedError",
    "check",
    "evaluate_shipped",
    "export",
    "load",
    "manifest",
    "names",
    "root",
    "tolerance",
]

FORMAT = "nfpi.pretrained/1"
MANIFEST = "manifest.yaml"
MAX_BYTES = 10 * 2**20  # shipped files stay small enough for the repository
RECORDED = ("acc_top1", "acc_top5", "test_bpd")
# How far a re-evaluation of fixed weights may land from the manifest on another processor:
# float32 rounding moves bits/dim by ~1e-6 and can flip the top class of a near-tie image, so
# accuracies get two test images and bits/dim 5e-4 (the manifest rounds to 1e-4).
# tests/test_portability.py checks both cover the spread measured on 12 emulated machines
# (results/portability.csv, scripts/portability.py) with a margin.
TOLERANCE_IMAGES = 2
TOLERANCE_BPD = 5e-4


class PretrainedError(RuntimeError):
    """A shipped flow is missing, unknown, or fails its SHA-256 check."""


def root() -> Path:
    """The folder of the shipped flows: ``$NFPI_CHECKPOINTS``, else ``checkpoints/`` beside the
    package (the repository's)."""
    return Path(os.environ.get("NFPI_CHECKPOINTS") or Path(__file__).resolve().parent.parent / "checkpoints")


def manifest(folder: str | os.PathLike[str] | None = None) -> dict[str, dict[str, Any]]:
    """The manifest: name -> entry (file, sha256, dataset, config, recorded metrics, commands)."""
    path = Path(folder or root()) / MANIFEST
    if not path.is_file():
        return {}
    return yaml.safe_load(path.read_text()) or {}


def names(folder: str | os.PathLike[str] | None = None) -> list[str]:
    """Names of the shipped flows."""
    return list(manifest(folder))


def _sha256(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


def _entry(name: str, folder: Path) -> dict[str, Any]:
    entries = manifest(folder)
    if name not in entries:
        raise PretrainedError(
            f"no shipped flow named {name!r} in {folder / MANIFEST}; the shipped ones are "
            f"{', '.join(entries) or 'none'}"
        )
    return entries[name]


def load(
    name: str, device: str | torch.device = "cpu", folder: str | os.PathLike[str] | None = None
) -> tuple[Glow, ClassGaussians, TrainConfig]:
    """The shipped flow ``name`` (eval mode, EMA weights), its class Gaussians and its config.

    The file's SHA-256 must equal the manifest's, else :class:`PretrainedError` (the file was
    changed or damaged: ``git checkout checkpoints/`` restores it). Loaded with
    ``weights_only=True``.
    """
    folder = Path(folder or root())
    entry = _entry(name, folder)
    path = folder / entry["file"]
    if not path.is_file():
        raise PretrainedError(
            f"{path} is missing (listed in {folder / MANIFEST}); restore it with `git checkout checkpoints/`"
        )
    payload = path.read_bytes()
    if _sha256(payload) != entry["sha256"]:
        raise PretrainedError(
            f"{path} fails its SHA-256 check against {folder / MANIFEST} (expected "
            f"{entry['sha256'][:16]}..., got {_sha256(payload)[:16]}...): the file changed "
            "after it was shipped; restore it with `git checkout checkpoints/`"
        )
    saved = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    if saved.get("format") != FORMAT:
        raise PretrainedError(
            f"{path} is not a shipped nfpi flow (format {saved.get('format')!r}, expected {FORMAT!r})"
        )
    cfg = TrainConfig.from_dict(upgrade(saved["config"]))
    model = build_flow(cfg.model, tuple(saved["shape"]))
    model.load_state_dict(saved["flow"])
    prior = ClassGaussians(saved["prior"]["means"], saved["prior"]["variances"])
    return model.to(device).eval(), prior.to(device), cfg


def evaluate_shipped(
    name: str, folder: str | os.PathLike[str] | None = None, batch_size: int = 500
) -> dict[str, float]:
    """Test metrics of the shipped flow ``name`` recomputed on its config's whole test set."""
    model, prior, cfg = load(name, folder=folder)
    _, test_set = load_data(cfg)
    return evaluate_flow(model, prior, test_set, cfg.bits, batch_size)


def export(
    run_dir: str | os.PathLike[str], name: str, command: str, folder: str | os.PathLike[str] | None = None
) -> dict[str, Any]:
    """Ship the EMA flow of a finished run as ``name``: write ``<folder>/<name>.pt`` (atomic),
    measure its test metrics, and record both in the manifest. ``command`` is what made the
    run (it goes into the manifest next to the export command)."""
    folder = Path(folder or root())
    folder.mkdir(parents=True, exist_ok=True)
    model, prior, cfg = load_checkpoint(run_dir)
    saved = {
        "format": FORMAT,
        "name": name,
        "config": cfg.to_dict(),
        "shape": list(model.in_shape),
        "flow": model.state_dict(),
        "prior": {"means": prior.means, "variances": prior.variances},
    }
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    payload = buffer.getvalue()
    if len(payload) > MAX_BYTES:
        raise PretrainedError(
            f"{name}: {len(payload) / 2**20:.1f} MB is over the {MAX_BYTES / 2**20:.0f} MB "
            "limit for shipped flows; ship a smaller model"
        )
    atomic_write(folder / f"{name}.pt", payload)
    _, test_set = load_data(cfg)
    metrics = evaluate_flow(model, prior, test_set, cfg.bits)
    entries = manifest(folder)
    entries[name] = {
        "file": f"{name}.pt",
        "sha256": _sha256(payload),
        "bytes": len(payload),
        "dataset": cfg.dataset,
        "test_images": len(test_set),
        **{k: round(float(metrics[k]), 4) for k in RECORDED},
        "code": repro.code_fingerprint(),
        "commands": [command, f"python -m nfpi.pretrained export {run_dir} {name}"],
        "config": cfg.to_dict(),
    }
    atomic_write(folder / MANIFEST, yaml.safe_dump(entries, sort_keys=False).encode())
    return entries[name]


def tolerance(entry: dict[str, Any], metric: str) -> float:
    """How far ``metric`` of the manifest ``entry`` may move on another machine
    (:data:`TOLERANCE_IMAGES` test images for accuracies, :data:`TOLERANCE_BPD` for bits/dim)."""
    if metric.startswith("acc"):
        return 100 * TOLERANCE_IMAGES / entry["test_images"]
    return TOLERANCE_BPD


def check(folder: str | os.PathLike[str] | None = None) -> dict[str, dict[str, float]]:
    """Re-evaluate every shipped flow on its test set and :func:`nfpi.repro.expect` each recorded
    metric within its :func:`tolerance` (a :class:`nfpi.repro.ResultMismatch` when one lies
    outside); name -> {metric: (recorded, now)}."""
    out = {}
    for name, entry in manifest(folder).items():
        now = evaluate_shipped(name, folder)
        for k in RECORDED:
            tol = tolerance(entry, k)
            repro.expect(f"{name} {k}", now[k], entry[k], tol, f"{tol:.4f}: float32 rounding on another CPU")
        out[name] = {k: (entry[k], now[k]) for k in RECORDED}
    return out


def main(argv: list[str] | None = None) -> None:
    """``python -m nfpi.pretrained {export RUN NAME --command CMD | check | list}``."""
    parser = argparse.ArgumentParser(prog="python -m nfpi.pretrained", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="action", required=True)
    ex = sub.add_parser("export", help="ship the EMA flow of a finished run")
    ex.add_argument("run")
    ex.add_argument("name")
    ex.add_argument("--command", required=True, help="the command that trained the run (recorded)")
    sub.add_parser("check", help="re-evaluate every shipped flow against the manifest")
    sub.add_parser("list", help="names and recorded metrics")
    args = parser.parse_args(argv)
    try:
        if args.action == "export":
            print(yaml.safe_dump({args.name: export(args.run, args.name, args.command)}, sort_keys=False))
        elif args.action == "check":
            check()
        else:
            for name, entry in manifest().items():
                print(
                    f"{name}: {entry['dataset']}, NF-Acc {entry['acc_top1']:.2f} %, "
                    f"bits/dim {entry['test_bpd']:.4f}"
                )
    except (PretrainedError, FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
