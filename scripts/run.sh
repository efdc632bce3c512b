#!/usr/bin/env bash
# Sets up (default model fetched if missing, release build) and runs edgellm with the given
# arguments; with none, answers a sample question.
#
#   scripts/run.sh ask "What is the capital of France?"
#   scripts/run.sh bench
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
cargo build --release --quiet --manifest-path "$root/Cargo.toml"
export EDGELLM_MODEL="${EDGELLM_MODEL:-$root/models/cache/SmolLM2-135M-Instruct.Q4_1.gguf}"
if [ $# -eq 0 ]; then
  set -- ask "What is the capital of France?"
fi
exec "$root/target/release/edgellm" "$@"
