#!/usr/bin/env bash
# Sets up (the default model, Qwen2.5-Coder-0.5B-Instruct, fetched if missing; release build)
# and runs edgellm with the given arguments; with none, answers a sample question.
#
#   scripts/run.sh ask "What is the capital of France?"
#   scripts/run.sh bench
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
cargo build --release --quiet --manifest-path "$root/Cargo.toml"
if [ $# -eq 0 ]; then
  set -- ask "What is the capital of France?"
fi
exec "$root/target/release/edgellm" "$@"
