"""Results tied to the code that made them, and checks that hold on any machine.

* :func:`code_fingerprint`: a digest of the ``nfpi`` sources. It is stored in every
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

Example:
    >>> from nfpi.repro import expect
    >>> expect("NF accuracy top-1 %", 96.4, recorded=96.8, tol=1.5, spread="3 x seed std 0.5")
    NF accuracy top-1 %: 96.40, recorded 96.80 +- 1.50 (3 x seed std 0.5): ok
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

__all__ = ["ResultMismatch", "code_fingerprint", "expect", "run_dir", "run_key"]

PACKAGE = Path(__file__).resolve().parent


class ResultMismatch(AssertionError):
    """A result lies outside the tolerance of its recorded value: a regression, or a change
    that needs the recorded value (and the tolerance's measurement) to be renewed."""


@functools.lru_cache(maxsize=None)
def code_fingerprint() -> str:
    """16 hex digits of SHA-256 over the ``nfpi`` package's ``*.py`` files (names and bytes).

    Computed once per process: the sources of a running interpreter do not change under it
    in any way that matters for the results it produces.
    """
    digest = hashlib.sha256()
    for path in sorted(PACKAGE.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def run_key(config: dict[str, Any], ignore: tuple[str, ...] = ()) -> str:
    """12 hex digits identifying a run: its configuration (a nested dict; top-level keys in
    ``ignore`` left out, e.g. devices and thread counts) and :func:`code_fingerprint`."""
    kept = {k: v for k, v in config.items() if k not in ignore}
    text = json.dumps({"config": kept, "code": code_fingerprint()}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def run_dir(root: str | os.PathLike[str], name: str, config: dict[str, Any],
            ignore: tuple[str, ...] = ()) -> Path:
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
        raise ResultMismatch(f"{line}: OUTSIDE the tolerance. If the change is intended, re-measure the "
                             "spread, then renew the recorded value and the tolerance beside this check.")
    print(f"{line}: ok")
