#!/usr/bin/env bash
# Fetches the ONNX Runtime library for the ORT backend from PyPI's `onnxruntime` wheel (CPU
# provider), checks the wheel's checksum, extracts libonnxruntime.so and prints its path.
# Idempotent: a library already extracted is reused. Only the wheel itself is downloaded (no
# dependencies, nothing installed into Python).
#
#   scripts/fetch-ort.sh [x86_64|aarch64]     default: this machine's architecture
#
# Env: EDGELLM_DOWNLOAD_CACHE (default: ~/.cache/edgellm/downloads) keeps the wheel and the
#      extracted library for reruns.
# Point the daemon at the library with `ort.library` in its config or ORT_DYLIB_PATH.
set -euo pipefail
version=1.32.0
arch="${1:-$(uname -m)}"
case "$arch" in
  x86_64) sum=5a34fc4dfeb5a7b4a74c95dcba1e773d722abda720b474edf1b0c419dc6d163d ;;
  aarch64|arm64) arch=aarch64; sum=2303372a85299b6757b0e11e1cbf13e410ddf7e10c37f4b37e99d1c90e7daf7c ;;
  *) echo "error: no onnxruntime wheel known for $arch (x86_64, aarch64)" >&2; exit 1 ;;
esac
wheel="onnxruntime-$version-cp311-cp311-manylinux_2_28_$arch.whl"
cache="${EDGELLM_DOWNLOAD_CACHE:-${HOME:-/root}/.cache/edgellm/downloads}"
dir="$cache/onnxruntime-$version-$arch"
lib="$dir/libonnxruntime.so.$version"
if [ -f "$lib" ]; then
  echo "$lib"
  exit 0
fi
mkdir -p "$cache"
sha() { sha256sum "$1" | cut -d' ' -f1; }
if [ ! -f "$cache/$wheel" ] || [ "$(sha "$cache/$wheel")" != "$sum" ]; then
  rm -f "$cache/$wheel"
  tmp=$(mktemp -d "$cache/.pip.XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  echo "downloading onnxruntime==$version ($arch) from PyPI (no dependencies)" >&2
  python3 -m pip download --quiet --no-deps --only-binary=:all: \
    --platform "manylinux_2_28_$arch" --python-version 3.11 -d "$tmp" "onnxruntime==$version" >&2
  got=$(sha "$tmp/$wheel")
  if [ "$got" != "$sum" ]; then
    echo "error: checksum mismatch for $wheel: expected $sum, got $got" >&2
    exit 1
  fi
  mv "$tmp/$wheel" "$cache/$wheel"
fi
part="$dir.part.$$"
rm -rf "$part"
mkdir -p "$part"
python3 - "$cache/$wheel" "$part" "$version" <<'PY'
import shutil, sys, zipfile
wheel, out, version = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    for name in (f"libonnxruntime.so.{version}", "libonnxruntime_providers_shared.so"):
        with z.open(f"onnxruntime/capi/{name}") as src, open(f"{out}/{name}", "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
PY
rm -rf "$dir"
mv "$part" "$dir"
echo "onnxruntime $version ready: $lib" >&2
echo "$lib"
