"""Training throughput of nfpi's Glow (docs/method.md §4.5) against normflows' Glow blocks.

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

Our Glow is timed in both memory modes (``memory="standard"`` and
``"reversible"``, same weights) alongside normflows. Peak memory of one training
step is measured for all three, each in a fresh subprocess: the rise of the
process's peak resident set (VmHWM, reset through /proc/self/clear_refs just
before the step) above its resident set after model, gradients and optimizer
state exist, with glibc's mmap threshold fixed so that freed tensors go back to
the OS. From the per-image bytes the largest batch that fits a 24 GB and an 80 GB
GPU is estimated (no GPU here: CPU-measured activations, plus weights, gradients,
two Adamax states and the EMA copy; cuDNN workspaces not counted).

``--report coupling`` times a training step with the matrix-exponential coupling
(``coupling="matexp"``) and with the whole Matrix Exponential Flow (its matexp 1x1 conv too)
against the affine coupling, and the batched matrix
exponential of bounded c2 x c2 matrices by ``torch.linalg.matrix_exp`` against a
scaling-and-squaring Taylor series (accuracy against float64, forward+backward time).

Timing alternates the two models step by step and reports the median and the
best step of each, so load from other processes affects both alike; the ratio
is also given by process CPU time, which time spent descheduled does not
inflate. On a busy machine ``--threads 1`` gives the steadiest numbers (two
OpenMP threads stall whenever the other core is taken).

    python benchmarks/bench_flow.py                 # CPU-sized, ~1-2 minutes
    python benchmarks/bench_flow.py --paper --batch 8   # paper size: 3 levels, 8 steps, 128 hidden
    python benchmarks/bench_flow.py --report coupling   # MEF coupling and matrix exponential
    python benchmarks/bench_flow.py --smoke             # every report at toy size, seconds (make test)

Without normflows installed (``pip install -e '.[bench]'``) its peer is skipped, with a note.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nfpi.flows import Glow, expm_series, saved_activation_bytes


class NormflowsGlow(nn.Module):
    """Multi-scale Glow from normflows layers, mapping x (B, C, H, W) to (z (B, D), logdet (B,))."""

    def __init__(self, in_shape: tuple[int, int, int], levels: int, steps: int, hidden: int) -> None:
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
                        channels,
                        hidden,
                        scale=True,
                        scale_map="sigmoid",
                        split_mode="channel",
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


MODES = ("standard", "reversible", "normflows")
GPU_BYTES = {"24 GB": 24e9, "80 GB": 80e9}
MEMORY_RATIOS = (("standard", "reversible"), ("normflows", "reversible"), ("standard", "normflows"))
# --smoke: argument defaults of a toy run through every report (explicit arguments still win).
SMOKE = {
    "batch": 4,
    "shape": (1, 8, 8),
    "levels": 2,
    "steps": 1,
    "hidden": 8,
    "iters": 2,
    "mm_size": 64,
    "mm_seconds": 0.05,
    "expm_images": 1,
    "report": "all",
}


def ratio(a: float, b: float) -> float:
    """a / b, NaN where b is not positive (toy sizes can measure no per-image memory)."""
    return a / b if b > 0 else math.nan


def modes(args: argparse.Namespace) -> tuple[str, ...]:
    """The models compared: ours in both memory modes, and normflows unless it is skipped."""
    return tuple(m for m in MODES if not (args.no_normflows and m == "normflows"))


def build(mode: str, args: argparse.Namespace) -> nn.Module:
    """Our Glow in memory ``mode`` ("standard" / "reversible") or normflows' Glow."""
    in_shape = tuple(args.shape)
    if mode == "normflows":
        return NormflowsGlow(in_shape, args.levels, args.steps, args.hidden)
    return Glow(
        in_shape,
        args.levels,
        args.steps,
        args.hidden,
        conv=args.conv,
        coupling=args.coupling,
        blocks=args.blocks,
        memory=mode,
    )


