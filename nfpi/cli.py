"""The ``nfpi`` command line: train a flow, evaluate a run, sample from it, write NFA data.

    nfpi train --config configs/digits_cpu.yaml [--run-dir DIR] [key=value ...]
    nfpi eval RUN                                   NF accuracy top-1/5 (method §6.1), bits/dim, confusion
    nfpi sample RUN --class C --temperature T --out grid.png
    nfpi augment RUN --out file.npz                 NF augmentation (paper Sec. 5, method §6.4)
    nfpi data fetch mnist cifar10                   download the missing dataset files, verified
    nfpi data list | nfpi data check                what is there; the SHA-256 of every file

``RUN`` is a run directory (or its ``checkpoint.pt``) written by ``nfpi train``. Each command
has ``--help``. ``python -m nfpi.cli`` is the same program.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import torch

from . import augment, data, plots, train
from .config import TrainConfig
from .data import download
from .evaluation import evaluate_flow
from .latents import NonFiniteLossError, encode
from .train import CheckpointError, load_checkpoint, load_data

__all__ = ["main"]

COMMANDS = {
    "train": "train a flow (the arguments of python -m nfpi.train)",
    "eval": "NF accuracy top-1/5, bits/dim and the confusion matrix of a run on its test set",
    "sample": "a grid of class-conditional samples of a run",
    "augment": "write NF-augmented copies of a run's training images (npz, docs/data.md)",
    "data": "the dataset files: fetch the missing ones, list them, check their SHA-256 sums",
}
DATA_COMMANDS = {
    "fetch": "download the missing splits of each named dataset via torchvision, verify, write",
    "list": "each registered dataset split: present or missing, path, size",
    "check": "verify the SHA-256 of every present dataset file against the committed sums",
}
ERRORS = (
    CheckpointError,
    NonFiniteLossError,
    data.DatasetFormatError,
    ValueError,
    FileNotFoundError,
    FileExistsError,
    ConnectionError,
)


def _load(args: argparse.Namespace) -> tuple[torch.nn.Module, Any, TrainConfig]:
    return load_checkpoint(args.run, ema=not args.no_ema, device=args.device)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "run", metavar="RUN", help="run directory (or its checkpoint.pt) written by nfpi train"
    )
    parser.add_argument("--device", default="cpu", help="torch device (default cpu), e.g. cuda")
    parser.add_argument("--no-ema", action="store_true", help="use the raw weights instead of their EMA")
    parser.add_argument("--batch-size", type=int, default=500, help="images per forward pass (default 500)")


def cmd_eval(args: argparse.Namespace) -> dict[str, Any]:
    model, gaussians, cfg = _load(args)
    _, test_set = load_data(cfg)
    metrics = evaluate_flow(model, gaussians, test_set, cfg.bits, args.batch_size)
    z, _ = encode(model, test_set, cfg.bits, args.batch_size)
    scores = gaussians.log_prob(z.to(gaussians.means.device)).cpu()
    k = test_set.num_classes
    # rows: true class, columns: predicted class (argmax_y log N(f(x); mu_y, s_y))
    confusion = torch.bincount(test_set.y * k + scores.argmax(1), minlength=k * k).reshape(k, k)
    width = max(6, *(len(c) for c in test_set.classes))
    print(f"{cfg.dataset}: {len(test_set)} test images, {k} classes")
    print(
        f"NF-Acc top-1 {metrics['acc_top1']:.2f} %  top-5 {metrics['acc_top5']:.2f} %  "
        f"bits/dim {metrics['test_bpd']:.4f}  NLL {metrics['test_nll']:.2f} nats"
    )
    print("confusion matrix (rows: true class, columns: predicted)")
    print(" " * width + "".join(f"{c[:width]:>{width + 1}}" for c in test_set.classes))
    for name, row in zip(test_set.classes, confusion.tolist()):
        print(f"{name:>{width}}" + "".join(f"{v:>{width + 1}}" for v in row))
    result = {"metrics": metrics, "classes": list(test_set.classes), "confusion": confusion.tolist()}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


def _class_index(value: str, classes: tuple[str, ...]) -> int:
    if value in classes:
        return classes.index(value)
    if value.isdigit() and int(value) < len(classes):
        return int(value)
    raise ValueError(
        f"--class {value!r} is neither a class name nor an index below {len(classes)}; the classes "
        f"are {list(classes)}"
    )


def cmd_sample(args: argparse.Namespace) -> Path:
    model, gaussians, cfg = _load(args)
    classes = load_data(cfg)[0].classes
    chosen = [_class_index(c, classes) for c in args.classes] if args.classes else list(range(len(classes)))
    if not args.temperature > 0:
        raise ValueError(f"--temperature must be > 0, got {args.temperature}")
    y = torch.tensor(chosen, device=gaussians.means.device).repeat_interleave(args.n)
    gen = torch.Generator(device=gaussians.means.device).manual_seed(args.seed)
    with torch.no_grad():
        images = model.inverse(gaussians.sample(y, temperature=args.temperature, generator=gen)).cpu()
    fig = plots.image_grid(
        images,
        cfg.bits,
        args.n,
        row_labels=[classes[k] for k in chosen],
        title=f"samples of {Path(args.run).name}, T = {args.temperature:g}",
        path=args.out,
    )
    plt.close(fig)
    print(f"wrote {args.out} ({len(chosen)} class(es) x {args.n} samples)")
    return Path(args.out)


def cmd_augment(args: argparse.Namespace) -> Path:
    model, gaussians, cfg = _load(args)
    train_set, _ = load_data(cfg)
    aug_cfg = augment.AugmentConfig(k=args.k, copies=args.copies, beta_max=args.beta_max)
    augmenter = augment.NFAugmenter.from_arrays(
        model, train_set, cfg.bits, aug_cfg, gaussians, args.batch_size
    )
    out = augment.generate_dataset(
        augmenter,
        train_set,
        args.copies,
        args.out,
        cfg.bits,
        args.batch_size,
        progress=not args.no_progress,
        seed=args.seed,
    )
    with np.load(out, allow_pickle=False) as npz:
        print(
            f"wrote {out}: {npz['x'].shape[0]} images {tuple(npz['x'].shape[1:])} "
            f"of {len(npz['classes'])} classes"
        )
    return out


def cmd_data(args: argparse.Namespace) -> Any:
    """``nfpi data fetch | list | check``: see :mod:`nfpi.data.download`."""
    if args.action == "fetch":
        return download.fetch(args.names, args.data_dir)
    if args.action == "check":
        return download.check_or_raise(args.data_dir)
    status = download.files(root=args.data_dir)
    print(f"data directory: {download.where(data.data_dir(args.data_dir))}")
    print(f"{'digits':<12} both  built in (scikit-learn), no file")
    for f in status:
        size = f"{f.size / 1e6:8.1f} MB" if f.present else "         -"
        state = "present" if f.present else "missing"
        note = "" if f.listed else "  (no committed sum)"
        print(f"{f.name:<12} {f.split:<5} {state:<8} {size}  {f.path}{note}")
    return status


def _data_parser(sub: Any) -> None:
    da = sub.add_parser("data", help=COMMANDS["data"], description=COMMANDS["data"])
    actions = da.add_subparsers(dest="action", metavar="ACTION", required=True)
    for action, text in DATA_COMMANDS.items():
        p = actions.add_parser(action, help=text, description=text)
        if action == "fetch":
            p.add_argument("names", nargs="+", metavar="DATASET", help="e.g. mnist cifar10")
        p.add_argument("--data-dir", help=f"dataset directory (default ${data.datasets.ENV_VAR}, else data/)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nfpi", description="Class-conditional normalizing flows with FPI class Gaussians (NFPI)."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    sub.add_parser("train", help=COMMANDS["train"], add_help=False)

    ev = sub.add_parser("eval", help=COMMANDS["eval"], description=COMMANDS["eval"])
    _common(ev)
    ev.add_argument("--json", help="also write metrics, classes and the confusion matrix to this JSON file")

    sa = sub.add_parser("sample", help=COMMANDS["sample"], description=COMMANDS["sample"])
    _common(sa)
    sa.add_argument(
        "--class",
        dest="classes",
        action="append",
        metavar="C",
        help="class name or index; repeat for several (default: every class, one row each)",
    )
    sa.add_argument("--temperature", type=float, default=0.7, help="scale T of the class std (default 0.7)")
    sa.add_argument("-n", type=int, default=10, help="samples per class (default 10)")
    sa.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    sa.add_argument("--out", required=True, help="image file to write, e.g. grid.png")

    au = sub.add_parser("augment", help=COMMANDS["augment"], description=COMMANDS["augment"])
    _common(au)
    defaults = augment.AugmentConfig()
    au.add_argument(
        "--out", required=True, help="npz file to write (docs/data.md format plus source and fingerprint)"
    )
    au.add_argument(
        "--copies", type=int, default=defaults.copies, help=f"variants per image ({defaults.copies})"
    )
    au.add_argument("--k", type=int, default=defaults.k, help=f"principal axes per class ({defaults.k})")
    au.add_argument(
        "--beta-max",
        type=float,
        default=defaults.beta_max,
        help=f"largest mixing weight ({defaults.beta_max})",
    )
    au.add_argument("--seed", type=int, default=0, help="seed of the variants (default 0)")
    au.add_argument("--no-progress", action="store_true", help="no progress bar")
    _data_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> Any:
    """Run ``nfpi COMMAND ...`` with ``argv`` (default ``sys.argv[1:]``); returns the command's result."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "train":  # nfpi.train.main owns these arguments, --help included
        return train.main(argv[1:])
    args = _parser().parse_args(argv)
    commands = {"eval": cmd_eval, "sample": cmd_sample, "augment": cmd_augment, "data": cmd_data}
    return commands[args.command](args)


def run() -> None:
    """Console-script entry point: errors become one line ``error: ...`` and exit status 1."""
    try:
        main()
    except ERRORS as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    run()
