"""Another processor is another draw: the numbers the tests recompute, measured on emulated machines.

A user's CPU runs other kernels than the machine that made the committed numbers: ATen's
vectorised kernels (AVX-512, AVX2 or scalar), oneDNN's convolutions (AVX-512 or AVX2) and
another thread count each reduce floats in another order. A flow evaluated on fixed weights
moves at the float32 rounding level; anything trained (a flow, the oracle CNN, the ResNet of
notebook 06) can land elsewhere altogether, as a reseeding would. This script measures both on
one machine by emulating the others (``ATEN_CPU_CAPABILITY``, ``ONEDNN_MAX_CPU_ISA``,
``OMP_NUM_THREADS``), for every number a test recomputes:

* ``legacy``: the legacy checkpoint's latents, log-dets and test metrics (their largest
  absolute difference to the stored reference outputs);
* ``shipped/<name>``: the test metrics of every shipped flow (``checkpoints/``; ``--only
  shipped/<name>`` re-measures one);
* ``results/<row>``: one cheap row of each notebook's results table, recomputed from scratch
  with the notebook's parameters (the rows ``tests/test_results.py`` recomputes).

Each emulated machine runs in a subprocess; ``results/portability.csv`` gets one row per
(machine, check, metric), and ``tests/test_results.py``, ``tests/test_pretrained.py`` and
``tests/test_legacy_checkpoint.py`` derive their tolerances from it (:func:`row_tolerance`, :func:`spread`)::

    python scripts/portability.py measure                 # the 12 machines (~1 hour on 2 cores)
    python scripts/portability.py measure --jobs 2        # two machines side by side
    python scripts/portability.py measure --only results  # one kind of check

The recomputations live here, once: the tests call the same functions.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jupytext
import pandas as pd
import torch

from nfpi import pretrained, repro
from nfpi.augment import AugmentConfig
from nfpi.config import TrainConfig
from nfpi.evaluation import ClassifierConfig, evaluate_flow
from nfpi.experiments import EvalConfig, downstream, load_oracle, run_grid, train_settings
from nfpi.latents import encode
from nfpi.train import load_checkpoint, load_data

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
RESULTS = REPO / "results"
CSV = RESULTS / "portability.csv"
LEGACY = REPO / "tests" / "data" / "legacy_d10b07e"

# The emulated machines: ATen's kernels x oneDNN's ISA x threads ("native": the variable unset).
CAPABILITIES = ("default", "avx2", "native")
ONEDNN = ("native", "AVX2")
THREADS = (1, 2)
MATRIX = [
    {"capability": c, "onednn": o, "threads": t}
    for c, o, t in itertools.product(CAPABILITIES, ONEDNN, THREADS)
]
KINDS = ("legacy", "shipped", "results")

# Each results row: (notebook, table, setting, metrics and their floors). A floor is the
# metric's resolution: two test images for accuracies (one image of digits' 359 = 0.28 %), one
# point of FID / Coverage / Label Reliability, 0.02 bits/dim.
ROWS = {
    "02_data": ("02_train_flow", "02_train_flow_digits_cpu.csv", "data", ("acc_top1", "test_bpd")),
    "04_data_init": (
        "04_lambda_sweep",
        "04_lambda_sweep.csv",
        "data_init",
        ("nf_top1", "cnn_top1", "fid", "coverage", "label_reliability", "bpd"),
    ),
    "05_means_only": (
        "05_ablations",
        "05_ablations.csv",
        "means_only",
        ("nf_top1", "cnn_top1", "fid", "coverage", "label_reliability", "bpd"),
    ),
    "06_baseline": ("06_nf_augmentation", "06_nf_augmentation.csv", "baseline", ("top1", "val_top1")),
    "06_nfa": ("06_nf_augmentation", "06_nf_augmentation.csv", "nfa", ("top1", "val_top1")),
}
TWO_DIGITS_IMAGES = 2 * 100 / 359
FLOORS = {
    "acc_top1": TWO_DIGITS_IMAGES,
    "nf_top1": TWO_DIGITS_IMAGES,
    "cnn_top1": TWO_DIGITS_IMAGES,
    "top1": TWO_DIGITS_IMAGES,
    "val_top1": 2.0,  # two of notebook 06's 100 validation images
    "fid": 1.0,
    "coverage": 1.0,
    "label_reliability": 1.0,
    "test_bpd": 0.02,
    "bpd": 0.02,
}


def parameters(notebook: str) -> dict:
    """The values of a notebook's ``parameters`` cell (plain literals)."""
    cell = next(
        c
        for c in jupytext.read(NOTEBOOKS / f"{notebook}.py").cells
        if "parameters" in c.metadata.get("tags", [])
    )
    values: dict = {}
    exec(cell.source, {}, values)
    return values