def _vm_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def probe(mode: str, args: argparse.Namespace) -> None:
    """Subprocess body: print JSON with the peak-memory rise (bytes) of a training step at
    half and at the full batch, and the parameter count."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build(mode, args)
    x = torch.rand(args.batch, *args.shape) * 2 - 1
    with torch.no_grad():
        model(x)  # ActNorm data-dependent init
    optimizer = torch.optim.Adamax(model.parameters(), lr=1e-3)

    def step(batch: Tensor) -> None:
        nll(*model(batch)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)  # as nfpi.train: gradients live only in a step

    step(x[:1])  # the optimizer state now exists
    result = {"params": sum(p.numel() for p in model.parameters())}
    for name, batch in (("half", x[: args.batch // 2]), ("full", x)):
        base = _vm_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
        step(batch)  # timed by report_throughput, alternating with its peers, not here
        result[name] = (_vm_kib("VmHWM") - base) * 1024
    print(json.dumps(result))


def measure_memory(args: argparse.Namespace) -> dict[str, dict]:
    """Run :func:`probe` for every mode in a fresh subprocess; {mode: its JSON}."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
    argv = [
        sys.executable,
        __file__,
        "--batch",
        str(args.batch),
        "--shape",
        *map(str, args.shape),
        "--levels",
        str(args.levels),
        "--steps",
        str(args.steps),
        "--hidden",
        str(args.hidden),
        "--conv",
        args.conv,
        "--coupling",
        args.coupling,
        "--threads",
        str(args.threads),
        "--blocks",
        *map(str, args.blocks if isinstance(args.blocks, list) else [args.blocks]),
    ]
    results = {}
    for mode in modes(args):
        out = subprocess.run(argv + ["--probe", mode], env=env, capture_output=True, text=True, check=True)
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    return results


def saved_bytes(mode: str, args: argparse.Namespace, batch: int = 2) -> float:
    """Bytes per image of the non-parameter tensors autograd saves for backward (hooks)."""
    torch.manual_seed(0)
    model = build(mode, args)
    x = torch.rand(batch, *args.shape) * 2 - 1
    with torch.no_grad():
        model(x)
    return saved_activation_bytes(model, x) / batch


def report_memory(args: argparse.Namespace) -> None:
    """Print peak step memory per mode, ratios, and the largest batch per GPU size."""
    saved = {mode: saved_bytes(mode, args) for mode in ("standard", "reversible")}
    print(
        f"saved for backward (autograd hooks) per image: standard {saved['standard'] / 2**20:.2f} "
        f"MiB, reversible {saved['reversible'] / 2**20:.3f} MiB "
        f"({saved['standard'] / saved['reversible']:.0f}x; the reversible recomputation adds "
        "one layer's activations during backward, counted in the peak below)"
    )
    results = measure_memory(args)
    half = args.batch // 2
    print(
        f"peak-memory rise of one training step in a fresh process (VmHWM), at batch {half} and "
        f"{args.batch}; per image = slope between the two, fixed = the rest (parameter gradients):"
    )
    per_image = {}
    for mode, r in results.items():
        per_image[mode] = (r["full"] - r["half"]) / (args.batch - half)
        fixed = r["full"] - per_image[mode] * args.batch
        state = 4 * 4 * r["params"]  # float32 weights, 2 Adamax states, EMA copy
        fits = ", ".join(
            f"{name}: batch {ratio(cap - state - fixed, per_image[mode]) // 1:.0f}"
            for name, cap in GPU_BYTES.items()
        )
        print(
            f"{mode:>10}: {r['full'] / 2**20:7.1f} MiB at batch {args.batch}, "
            f"{per_image[mode] / 2**20:6.2f} MiB per image + {fixed / 2**20:6.1f} MiB fixed; "
            f"largest batch (estimate) {fits}"
        )
    pairs = [(a, b) for a, b in MEMORY_RATIOS if a in per_image and b in per_image]
    print(
        "per-image memory ratio "
        + ", ".join(f"{a}/{b}: {ratio(per_image[a], per_image[b]):.2f}x" for a, b in pairs)
    )


