#!/usr/bin/env bash
# Builds llama.cpp's llama-bench from the PyPI source package llama-cpp-python==0.3.36 (its
# vendored llama.cpp, CPU only, -DGGML_NATIVE=ON) and runs it beside `edgellm bench` on the same
# files, threads 1 and 2. About 15 minutes to build on 2 cores the first time; never run in CI.
#
#   scripts/compare-llamacpp.sh [MODEL.gguf ...]   (default: the Q4_1 model, a Q4_0 copy of it
#                                                   and Qwen2.5-Coder-0.5B Q4_K_M)
#   ROUNDS=3 (default): alternated runs of the two per file and thread count; medians reported.
# On one thread it also reports generation's weight reads (bytes per token × tokens/s) against
# what one thread reads in a plain loop on this machine (`edgellm bench --bandwidth`).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
work="${EDGELLM_PEER_DIR:-${HOME:-/root}/.cache/edgellm/llama.cpp}"
mkdir -p "$work"
if [ ! -x "$work/build/bin/llama-bench" ]; then
  command -v cmake >/dev/null || { apt-get update -qq && apt-get install -y -qq cmake >/dev/null; }
  if [ ! -d "$work/src" ]; then
    python3 -m pip download --quiet --no-deps --no-binary=:all: -d "$work" llama-cpp-python==0.3.36
    tar -xzf "$work"/llama_cpp_python-0.3.36.tar.gz -C "$work"
    mv "$work"/llama_cpp_python-0.3.36/vendor/llama.cpp "$work/src"
  fi
  cmake -S "$work/src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF >/dev/null
  cmake --build "$work/build" --target llama-bench -j "$(nproc)" >/dev/null
fi
bash "$root/scripts/setup.sh"
cargo build --release --quiet --manifest-path "$root/Cargo.toml"
q41="$root/models/cache/SmolLM2-135M-Instruct.Q4_1.gguf"
q40="$root/models/cache/SmolLM2-135M-Instruct.Q4_0.gguf"
qwen="$root/models/cache/Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf"
if [ $# -eq 0 ]; then
  [ -f "$q40" ] || "$root/target/release/edgellm" quantize "$q41" "$q40" --type q4_0
  [ -f "$qwen" ] || bash "$root/models/fetch.sh" qwen2.5-coder-0.5b
  set -- "$q41" "$q40" "$qwen"
fi
rounds="${ROUNDS:-3}"
for m in "$@"; do
  for t in 1 2; do
    runs=()
    for _ in $(seq "$rounds"); do
      peer=$("$work/build/bin/llama-bench" -m "$m" -p 128 -n 64 -t "$t" -o json 2>/dev/null |
        python3 -c 'import json,sys; r=json.load(sys.stdin); print(" ".join(str(round(x["avg_ts"],1)) for x in r))')
      bw=(); [ "$t" = 1 ] && bw=(--bandwidth)
      ours=$("$root/target/release/edgellm" bench -m "$m" -t "$t" "${bw[@]}" |
        python3 -c 'import json,sys; d=json.load(sys.stdin); print(round(d["pp_tps"],1), round(d["tg_tps"],1), d["kernels"], round(d.get("decode_gbps") or 0,2), round(d.get("read_gbps") or 0,2))')
      runs+=("$peer $ours")
    done
    python3 - "$m" "$t" "${runs[@]}" <<'PY'
import os, statistics, sys
m, t, runs = sys.argv[1], sys.argv[2], [r.split() for r in sys.argv[3:]]
med = lambda i: statistics.median(float(r[i]) for r in runs)
ppp, ptg, opp, otg, kern = med(0), med(1), med(2), med(3), runs[0][4]
line = (f"{os.path.basename(m)} threads={t}, medians of {len(runs)}: llama.cpp pp {ppp} tg {ptg} | "
        f"edgellm ({kern}) pp {opp} tg {otg} | ratio pp {opp/ppp:.2f}x tg {otg/ptg:.2f}x")
dec, rd = med(5), med(6)
if rd > 0:
    line += f" | decode reads {dec:.1f} GB/s of one thread's {rd:.1f} GB/s ({dec/rd:.0%})"
print(line)
PY
  done
done
