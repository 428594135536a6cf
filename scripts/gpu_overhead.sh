#!/usr/bin/env bash
# The GPU rows of `ganray bench overhead` on a machine that has PyTorch but not ganray's other
# dependencies (no Ray, MLflow or pydantic): DCGAN 64x64, bf16 autocast on/off, channels_last
# on/off. What it times: ganray's round in this process (the ReplicaStepper every replica runs, from
# `build_replica`; no Ray in the path, the device machine has none) against the tuned plain loop
# (the reference: data on the device, fused Adam, foreach EMA), with the minimal loop as an extra
# row. The Ray path adds only the driver's call per chunk, measured on CPU by `ganray bench overhead`.
# Usage: [BATCH=256] [REPS=5] [SECONDS_PER_REP=2] scripts/gpu_overhead.sh OUT_DIR
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
shim="$(mktemp -d)"
mkdir -p "$shim/ganray"
# ganray.bench.plain needs only these three folders (no orchestrator: no pydantic, Ray, MLflow).
for layer in workers models bench; do ln -s "$repo/$layer" "$shim/ganray/$layer"; done
export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
config="$repo/scripts/dcgan64-gpu.json"
if [[ -n "${BATCH:-}" ]]; then  # the same job at another batch size (64 is launch-bound on a big card)
  config="$shim/dcgan64-gpu-b$BATCH.json"
  python3 -c "import json,sys; c=json.load(open(sys.argv[1])); c['schedule']['batch_size']=int(sys.argv[2]); json.dump(c,open(sys.argv[3],'w'))" \
    "$repo/scripts/dcgan64-gpu.json" "$BATCH" "$config"
fi
python3 -m ganray.bench.plain "$config" --out "$1" --reps "${REPS:-5}" --seconds "${SECONDS_PER_REP:-2}"
