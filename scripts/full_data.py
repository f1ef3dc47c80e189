"""Full-data runs: hours on a CPU, so run in the background and committed as files.

    python scripts/full_data.py candidates                    # candidates for configs/mnist_full.yaml
    python scripts/full_data.py tables                        # Tables 1 and 3 on full MNIST, 3 seeds
    python scripts/full_data.py tables --groups data gd --seeds 0 --out x.csv   # a part of them
    python scripts/full_data.py candidates --dataset cifar10  # candidates for configs/cifar10_full.yaml
    python scripts/full_data.py tables --dataset cifar10      # data init vs FPI "both" on full CIFAR-10
    python scripts/full_data.py candidates --dataset cifar10 --collect  # the CSV of the runs as they are

write results/full/<dataset>_candidates.csv and results/full/<dataset>_tables.csv (with the
per-epoch metrics of the table runs in results/full/<dataset>_tables_epochs.csv).

Every run trains in its own folder under ``runs/full/`` and resumes there when interrupted
(run the same command again); a folder is locked while a run trains in it, so several of these
commands may run side by side (``--only`` picks candidates). The committed CSVs hold each
run's per-epoch metrics (the candidates, for learning curves against wall time) or its final
row (the tables), with the command that reproduces it; notebook 07 renders them.
"""

from __future__ import annotations

import argparse
import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import yaml

from nfpi.config import TrainConfig
from nfpi.experiments import train_settings
from nfpi.train import keyed_run_dir, train

REPO = Path(__file__).resolve().parents[1]
RUNS = REPO / "runs" / "full"
RESULTS = REPO / "results" / "full"


@dataclass
class Study:
    """The full-data runs of one data set: its config, the candidates it was chosen among
    (label -> overrides; the config is one of them), the budget of its table runs (overrides)
    and the table groups (group -> its candidate settings, chosen on seed-0 validation)."""

    config: str
    candidates: dict[str, list[str]]
    table_budget: list[str] = field(default_factory=list)
    groups: dict[str, dict[str, dict]] = field(default_factory=dict)
    seeds: tuple[int, ...] = (0, 1, 2)


# MNIST candidates, compared per CPU-minute; configs/mnist_full.yaml is the last one (the most
# accurate per CPU-minute after 20 minutes). Tables 1 and 3 use a smaller budget than the
# config (15+ runs of 35 minutes do not fit): the 2x4-step, 32-channel candidate, 2 epochs (one
# solve after epoch 0, one epoch on the solved Gaussians), about 5 minutes a run on one core.
SMALL = ["model.hidden=32", "model.steps=4", "epochs=8"]
# Learning variances with the paper's rule needs lambda below the unbounded threshold (55 for
# pairwise pi, K = 10).
_VARIANCE_RULES = {
    "paper rule, lambda=50": {"solver.rule": "paper", "gaussians.lam": 50.0},
    "released rule, lambda=1e4": {"solver.rule": "released", "gaussians.lam": 1.0e4},
}
MNIST = Study(
    config="configs/mnist_full.yaml",
    candidates={
        "2x4, 32 ch, FPI means": SMALL,
        "2x4, 32 ch, FPI both": [*SMALL, "gaussians.learn=both"],
        "2x8, 64 ch, FPI means": [],
    },
    table_budget=["model.hidden=32", "model.steps=4", "epochs=2"],
    groups={
        "data": {"data": {"gaussians.prior": "data"}},
        "fpi means": {"fpi means": {"gaussians.learn": "means"}},
        "gd": {
            f"gd {p}": {"gaussians.prior": "gd", "gd.policy": p}
            for p in ("constant", "linear", "superlinear_v2")
        },
        **{
            f"fpi {learn}": {
                f"fpi {learn}, {rule}": {"gaussians.learn": learn, **o} for rule, o in _VARIANCE_RULES.items()
            }
            for learn in ("both", "variances")
        },
    },
)
# CIFAR-10: the config (3 levels x 4 steps, 64 channels, 5 epochs) against a deeper model (3 x 8
# steps, 1.75 times the time per epoch; stopped after its first), trained side by side; the
# config is the paper's "both" setting, run against data init, seeds 0 and 1 (a third did not
# fit in the session that made them).
CIFAR10 = Study(
    config="configs/cifar10_full.yaml",
    candidates={
        "3x4, 64 ch, FPI both": [],
        "3x8, 64 ch, FPI both": ["model.steps=8", "epochs=2"],
    },
    groups={
        "data": {"data": {"gaussians.prior": "data"}},
        "fpi both": {"fpi both": {}},
    },
    seeds=(0, 1),
)
STUDIES = {"mnist": MNIST, "cifar10": CIFAR10}


def _overrides(items: list[str]) -> dict:
    return {k: yaml.safe_load(v) for k, _, v in (item.partition("=") for item in items)}


