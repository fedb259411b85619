#!/usr/bin/env bash
# The full-stack GPU benchmark in one command of at most 10 minutes (docs/gpu.md):
#
#   bash benchmarks/gpu/run_stack.sh <gpus> [extra stack_bench.py args]
#
# Sources env.sh (wheels of .whl/, tokenizer cache, NVLink multicast off), prints
# nvidia-smi, and runs benchmarks/gpu/stack_bench.py for Llama-3.1-8B (random bf16
# weights) on <gpus> GPUs inside a `timeout` that keeps the whole script within 10
# minutes, ~60 s of them for the setup and the stop. Results go to $OUT (results.json, results.md, stack.png,
# stack.log); without $OUT, to bench-results/stack.
set -uo pipefail
GPUS="${1:?usage: bash benchmarks/gpu/run_stack.sh <gpus> [extra stack_bench.py args]}"
shift
cd "$(dirname "$0")/../.."
# shellcheck source=/dev/null
source benchmarks/gpu/env.sh
OUT="${OUT:-bench-results/stack}"
mkdir -p "$OUT"
{
  echo "===== $(date -u +%FT%TZ) run_stack.sh $GPUS $*"
  nvidia-smi --query-gpu=index,name,memory.used,memory.total,driver_version --format=csv 2>&1 || echo "no nvidia-smi"
  nvidia-smi topo -m 2>&1 | head -n $((GPUS + 2)) || true
} | tee -a "$OUT/stack.log"

case "$GPUS" in
  2) DEFAULTS=(--time-budget-s 450) ;;
  *) DEFAULTS=(--time-budget-s 500 --duration-s 10) ;;
esac
# 565 s for the benchmark: it starts nothing past its budget, a run in flight and the last
# cluster's stop take the rest; SIGTERM at 565 s still stops the clusters and writes the
# results, SIGKILL 15 s later (580 s, inside the 10 minutes).
timeout -k 15 565 python3 benchmarks/gpu/stack_bench.py --gpus "$GPUS" --device cuda --model llama-3.1-8b \
  --out "$OUT" "${DEFAULTS[@]}" "$@"
rc=$?
echo "stack_bench exit status $rc"
ls -la "$OUT"
exit $rc
