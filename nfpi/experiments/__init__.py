"""Experiments: the result rows of the papers' tables, grids with reuse, the published numbers,
and the NF-augmentation studies (docs/method.md §6-§8).

- :mod:`nfpi.experiments.rows`: one tidy result row per checkpoint (:func:`evaluate_run`);
- :mod:`nfpi.experiments.grid`: grids of runs trained and evaluated into results CSVs;
- :mod:`nfpi.experiments.tables`: the results CSVs (read, atomic append by (run, eval) key);
- :mod:`nfpi.experiments.references`: the papers' published tables;
- :mod:`nfpi.experiments.peers`: a peer's own class-conditional base on the same flow (notebook 08);
- :mod:`nfpi.experiments.downstream`: the paired NF-augmentation study (``downstream.study``);
- :mod:`nfpi.experiments.finetune`: transformer fine-tuning for paper Tables 5-6.

Example:
    >>> paper_table("nfpi_table1").setting.iloc[-1]
    'FPI'
"""

from . import downstream, finetune
from .grid import best_setting, choose_lambda, run_grid, train_settings
from .peers import TRAINERS, compare_arms, flow_size, train_native
from .references import paper_table
from .rows import (
    EvalConfig,
    Oracle,
    check_compatible,
    config_hash,
    evaluate_run,
    generate,
    load_oracle,
    rfcm,
    solve_info,
)
from .tables import KEY, append_row, find_row, read_rows

__all__ = [
    "KEY",
    "TRAINERS",
    "EvalConfig",
    "Oracle",
    "append_row",
    "best_setting",
    "check_compatible",
    "choose_lambda",
    "compare_arms",
    "config_hash",
    "downstream",
    "evaluate_run",
    "find_row",
    "finetune",
    "flow_size",
    "generate",
    "load_oracle",
    "paper_table",
    "read_rows",
    "rfcm",
    "run_grid",
    "solve_info",
    "train_native",
    "train_settings",
]
