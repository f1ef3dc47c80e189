"""One-command check of the GPU path (run through ``scripts/gpu_check.sh``); writes a JSON summary.

1. ``flow``: float64 checks of the Glow on the device (paper Sec. 3 layers; both 1x1
   convolutions): the inverse reconstructs the input, and the log-determinant equals
   log|det J| of the autograd Jacobian.
2. ``fpi``: the FPI fixed point (paper Eqs. 5-7) solved from class statistics held on the
   device is stationary (relative gradient residual of J <= 1e-6) and equals the CPU solution.
3. ``train``: the training steps of :mod:`nfpi.train` (the real loop: data loader, bf16
   autocast, EMA) on CIFAR-10 with the paper model (``configs/cifar10.yaml``: 3 levels x 8
   steps, 128 hidden) at batch 512, for a fixed number of steps, in float32 (PyTorch's default
   TF32 convolutions), bf16 autocast, bf16 + channels_last and bf16 + torch.compile: images/s,
   peak GPU memory, and the loss. One epoch of ``steps`` steps warms up (cuDNN autotuning,
   compilation), a second is timed; the default 97 steps x 512 images is one CIFAR-10 epoch, so
   its time (data loader start included) is the training time of an epoch.
   The real images are used when ``$NFPI_DATA`` holds them, else uniform random images of
   the same shape (the speed does not depend on the pixels; the loss then means nothing).
4. ``torchrun``: ``torchrun --standalone --nproc_per_node 1 -m nfpi.train`` on digits for one
   epoch, which opens a process group (NCCL on a GPU, gloo on a CPU), trains under DDP,
   all-reduces the class statistics and gathers the test metrics.

``--smoke`` shrinks everything (tiny model, batch 8, 2 steps; compile with TorchDynamo's
eager backend, since CPU code generation takes minutes) so that ``--device cpu --smoke``
checks the script itself in seconds.

    python scripts/gpu_check.py --device cuda --out runs/gpu_check.json
    python scripts/gpu_check.py --device cpu --smoke --out /tmp/gpu_check.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from nfpi import data

# nfpi.train's internal run object: the timed steps are those of the real training loop.
from nfpi._ddp import setup_distributed
from nfpi.config import TrainConfig
from nfpi.flows import Glow
from nfpi.prior import ClassStats, fpi, gradient_residual
from nfpi.train import build_flow
from nfpi.train.loop import _Run

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {  # name -> TrainConfig settings
    "fp32": {},
    "bf16": {"amp": True},
    "bf16_channels_last": {"amp": True, "channels_last": True},
    "bf16_compiled": {"amp": True, "compile": True},
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- 1. flow
def check_flow(device: torch.device) -> dict[str, Any]:
    """float64 inverse and log-determinant of a small Glow, per 1x1 convolution."""
    out = {}
    for conv in ("lu", "matexp"):
        torch.manual_seed(0)
        model = Glow((2, 4, 4), levels=2, steps=2, hidden=8, conv=conv).to(device, torch.float64)
        x = torch.rand(16, 2, 4, 4, device=device, dtype=torch.float64) * 2 - 1
        model(x)  # ActNorm data init
        with torch.no_grad():  # move off the identity-like init so every layer matters
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        with torch.no_grad():
            z, logdet = model(x)
            inverse_error = float((model.inverse(z) - x).abs().max())
        x0 = x[:1]
        jac = torch.autograd.functional.jacobian(
            lambda v, model=model, x0=x0: model(v.view_as(x0))[0].flatten(), x0.flatten()
        )
        logdet_error = float((torch.linalg.slogdet(jac)[1] - logdet[0]).abs())
        out[conv] = {
            "inverse_max_abs_error": inverse_error,
            "logdet_abs_error": logdet_error,
            "ok": inverse_error < 1e-9 and logdet_error < 1e-8,
        }
    out["ok"] = all(r["ok"] for r in out.values())
    return out


# ----------------------------------------------------------------------------- 2. FPI
def check_fpi(device: torch.device) -> dict[str, Any]:
    """FPI solved from statistics on ``device``: stationary, and equal to the CPU solve."""
    g = torch.Generator().manual_seed(0)
    k, d, lam = 10, 64, 50.0
    y = torch.arange(k).repeat_interleave(40)
    z = (
        torch.randn(len(y), d, generator=g, dtype=torch.float64)
        + 0.7 * torch.randn(k, d, generator=g, dtype=torch.float64)[y]
    )
    on_device = fpi.solve(ClassStats.from_latents(z.to(device), y.to(device), k), lam)
    on_cpu = fpi.solve(ClassStats.from_latents(z, y, k), lam)
    residual = float(
        gradient_residual(
            ClassStats.from_latents(z, y, k), on_device.means.cpu(), on_device.variances.cpu(), lam
        )
    )
    gap = float((on_device.means.cpu() - on_cpu.means).abs().max())
    return {
        "device": str(on_device.means.device),
        "iterations": on_device.iterations,
        "converged": bool(on_device.converged),
        "gradient_residual": residual,
        "max_abs_diff_vs_cpu": gap,
        "ok": bool(on_device.converged) and residual < 1e-6 and gap < 1e-8,
    }


# ----------------------------------------------------------------------------- 3. training speed
def flops_per_image(cfg: TrainConfig, shape: tuple[int, int, int]) -> dict[str, float]:
    """GFLOP per image of the flow of ``cfg``: forward, and a training step (forward + backward
    of the NLL), counted by torch.utils.flop_counter on the CPU (convolutions and matmuls)."""
    torch.manual_seed(0)
    model = build_flow(cfg.model, shape)
    x = torch.rand(2, *shape) * 2 - 1
    with torch.no_grad():
        model(x)  # ActNorm init, not counted
    with FlopCounterMode(display=False) as forward, torch.no_grad():
        model(x)
    with FlopCounterMode(display=False) as step:
        z, logdet = model(x)
        (0.5 * z.pow(2).sum() - logdet.sum()).backward()
    return {"forward_gflop": forward.get_total_flops() / 2e9, "train_gflop": step.get_total_flops() / 2e9}


def _synthetic_cifar10(root: Path, per_class: int) -> None:
    """Uniform random CIFAR-10-shaped npz files as in docs/method.md §9 (10 test images a class)."""
    g = np.random.default_rng(0)
    classes = np.array([str(c) for c in range(10)])
    for split, n in (("train", per_class), ("test", 10)):
        y = np.repeat(np.arange(10), n)
        x = g.integers(0, 256, (len(y), 32, 32, 3), dtype=np.uint8)
        np.savez(root / f"cifar10_{split}.npz", x=x, y=y, classes=classes)


def bench_training(
    device: torch.device, steps: int, batch: int, smoke: bool, data_dir: str | None, workdir: Path
) -> dict[str, Any]:
    """images/s, peak memory and loss of the training loop for every entry of VARIANTS."""
    per_class = -(-steps * batch // 10)  # ceil: at least ``steps`` full batches
    overrides: dict[str, Any] = {
        "epochs": 2,
        "batch_size": batch,
        "per_class": per_class,
        "test_per_class": 10,
        "device": device.type,
        "gaussians.prior": "standard",  # no solve: only the training steps are timed
    }
    if smoke:
        overrides.update(
            {"model.steps": 1, "model.hidden": 8, "num_workers": 0, "init_images": 16, "eval_batch_size": 64}
        )
    cfg0 = TrainConfig.from_yaml(REPO / "configs" / "cifar10.yaml", **overrides)
    source = "real"
    try:
        if smoke:
            raise FileNotFoundError("smoke runs use synthetic images")
        data.load("cifar10", "test", data_dir)
    except FileNotFoundError:
        data_dir, source = str(workdir / "synthetic"), "synthetic"
        Path(data_dir).mkdir(exist_ok=True)
        _synthetic_cifar10(Path(data_dir), per_class)
    flops = flops_per_image(cfg0, data.DATASETS["cifar10"].shape)
    results: dict[str, Any] = {
        "data": source,
        "batch": batch,
        "steps": steps,
        "model": dataclasses.asdict(cfg0.model),
        **flops,
    }
    for name, settings in VARIANTS.items():
        cfg = cfg0.replace(data_dir=data_dir, **settings)
        try:
            results[name] = _time_variant(cfg, device, smoke, workdir / name)
            results[name]["achieved_tflops"] = results[name]["images_per_s"] * flops["train_gflop"] / 1e3
        except Exception as err:  # report and go on: the other variants still say something
            results[name] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
    return results


def _time_variant(cfg: TrainConfig, device: torch.device, smoke: bool, run_dir: Path) -> dict[str, Any]:
    compile_fn = torch.compile
    if smoke and cfg.compile:  # CPU code generation takes minutes; Dynamo's graph capture is checked
        torch.compile = lambda module, **kw: compile_fn(module, backend="eager")  # type: ignore[assignment]
    try:
        run = _Run(cfg, run_dir, setup_distributed(cfg.device), progress=False, model=None)
        run.initialise()
        net = run.network()
        start = time.perf_counter()
        run._train_epoch(net, 0)  # warm-up: cuDNN autotuning, compilation
        _sync(device)
        warmup = time.perf_counter() - start
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        row = run._train_epoch(net, 1)
        _sync(device)
        seconds = time.perf_counter() - start
    finally:
        torch.compile = compile_fn
    images = cfg.batch_size * (len(run.nf_set) // cfg.batch_size)
    return {
        "images_per_s": images / seconds,
        "step_ms": 1e3 * seconds * cfg.batch_size / images,
        "epoch_s": seconds,
        "warmup_s": warmup,
        "peak_memory_gib": (
            torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        ),
        "train_nll": row["train_nll"],
        "train_bpd": row["train_bpd"],
    }


# ----------------------------------------------------------------------------- 4. torchrun
def torchrun_smoke(device: torch.device, workdir: Path) -> dict[str, Any]:
    """One-process torchrun of nfpi.train on digits: process group, DDP, collectives."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "1",
        "-m",
        "nfpi.train",
        "--config",
        str(REPO / "configs" / "digits_cpu.yaml"),
        "--run-dir",
        str(workdir / "torchrun"),
        "--no-progress",
        "--no-resume",
        "epochs=1",
        "per_class=30",
        "batch_size=60",
        "init_images=120",
        "model.levels=2",
        "model.steps=2",
        "model.hidden=8",
        f"device={device.type}",
        "threads=1",
    ]
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    }
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    out: dict[str, Any] = {"returncode": proc.returncode, "seconds": time.perf_counter() - start}
    try:
        metrics = json.loads((workdir / "torchrun" / "metrics.json").read_text())["metrics"]
        out.update(test_bpd=metrics["test_bpd"], acc_top1=metrics["acc_top1"])
    except (OSError, ValueError, KeyError):
        out["stderr_tail"] = proc.stderr[-3000:]
    out["ok"] = proc.returncode == 0 and "test_bpd" in out
    return out


