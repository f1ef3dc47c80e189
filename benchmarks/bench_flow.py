"""Training throughput of nfpi's Glow (SPEC §4) against normflows' Glow blocks.

One training step = forward x -> z, mean NLL under N(0, I) (paper Eq. 1 with a
single standard Gaussian; the class Gaussians do not change the cost), backward,
Adamax step. Both models are built with the same skeleton: ``levels`` levels of
squeeze + ``steps`` steps (ActNorm, LU 1x1 conv, affine coupling) with half the
channels split off after every level but the last. normflows' stock GlowBlock
uses a conv3x3 -> conv1x1 -> conv3x3 coupling net; ours (``blocks=1``) is
conv3x3 -> [conv3x3 -> conv1x1 + skip] -> conv3x3, so normflows is given a
``nets.ConvNet2d`` with kernels (3, 3, 1, 3) and the same widths: both models
then run the same convolutions (the FLOP counts printed below confirm it).
normflows is driven in its normalizing direction (``inverse``), the one its
``MultiscaleFlow.forward_kld`` trains with.

The machine's float32 matmul rate (large ``torch.mm``) is measured too, and
the fraction of it reached by our training step is reported, with the step's
FLOPs counted by ``torch.utils.flop_counter.FlopCounterMode``.

Timing alternates the two models step by step and reports the median and the
best step of each, so load from other processes affects both alike; the ratio
is also given by process CPU time, which time spent descheduled does not
inflate. On a busy machine ``--threads 1`` gives the steadiest numbers (two
OpenMP threads stall whenever the other core is taken).

    python benchmarks/bench_flow.py                 # CPU-sized, ~1-2 minutes
    python benchmarks/bench_flow.py --paper         # paper size: 3 levels, 8 steps, 128 hidden
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nfpi.flows import Glow  # noqa: E402


class NormflowsGlow(nn.Module):
    """Multi-scale Glow from normflows layers, mapping x (B, C, H, W) to (z (B, D), logdet (B,))."""

    def __init__(
        self, in_shape: tuple[int, int, int], levels: int, steps: int, hidden: int
    ) -> None:
        import normflows as nf

        super().__init__()
        channels = in_shape[0]
        self.levels = nn.ModuleList()
        for level in range(levels):
            channels *= 4
            blocks = []
            for _ in range(steps):
                with warnings.catch_warnings():
                    # normflows' LU init calls the deprecated torch.lu; not our concern here.
                    warnings.simplefilter("ignore", UserWarning)
                    block = nf.flows.GlowBlock(
                        channels, hidden, scale=True, scale_map="sigmoid", split_mode="channel",
                        use_lu=True,
                    )
                # Same convolutions as nfpi's CouplingNet(blocks=1): see the module docstring.
                coupling = block.flows[0].flows[1]
                coupling.param_map = nf.nets.ConvNet2d(
                    ((channels + 1) // 2, hidden, hidden, hidden, 2 * (channels // 2)),
                    (3, 3, 1, 3),
                )
                blocks.append(block)
            self.levels.append(nn.ModuleList([nf.flows.Squeeze(), *blocks]))
            if level < levels - 1:
                channels //= 2

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x: (B, C, H, W) -> (z (B, D), logdet (B,)) via each flow's normalizing ``inverse``."""
        parts = []
        logdet = x.new_zeros(x.shape[0])
        for index, level in enumerate(self.levels):
            for flow in level:
                x, layer_logdet = flow.inverse(x)
                logdet = logdet + layer_logdet
            if index < len(self.levels) - 1:
                x, factored = x.chunk(2, dim=1)
                parts.append(factored.flatten(1))
        parts.append(x.flatten(1))
        return torch.cat(parts, dim=1), logdet


def nll(z: Tensor, logdet: Tensor) -> Tensor:
    """Mean negative log-likelihood under N(0, I); z (B, D), logdet (B,) -> scalar."""
    log_norm = 0.5 * z.shape[1] * math.log(2 * math.pi)
    return (0.5 * z.pow(2).sum(1) + log_norm - logdet).mean()


