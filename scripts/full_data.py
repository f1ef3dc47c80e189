"""Full-data runs: hours on a CPU, so run in the background and committed as files.

    python scripts/full_data.py candidates                    # candidates for configs/mnist_full.yaml
    python scripts/full_data.py tables                        # Tables 1 and 3 on full MNIST, 3 seeds
    python scripts/full_data.py tables --groups data gd --seeds 0 --out x.csv   # a part of them
    python scripts/full_data.py candidates --dataset cifar10  # candidates for configs/cifar10_full.yaml
    python scripts/full_data.py tables --dataset cifar10      # Tables 1 and 3 on full CIFAR-10, 3 seeds
    python scripts/full_data.py candidates --dataset cifar10 --collect  # the CSV of the runs as they are

write results/full/<dataset>_candidates.csv and results/full/<dataset>_tables.csv (with the
per-epoch metrics of the table runs in results/full/<dataset>_tables_epochs.csv).

Every run trains in its own folder under ``runs/full/`` and resumes there when interrupted
(run the same command again); a folder is locked while a run trains in it, so several of these
commands may run side by side: ``--only`` picks candidates and keeps the other candidates' rows
of the CSV, and ``tables`` commands (one per core) share one CSV, each re-reading it under a
lock before it records a run. Their groups may overlap: each trains the runs the other is not
training, and waits for the other's run when nothing else of its groups is left. The committed CSVs hold each
run's per-epoch metrics (the candidates, for learning curves against wall time) or its final
row (the tables), with the command that reproduces it; notebook 07 renders them.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import shlex
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import yaml

from nfpi.config import TrainConfig, upgrade
from nfpi.experiments import best_setting, solve_info
from nfpi.train import RunDirBusy, config_key, keyed_run_dir, train

REPO = Path(__file__).resolve().parents[1]
RUNS = REPO / "runs" / "full"
RESULTS = REPO / "results" / "full"


@dataclass
class Study:
    """The full-data runs of one data set: its config, the candidates it was chosen among
    (label -> overrides; the config is one of them), the budget of its table runs (overrides)
    and the table groups (group -> its candidate settings, chosen on seed-0 validation:
    :func:`nfpi.experiments.best_setting`, the best NF accuracy among the candidates whose
    validation bits/dim are at most ``max_bpd_ratio`` times data init's, the ``data`` group's;
    None: no bound), and whether its committed table is complete."""

    config: str
    candidates: dict[str, list[str]]
    table_budget: list[str] = field(default_factory=list)
    groups: dict[str, dict[str, dict]] = field(default_factory=dict)
    seeds: tuple[int, ...] = (0, 1, 2)
    max_bpd_ratio: float | None = None
    complete: bool = True  # False while a campaign is still running: the committed table is a part


# MNIST candidates, compared per CPU-minute; configs/mnist_full.yaml is the third (the most
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
        # the config's model for the 60-CPU-minute budget: 7 epochs, the learning rate decayed to
        # 0 by a cosine over them (54,000 // 64 = 843 steps an epoch)
        "2x8, 64 ch, FPI means, 7 epochs, cosine": ["epochs=7", "optim.decay_steps=5901"],
        # the same with the gradient norm clipped at 1e4 (about twice its epoch mean): the
        # cosine run above lost its validation accuracy to two loss spikes (gradient norms 3e4
        # and 2e11 in epochs 1 and 4)
        # (stopped after its first epoch: its one solve met a flow at 58 % validation accuracy)
        "2x8, 64 ch, FPI means, 7 epochs, cosine, clipped": [
            "epochs=7",
            "optim.decay_steps=5901",
            "optim.grad_clip=1e4",
        ],
        # and solved again after every epoch, so that no run hangs on the flow its first solve
        # met; 6 epochs, as the solves (encoding the training set) take about 1.5 minutes each
        # (stopped after its second: 68.7 and 90.3 % validation against the config's 84.2 and
        # 97.7, each solve at lambda 1e5 moving the Gaussians the flow had just fitted)
        "2x8, 64 ch, FPI means, 6 epochs, cosine, clipped, solved every epoch": [
            "epochs=6",
            "optim.decay_steps=5058",
            "optim.grad_clip=1e4",
            "schedule.resolve_every=1",
        ],
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
# steps, 1.75 times the time per epoch; stopped after its first), trained side by side, and the
# paper's MEF backbone at about the same CPU time (below). Tables
# 1 and 3 at the config's budget, each group with 3 candidates chosen on seed-0 validation:
# - "fpi both", "fpi means": the released rule (and isotropic mean step) around the released
#   lambda 3e5; "fpi variances" the same;
# - Table 1 on one objective: "fpi paper" is the fixed point of the paper's J (stationary rule,
#   learned means and variances) and "gd" minimises that J by Adam, both in the box
#   [v/rho, v*rho] of solver.rho, at the same lambdas; J is unbounded below above lambda = 55.3
#   (pairwise pi, K = 10), so 50 is the largest the paper rule can take.
# A campaign of hours across sessions: runs are recorded as they finish
# (results/full/cifar10_tables.csv); complete since every group has its candidates and 3 seeds
# of its choice (30 runs).
_RELEASED = (3.0e4, 3.0e5, 3.0e6)


def _lambdas(label: str, overrides: dict, lams: tuple[float, ...]) -> dict[str, dict]:
    """One candidate per lambda: ``"<label>, lambda=<lam>"`` -> ``overrides`` with that lambda."""
    return {f"{label}, lambda={lam:g}": {**overrides, "gaussians.lam": lam} for lam in lams}


_PAPER = (10.0, 20.0, 50.0)
# NF accuracy alone chose the largest lambda of "fpi both" (3e6: 68.7 % at 10.9 bits/dim, data
# init 1.82), as it does at every end of MNIST-3k's grid (docs/results.md §1, §3); every group
# chooses within twice data init's validation bits/dim instead, a bound set after seeing the
# seed-0 candidates of "fpi both" (docs/results.md §3 gives the choices under other bounds).
CIFAR10 = Study(
    config="configs/cifar10_full.yaml",
    candidates={
        "3x4, 64 ch, FPI both": [],
        "3x8, 64 ch, FPI both": ["model.steps=8", "epochs=2"],
        # the paper's backbone (Matrix Exponential Flow: matexp 1x1 convs and couplings) at about
        # the config's CPU time: a 3x4 MEF training step takes 4.2 times the config's (one core,
        # batch 64: benchmarks/bench_flow.py --report coupling --threads 1), a step's cost is
        # linear in the steps, so 3x2 for 3 epochs (about 1.2 times the config's CPU time)
        "3x2, 64 ch, MEF, FPI both": [
            "model.steps=2",
            "model.conv=matexp",
            "model.coupling=matexp",
            "epochs=3",
        ],
    },
    groups={
        "data": {"data": {"gaussians.prior": "data"}},
        "fpi both": _lambdas("fpi both, released rule", {}, _RELEASED),
        "fpi paper": _lambdas("fpi both, paper rule", {"solver.rule": "paper"}, _PAPER),
        "gd": _lambdas("gd, paper J", {"gaussians.prior": "gd", "solver.rule": "paper"}, _PAPER),
        "fpi means": _lambdas("fpi means, released rule", {"gaussians.learn": "means"}, _RELEASED),
        "fpi variances": _lambdas(
            "fpi variances, released rule", {"gaussians.learn": "variances"}, _RELEASED
        ),
    },
    max_bpd_ratio=2.0,
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


@dataclass
class Campaign:
    """The table runs of one data set so far: the committed final rows and per-epoch metrics
    (``out`` and its ``_epochs`` file), extended and rewritten after every finished run, so
    that the runs of one session outlive its (gitignored) run folders once committed. Several
    processes may record into one ``out``: every change re-reads the files under a lock
    (:func:`_locked`) and rewrites them with the change alone, so none drops another's rows."""

    out: Path
    rows: pd.DataFrame = field(default_factory=pd.DataFrame)
    epochs: pd.DataFrame = field(default_factory=pd.DataFrame)

    @classmethod
    def read(cls, out: Path) -> Campaign:
        """The campaign written so far to ``out`` (none yet: empty)."""
        campaign = cls(out)
        campaign.refresh()
        return campaign

    def refresh(self) -> None:
        """Take the files as they are now (another process may have recorded runs since)."""
        if self.out.is_file():  # written atomically (_write), so never read half-written
            self.rows, self.epochs = pd.read_csv(self.out), pd.read_csv(_epochs_file(self.out))

    def row(self, key: str) -> pd.Series | None:
        """The recorded final row of the run with config key ``key``, if any."""
        self.refresh()
        found = self.rows[self.rows["config_key"] == key] if len(self.rows) else self.rows
        return found.iloc[-1] if len(found) else None

    def relabel(self, key: str, head: dict) -> None:
        """Give the run of ``key`` the group, setting and command ``head`` names it by now."""

        def change() -> None:
            for frame in (self.rows, self.epochs):
                names = [k for k in head if k in frame]
                frame.loc[frame["config_key"] == key, names] = [head[k] for k in names]

        self._update(change)

    def add(self, row: dict, epochs: pd.DataFrame) -> None:
        """Record one finished run (replacing an earlier record of its key) and rewrite the files."""

        def change() -> None:
            if len(self.rows):
                keep = self.rows["config_key"] != row["config_key"]
                self.epochs = self.epochs[self.epochs["config_key"].isin(self.rows.loc[keep, "config_key"])]
                self.rows = self.rows[keep]
            self.rows = pd.concat([self.rows, pd.DataFrame([row])], ignore_index=True)
            self.epochs = pd.concat([self.epochs, epochs], ignore_index=True)

        self._update(change)

    def choose(self, group: str, setting: str) -> None:
        """Mark ``setting`` as ``group``'s choice (``chosen``) and its other settings as not."""

        def change() -> None:
            in_group = self.rows["group"] == group
            self.rows.loc[in_group, "chosen"] = self.rows.loc[in_group, "setting"] == setting

        self._update(change)

    def _update(self, change: Callable[[], None]) -> None:
        """Apply ``change`` to the files as they are now, under the lock; rewrite them if it
        changed anything."""
        with _locked(self.out):
            self.refresh()
            before = (self.rows.copy(), self.epochs.copy())
            change()
            if not (self.rows.equals(before[0]) and self.epochs.equals(before[1])):
                _write(self.rows, self.out)
                _write(self.epochs, _epochs_file(self.out))


