#!/usr/bin/env bash
# The prepared GPU check of issue 9 (docs/gpu.md): on a machine with one CUDA GPU, installs psgpo with
# the ml + vllm extras into a fresh venv, builds the tiny models and runs scripts/gpu_check.py.
#   bash scripts/gpu_check.sh [OUT_DIR]          (default runs/gpu_check)
# Env: VENV (default .venv-gpu), PYTHON (default python3), PIP_EXTRA (extra pip args, e.g. an index),
# RUN_TESTS=1 to also run pytest -m gpu.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu_check}
VENV=${VENV:-.venv-gpu}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
# vLLM pins its own CUDA torch build: install it first and let the ml extra keep that torch.
"$VENV/bin/pip" install -q --upgrade pip ${PIP_EXTRA:-}
"$VENV/bin/pip" install -q ${PIP_EXTRA:-} -e ".[ml,vllm,dev]"
"$VENV/bin/python" -c "import torch, vllm; assert torch.cuda.is_available(), 'no CUDA GPU'; \
print('torch', torch.__version__, 'vllm', vllm.__version__, torch.cuda.get_device_name(0))"
if [ ! -f "$OUT/models/prm/model.safetensors" ]; then
  "$VENV/bin/psgpo" models tiny --out "$OUT/models"
fi
"$VENV/bin/python" scripts/gpu_check.py --models "$OUT/models" --out "$OUT/gpu_check.json"
if [ "${RUN_TESTS:-0}" = 1 ]; then  # the same checks as pytest tests (more engine starts: minutes more)
  "$VENV/bin/python" -m pytest tests/gpu -q -m gpu
fi
