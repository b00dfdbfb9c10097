#!/usr/bin/env bash
# The GPU check, for a lent device machine (one H200, its own python3 with torch and nvcc, no network):
#   bash bench/gpu_check.sh          # from the repository root; logs and CSVs go to $OUT (default ./gpu_out)
# Builds the extension for sm_90 (no _sim), runs the CUDA-backend tests, compute-sanitizer memcheck and
# racecheck over every kernel (bench/gpu_smoke.py), then every microbenchmark on the GPU. Each step has its own
# time limit and the limits add up to 480 s, so the whole run stays under 8 minutes; a failed or timed-out step is
# recorded (its log keeps what it printed) and the next one still runs.
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$REPO/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
status=0

step() {  # step NAME SECONDS COMMAND...: runs COMMAND with a limit, output to $OUT/NAME.log and the screen
  local name=$1 limit=$2
  shift 2
  local start=$(date +%s)
  echo "=== $name (limit ${limit}s)"
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $(( $(date +%s) - start ))s" | tee -a "$OUT/summary.txt"
  [ "$rc" -eq 0 ] || status=1
}

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
cd "$REPO"
step build 200 env TORCH_CUDA_ARCH_LIST=9.0 PEFT_KERNELS_CUDASIM=0 PEFT_KERNELS_CUDA=1 \
  "$PY" -m pip install --no-build-isolation --no-deps . -q
cd /tmp
step info 15 "$PY" -P -c "import peft_kernels, json; print(json.dumps(peft_kernels.build_info(), indent=1))"
step tests 65 "$PY" -P -m pytest "$REPO/python_tests" -q -x -k "cuda and not sanitize" -p no:cacheprovider
step memcheck 45 compute-sanitizer --tool memcheck --error-exitcode 3 "$PY" -P "$REPO/bench/gpu_smoke.py"
step racecheck 45 compute-sanitizer --tool racecheck --error-exitcode 3 "$PY" -P "$REPO/bench/gpu_smoke.py"
step bench_nf4_linear 45 "$PY" -P "$REPO/bench/bench_nf4_linear.py" --device cuda --dtype bf16 --out "$OUT"
step bench_lora 25 "$PY" -P "$REPO/bench/bench_lora.py" --device cuda --dtype bf16 --out "$OUT"
step bench_qlora 15 "$PY" -P "$REPO/bench/bench_qlora.py" --device cuda --dtype bf16 --out "$OUT"
step bench_kron_linear 15 "$PY" -P "$REPO/bench/bench_kron_linear.py" --device cuda --dtype bf16 --out "$OUT"
step bench_sparse 10 "$PY" -P "$REPO/bench/bench_sparse.py" --device cuda --out "$OUT"
exit $status
