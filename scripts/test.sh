#!/usr/bin/env bash
# The whole test suite: setup, formatting, lints, the Debian packages for amd64 and arm64 (the
# native tests check them, install one with dpkg and boot it under systemd-nspawn), the native
# tests (real models, reference data), then the kernel and engine tests cross-compiled for
# aarch64 and run under qemu, once with qemu's default CPU (NEON + dotprod) and once as a
# Cortex-A53 (plain NEON).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
step() { printf '\n== %s\n' "$*" >&2; }

step setup
bash scripts/setup.sh --test

step "cargo fmt --check"
cargo fmt --check

step "cargo clippy"
cargo clippy --release --all-targets --quiet -- -D warnings

step "Debian packages (amd64, arm64)"
bash scripts/package.sh

step "native tests (x86_64)"
cargo test --release

step "aarch64 build (Debian rustc, cross linker)"
export RUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER=qemu-aarch64
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar
export CARGO_TARGET_DIR="$root/target/cross"
export RUSTFLAGS="-D warnings"
# The crafted-file test runs the native `edgellm` binary and measures it: the x86 run has it.
cross=(cargo test --release --target aarch64-unknown-linux-gnu --lib --test tests -- kernels:: gguf_errors:: engine:: --skip gguf_errors::a_crafted_array)

step "aarch64 tests under qemu, default CPU (dotprod)"
"${cross[@]}"

step "aarch64 tests under qemu, QEMU_CPU=cortex-a53 (plain NEON)"
QEMU_CPU=cortex-a53 "${cross[@]}"
