"""Convergence of the fixed-point solver in the regimes of the shipped configs (configs/*.yaml).

Each config's class statistics are those its training run solves for at docs/method.md §4.3, taken
before training: the latents of the config's own untrained flow (ActNorm data init on
``init_images`` images, zero-initialised couplings) on real images, with the seeded
dequantisation noise of the statistics. CIFAR-100 is not assumed to be present: its K = 100
classes are built from CIFAR-10 latents by splitting every class into 10 deciles of its
projection on a random direction (same latent scale and spread, distinct class means), and
for time the flow is the small one of cifar10_cpu.yaml (an untrained flow's couplings are the
identity, so it differs from the paper-size one only by its random 1x1 convolutions).
The solve is :func:`nfpi.train.fit`, i.e. exactly what training calls with the config's
``gaussians:`` and ``solver:`` sections; one row per config:

    config, lambda, rule, learn, stop, accel, iterations, final change, converged, seconds

    NFPI_DATA=<folder of the npz files> python benchmarks/bench_fpi_configs.py [--per-class 500] [--threads 1]
    python benchmarks/bench_fpi_configs.py --smoke   # digits_cpu on 10 images per class, seconds
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import torch

from nfpi import data
from nfpi.config import TrainConfig
from nfpi.latents import class_stats, encode
from nfpi.prior import ClassStats, fpi
from nfpi.train import build_flow, fit, load_data

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# --smoke: these defaults (explicit arguments still win): the embedded digits, a few images per class
SMOKE = {"configs": ["digits_cpu"], "digits_per_class": 10, "distance": True}


def untrained_latent_stats(
    cfg: TrainConfig, per_class: int, digits_per_class: int | None = None
) -> ClassStats:
    """Statistics of the latents of ``cfg``'s untrained flow on its training images (for configs
    that train on a whole dataset: ``per_class`` images per class; digits: ``digits_per_class``,
    None = all 1,438)."""
    pseudo = cfg.dataset == "cifar100"
    if pseudo:  # not available offline: CIFAR-10 images, 10 pseudo-classes per class (see above)
        small = TrainConfig.from_yaml(CONFIGS / "cifar10_cpu.yaml").to_dict()["model"]
        cfg = cfg.replace(dataset="cifar10", download=False, **{f"model.{k}": v for k, v in small.items()})
    # configs on a whole dataset: a class-balanced share (digits: all unless digits_per_class)
    share = digits_per_class if cfg.dataset == "digits" else per_class * (10 if pseudo else 1)
    if cfg.per_class is None and share is not None:
        cfg = cfg.replace(per_class=share)
    torch.manual_seed(cfg.seed)
    arrays, _ = load_data(cfg)
    model = build_flow(cfg.model, arrays.shape)
    gen = torch.Generator().manual_seed(cfg.seed)
    idx = torch.randperm(len(arrays), generator=gen)[: cfg.init_images]
    with torch.no_grad():  # data-dependent ActNorm init (docs/method.md §4.1)
        model(data.dequantize(data.quantize(arrays.x[idx], cfg.bits), cfg.bits, noise=True, generator=gen))
    if not pseudo:
        return class_stats(model, arrays, cfg.bits, 250, noise=cfg.seed)
    z, _ = encode(model, arrays, cfg.bits, 250, noise=cfg.seed)
    z = z.double()
    labels = torch.empty_like(arrays.y)
    for c in range(arrays.num_classes):
        rows = (arrays.y == c).nonzero().flatten()
        proj = z[rows] @ torch.randn(z.shape[1], generator=gen, dtype=torch.float64)
        labels[rows[proj.argsort()]] = c * 10 + torch.arange(len(rows)) * 10 // len(rows)
    return ClassStats.from_latents(z, labels, 10 * arrays.num_classes)


# Released ablation lambdas named in the configs' comments (docs/method.md §4.8): same statistics,
# other blocks.
ABLATIONS = {
    "cifar10": [("means", 5e5), ("variances", 1e5)],
    "cifar100": [("means", 7.5e6), ("variances", 2e6)],
}


def distance(stats: ClassStats, cfg: TrainConfig, lam: float, info: dict) -> float:
    """Max distance of a solve's result to the fixed point (a relative-tol 1e-13 solve): means
    in class-std units, variances relative."""
    tight = cfg.replace(
        **{
            "solver.stop": "relative",
            "solver.accel": "anderson",
            "solver.tol": 1e-13,
            "solver.max_iter": 20_000,
        }
    )
    ref, _ = fit(tight, stats, lam)
    std = stats.var().sqrt()
    return max(
        float(((info["means"] - ref.means) / std).abs().max()),
        float(((info["variances"] - ref.variances) / ref.variances).abs().max()),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--per-class",
        type=int,
        default=500,
        help="images per class for the statistics of full-dataset configs",
    )
    ap.add_argument(
        "--digits-per-class", type=int, help="images per class for the digits configs (default: all)"
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache", help="folder to keep the statistics in between runs")
    ap.add_argument("--distance", action="store_true", help="also the distance to the fixed point (slow)")
    ap.add_argument("configs", nargs="*", help="config names (default: all in configs/)")
    ap.add_argument("--smoke", action="store_true", help="digits_cpu only, on few images (seconds)")
    if ap.parse_known_args()[0].smoke:
        ap.set_defaults(**SMOKE)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    names = args.configs or sorted(p.stem for p in CONFIGS.glob("*.yaml"))
    print(
        "| config | K | D | lambda | rule | learn | stop | accel | iterations | final change | converged "
        "| seconds |" + (" distance to fixed point |" if args.distance else "")
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if args.distance else ""))
    for name in names:
        cfg = TrainConfig.from_yaml(CONFIGS / f"{name}.yaml")
        digits = "" if args.digits_per_class is None else f"_{args.digits_per_class}"
        cached = Path(args.cache) / f"{name}_{args.per_class}{digits}.pt" if args.cache else None
        if cached is not None and cached.exists():
            stats = ClassStats(*torch.load(cached, weights_only=True))
        else:
            stats = untrained_latent_stats(cfg, args.per_class, args.digits_per_class)
            if cached is not None:
                torch.save((stats.count, stats.total, stats.total_sq), cached)
        rows = [cfg] + [
            cfg.replace(**{"gaussians.learn": learn, "gaussians.lam": lam})
            for learn, lam in ABLATIONS.get(name, [])
        ]
        # configs on the released solve also get the default one (Anderson, relative tol), for comparison
        rows += [
            row.replace(**{"solver.stop": "relative", "solver.accel": "anderson"})
            for row in rows
            if row.solver.stop == "released"
        ]
        for row in rows:
            gs, solver = row.gaussians, row.solver
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", fpi.FPIWarning)
                start = time.perf_counter()
                fitted, info = fit(row, stats, gs.lam)
                seconds = time.perf_counter() - start
                extra = ""
                if args.distance:
                    info.update(means=fitted.means, variances=fitted.variances)
                    extra = f" {distance(stats, row, gs.lam, info):.1e} |"
            print(
                f"| {name} | {stats.num_classes} | {stats.dim} | {gs.lam:g} | {solver.rule} | {gs.learn} | "
                f"{solver.stop} | {solver.accel} | "
                f"{info['iterations']} | {info['change']:.2g} | {info['converged']} | {seconds:.1f} |{extra}",
                flush=True,
            )


if __name__ == "__main__":
    main()