def committed(table: str) -> pd.DataFrame:
    """A committed results table (a clear error when it is missing)."""
    path = RESULTS / table
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: run its notebook (make reproduce) and commit its results"
        )
    return pd.read_csv(path)


def record_of(row: str) -> tuple[pd.DataFrame, pd.Series]:
    """The committed table of ``row`` and the mask of its setting's rows (of its evaluation)."""
    notebook, table, setting, _ = ROWS[row]
    record = committed(table)
    ours = record["setting"] == setting
    if "eval" in record:
        ours &= record["eval"] == record.loc[ours, "eval"].iloc[0]
    return record, ours


# --- the recomputations -------------------------------------------------------------------------


def legacy_outputs() -> dict[str, float]:
    """Largest absolute difference of the legacy checkpoint's latents and log-dets (first 40
    test images) to its stored outputs, and of each of its test metrics."""
    model, gaussians, cfg = load_checkpoint(LEGACY)
    reference = torch.load(LEGACY / "outputs.pt", weights_only=True)
    test_set = load_data(cfg)[1]
    z, logdet = encode(model, test_set, cfg.bits, 500)
    metrics = evaluate_flow(model, gaussians, test_set, cfg.bits, 500)
    out = {
        "z": float((z[:40] - reference["z"]).abs().max()),
        "logdet": float((logdet[:40] - reference["logdet"]).abs().max()),
    }
    out |= {key: abs(float(metrics[key]) - float(value)) for key, value in reference["metrics"].items()}
    return out


def shipped_metrics(name: str) -> dict[str, float]:
    """The shipped flow ``name``'s test metrics, recomputed on its whole test set."""
    now = pretrained.evaluate_shipped(name)
    return {key: float(now[key]) for key in ("acc_top1", "acc_top5", "test_bpd")}


def oracle_for(tmp: Path):
    """Notebook 04's oracle (notebook 05 uses the same parameters), trained into ``tmp``."""
    p = parameters("04_lambda_sweep")
    base = TrainConfig.from_yaml(NOTEBOOKS / p["config"], **p["overrides"])
    return load_oracle(base, ClassifierConfig(**p["oracle"]), tmp / "oracle.pt")


def recompute(row: str, tmp: Path, oracle=None) -> dict[str, float]:
    """One results row recomputed from scratch with its notebook's parameters (seed 0 of the
    notebook's seeds), trained under ``tmp``; ``oracle`` for the rows of notebooks 04/05."""
    notebook, _, setting, metrics = ROWS[row]
    p = parameters(notebook)
    record, ours = record_of(row)
    if notebook == "02_train_flow":
        base = TrainConfig.from_yaml(NOTEBOOKS / p["config"], **p["overrides"])
        lam = float(record.loc[record["setting"] == "fpi", "lam"].iloc[0])
        overrides = {"gaussians.prior": "data", "gaussians.lam": lam}
        fresh = train_settings(base, {setting: overrides}, [p["seeds"][0]], tmp, "fresh").iloc[0]
    elif notebook in ("04_lambda_sweep", "05_ablations"):
        base = TrainConfig.from_yaml(NOTEBOOKS / p["config"], **p["overrides"])
        first = record[ours].iloc[0]
        ev = EvalConfig(
            samples_per_class=int(first["eval.samples_per_class"]),
            temperature=first["eval.temperature"],
            mean_scale=first["eval.mean_scale"],
            classifier=ClassifierConfig(**p["cnn"]),
        )
        if ev.tag() != first["eval"]:
            raise ValueError(f"{notebook}'s parameters no longer make its committed rows ({first['eval']})")
        overrides = {
            "04_lambda_sweep": {"gaussians.prior": "data"},
            "05_ablations": {
                "gaussians.prior": "fpi",
                "gaussians.lam": p.get("lam"),
                "gaussians.learn": "means",
            },
        }[notebook]
        grid = {setting: overrides}
        fresh = run_grid(grid, base, tmp / "runs", tmp / "rows.csv", oracle, ev, seeds=[p["seeds"][0]]).iloc[
            0
        ]
    else:
        fresh = _study_row(p, setting, tmp)
    return {metric: float(fresh[metric]) for metric in metrics}


