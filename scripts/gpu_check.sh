#!/usr/bin/env bash
# One command on a CUDA machine: install the pinned GPU extras (make setup-gpu: torch's CUDA build, vLLM,
# DeepSpeed, Liger), then run scripts/gpu_check.py: a random model with Llama-3.2-3B's shapes through SFT
# and GRPO (with and without vLLM colocate), saved, merged, reloaded; per-step time, tokens/s, peak GPU memory.
#
#   bash scripts/gpu_check.sh                    # 3 steps per run, ~10 minutes on one H100-class GPU
#   STEPS=5 bash scripts/gpu_check.sh --no-vllm
#   SKIP_INSTALL=1 PYTHON=python bash scripts/gpu_check.sh   # an environment that has the extras already
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
if [[ -z ${SKIP_INSTALL:-} ]]; then
  make setup-gpu
fi
exec "$PY" scripts/gpu_check.py --steps "${STEPS:-3}" "$@"