@contextmanager
def _locked(out: Path) -> Iterator[None]:
    """Hold the lock of ``out`` (``fcntl.flock`` on ``<out>.lock``, waiting for another process
    that holds it): one process at a time reads and rewrites a campaign's files."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_name(out.name + ".lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes, or its process dies
        yield


def _epochs_file(out: Path) -> Path:
    return out.with_name(out.stem + "_epochs.csv")


def _finished_run(cfg: TrainConfig) -> tuple[Path, dict] | None:
    """A finished run folder of ``cfg`` made by any code version (a run started by the CLI, or
    by the code before a change) and its final metrics row; None when there is none. An
    unfinished one of other code cannot be resumed (its checkpoint is another code's)."""
    key = config_key(cfg)
    for path in sorted(RUNS.glob("*/metrics.json")):
        summary = json.loads(path.read_text())
        try:
            same = config_key(TrainConfig.from_dict(upgrade(summary["config"]))) == key
        except (KeyError, TypeError, ValueError):  # not a run summary this code can read
            continue
        if same and summary["metrics"]["epoch"] == cfg.epochs - 1:
            return path.parent, summary["metrics"]
    return None


def table_run(
    study: Study, campaign: Campaign, group: str, setting: str, seed: int, chosen: bool = False
) -> pd.Series | None:
    """The final row of one table run: the committed one when its config was run before (by
    any code version), else trained (or resumed) now and recorded in ``campaign`` (``chosen``:
    the setting is its group's choice); None when another process is training it now."""
    settings = {name: o for g in study.groups.values() for name, o in g.items()}
    base = TrainConfig.from_yaml(REPO / study.config, **_overrides(study.table_budget))
    cfg = base.replace(**settings[setting], seed=seed)
    key = config_key(cfg)
    items = [*study.table_budget, *(f"{k}={v}" for k, v in settings[setting].items()), f"seed={seed}"]
    head = {"group": group, "setting": setting, "command": _command(study, items), "seed": seed}
    if campaign.row(key) is not None:  # named as the study names it now
        campaign.relabel(key, head)
        return campaign.row(key)
    if (found := _finished_run(cfg)) is not None:
        run_dir, final = found
    else:
        run_dir = keyed_run_dir(RUNS, f"{cfg.dataset}_full", cfg)
        try:
            final = train(cfg, run_dir, progress=True)
        except RunDirBusy:  # another command trains it and will record it: on to the next run
            print(f"{setting}, seed {seed}: another process is training it ({run_dir})", flush=True)
            return None
    epochs = _epochs(run_dir)
    row = {
        **head,
        "chosen": chosen,
        "run_dir": str(run_dir),
        "code": epochs["code"].iloc[0],
        "config_key": key,
    }
    row |= final | solve_info(run_dir)  # the last solve's report (the final epoch has none)
    campaign.add(row, epochs.assign(group=group, setting=setting, seed=seed, config_key=key))
    return campaign.row(key)


def bpd_bound(study: Study, campaign: Campaign, seed: int) -> float | None:
    """The bound on a candidate's validation bits/dim: ``study.max_bpd_ratio`` times data
    init's with ``seed`` (trained now if it has not run); None without a ratio."""
    if study.max_bpd_ratio is None:
        return None
    data = table_run(study, campaign, "data", "data", seed)
    return study.max_bpd_ratio * float(data["val_bpd"])


def table_group(dataset: str, group: str, seeds: list[int], campaign: Campaign) -> bool:
    """One group of Tables 1 / 3: its candidates with seed ``seeds[0]``, then the one with the
    best validation NF accuracy (within the study's bound on validation bits/dim) with every
    seed (``chosen`` marks its rows). Runs another process is training are skipped: True when
    the group is complete, False when it waits for such a run (call again later: :func:`tables`)."""
    study = STUDIES[dataset]
    if study.max_bpd_ratio is not None and table_run(study, campaign, "data", "data", seeds[0]) is None:
        return False
    first = {s: table_run(study, campaign, group, s, seeds[0]) for s in study.groups[group]}
    if any(row is None for row in first.values()):
        return False
    best = best_setting(pd.DataFrame(list(first.values())), max_val_bpd=bpd_bound(study, campaign, seeds[0]))
    campaign.choose(group, best)  # before the other seeds train: a commit taken meanwhile names it
    rest = [table_run(study, campaign, group, best, seed, chosen=True) for seed in seeds[1:]]
    return all(row is not None for row in rest)


def tables(dataset: str, groups: list[str], seeds: list[int], campaign: Campaign, poll: float = 60.0) -> None:
    """Every group of ``groups`` until complete: a pass trains each group's runs that no other
    process is training; while some group waits for such a run, wait ``poll`` seconds and pass
    again (the other process records it meanwhile)."""
    waiting, told = list(groups), None
    while waiting := [g for g in waiting if not table_group(dataset, g, seeds, campaign)]:
        if waiting != told:  # once, not every poll
            print(f"waiting for runs other processes train in {waiting}", flush=True)
            told = waiting
        time.sleep(poll)


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
        table = candidates(args.dataset, args.only, args.collect)
        if args.only and out.is_file():  # the other candidates' committed rows stay
            kept = pd.read_csv(out)
            table = pd.concat([kept[~kept["candidate"].isin(args.only)], table], ignore_index=True)
            order = {label: i for i, label in enumerate(study.candidates)}
            table = table.sort_values("candidate", key=lambda c: c.map(order), kind="stable")
        _write(table.reset_index(drop=True), out)
    else:  # written after each run, so that a long campaign leaves its finished runs behind
        campaign = Campaign.read(out)
        tables(args.dataset, args.groups or list(study.groups), args.seeds or list(study.seeds), campaign)


def _write(table: pd.DataFrame, out: Path) -> None:
    if "run_dir" in table:  # committed files name runs relative to the repository, whatever the cwd
        table["run_dir"] = [str((REPO / p).resolve().relative_to(REPO)) for p in table["run_dir"]]
    tmp = out.with_name(out.name + ".tmp")
    table.to_csv(tmp, index=False)
    tmp.replace(out)  # atomic: a commit taken while a campaign runs never holds half a file
    print(f"wrote {out} ({len(table)} rows)")


if __name__ == "__main__":
    main()
