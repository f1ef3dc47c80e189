"""Results tied to the code that made them, and checks that hold on any machine.

* :func:`code_fingerprint`: a digest of the ``nfpi`` sources (their syntax: docstring and
  comment edits keep it). It is stored in every
  checkpoint, run summary and results row, and it is part of every cache key
  (:func:`run_key`, :func:`nfpi.experiments.config_hash`), so a cached run or row is reused
  only when the same code and the same configuration made it; any change to the library
  recomputes.
* :func:`run_dir`: the run folder of a configuration, ``root / "<name>-<run_key>"``: a
  parameter change gets its own run, an identical configuration reuses its run.
* :func:`expect`: the one helper that checks a trained, sampled or fine-tuned number against
  its recorded value. Such numbers change with the machine, the thread count and the float
  reduction order, so they are never compared as exact strings; each check states its
  tolerance and the measured spread it was derived from, prints the comparison and raises
  :class:`ResultMismatch` when the value is outside it.
* :func:`seed_summary`: mean and std over seeds per setting, and the paired (same seed)
  difference to a baseline with its std and 95 % interval: how every comparison is reported.
* :func:`expect_recorded`: :func:`expect` for every setting and metric of a fresh results
  table against the committed one, with tolerances derived from the recorded seed spread
  (:func:`pooled_spread`, :func:`draw_tolerance`: another machine is another draw).
* :func:`orderings`: whether claimed orderings of settings ("A > B") hold, each a paired
  t-test over seeds, Holm-corrected over the family of orderings read together.
* :func:`render_readme`: the result tables of the README and docs/results.md are generated from
  the committed results CSVs (blocks between ``<!-- results: ... -->`` and ``<!-- /results -->``),
  so every number there has an artefact; ``python -m nfpi.repro FILE`` (``make tables``) rewrites them and
  ``tests/test_readme.py`` checks that they agree.

Example:
    >>> from nfpi.repro import expect
    >>> expect("NF accuracy top-1 %", 96.4, recorded=96.8, tol=1.5, spread="3 x seed std 0.5")
    NF accuracy top-1 %: 96.40, recorded 96.80 +- 1.50 (3 x seed std 0.5): ok
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import math
import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from scipy import stats

__all__ = [
    "ResultMismatch",
    "code_fingerprint",
    "draw_tolerance",
    "expect",
    "expect_recorded",
    "markdown_summary",
    "orderings",
    "pooled_spread",
    "read_recorded",
    "render_readme",
    "run_dir",
    "run_key",
    "seed_summary",
]

PACKAGE = Path(__file__).resolve().parent
# The chance that a correct build fails one recomputed-result check on an unseen machine. About
# 50 checks recompute on a fresh machine (tests/test_results.py, notebooks 02 and 06 in nbval):
# at 1e-4 each, a correct build fails `make test` there in fewer than 1 run of 200.
FALSE_ALARM = 1e-4


class ResultMismatch(AssertionError):
    """A result lies outside the tolerance of its recorded value: a regression, or a change
    that needs the recorded value (and the tolerance's measurement) to be renewed."""


@functools.cache
def code_fingerprint(root: str | os.PathLike[str] | None = None) -> str:
    """16 hex digits of SHA-256 over the syntax of the ``nfpi`` package's ``*.py`` files, in
    every subpackage (``root``: another package tree, default :data:`PACKAGE`).

    Each file contributes its path relative to the package (posix, sorted) and its syntax tree
    without docstrings and comments (:func:`_syntax`): editing documentation keeps the
    fingerprint, and so the results made by the code; any change to a statement or a constant
    changes it. Computed once per process and root: the sources of a running interpreter do
    not change under it in any way that matters for the results it produces.

    Example:
        >>> len(code_fingerprint())
        16
    """
    package = Path(root) if root is not None else PACKAGE
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py"), key=lambda p: p.relative_to(package).as_posix()):
        rel = path.relative_to(package).as_posix()
        digest.update(rel.encode() + b"\0" + _syntax(path.read_text(encoding="utf-8")).encode() + b"\0")
    return digest.hexdigest()[:16]


def _syntax(source: str) -> str:
    """The syntax tree of ``source`` without docstrings (the first string statement of a module,
    class or function), as :func:`ast.dump` writes it: without comments, line numbers or
    formatting."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                if isinstance(body[0].value.value, str):
                    node.body = body[1:]
    return ast.dump(tree, annotate_fields=True, include_attributes=False)


def run_key(config: dict[str, Any], ignore: tuple[str, ...] = (), with_code: bool = True) -> str:
    """12 hex digits identifying a run: its configuration (a nested dict; top-level keys in
    ``ignore`` left out, e.g. devices and thread counts) and :func:`code_fingerprint`
    (``with_code=False``: the configuration alone, for results that outlive a code version and
    record the fingerprint that made them beside the key)."""
    kept: dict[str, Any] = {"config": {k: v for k, v in config.items() if k not in ignore}}
    if with_code:
        kept["code"] = code_fingerprint()
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:12]


def run_dir(
    root: str | os.PathLike[str], name: str, config: dict[str, Any], ignore: tuple[str, ...] = ()
) -> Path:
    """``root / "<name>-<run_key>"``: the folder of the run of ``config`` made by this code."""
    return Path(root) / f"{name}-{run_key(config, ignore)}"


def expect(label: str, value: float, recorded: float, tol: float, spread: str) -> None:
    """Check that ``value`` lies within ``tol`` of ``recorded``; print the comparison.

    ``spread`` says where ``tol`` comes from (e.g. "3 x seed std 0.5, threads 1 vs 2: 0.1"):
    a tolerance is derived from measured seed-to-seed and thread-to-thread spread, never
    picked to pass. Raises :class:`ResultMismatch` (an AssertionError, so pytest and nbval
    report it as a failure) when ``|value - recorded| > tol`` or the value is not finite.
    """
    if not tol > 0:
        raise ValueError(f"{label}: tol must be > 0 (derived from a measured spread), got {tol}")
    value = float(value)
    line = f"{label}: {value:.2f}, recorded {recorded:.2f} +- {tol:.2f} ({spread})"
    if not math.isfinite(value) or abs(value - recorded) > tol:
        raise ResultMismatch(
            f"{line}: OUTSIDE the tolerance. If the change is intended, re-measure the "
            "spread, then renew the recorded value and the tolerance beside this check."
        )
    print(f"{line}: ok")


def seed_summary(
    results: pd.DataFrame,
    metrics: Sequence[str],
    by: str = "setting",
    seed: str = "seed",
    baseline: str | None = None,
) -> pd.DataFrame:
    """One row per value of ``by`` (in order of appearance): ``seeds``, and for each metric its
    ``<m>_mean`` and ``<m>_std`` over seeds; with ``baseline`` (a value of ``by``) also the
    paired difference to it, seed by seed: ``<m>_diff_mean``, ``<m>_diff_std`` and
    ``<m>_diff_ci95`` (half-width of the Student-t 95 % interval of the mean difference; NaN
    with fewer than 2 shared seeds)."""
    order = list(dict.fromkeys(results[by]))
    table = results.groupby(by)[list(metrics)].agg(["mean", "std"]).reindex(order)
    table.columns = [f"{m}_{stat}" for m, stat in table.columns]
    table.insert(0, "seeds", results.groupby(by)[seed].nunique().reindex(order))
    if baseline is not None:
        if baseline not in order:
            raise ValueError(f"baseline {baseline!r} is not a value of {by!r}: {order}")
        for m in metrics:
            by_seed = results.pivot_table(index=seed, columns=by, values=m)
            diffs = by_seed.sub(by_seed[baseline], axis=0)
            n = diffs.notna().sum()
            half = stats.t.ppf(0.975, (n - 1).clip(lower=1)) * diffs.std() / n.pow(0.5)
            table[f"{m}_diff_mean"] = diffs.mean().reindex(order)
            table[f"{m}_diff_std"] = diffs.std().reindex(order)
            table[f"{m}_diff_ci95"] = half.where(n >= 2).reindex(order)
    return table


def read_recorded(path: str | os.PathLike[str]) -> pd.DataFrame | None:
    """The committed results table at ``path``, read before a notebook recomputes it (None if
    there is none yet)."""
    path = Path(path)
    return pd.read_csv(path) if path.exists() else None


def pooled_spread(table: pd.DataFrame, metric: str, by: str | Sequence[str] = "setting") -> tuple[float, int]:
    """``(s, df)``: the seed-to-seed std of ``metric`` within a setting (value of ``by``), pooled
    over every setting of ``table`` with >= 2 finite values, and its degrees of freedom
    (``(0.0, 0)`` when there are none). Three seeds say little about a heavy tail; a table's
    settings share their noise source (the same classifier, test set and training budget), so
    their pooled std is the better estimate of the spread of one more draw."""
    groups = table.groupby(by)[metric].agg(["var", "count"]).dropna()
    groups = groups[groups["count"] >= 2]
    df = int((groups["count"] - 1).sum())
    if df == 0:
        return 0.0, 0
    return math.sqrt(float((groups["var"] * (groups["count"] - 1)).sum()) / df), df


def draw_tolerance(
    spread: float, df: int, n_new: int, n_old: int, floor: float, false_alarm: float = FALSE_ALARM
) -> float:
    """Half-width of the Student-t prediction interval of a mean over ``n_new`` new draws
    (seeds, or one seed on another machine, which reduces floats in another order and so is
    another draw) around a recorded mean over ``n_old``:
    ``t(1 - false_alarm / 2, df) * spread * sqrt(1/n_new + 1/n_old)``, never below ``floor`` (the
    metric's resolution). ``false_alarm`` is the chance that a correct build fails the check.

    Example:
        >>> round(draw_tolerance(1.0, 20, 1, 3, floor=0.5), 1)  # t(1 - 5e-5, 20) = 4.84
        5.6
    """
    if df < 1:
        raise ValueError(f"a tolerance needs a measured spread (>= 1 degree of freedom); got df={df}")
    k = float(stats.t.ppf(1 - false_alarm / 2, df))
    return max(floor, k * spread * math.sqrt(1 / n_new + 1 / n_old))


def expect_recorded(
    fresh: pd.DataFrame,
    recorded: pd.DataFrame | None,
    floors: Mapping[str, float],
    by: str | Sequence[str] = "setting",
    seed: str = "seed",
    false_alarm: float = FALSE_ALARM,
) -> None:
    """:func:`expect` the mean over seeds of every metric in ``floors``, for every setting
    (value of ``by``, one column or several) of ``fresh``, against the ``recorded`` table.

    Another machine is another draw (its kernels reduce floats in another order, and training
    amplifies that as far as a reseeding), so the tolerance is the :func:`draw_tolerance` of
    ``s = max(the setting's recorded seed std, the recorded table's pooled std)`` with the
    pooled degrees of freedom (:func:`pooled_spread`), at ``false_alarm`` per check. ``floors``
    give each metric's resolution (e.g. two test images in %). A setting with fewer than 2
    recorded seeds is refused. Without a recorded table, or for a setting it lacks, nothing is
    compared and the line says so. A metric that is NaN in every fresh and every recorded row
    of a setting (one it does not produce) is skipped; NaN on one side only fails.
    """
    by = [by] if isinstance(by, str) else list(by)
    for setting, group in fresh.groupby(by, sort=False):
        name = " ".join(map(str, setting))
        old = None
        if recorded is not None and set(by) <= set(recorded.columns):
            hit = (recorded[by].astype(str) == [str(v) for v in setting]).all(axis=1)
            old = recorded[hit]
        if old is None or old.empty:
            print(f"{name}: nothing recorded yet; these numbers become the record when committed")
            continue
        n_old, n_new = old[seed].nunique(), group[seed].nunique()
        if n_old < 2:
            raise ValueError(f"{name}: the record holds {n_old} seed; a tolerance needs the spread of >= 2")
        for metric, floor in floors.items():
            if group[metric].isna().all() and old[metric].isna().all():
                continue  # a metric this setting does not produce (e.g. CNN-Acc of an NF-only row)
            own = float(old[metric].std())
            pooled, df = pooled_spread(recorded, metric, by)
            spread = max(own, pooled)
            tol = draw_tolerance(spread, df, n_new, n_old, floor, false_alarm)
            expect(
                f"{name} {metric} (mean of {n_new} seeds)",
                group[metric].mean(),
                float(old[metric].mean()),
                tol,
                f"max(floor {floor:g}, t({1 - false_alarm / 2:g}, {df}) x max(seed std {own:.2f}, "
                f"pooled {pooled:.2f}) x sqrt(1/{n_new} + 1/{n_old}))",
            )


def markdown_summary(
    table: pd.DataFrame,
    metrics: Sequence[str],
    by: str = "setting",
    baseline: str | None = None,
    settings: Sequence[str] | None = None,
) -> str:
    """A markdown table: one row per setting (``settings`` in that order, or all), the number
    of seeds and ``mean ± std`` of each metric over seeds, and with ``baseline`` the paired
    difference of the first metric to it (mean ± 95 % interval half-width). A setting with one
    seed shows its value and "(one seed)"."""
    summary = seed_summary(table, metrics, by=by, baseline=baseline)
    if settings is not None:
        summary = summary.loc[list(settings)]
    head = [by, "seeds", *metrics] + ([f"{metrics[0]} - {baseline} (95 % CI)"] if baseline else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in summary.iterrows():
        cells = [str(name), str(int(row["seeds"]))]
        cells += [_plus_minus(row[f"{m}_mean"], row[f"{m}_std"], "") for m in metrics]
        if baseline:
            diff, half = row[f"{metrics[0]}_diff_mean"], row[f"{metrics[0]}_diff_ci95"]
            cells.append("–" if name == baseline else _plus_minus(diff, half, "+"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _plus_minus(value: float, spread: float, sign: str) -> str:
    """``"value ± spread"``; one seed has no spread, and says so instead of ``± nan``; a metric
    a setting does not produce (NaN) is ``–``."""
    if not math.isfinite(value):
        return "–"
    text = f"{value:{sign}.2f}"
    return f"{text} ± {spread:.2f}" if math.isfinite(spread) else f"{text} (one seed)"


def orderings(
    table: pd.DataFrame,
    metric: str,
    claims: Sequence[tuple[str, str]],
    by: str = "setting",
    seed: str = "seed",
    level: float = 0.05,
) -> pd.DataFrame:
    """Whether each claim ``(a, b)``, "a > b in ``metric``", holds in ``table``: one row per
    claim with the means, the paired (same seed) difference a - b, its 95 % interval, the
    two-sided paired t-test p value and its Holm-adjusted value over the claims that could be
    tested (the family read together), and a verdict: ``holds`` (adjusted p < ``level``, a > b),
    ``reversed`` (adjusted p < ``level``, a < b), ``not shown`` (neither), ``not run yet``
    (a setting has no rows) or ``too few seeds`` (< 2 shared seeds).

    Example:
        >>> t = pd.DataFrame({"setting": ["a"] * 3 + ["b"] * 3, "seed": [0, 1, 2] * 2,
        ...                   "acc": [90.0, 91.0, 92.0, 50.0, 52.0, 51.0]})
        >>> orderings(t, "acc", [("a", "b"), ("b", "a"), ("a", "c")])["verdict"].tolist()
        ['holds', 'reversed', 'not run yet']
    """
    by_seed = table.pivot_table(index=seed, columns=by, values=metric)
    rows = []
    for a, b in claims:
        row: dict[str, Any] = {"claim": f"{a} > {b}", "a": a, "b": b, "verdict": "not run yet"}
        if a in by_seed and b in by_seed:
            diff = (by_seed[a] - by_seed[b]).dropna()
            n = len(diff)
            row |= {"a_mean": by_seed[a].mean(), "b_mean": by_seed[b].mean(), "seeds": n}
            row["verdict"] = "too few seeds"
            if n >= 2:
                sd = float(diff.std())
                half = float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
                p = float(stats.ttest_1samp(diff, 0.0).pvalue) if sd > 0 else 0.0
                row |= {"diff_mean": float(diff.mean()), "diff_ci95": half, "p": p}
        rows.append(row)
    out = pd.DataFrame(rows)
    tested = out["p"].notna() if "p" in out else pd.Series(False, index=out.index)
    if tested.any():  # Holm: the i-th smallest of m p values times (m - i), made monotone
        p = out.loc[tested, "p"].sort_values()
        adjusted = (p * (len(p) - pd.Series(range(len(p)), index=p.index))).cummax().clip(upper=1.0)
        out.loc[tested, "p_holm"] = adjusted
        shown = tested & (out["p_holm"] < level)
        out.loc[tested, "verdict"] = "not shown"
        out.loc[shown, "verdict"] = ["holds" if d > 0 else "reversed" for d in out.loc[shown, "diff_mean"]]
    return out


def _markdown_orderings(table: pd.DataFrame, metric: str, claims: Sequence[tuple[str, str]], by: str) -> str:
    """:func:`orderings` as a markdown table (means, paired difference ± 95 % interval, Holm p)."""
    result = orderings(table, metric, claims, by=by)
    head = ["claim", "seeds", f"{metric}: a vs b", "a - b (95 % CI)", "Holm p", "verdict"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in result.iterrows():
        cells = [r["claim"], "–", "–", "–", "–", f"**{r['verdict']}**"]
        if "a_mean" in r and pd.notna(r["a_mean"]):
            cells[1:3] = [str(int(r["seeds"])), f"{r['a_mean']:.2f} vs {r['b_mean']:.2f}"]
        if "p" in r and pd.notna(r["p"]):
            cells[3:5] = [f"{r['diff_mean']:+.2f} ± {r['diff_ci95']:.2f}", f"{r['p_holm']:.2g}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


_BLOCK = re.compile(r"(<!-- results: (?P<spec>[^\n]*?) -->\n)(?P<body>.*?)(<!-- /results -->)", re.DOTALL)


def _render_block(spec: str, root: Path) -> str:
    """The table of one README marker: ``<csv> metrics=a,b [by=setting] [baseline=x]
    [settings=x,y] [<column>=<value> ...]``; other ``column=value`` options keep only the rows
    where that column holds that value (e.g. one evaluation, ``eval=nf``). With
    ``claims=a>b,c>d`` the block is the :func:`orderings` table of the first metric instead (a
    name not in the table is read with its ``_`` as spaces: ``fpi_means`` for ``fpi means``)."""
    path, *options = spec.split()
    args = dict(option.split("=", 1) for option in options)
    table = pd.read_csv(root / path)
    for column in set(args) - {"metrics", "by", "baseline", "settings", "claims"}:
        table = table[table[column].astype(str) == args[column]]
    if "claims" in args:
        by, names = args.get("by", "setting"), set(table[args.get("by", "setting")])
        pairs = [c.split(">") for c in args["claims"].split(",")]
        claims = [tuple(n if n in names else n.replace("_", " ") for n in pair) for pair in pairs]
        return _markdown_orderings(table, args["metrics"].split(",")[0], claims, by=by)
    settings = args["settings"].split(",") if "settings" in args else None
    return markdown_summary(
        table,
        args["metrics"].split(","),
        by=args.get("by", "setting"),
        baseline=args.get("baseline"),
        settings=settings,
    )


def render_readme(text: str, root: str | os.PathLike[str]) -> str:
    """``text`` with every results block regenerated from its CSV (paths relative to ``root``)."""
    return _BLOCK.sub(
        lambda m: m.group(1) + _render_block(m.group("spec"), Path(root)) + "\n" + m.group(4), text
    )


if __name__ == "__main__":  # python -m nfpi.repro README.md: regenerate its results tables
    readme = Path(sys.argv[1] if len(sys.argv) > 1 else "README.md")
    readme.write_text(render_readme(readme.read_text(), readme.parent))
    print(f"{readme}: {len(_BLOCK.findall(readme.read_text()))} results tables regenerated")
