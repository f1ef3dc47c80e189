"""``scripts/gpu_check.sh --device cpu --smoke``: the GPU check script runs end to end on a CPU
(the script to run first on a GPU; see docs/gpu.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # three Python processes (script, torchrun launcher, worker): ~14 s of CPU time
def test_gpu_check_smoke_on_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    cmd = [str(REPO / "scripts" / "gpu_check.sh"), "--device", "cpu", "--smoke", "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert summary["ok"] and summary["smoke"]
    for conv in ("lu", "matexp"):  # float64 flow checks
        assert summary["flow"][conv]["inverse_max_abs_error"] < 1e-9
        assert summary["flow"][conv]["logdet_abs_error"] < 1e-8
    assert summary["fpi"]["converged"] and summary["fpi"]["gradient_residual"] < 1e-6
    train = summary["train"]
    fp32 = train["fp32"]
    for variant in ("fp32", "bf16", "bf16_channels_last", "bf16_compiled"):
        assert train[variant]["images_per_s"] > 0
        # Same data and initialisation: the variants differ by bf16 rounding only.
        assert abs(train[variant]["train_bpd"] - fp32["train_bpd"]) < 0.05, variant
    assert summary["torchrun"]["returncode"] == 0 and 0 < summary["torchrun"]["acc_top1"] <= 100
    assert "[gpu_check] ok" in proc.stdout