def report_throughput(args: argparse.Namespace) -> None:
    """Time standard, reversible and normflows training steps alternately and print ratios."""
    torch.manual_seed(0)
    in_shape = tuple(args.shape)
    x = torch.rand(args.batch, *in_shape) * 2 - 1
    models = {"nfpi": build("standard", args), "nfpi-rev": build("reversible", args)}
    models["nfpi-rev"].load_state_dict(models["nfpi"].state_dict())  # same weights
    if "normflows" in modes(args):
        models["normflows"] = build("normflows", args)

    flops, steps_fn = {}, {}
    for name, model in models.items():
        with torch.no_grad():
            model(x)  # ActNorm data-dependent init
        params = sum(p.numel() for p in model.parameters())
        # FlopCounterMode's module hooks cannot follow autograd.grad inside a backward, so the
        # reversible step (standard FLOPs + one more forward and one inverse) is not counted.
        flops[name] = step_flops(model, x) if name != "nfpi-rev" else None
        steps_fn[name] = make_step(model, x, lr=1e-3)
        steps_fn[name]()  # warm-up
        counted = "" if flops[name] is None else f", {flops[name] / args.batch / 1e9:.3f} GFLOP"
        print(f"{name:>9}: {params / 1e6:.3f} M parameters{counted} per image per step")

    times: dict[str, list[float]] = {name: [] for name in models}
    cpu_times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.iters):
        for name, step in steps_fn.items():
            start, cpu_start = time.perf_counter(), time.process_time()
            step()
            times[name].append(time.perf_counter() - start)
            cpu_times[name].append(time.process_time() - cpu_start)

    mm_rate = matmul_flop_rate(args.mm_size, seconds=args.mm_seconds)
    print(f"float32 matmul ({args.mm_size}^3): {mm_rate / 1e9:.1f} GFLOP/s")
    rate, best_rate = {}, {}
    for name in models:
        median, best = statistics.median(times[name]), min(times[name])
        rate[name], best_rate[name] = args.batch / median, args.batch / best
        achieved = (
            ""
            if flops[name] is None
            else (
                f", {flops[name] / median / 1e9:.1f} GFLOP/s = {flops[name] / median / mm_rate:.1%} "
                "of matmul rate"
            )
        )
        print(
            f"{name:>9}: {rate[name]:8.1f} images/s median ({best_rate[name]:.1f} best step), "
            f"median step {median * 1e3:.1f} ms{achieved}"
        )
    cpu = {name: statistics.median(cpu_times[name]) for name in models}
    print(
        f"step time reversible/standard: {rate['nfpi'] / rate['nfpi-rev']:.3f} median, "
        f"{best_rate['nfpi'] / best_rate['nfpi-rev']:.3f} best step, "
        f"{cpu['nfpi-rev'] / cpu['nfpi']:.3f} by median CPU time per step"
    )
    if "normflows" in rate:
        print(
            f"ratio nfpi/normflows (images/s): {rate['nfpi'] / rate['normflows']:.3f} median, "
            f"{best_rate['nfpi'] / best_rate['normflows']:.3f} best step, "
            f"{cpu['normflows'] / cpu['nfpi']:.3f} by median CPU time per step"
        )


