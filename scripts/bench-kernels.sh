#!/usr/bin/env bash
# Alternated `edgellm bench` runs of kernel sets and KV types on one model, medians of N rounds:
# the comparison behind the choice of `auto` and of the KV default. Never run in CI.
#
#   scripts/bench-kernels.sh MODEL.gguf [ROUNDS] [KERNELS...]   (default: 3 rounds, avx2 and
#                                                                 the best this CPU has)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
model="$1"; rounds="${2:-3}"; shift $(( $# < 2 ? $# : 2 ))
kernels=("$@"); [ ${#kernels[@]} -gt 0 ] || kernels=(avx2 auto)
bin="$root/target/release/edgellm"
out=$(mktemp)
for r in $(seq "$rounds"); do
  for t in 1 2; do
    for k in "${kernels[@]}"; do
      for kv in f16 f32; do
        "$bin" bench -m "$model" -t "$t" --kernels "$k" --kv-type "$kv" 2>/dev/null |
          python3 -c "import json,sys; d=json.load(sys.stdin); print('$t', '$k', d['kernels'], '$kv', d['pp_tps'], d['tg_tps'], d['rss_mib'])" >>"$out"
      done
    done
  done
done
python3 - "$out" <<'PY'
import sys, statistics, collections
runs = collections.defaultdict(list)
for line in open(sys.argv[1]):
    t, asked, got, kv, pp, tg, rss = line.split()
    runs[(int(t), got, kv)].append((float(pp), float(tg), float(rss)))
print("| threads | kernels | KV | pp tok/s | tg tok/s | RSS MiB | runs |")
print("| --- | --- | --- | --- | --- | --- | --- |")
for (t, k, kv), v in sorted(runs.items()):
    med = lambda i: statistics.median(x[i] for x in v)
    print(f"| {t} | {k} | {kv} | {med(0):.1f} | {med(1):.1f} | {med(2):.0f} | {len(v)} |")
PY
rm -f "$out"
