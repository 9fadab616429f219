#!/usr/bin/env bash
# One prepared run for a lent GPU (device time is scarce: plan for one ~10-minute call).
#   bash scripts/gpu_check.sh [PHASE ...]     phases: install tests ops attention decode quant flce e2e
# Default: all phases in that order, each under its own time limit so one slow phase cannot eat the rest.
# Installs into the image's own Python without network (its torch/triton are kept), runs the GPU tests,
# then the benchmarks; results land in benchmarks/results/<gpu>/ and, when $OUT is set (the device tool),
# are copied there together with the logs.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
phases=${*:-install tests ops attention decode quant flce e2e}
log_dir=${OUT:-/tmp}/gpu-check-logs
mkdir -p "$log_dir"

run() {  # run NAME SECONDS CMD...
    local name=$1 secs=$2; shift 2
    echo "=== $name (limit ${secs}s): $*"
    local t0=$SECONDS
    timeout "$secs" "$@" > "$log_dir/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$log_dir/$name.log"
    echo "=== $name rc=$rc in $((SECONDS - t0))s"
}

for phase in $phases; do
    case $phase in
        install)   run install 120 "$PY" -m pip install --no-deps --no-build-isolation -e . ;;
        tests)     run tests 240 "$PY" -m pytest -q -m gpu -x -p no:cacheprovider ;;
        ops)       run ops 150 "$PY" -m llama_triton.cli bench ;;
        attention) run attention 90 "$PY" benchmarks/bench_attention.py ;;
        decode)    run decode 90 "$PY" benchmarks/bench_decode.py --no-compile ;;
        quant)     run quant 90 "$PY" benchmarks/bench_quant.py --quick ;;
        flce)      run flce 60 "$PY" benchmarks/bench_flce.py ;;
        e2e)       run e2e 150 "$PY" benchmarks/bench_e2e.py --models llama-3.2-1b ;;
        *)         echo "unknown phase $phase"; exit 2 ;;
    esac
done
if [ -n "${OUT:-}" ] && [ -d benchmarks/results ]; then
    cp -r benchmarks/results "$OUT/"
fi
