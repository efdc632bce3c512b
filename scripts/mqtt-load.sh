#!/usr/bin/env bash
# MQTT load run (a benchmark, not a test): 500 requests from 8 MQTT 5 clients to a daemon on
# the default model, through a mosquitto of its own that is restarted twice during the run.
# Prints a JSON report; exits 1 unless every request was answered exactly once.
#   scripts/mqtt-load.sh [--requests 500] [--clients 8] [--restarts 2] [--window 4]
#                        [--max-tokens 8] [--model M.gguf] [--binary target/release/edgellm]
set -euo pipefail
cd "$(dirname "$0")/.."
command -v mosquitto >/dev/null || { echo "mosquitto missing: bash scripts/setup.sh --test" >&2; exit 2; }
[ -f models/cache/SmolLM2-135M-Instruct.Q4_1.gguf ] || bash models/fetch.sh smollm2 >&2
cargo build --release --quiet --bin edgellm --example mqtt_load
exec target/release/examples/mqtt_load "$@"
