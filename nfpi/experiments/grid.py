"""Grids of runs into results CSVs (docs/method.md §8; notebooks 04-05): :func:`run_grid` trains
(through :func:`nfpi.train.train`, which resumes and reuses finished runs) and evaluates
(:func:`nfpi.experiments.rows.evaluate_run`) only the (run, evaluation) pairs whose row is
missing from the CSV (:mod:`nfpi.experiments.tables`) or was computed from another
configuration (``config_hash``); :func:`train_settings` trains settings over seeds and
returns their final metrics rows; :func:`choose_lambda` chooses each solver's lambda on the
validation split, from candidates of its own, by :func:`best_setting` (the best validation NF
accuracy, optionally among the candidates within a bound on validation bits/dim).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from .. import repro
from ..config import TrainConfig
from ..train import keyed_run_dir, train
from .rows import EvalConfig, Oracle, config_hash, evaluate_run, solve_info
from .tables import append_row, find_row, read_rows

__all__ = ["best_setting", "choose_lambda", "run_grid", "train_settings"]


def run_grid(
    grid: Mapping[str, Mapping[str, Any]],
    base_cfg: TrainConfig,
    runs_dir: str | os.PathLike[str],
    results_csv: str | os.PathLike[str],
    oracle: Oracle | None = None,
    evals: EvalConfig | Sequence[EvalConfig] | None = None,
    progress: bool = False,
    seeds: Sequence[int] | None = None,
) -> pd.DataFrame:
    """Train and evaluate every run of ``grid`` (setting name -> config overrides of
    ``base_cfg``, dotted keys) under every evaluation of ``evals`` (default: one
    ``EvalConfig()``); return their rows in grid
    order, each with a ``setting`` column holding its grid name.

    With ``seeds`` every setting is trained once per seed (``seed`` overridden), as the run
    ``<name>_seed<s>``; without, once with the base config's seed, as the run ``<name>``.
    A (run, evaluation) whose row is in ``results_csv`` with the same ``config_hash`` is reused
    as is (the hash covers the config, the evaluation and the code). Otherwise the run is
    trained or resumed in ``runs_dir / "flow-<key>"`` (:func:`nfpi.train.runs.keyed_run_dir`; a
    finished checkpoint costs nothing) and evaluated, and its row is appended to the CSV at
    once, so an interrupted grid continues where it stopped.
    """
    evals = [EvalConfig()] if evals is None else [evals] if isinstance(evals, EvalConfig) else list(evals)
    if not evals:
        raise ValueError("evals is empty: give at least one EvalConfig")
    runs = (
        [(name, name, base_cfg.replace(**overrides)) for name, overrides in grid.items()]
        if seeds is None
        else [
            (name, f"{name}_seed{s}", base_cfg.replace(**overrides, seed=s))
            for name, overrides in grid.items()
            for s in seeds
        ]
    )
    table = read_rows(results_csv)
    keys = []
    for setting, run, cfg in runs:
        todo = []
        for ev in evals:
            keys.append((setting, run, ev.tag()))
            done = find_row(table, run, ev.tag())
            if done is None or done.get("config_hash") != config_hash(cfg, ev):
                todo.append(ev)
        # The folder is named by the config alone: settings of several grids that train the
        # same config share one run.
        folder = keyed_run_dir(runs_dir, "flow", cfg)
        if todo:
            train(cfg, folder, progress=progress)
        for ev in todo:
            table = append_row(
                results_csv, {"setting": setting, **evaluate_run(folder, ev, oracle, run, progress)}
            )
    table = read_rows(results_csv)  # as stored, so that fresh and reused rows have the same types
    return pd.DataFrame([find_row(table, run, tag) for _, run, tag in keys]).reset_index(drop=True)


def train_settings(
    base_cfg: TrainConfig,
    settings: Mapping[str, Mapping[str, Any]],
    seeds: Sequence[int],
    runs_dir: str | os.PathLike[str],
    name: str,
    progress: bool = False,
) -> pd.DataFrame:
    """Train every setting (label -> config overrides of ``base_cfg``, dotted keys) with every
    seed and return one tidy row per (setting, seed): ``setting``, ``seed``, ``run_dir``,
    ``code``, ``lam`` / ``lam_normalised`` and the report of the last solve (``solves``,
    ``solve_iterations``, ``solve_bounds_active``, ...), and the final metrics row of
    :func:`nfpi.train.train` (validation metrics ``val_*`` when the config has a split, test
    metrics ``acc_top1``, ``acc_top5``, ``test_bpd``, ...).

    Runs live in ``runs_dir / "<name>-<key>"`` (:func:`nfpi.train.runs.keyed_run_dir`): a finished
    run of the same config and code is reused, any other is trained. Rows are not cached:
    the numbers always come from the checkpoints of this code.
    """
    rows = []
    for label, overrides in settings.items():
        for seed in seeds:
            cfg = base_cfg.replace(**overrides, seed=seed)
            folder = keyed_run_dir(runs_dir, name, cfg)
            final = train(cfg, folder, progress=progress)
            rows.append(
                {
                    "setting": label,
                    "seed": seed,
                    "run_dir": str(folder),
                    "code": repro.code_fingerprint(),
                    **final,
                    **solve_info(folder),  # the last solve's report (the final epoch has none)
                }
            )
    return pd.DataFrame(rows)


def choose_lambda(
    base_cfg: TrainConfig,
    solvers: Mapping[str, Mapping[str, Any]],
    lambdas: Mapping[str, Sequence[float]],
    seeds: Sequence[int],
    runs_dir: str | os.PathLike[str],
    name: str,
    progress: bool = False,
    metric: str = "val_acc_top1",
    max_val_bpd: float | None = None,
) -> tuple[pd.DataFrame, dict[str, float]]:
    """Train each solver (label -> config overrides of ``base_cfg``) with each of its candidate
    lambdas ``lambdas[label]`` over ``seeds`` (:func:`train_settings`), and choose for each the
    lambda with the best mean validation ``metric`` over the seeds (among those with a mean
    validation bits/dim of at most ``max_val_bpd``, :func:`best_setting`): the test set plays no
    part. Returns every candidate's rows (``setting`` "<label> lambda=<lam>", ``solver`` = label)
    and the chosen lambda per solver. Comparing solvers fairly means giving each as many
    candidates; a choice at an end of its grid that could go further says to extend the grid.
    """
    candidates = {label: _lambdas(label, lambdas.get(label)) for label in solvers}  # before any training
    tables, chosen = [], {}
    for label, overrides in solvers.items():
        grid = {f"{label} lambda={lam:g}": {**overrides, "gaussians.lam": lam} for lam in candidates[label]}
        table = train_settings(base_cfg, grid, seeds, runs_dir, name, progress).assign(solver=label)
        chosen[label] = float(grid[best_setting(table, metric, max_val_bpd)]["gaussians.lam"])
        tables.append(table)
    return pd.concat(tables, ignore_index=True), chosen


def best_setting(
    table: pd.DataFrame, metric: str = "val_acc_top1", max_val_bpd: float | None = None, by: str = "setting"
) -> str:
    """The setting (``table[by]``) with the best mean validation ``metric`` over its rows
    (seeds), among the settings whose mean ``val_bpd`` is at most ``max_val_bpd`` (None: all);
    a tie goes to the first in ``table``'s order.

    NF accuracy alone rewards ever larger lambda: the repulsion keeps separating the classes
    while the likelihood collapses (validation bits/dim 58 at the chosen end of MNIST-3k's grid,
    11 on CIFAR-10; docs/results.md §1, §3). The paper sets lambda by "the convergence, the
    discriminative and the generative properties" together; a bound on validation bits/dim
    states the generative side as a constraint, e.g. twice data init's
    (``scripts/full_data.py``, ``Study.max_bpd_ratio``).

    Example:
        >>> runs = pd.DataFrame({"setting": ["a", "b", "c"], "val_acc_top1": [80.0, 90.0, 95.0],
        ...                      "val_bpd": [1.5, 2.5, 9.0]})
        >>> best_setting(runs), best_setting(runs, max_val_bpd=3.0)
        ('c', 'b')
    """
    if max_val_bpd is None:
        return str(table.groupby(by, sort=False)[metric].mean().idxmax())
    means = table.groupby(by, sort=False)[[metric, "val_bpd"]].mean()
    allowed = means[means["val_bpd"] <= max_val_bpd]  # a NaN (diverged) candidate is never allowed
    if not len(allowed):
        raise ValueError(
            f"no setting has a mean validation bits/dim of at most {max_val_bpd:.4g} (the lowest is "
            f"{means['val_bpd'].min():.4g}, {means['val_bpd'].idxmin()!r}): raise the bound or add "
            "candidates with a smaller lambda"
        )
    return str(allowed[metric].idxmax())


def _lambdas(label: str, values: Sequence[Any] | None) -> list[float]:
    """A solver's candidate lambdas as floats; an empty list or a value that is not a number
    (PyYAML reads ``1.0e4`` as text) is refused before any run trains."""
    if not values:
        raise ValueError(f"solver {label!r} has no candidate lambdas; give lambdas[{label!r}]")
    try:
        return [float(v) for v in values]
    except (TypeError, ValueError):
        raise ValueError(
            f"lambdas[{label!r}] = {list(values)!r} holds a value that is not a number; in YAML "
            "(papermill -y, configs) write numbers such as 1.0e+4 or 10000.0"
        ) from None
