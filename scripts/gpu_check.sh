#!/usr/bin/env bash
# The GPU path in one command (scripts/gpu_check.py says what it checks): float64 flow and FPI
# checks on the device, paper-size CIFAR-10 training steps at batch 512 in fp32 / bf16 /
# bf16 + channels_last / bf16 + torch.compile (images/s, peak memory, loss), and a one-process
# torchrun smoke; writes a JSON summary (default runs/gpu_check.json). Under 8 minutes on one GPU.
#
#   scripts/gpu_check.sh                          # on a machine with a GPU
#   scripts/gpu_check.sh --device cpu --smoke     # checks the script itself on a CPU, in seconds
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
# Real datasets as in the Makefile; without them the training check uses synthetic images.
if [[ -z "${NFPI_DATA:-}" && -d ../shared/data ]]; then export NFPI_DATA="$(cd ../shared/data && pwd)"; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" scripts/gpu_check.py "$@"