def _study_row(p: dict, setting: str, tmp: Path) -> pd.Series:
    """Seed 0's row of one arm of notebook 06's study (its own flow, trained under ``tmp``)."""
    flow_cfg = TrainConfig.from_yaml(NOTEBOOKS / p["flow_config"], **p["flow_overrides"])
    study_cfg = downstream.StudyConfig.resnet(
        p["width"],
        p["shift"],
        p["epochs"],
        per_class=p["per_class"],
        val_per_class=p["val_per_class"],
        copies=p["copies"],
    )
    nfa = AugmentConfig(
        k=p["k"], law=p["law"], beta_max=p["beta_max"], beta_a=p["beta_a"], copies=p["copies"]
    )
    arm = downstream.default_arms(nfa=nfa)[setting]
    return downstream.study(flow_cfg, {setting: arm}, study_cfg, p["seeds"][:1], tmp, progress=False).iloc[0]


# --- tolerances from the measured spread --------------------------------------------------------


def measured() -> pd.DataFrame:
    """``results/portability.csv`` (a clear error when it is missing)."""
    if not CSV.exists():
        raise FileNotFoundError(
            f"{CSV} is missing: run `python scripts/portability.py measure` and commit it"
        )
    return pd.read_csv(CSV)


def spread(check: str, metric: str) -> pd.Series:
    """The values of ``metric`` of ``check`` measured on the emulated machines."""
    table = measured()
    values = table.loc[(table["check"] == check) & (table["metric"] == metric), "value"]
    if len(values) < len(MATRIX):
        raise ValueError(
            f"{CSV}: {check} {metric} has {len(values)} of the {len(MATRIX)} machines; re-measure"
        )
    return values


def machine_draws(row: str, metric: str) -> pd.Series:
    """The distinct values of ``metric`` of ``row`` over the emulated machines: machines that
    computed bit-identical numbers (the thread count changes none of these rows) are one draw."""
    table = measured()
    ours = table[(table["check"] == f"results/{row}") & (table["metric"] == metric)]
    spread(f"results/{row}", metric)  # every machine measured
    return ours.drop_duplicates(["capability", "onednn", "value"])["value"]


def row_tolerance(row: str, metric: str) -> tuple[float, float, str]:
    """``(centre, tolerance, where it came from)`` for a recomputed ``metric`` of ``row``.

    A recomputation on another machine is another draw of the setting's distribution over
    seeds and machines, so it is checked against the committed mean over its n seeds with the
    Student-t prediction interval of :func:`nfpi.repro.draw_tolerance` at
    :data:`nfpi.repro.FALSE_ALARM`. Its spread pools the two measured samples of that
    distribution, the committed seeds and the m distinct draws of the emulated machines
    (``results/portability.csv``), with n + m - 2 degrees of freedom; it is never narrower
    than the seed std alone.
    """
    record, ours = record_of(row)
    seeds = record.loc[ours, metric]
    draws = machine_draws(row, metric)
    n, m = len(seeds), len(draws)
    s_seed, s_machine = float(seeds.std()), float(draws.std()) if m > 1 else 0.0
    df = (n - 1) + (m - 1)
    pooled = math.sqrt(((n - 1) * s_seed**2 + (m - 1) * s_machine**2) / df)
    s, floor = max(s_seed, pooled), FLOORS[metric]
    tol = repro.draw_tolerance(s, df, 1, n, floor)
    why = (
        f"max(floor {floor:.2f}, t({1 - repro.FALSE_ALARM / 2:g}, {df}) x s {s:.2f} x sqrt(1 + 1/{n})); "
        f"s = max(seed std {s_seed:.2f}, pooled with {m} machine draws of std {s_machine:.2f})"
    )
    return float(seeds.mean()), tol, why