def report_coupling_cost(args: argparse.Namespace) -> None:
    """Step time of the matexp coupling and of the whole MEF vs the affine coupling, and
    matrix_exp vs series on bounded W."""
    torch.manual_seed(0)
    x = torch.rand(args.batch, *args.shape) * 2 - 1
    steps_fn = {}
    # the MEF coupling on the given conv, and the whole MEF (its matexp 1x1 conv too)
    for name, conv, coupling in (
        ("affine", args.conv, "affine"),
        ("matexp", args.conv, "matexp"),
        ("mef", "matexp", "matexp"),
    ):
        model = Glow(
            tuple(args.shape),
            args.levels,
            args.steps,
            args.hidden,
            conv=conv,
            coupling=coupling,
            blocks=args.blocks,
        )
        with torch.no_grad():
            model(x)
        steps_fn[name] = make_step(model, x, lr=1e-3)
        steps_fn[name]()
    times: dict[str, list[float]] = {name: [] for name in steps_fn}
    for _ in range(args.iters):
        for name, step in steps_fn.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) for name, t in times.items()}
    print(
        f"training step, coupling matexp vs affine: {median['matexp'] * 1e3:.1f} ms vs "
        f"{median['affine'] * 1e3:.1f} ms = {median['matexp'] / median['affine']:.2f}x"
    )
    print(
        f"training step, MEF (matexp conv and coupling) vs affine on {args.conv}: "
        f"{median['mef'] * 1e3:.1f} ms = {median['mef'] / median['affine']:.2f}x"
    )

    print(
        "batched expm of bounded W = tanh(r) / c2 + saturated rows (float32, fwd+bwd time, "
        "max rel. error vs float64 matrix_exp):"
    )
    for c2, side in ((6, 16), (12, 8), (24, 4)):
        pixels = args.expm_images * side * side
        raw = 3 * torch.randn(pixels, c2, c2, dtype=torch.float64)
        w = torch.tanh(raw) / c2  # the MEF bound at init: ||W||_inf <= 1
        w[: pixels // 8] = 1.0 / c2  # saturated: one eigenvalue of exactly 1
        exact = torch.linalg.matrix_exp(w)
        cells = []
        for name, fn in (("matrix_exp", torch.linalg.matrix_exp), ("series", expm_series)):
            w32 = w.float().requires_grad_(True)
            best = math.inf
            for _ in range(5):
                start = time.perf_counter()
                out = fn(w32)
                out.sum().backward()
                best = min(best, time.perf_counter() - start)
            error = ((out.double() - exact).abs().amax((-2, -1)) / exact.abs().amax((-2, -1))).max()
            cells.append(f"{name} {best * 1e3:6.1f} ms, err {error.item():.1e}")
        print(f"  c2={c2:2d}, {pixels} matrices: " + "; ".join(cells))


def main() -> None:
    """Parse arguments and run the requested reports."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--shape", type=int, nargs=3, default=(3, 32, 32), metavar=("C", "H", "W"))
    parser.add_argument("--levels", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4, help="flow steps per level")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument(
        "--blocks",
        type=int,
        nargs="+",
        default=[1],
        help="residual blocks per coupling net: one count, or one per level",
    )
    parser.add_argument(
        "--conv", choices=("lu", "matexp"), default="lu", help="our 1x1 conv (normflows always uses LU)"
    )
    parser.add_argument(
        "--coupling",
        choices=("affine", "additive", "matexp"),
        default="affine",
        help="our coupling (normflows always uses affine)",
    )
    parser.add_argument("--paper", action="store_true", help="paper size: levels=3, steps=8, hidden=128")
    parser.add_argument(
        "--iters",
        type=int,
        default=8,
        help="timed training steps per model (the models alternate step by step)",
    )
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--mm-size", type=int, default=2048)
    parser.add_argument("--mm-seconds", type=float, default=3.0, help="time spent timing the matmul")
    parser.add_argument(
        "--expm-images", type=int, default=64, help="coupling report: images' worth of expm matrices"
    )
    parser.add_argument("--no-normflows", action="store_true", help="time only our Glow")
    parser.add_argument(
        "--report",
        choices=("default", "throughput", "memory", "coupling", "all"),
        default="default",
        help="default: throughput and memory; coupling: MEF coupling vs affine and matrix_exp vs series",
    )
    parser.add_argument("--smoke", action="store_true", help="every report at toy size (seconds)")
    parser.add_argument("--probe", choices=MODES, help=argparse.SUPPRESS)
    if parser.parse_known_args()[0].smoke:
        parser.set_defaults(**SMOKE)
    args = parser.parse_args()
    if not args.no_normflows and importlib.util.find_spec("normflows") is None:
        print("normflows is not installed (pip install -e '.[bench]'): skipping the normflows peer")
        args.no_normflows = True
    if args.paper:
        args.levels, args.steps, args.hidden = 3, 8, 128
    args.blocks = args.blocks[0] if len(args.blocks) == 1 else args.blocks
    torch.set_num_threads(args.threads)
    if args.probe:
        probe(args.probe, args)
        return
    print(
        f"config: batch={args.batch} shape={tuple(args.shape)} levels={args.levels} "
        f"steps={args.steps} hidden={args.hidden} blocks={args.blocks} conv={args.conv} "
        f"coupling={args.coupling} threads={args.threads} torch={torch.__version__}"
    )
    if args.report in ("coupling", "all"):
        report_coupling_cost(args)
    if args.report in ("default", "throughput", "all"):
        report_throughput(args)
    if args.report in ("default", "memory", "all"):
        report_memory(args)


if __name__ == "__main__":
    main()
