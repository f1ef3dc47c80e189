"""Cost of the training checkpoint's SHA-256 against plain ``torch.save`` / ``torch.load``.

The checkpoint of :mod:`nfpi.train` holds the flow, its EMA copy, the Adamax state and the
class Gaussians; its checksum hashes every tensor's bytes (:func:`nfpi.train.checksum`). This
script builds that checkpoint for a Glow (default: the paper's CIFAR-10 size, 3 levels x 8
steps, 128 hidden channels) and times, alternating, in the same run:

- save: ``torch.save`` to memory, and ``torch.save`` + checksum (what ``_Run.save`` does);
- load: ``torch.load`` of the file, and ``read_checkpoint`` (load + verify).

It prints the medians and the ratios (with / without the checksum).

    python benchmarks/bench_checkpoint.py              # paper size, ~1 minute on one core
    python benchmarks/bench_checkpoint.py --small      # 2 x 4 x 32 digits-sized flow, seconds
    python benchmarks/bench_checkpoint.py --smoke      # the small flow, one repeat (make test)
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time
from pathlib import Path

import torch

from nfpi.flows import Glow
from nfpi.train import CHECKPOINT_FORMAT, checksum, read_checkpoint

SMOKE = {"small": True, "repeats": 1}  # --smoke: these defaults (explicit arguments still win)


def build(small: bool) -> dict:
    shape, levels, steps, hidden = ((1, 8, 8), 2, 4, 32) if small else ((3, 32, 32), 3, 8, 128)
    torch.manual_seed(0)
    model = Glow(shape, levels=levels, steps=steps, hidden=hidden)
    opt = torch.optim.Adamax(model.parameters(), lr=1e-3)
    z, logdet = model(torch.rand(2, *shape) * 2 - 1)
    (z.pow(2).sum() - logdet.sum()).backward()  # one step so that Adamax has its state
    opt.step()
    state = model.state_dict()
    ema = {f"module.{k}": v.clone() for k, v in state.items()} | {"n_averaged": torch.tensor(1)}
    return {
        "format": CHECKPOINT_FORMAT,
        "epoch": 1,
        "config": {},
        "model": state,
        "ema": ema,
        "optimizer": opt.state_dict(),
        "rng": torch.get_rng_state(),
        "metrics": [],
        "solves": [],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="a digits-sized flow instead of the paper's")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="the small flow, one repeat (seconds)")
    if parser.parse_known_args()[0].smoke:
        parser.set_defaults(**SMOKE)
    args = parser.parse_args()
    ckpt = build(args.small)
    size = sum(t.numel() * t.element_size() for t in ckpt["model"].values())
    times: dict[str, list[float]] = {"save": [], "save+sha256": [], "load": [], "load+verify": []}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "checkpoint.pt"
        for _ in range(args.repeats):
            start = time.perf_counter()
            torch.save(ckpt, io.BytesIO())
            times["save"].append(time.perf_counter() - start)
            start = time.perf_counter()
            signed = {**ckpt, "sha256": checksum(ckpt)}
            buffer = io.BytesIO()
            torch.save(signed, buffer)
            times["save+sha256"].append(time.perf_counter() - start)
            path.write_bytes(buffer.getvalue())
            start = time.perf_counter()
            torch.load(path, map_location="cpu", weights_only=True)
            times["load"].append(time.perf_counter() - start)
            start = time.perf_counter()
            read_checkpoint(path)
            times["load+verify"].append(time.perf_counter() - start)
        file_mb = path.stat().st_size / 2**20
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"checkpoint: {file_mb:.1f} MiB on disk (flow weights {size / 2**20:.1f} MiB), "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats}"
    )
    for key, value in med.items():
        print(f"  {key:12s} {value * 1e3:8.1f} ms")
    print(f"ratio save+sha256 / save: {med['save+sha256'] / med['save']:.2f}")
    print(f"ratio load+verify / load: {med['load+verify'] / med['load']:.2f}")


if __name__ == "__main__":
    main()