# --- measuring ----------------------------------------------------------------------------------


def _environment(machine: dict) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")}
    if machine["capability"] != "native":
        env["ATEN_CPU_CAPABILITY"] = machine["capability"]
    if machine["onednn"] != "native":
        env["ONEDNN_MAX_CPU_ISA"] = machine["onednn"]
    env["OMP_NUM_THREADS"] = str(machine["threads"])
    return env


def _worker(kinds: list[str]) -> Iterator[dict]:
    """The rows of one machine (this process, under its environment)."""
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if "legacy" in kinds:
        for metric, value in legacy_outputs().items():
            yield {"check": "legacy", "metric": metric, "value": value}
    for name in pretrained.names():
        if "shipped" in kinds or f"shipped/{name}" in kinds:
            for metric, value in shipped_metrics(name).items():
                yield {"check": f"shipped/{name}", "metric": metric, "value": value}
    if "results" in kinds:
        with tempfile.TemporaryDirectory() as tmp:
            oracle = oracle_for(Path(tmp))
            for row in ROWS:
                # notebook 06's two arms share a folder: their replicate's flow is trained once
                folder = Path(tmp) / row.split("_")[0]
                for metric, value in recompute(row, folder, oracle).items():
                    yield {"check": f"results/{row}", "metric": metric, "value": value}


def _run_machine(machine: dict, kinds: list[str]) -> list[dict]:
    cmd = [sys.executable, __file__, "worker", "--only", *kinds]
    done = subprocess.run(cmd, env=_environment(machine), capture_output=True, text=True, cwd=REPO)
    if done.returncode:
        raise RuntimeError(f"{machine}: worker failed\n{done.stderr[-3000:]}")
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    print(f"{machine}: {len(rows)} values", flush=True)
    return [machine | row for row in rows]


def _cpu_name() -> str:
    """The processor's model name (``/proc/cpuinfo`` on Linux), else what ``platform`` says."""
    info = Path("/proc/cpuinfo")
    if info.exists():
        for line in info.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def measure(kinds: list[str], jobs: int) -> pd.DataFrame:
    """Every machine of :data:`MATRIX`, ``jobs`` at a time; merged into ``results/portability.csv``."""
    with ThreadPoolExecutor(jobs) as pool:
        rows = [r for part in pool.map(lambda m: _run_machine(m, kinds), MATRIX) for r in part]
    fresh = pd.DataFrame(rows)
    fresh["cpu"] = _cpu_name()
    fresh["native"] = torch.backends.cpu.get_cpu_capability()
    fresh["code"] = repro.code_fingerprint()
    if CSV.exists():
        old = pd.read_csv(CSV)
        kept = ~(old["check"].str.split("/").str[0].isin(kinds) | old["check"].isin(kinds))
        fresh = pd.concat([old[kept], fresh], ignore_index=True)
    fresh.to_csv(CSV, index=False)
    return fresh


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["measure", "worker"])
    flows = [f"shipped/{name}" for name in pretrained.names()]
    parser.add_argument("--only", nargs="+", choices=[*KINDS, *flows], default=list(KINDS))
    parser.add_argument("--jobs", type=int, default=1, help="machines measured side by side")
    args = parser.parse_args(argv)
    if args.command == "worker":
        for row in _worker(args.only):
            print(json.dumps(row), flush=True)
        return
    table = measure(args.only, args.jobs)
    print(table.groupby(["check", "metric"])["value"].agg(["min", "max", "std"]).to_string())


if __name__ == "__main__":
    main()
