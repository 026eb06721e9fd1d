#!/usr/bin/env bash
# GPU readiness, in one run (under 8 minutes on one GPU): every CUDA path's test (pytest -m gpu,
# tests/test_devices.py), then the benchmarks on CUDA, written to benchmarks/results/*-cuda.*
# with the machine's description. Run it first in a session that is lent a GPU machine:
#   bash benchmarks/gpu-check.sh            (on the device tool: the repository root)
# Without CUDA it runs its CPU fallback end to end (the CPU variants of the same tests and short
# benchmark runs into a temporary folder), so CI proves the script works; nothing is committed
# from the fallback.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3
failures=0
step() {  # step NAME COMMAND...: run, log, count failures, go on with the next step
  local name=$1; shift
  echo "== $name: $*" | tee -a "$LOG"
  local started=$SECONDS
  "$@" 2>&1 | tee -a "$LOG"
  local code=${PIPESTATUS[0]}
  echo "== $name: exit $code in $((SECONDS - started)) s" | tee -a "$LOG"
  [ "$code" -eq 0 ] || failures=$((failures + 1))
}

if "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  mode=cuda
  OUT=${OUT:-benchmarks/results}
  tests=(-m gpu)
  sizes=()
  moco_sizes=()
  scoring_sizes=()
else
  mode=cpu
  OUT=${OUT:-$(mktemp -d)}
  tests=(-m "not gpu")
  sizes=(--images 256 --repeats 1 --random-policies 1)
  moco_sizes=(--configs r18w8_16px --steps 1 --repeats 1)
  scoring_sizes=(--candidates 2 --heldout 128)
fi
mkdir -p "$OUT"
LOG=$OUT/gpu-check-$mode.log
: > "$LOG"
{
  echo "# gpu-check ($mode), $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  "$PYTHON" -c "import torch, platform; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, platform.platform())"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  echo "load average: $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null)"
} 2>&1 | tee -a "$LOG"

step tests "$PYTHON" -m pytest -q -p no:cacheprovider "${tests[@]}" -k "not gpu_check" tests/test_devices.py
# --write: the benchmarks only print without it; a result measured on a loaded machine is
# written marked as such (benchmarks/common.py).
step moco "$PYTHON" benchmarks/bench_moco.py --write --out "$OUT" "${moco_sizes[@]}"
step scoring "$PYTHON" benchmarks/bench_scoring.py --write --device "$mode" --out "$OUT" "${scoring_sizes[@]}"
step augment "$PYTHON" benchmarks/bench_augment.py --write --out "$OUT" "${sizes[@]}"

echo "gpu-check ($mode): $failures failed step(s); results and log in $OUT" | tee -a "$LOG"
[ "$failures" -eq 0 ]
