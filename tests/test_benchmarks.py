"""The benchmarks still run: each script in benchmarks/ with ``--smoke`` (every section, its
subprocess memory probes and its peer comparison, at toy sizes) in a fresh process.

Guards against a benchmark breaking silently when the library under it changes (as it once did: the
K=1000 memory probe of bench_fpi.py crashed once ``fpi.solve`` refused ``tol=0``). The numbers
printed at smoke sizes mean nothing; only that every code path completes and reports is checked.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

# `make test` runs these; `make quick` leaves them out: each is 2-4 fresh Python processes that import
# torch (and TorchDynamo, which the first optimizer pulls in), ~6-20 s apiece on a loaded 2-core machine.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
HAVE_NORMFLOWS = importlib.util.find_spec("normflows") is not None

# script -> text its smoke output must contain: a ratio line against its peer where it has one
EXPECTED = {
    "bench_fpi.py": ["ratio", "[1]", "[2]", "[3]", "[4]"],
    "bench_flow.py": [
        "ratio nfpi/normflows" if HAVE_NORMFLOWS else "skipping the normflows peer",
        "per-image memory ratio",
        "matexp vs affine",
    ],
    "bench_checkpoint.py": ["ratio save+sha256 / save", "ratio load+verify / load"],
    "bench_fpi_configs.py": ["| digits_cpu | 10 | 64 |"],
}


@pytest.mark.parametrize("script", sorted(EXPECTED))
def test_benchmark_smoke_run(script: str) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--smoke"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, f"{script} --smoke failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
    missing = [text for text in EXPECTED[script] if text not in out.stdout]
    assert not missing, f"{script} --smoke printed no {missing}:\n{out.stdout}"