def _command(study: Study, items: list[str]) -> str:
    """The one-line command that trains a run (its run folder name differs)."""
    return shlex.join(["python", "-m", "nfpi.train", "--config", study.config, *items])


def _epochs(run_dir: Path) -> pd.DataFrame:
    """The per-epoch metrics of a finished run, with the code fingerprint that made it."""
    table = pd.read_csv(run_dir / "metrics.csv")
    table.insert(0, "code", json.loads((run_dir / "metrics.json").read_text())["code"])
    return table


def candidates(dataset: str, only: list[str] | None = None, collect: bool = False) -> pd.DataFrame:
    """Train (or resume, or reuse) each candidate of ``dataset`` (those in ``only`` when given);
    their per-epoch metrics in one table. The runs are keyed like the table runs, so the
    config's own candidate is the table's run of its setting. ``collect``: train nothing, take
    the runs as they are (a candidate stopped by hand keeps the epochs it finished)."""
    study, tables = STUDIES[dataset], []
    for label, items in study.candidates.items():
        if only and label not in only:
            continue
        cfg = TrainConfig.from_yaml(REPO / study.config, **_overrides(items))
        run_dir = keyed_run_dir(RUNS, f"{dataset}_full", cfg)
        if not collect:
            train(cfg, run_dir, progress=True)
        elif not (run_dir / "metrics.csv").is_file():
            raise SystemExit(f"--collect: candidate {label!r} has no finished epoch in {run_dir}")
        table = _epochs(run_dir)
        table.insert(0, "candidate", label)
        table.insert(1, "command", _command(study, items))
        tables.append(table)
    return pd.concat(tables, ignore_index=True)


def table_group(dataset: str, group: str, seeds: list[int]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One group of Tables 1 / 3: its candidates with seed ``seeds[0]``, the one with the best
    validation NF accuracy with every seed; one final row per run (reused when finished), and
    the runs' per-epoch metrics."""
    study = STUDIES[dataset]
    settings = {name: o for g in study.groups.values() for name, o in g.items()}
    base = TrainConfig.from_yaml(REPO / study.config, **_overrides(study.table_budget))
    name = f"{dataset}_full"
    first = train_settings(base, study.groups[group], seeds[:1], RUNS, name, progress=True)
    best = first.loc[first["val_acc_top1"].idxmax(), "setting"]
    rest = train_settings(base, {best: settings[best]}, seeds[1:], RUNS, name, progress=True)
    table = pd.concat([first, rest], ignore_index=True)
    table.insert(0, "group", group)
    table.insert(2, "chosen", table["setting"] == best)
    commands = [
        _command(study, [*study.table_budget, *(f"{k}={v}" for k, v in settings[s].items()), f"seed={seed}"])
        for s, seed in zip(table["setting"], table["seed"])
    ]
    table.insert(3, "command", commands)
    epochs = [
        _epochs(Path(d)).assign(group=group, setting=s, seed=seed)
        for d, s, seed in zip(table["run_dir"], table["setting"], table["seed"])
    ]
    return table, pd.concat(epochs, ignore_index=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("candidates", "tables"))
    parser.add_argument("--dataset", default="mnist", choices=list(STUDIES))
    parser.add_argument("--groups", nargs="+", help="table groups (default: all of the data set's)")
    parser.add_argument("--only", nargs="+", help="candidates to train (default: all of the data set's)")
    parser.add_argument("--seeds", nargs="+", type=int, help="table seeds (default: the data set's)")
    parser.add_argument("--collect", action="store_true", help="candidates: write the CSV, train nothing")
    parser.add_argument("--out", help="results CSV (default results/full/<dataset>_<what>.csv)")
    args = parser.parse_args()
    study = STUDIES[args.dataset]
    for given, known, what in (
        (args.groups, study.groups, "group"),
        (args.only, study.candidates, "candidate"),
    ):
        if unknown := sorted(set(given or ()) - set(known)):
            parser.error(f"unknown {what} {unknown} for {args.dataset}; choose from {list(known)}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = Path(args.out) if args.out else RESULTS / f"{args.dataset}_{args.what}.csv"
    if args.what == "candidates":
        _write(candidates(args.dataset, args.only, args.collect), out)
    else:  # written after each group, so that a long run leaves its finished groups behind
        done, epochs = [], []
        for group in args.groups or study.groups:
            table, per_epoch = table_group(args.dataset, group, args.seeds or list(study.seeds))
            done.append(table)
            epochs.append(per_epoch)
            _write(pd.concat(done, ignore_index=True), out)
            _write(pd.concat(epochs, ignore_index=True), out.with_name(out.stem + "_epochs.csv"))


def _write(table: pd.DataFrame, out: Path) -> None:
    if "run_dir" in table:  # committed files name runs relative to the repository
        table["run_dir"] = [str(Path(p).resolve().relative_to(REPO)) for p in table["run_dir"]]
    table.to_csv(out, index=False)
    print(f"wrote {out} ({len(table)} rows)")


if __name__ == "__main__":
    main()
