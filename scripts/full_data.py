"""Full-data runs (issue 11): hours on a CPU, so run in the background and committed as files.

    python scripts/full_data.py candidates  # candidates for configs/mnist_full.yaml
    python scripts/full_data.py tables      # Tables 1 and 3 on full MNIST, 3 seeds
    python scripts/full_data.py tables --settings data gd --seeds 0 --out x.csv   # a part of them

write results/full/mnist_candidates.csv and results/full/mnist_tables.csv.

Every run trains in its own folder under ``runs/full/`` and resumes there when interrupted
(run the same command again). The committed CSVs hold each run's per-epoch metrics (the
candidates, for learning curves against wall time) or its final row (the tables), with the
command that reproduces it; notebook 07 renders them.
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

import pandas as pd
import yaml

from nfpi.experiments import train_settings
from nfpi.train import TrainConfig, train

REPO = Path(__file__).resolve().parents[1]
RUNS = REPO / "runs" / "full"
RESULTS = REPO / "results" / "full"
CONFIG = "configs/mnist_full.yaml"
# Candidate architectures / rules for configs/mnist_full.yaml, compared per CPU-minute.
# configs/mnist_full.yaml is the last one (the most accurate within the 60-minute budget).
SMALL = ["model.hidden=32", "model.steps=4", "epochs=8"]
CANDIDATES = {
    "2x4, 32 ch, FPI means": SMALL,
    "2x4, 32 ch, FPI both": [*SMALL, "gaussians.learn=both"],
    "2x8, 64 ch, FPI means": [],
}
# Tables 1 and 3 of the paper on full MNIST (every other setting as in configs/mnist_full.yaml).
SETTINGS = {
    "data": {"gaussians.prior": "data"},
    "gd": {"gaussians.prior": "gd"},
    "fpi means": {"gaussians.learn": "means"},
    "fpi variances": {"gaussians.learn": "variances"},
    "fpi both": {"gaussians.learn": "both"},
}
SEEDS = (0, 1, 2)


def _overrides(items: list[str]) -> dict:
    return {k: yaml.safe_load(v) for k, _, v in (item.partition("=") for item in items)}


def candidate_metrics(run_dir: Path, label: str) -> pd.DataFrame:
    """The per-epoch metrics of a finished candidate run, labelled with its command and code."""
    table = pd.read_csv(run_dir / "metrics.csv")
    table.insert(0, "candidate", label)
    table.insert(
        1, "command", shlex.join(["python", "-m", "nfpi.train", "--config", CONFIG, *CANDIDATES[label]])
    )
    table.insert(2, "code", json.loads((run_dir / "metrics.json").read_text())["code"])
    return table


def candidates() -> pd.DataFrame:
    """Train (or resume) each candidate; their per-epoch metrics in one table."""
    tables = []
    for label, items in CANDIDATES.items():
        run_dir = RUNS / ("candidate-" + label.replace(" ", "").replace(",", "-"))
        train(TrainConfig.from_yaml(REPO / CONFIG, **_overrides(items)), run_dir)
        tables.append(candidate_metrics(run_dir, label))
    return pd.concat(tables, ignore_index=True)


def tables(settings: list[str], seeds: list[int]) -> pd.DataFrame:
    """Tables 1 and 3: every setting x seed, one final row each (reused when finished)."""
    base = TrainConfig.from_yaml(REPO / CONFIG)
    chosen = {name: SETTINGS[name] for name in settings}
    return train_settings(base, chosen, seeds, RUNS, "mnist_full", progress=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("candidates", "tables"))
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    parser.add_argument("--out", help="results CSV (default results/full/mnist_<what>.csv)")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    table = candidates() if args.what == "candidates" else tables(args.settings, args.seeds)
    if "run_dir" in table:  # committed files name runs relative to the repository
        table["run_dir"] = [str(Path(p).resolve().relative_to(REPO)) for p in table["run_dir"]]
    out = Path(args.out) if args.out else RESULTS / f"mnist_{args.what}.csv"
    table.to_csv(out, index=False)
    print(f"wrote {out} ({len(table)} rows)")


if __name__ == "__main__":
    main()