# ----------------------------------------------------------------------------- main
def _section(summary: dict[str, Any], name: str, fn: Callable[[], dict[str, Any]]) -> None:
    start = time.perf_counter()
    try:
        summary[name] = fn()
    except Exception as err:
        summary[name] = {
            "ok": False,
            "error": f"{type(err).__name__}: {err}",
            "traceback": traceback.format_exc(),
        }
    summary[name]["seconds"] = summary[name].get("seconds", time.perf_counter() - start)
    print(f"[gpu_check] {name}: {json.dumps(summary[name], default=str)[:1500]}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script in seconds")
    parser.add_argument(
        "--steps", type=int, help="timed training steps per variant (default 97: one CIFAR-10 epoch; smoke 2)"
    )
    parser.add_argument("--batch", type=int, help="training batch (default 512, the paper's; smoke 8)")
    parser.add_argument("--data-dir", help="directory of cifar10_*.npz (default $NFPI_DATA)")
    parser.add_argument("--out", default="runs/gpu_check.json", help="JSON summary path")
    parser.add_argument(
        "--flops",
        action="store_true",
        help="only print the GFLOP per image of the paper configs (any machine) and exit",
    )
    args = parser.parse_args(argv)
    if args.flops:
        for name in ("cifar10", "cifar100", "mnist"):
            cfg = TrainConfig.from_yaml(REPO / "configs" / f"{name}.yaml")
            c, h, w = data.DATASETS[name].shape
            shape = (c, h + 2 * cfg.pad + cfg.codes.rows, w + 2 * cfg.pad)
            print(
                f"{name}: {shape}, {json.dumps(dataclasses.asdict(cfg.model))}: "
                f"{json.dumps({k: round(v, 3) for k, v in flops_per_image(cfg, shape).items()})}"
            )
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available; use --device cpu --smoke")
    device = torch.device(args.device)
    steps = args.steps or (2 if args.smoke else 97)
    batch = args.batch or (8 if args.smoke else 512)
    summary: dict[str, Any] = {
        "device": (
            torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
        ),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "smoke": args.smoke,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check.") as tmp:
        work = Path(tmp)
        _section(summary, "flow", lambda: check_flow(device))
        _section(summary, "fpi", lambda: check_fpi(device))
        _section(
            summary, "train", lambda: bench_training(device, steps, batch, args.smoke, args.data_dir, work)
        )
        _section(summary, "torchrun", lambda: torchrun_smoke(device, work))
    train = summary["train"]
    summary["train"]["ok"] = all("images_per_s" in train.get(v, {}) for v in VARIANTS)
    summary["ok"] = all(summary[s].get("ok") for s in ("flow", "fpi", "train", "torchrun"))
    summary["seconds"] = time.perf_counter() - start
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2, default=str))
    for name in VARIANTS:
        r = train.get(name, {})
        if "images_per_s" in r:
            mem = "-" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.2f} GiB"
            print(
                f"[gpu_check] {name:>20}: {r['images_per_s']:9.1f} images/s  "
                f"{r['achieved_tflops']:7.2f} TFLOP/s  peak {mem}  train bits/dim {r['train_bpd']:.3f}"
            )
    print(f"[gpu_check] {'ok' if summary['ok'] else 'FAILED'} in {summary['seconds']:.1f} s -> {out}")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
