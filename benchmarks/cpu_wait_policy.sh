#!/usr/bin/env bash
# How OpenMP's wait policy and the thread count change one colocated CPU node's serving,
# everything (NATS, scheduler, gateway, node, load generator) pinned to the same cores:
#
#   bash benchmarks/cpu_wait_policy.sh [CORES] [MODEL]      # default: 0,1 and smollm2
#
# Runs `flowkv up --colocated 1` three times: GOMP_SPINCOUNT=300000 (threads spin a while
# before they sleep: libgomp's own default, which nodes keep), OMP_WAIT_POLICY=PASSIVE
# (they sleep at once) and one thread; each with
# `flowkv bench` fixed 256/64 at concurrency 1, 4 and 16 (max(8, 3 x c) requests).
# Prints one line per run: completed, failed, output tok/s, TTFT and TPOT percentiles.
set -u
CORES="${1:-0,1}"
MODEL="${2:-smollm2}"
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"

run() {  # run LABEL [ENV=VALUE...]
  local label=$1; shift
  local port=$((8400 + RANDOM % 500)) log
  log=$(mktemp)
  env "$@" taskset -c "$CORES" "$PY" -m services.cli up --colocated 1 --model "$MODEL" --port $port \
    --log-level warning >"$log" 2>&1 &
  local up=$!
  for _ in $(seq 1 180); do curl -sf "localhost:$port/ready" >/dev/null && break; sleep 1; done
  for c in 1 4 16; do
    local n=$((c * 3 > 8 ? c * 3 : 8)) out
    out=$(mktemp)
    taskset -c "$CORES" "$PY" -m services.cli bench --base-url "http://127.0.0.1:$port" --model "$MODEL" \
      --workload fixed --input-len 256 --output-len 64 --num-requests $n --max-concurrency $c --seed $((c + 7)) \
      --no-progress --out-json "$out" >/dev/null 2>&1
    "$PY" - "$label" "$c" "$out" <<'PY'
import json, sys
s = json.load(open(sys.argv[3]))
s = s.get("summary", s)
ms = lambda d, k: round(d[k] * 1e3, 1)
print(f"{sys.argv[1]:<8} c={sys.argv[2]:<3} served {s['completed']} failed {s['failed']} "
      f"out tok/s {s['output_throughput']:.1f}  TTFT p50 {ms(s['ttft'], 'p50')} ms  "
      f"TPOT p50 {ms(s['tpot'], 'p50')} p99 {ms(s['tpot'], 'p99')} ms")
PY
  done
  kill -INT $up; wait $up 2>/dev/null
}

run spin GOMP_SPINCOUNT=300000
run passive OMP_WAIT_POLICY=PASSIVE
run 1thread OMP_NUM_THREADS=1
