#!/usr/bin/env bash
# Decode and prompt speed on an idle CPU and beside one busy process (a shell spin loop, as a
# neighbour on a board would be), 1 thread, 2 threads and the default (all cores), alternated,
# medians of N rounds. The figures behind the pool's claim-and-back-off design (kernels/pool.rs).
# Never run in CI.
#
#   scripts/bench-busy.sh [MODEL.gguf] [ROUNDS]   (default: the Q4_1 model, 3 rounds)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
model="${1:-$root/models/cache/SmolLM2-135M-Instruct.Q4_1.gguf}"; rounds="${2:-3}"
bin="${EDGELLM_BIN:-$root/target/release/edgellm}"
out=$(mktemp)
spin=""
trap '[ -n "$spin" ] && kill "$spin" 2>/dev/null; rm -f "$out"' EXIT
for r in $(seq "$rounds"); do
  for load in idle busy; do
    if [ "$load" = busy ]; then
      bash -c 'while :; do :; done' & spin=$!
      sleep 0.3
    fi
    for t in 1 2 0; do
      "$bin" bench -m "$model" -t "$t" 2>/dev/null |
        python3 -c "import json,sys; d=json.load(sys.stdin); print('$load', '$t', d['threads'], d['pp_tps'], d['tg_tps'])" >>"$out"
    done
    if [ -n "$spin" ]; then kill "$spin"; wait "$spin" 2>/dev/null || true; spin=""; fi
  done
done
python3 - "$out" "$(nproc)" <<'PY'
import sys, statistics, collections
runs = collections.defaultdict(list)
for line in open(sys.argv[1]):
    load, asked, got, pp, tg = line.split()
    runs[(load, int(asked), int(got))].append((float(pp), float(tg)))
print(f"cores: {sys.argv[2]}")
print("| CPU | threads | pp tok/s | tg tok/s | runs |")
print("| --- | --- | --- | --- | --- |")
for (load, asked, got), v in sorted(runs.items(), key=lambda kv: (kv[0][0] != 'idle', kv[0][1] == 0, kv[0][1])):
    label = f"{got} (default)" if asked == 0 else f"{got}"
    med = lambda i: statistics.median(x[i] for x in v)
    cpu = "idle" if load == "idle" else "1 spin loop beside"
    print(f"| {cpu} | {label} | {med(0):.0f} | {med(1):.0f} | {len(v)} |")
PY