def make_step(model: nn.Module, x: Tensor, lr: float) -> Callable[[], None]:
    """One training step on the fixed batch x, as a closure."""
    optimizer = torch.optim.Adamax(model.parameters(), lr=lr)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        nll(*model(x)).backward()
        optimizer.step()

    return step


def step_flops(model: nn.Module, x: Tensor) -> int:
    """FLOPs of forward + backward of the NLL (matmuls/convs, as FlopCounterMode counts)."""
    counter = FlopCounterMode(display=False)
    with counter:
        nll(*model(x)).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def matmul_flop_rate(n: int, seconds: float) -> float:
    """float32 FLOP/s of an n x n @ n x n torch.mm, best of repeated timings."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = math.inf
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def main() -> None:
    """Parse arguments, build both models, time them alternately and print the report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--shape", type=int, nargs=3, default=(3, 32, 32), metavar=("C", "H", "W"))
    parser.add_argument("--levels", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4, help="flow steps per level")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--conv", choices=("lu", "matexp"), default="lu",
                        help="our 1x1 conv (normflows always uses LU)")
    parser.add_argument("--paper", action="store_true",
                        help="paper size: levels=3, steps=8, hidden=128")
    parser.add_argument("--iters", type=int, default=8,
                        help="timed training steps per model (the models alternate step by step)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--mm-size", type=int, default=2048)
    parser.add_argument("--no-normflows", action="store_true", help="time only our Glow")
    args = parser.parse_args()
    if args.paper:
        args.levels, args.steps, args.hidden = 3, 8, 128

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    in_shape = tuple(args.shape)
    x = torch.rand(args.batch, *in_shape) * 2 - 1

    models = {"nfpi": Glow(in_shape, args.levels, args.steps, args.hidden, conv=args.conv)}
    if not args.no_normflows:
        models["normflows"] = NormflowsGlow(in_shape, args.levels, args.steps, args.hidden)
    print(f"config: batch={args.batch} shape={in_shape} levels={args.levels} steps={args.steps} "
          f"hidden={args.hidden} conv={args.conv} threads={args.threads} torch={torch.__version__}")

    flops, steps_fn = {}, {}
    for name, model in models.items():
        with torch.no_grad():
            model(x)  # ActNorm data-dependent init
        params = sum(p.numel() for p in model.parameters())
        flops[name] = step_flops(model, x)
        steps_fn[name] = make_step(model, x, lr=1e-3)
        steps_fn[name]()  # warm-up
        print(f"{name:>9}: {params / 1e6:.3f} M parameters, "
              f"{flops[name] / args.batch / 1e9:.3f} GFLOP per image per step")

    times: dict[str, list[float]] = {name: [] for name in models}
    cpu_times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.iters):
        for name, step in steps_fn.items():
            start, cpu_start = time.perf_counter(), time.process_time()
            step()
            times[name].append(time.perf_counter() - start)
            cpu_times[name].append(time.process_time() - cpu_start)

    mm_rate = matmul_flop_rate(args.mm_size, seconds=3.0)
    print(f"float32 matmul ({args.mm_size}^3): {mm_rate / 1e9:.1f} GFLOP/s")
    rate, best_rate = {}, {}
    for name in models:
        median, best = statistics.median(times[name]), min(times[name])
        rate[name], best_rate[name] = args.batch / median, args.batch / best
        achieved = flops[name] / median
        print(f"{name:>9}: {rate[name]:8.1f} images/s median ({best_rate[name]:.1f} best step), "
              f"median step {median * 1e3:.1f} ms, {achieved / 1e9:.1f} GFLOP/s "
              f"= {achieved / mm_rate:.1%} of matmul rate")
    if "normflows" in rate:
        cpu = {name: statistics.median(cpu_times[name]) for name in models}
        print(f"ratio nfpi/normflows (images/s): {rate['nfpi'] / rate['normflows']:.3f} median, "
              f"{best_rate['nfpi'] / best_rate['normflows']:.3f} best step, "
              f"{cpu['normflows'] / cpu['nfpi']:.3f} by median CPU time per step")


if __name__ == "__main__":
    main()
