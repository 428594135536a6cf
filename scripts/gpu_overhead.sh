#!/usr/bin/env bash
# The GPU rows of `ganray bench overhead` on a machine that has PyTorch but not ganray's other
# dependencies (no Ray, MLflow or pydantic): DCGAN 64x64, bf16 autocast on/off, channels_last
# on/off, ganray's round (the ReplicaStepper every replica runs) against the plain loop.
# Usage: scripts/gpu_overhead.sh OUT_DIR
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
shim="$(mktemp -d)"
mkdir -p "$shim/ganray"
for layer in orchestrator workers models; do ln -s "$repo/$layer" "$shim/ganray/$layer"; done
export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
python3 -m ganray.orchestrator.bench_plain "$repo/scripts/dcgan64-gpu.json" --out "$1" --reps "${REPS:-5}" --seconds "${SECONDS_PER_REP:-2}"
