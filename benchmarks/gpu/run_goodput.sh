#!/usr/bin/env bash
# Goodput on one GPU shared by 4 node processes: flowkv (planning for the objectives) against
# 4 colocated nodes and the fixed splits 2:2 and 3:1, the same arrivals, in one command of
# at most 8 minutes (docs/benchmarks/goodput.md):
#
#   bash benchmarks/gpu/run_goodput.sh [extra goodput_real.py args]
#
# Llama-3.1-8B shapes (random weights), bf16; each node keeps 6,000 KV blocks of 16 tokens
# (2 MiB each: 12 GB; FLOWKV_NODE_NUM_BLOCKS overrides) so that four fit beside their weights on
# one 141 GB H200. The load:
# prompts of 2,000-8,000 tokens, 64-256 out, Poisson at 1.5 req/s; objectives TTFT 3 s,
# TPOT 100 ms (four processes time-share the GPU); 8 s lead-in, 25 s measured, 15 s drain
# per cluster. A cluster that would end past the budget is skipped and listed.
# Prints the table; writes results.json, results.md and clusters.log to $OUT (default
# bench-results/goodput).
set -uo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=/dev/null
source benchmarks/gpu/env.sh  # wheels, NCCL_NVLS_ENABLE=0 and the other multicast switches
OUT="${OUT:-bench-results/goodput}"
mkdir -p "$OUT"
T0=$SECONDS
{
  echo "===== $(date -u +%FT%TZ) run_goodput.sh $* (commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'))"
  nvidia-smi --query-gpu=index,name,memory.used,memory.total,driver_version --format=csv 2>&1 || echo "no nvidia-smi"
} | tee -a "$OUT/run.log"
export FLOWKV_NODE_NUM_BLOCKS="${FLOWKV_NODE_NUM_BLOCKS:-6000}" FLOWKV_NODE_MAX_NUM_SEQS=64 FLOWKV_NODE_MAX_NUM_BATCHED_TOKENS=8192 \
  FLOWKV_NODE_MAX_MODEL_LEN=16384
# SIGTERM at 450 s, SIGKILL 15 s later: inside the 8 minutes with the lines above.
timeout -k 15 450 python3 benchmarks/goodput_real.py --device cuda --model llama-3.1-8b --dtype bfloat16 \
  --nodes 4 --policies flowkv,colocated,fixed:2:2,fixed:3:1 --rate 1.5 --input-len 2000:8000 --output-len 64:256 \
  --ttft-slo 3 --tpot-slo 0.1 --lead-in-s 8 --duration-s 25 --drain-s 15 --ready-timeout-s 150 \
  --time-budget-s 420 --out "$OUT" "$@" 2>&1 | tee -a "$OUT/run.log"
rc=${PIPESTATUS[0]}
echo "goodput_real exit status $rc after $((SECONDS - T0)) s" | tee -a "$OUT/run.log"
ls -la "$OUT"
exit $rc
