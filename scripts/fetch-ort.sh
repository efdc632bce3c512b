#!/usr/bin/env bash
# Fetches the ONNX Runtime library for the ORT backend from PyPI's `onnxruntime` wheel (CPU
# provider), checks the wheel's checksum, extracts libonnxruntime.so and prints its path.
# Idempotent: a library already extracted is reused. Only the wheel itself is downloaded (no
# dependencies, nothing installed into Python).
#
#   scripts/fetch-ort.sh [x86_64|aarch64]     default: this machine's architecture
#   scripts/fetch-ort.sh --qnn                also Qualcomm's QNN execution provider, a plugin
#                                             library (PyPI's onnxruntime-qnn 2.7.0, x86_64: its
#                                             HTP backend runs as a simulator there), extracted
#                                             with its QNN libraries; prints its path second
#
# Env: EDGELLM_DOWNLOAD_CACHE (default: ~/.cache/edgellm/downloads) keeps the wheel and the
#      extracted library for reruns.
# Point the daemon at the library with `ort.library` in its config or ORT_DYLIB_PATH.
set -euo pipefail
version=1.32.0
want_qnn=0
if [ "${1:-}" = "--qnn" ]; then want_qnn=1; shift; fi
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
sha() { sha256sum "$1" | cut -d' ' -f1; }

# The QNN plugin: onnxruntime_qnn/*.so (the provider, QnnHtp, HtpPrepare, QnnSystem, ...) and
# the C++ runtime they link (onnxruntime_qnn.libs/), kept in the wheel's layout so that their
# RUNPATH ($ORIGIN/../onnxruntime_qnn.libs) finds it.
fetch_qnn() {
  local qv=2.7.0 qsum=c56c01562b8534fe8980cfea4601408d950c065f8251fb862ce82101c52c9849
  if [ "$arch" != x86_64 ]; then
    echo "error: the onnxruntime-qnn wheel is fetched for x86_64 (the HTP simulator); on a Snapdragon board use the QNN libraries of its BSP" >&2
    exit 1
  fi
  local qwheel="onnxruntime_qnn-$qv-cp311-cp311-manylinux_2_35_x86_64.whl"
  local qdir="$cache/onnxruntime-qnn-$qv-$arch"
  local qlib="$qdir/onnxruntime_qnn/libonnxruntime_providers_qnn.so"
  if [ -f "$qlib" ]; then
    echo "$qlib"
    return
  fi
  mkdir -p "$cache"
  if [ ! -f "$cache/$qwheel" ] || [ "$(sha "$cache/$qwheel")" != "$qsum" ]; then
    rm -f "$cache/$qwheel"
    local tmp
    tmp=$(mktemp -d "$cache/.pip.XXXXXX")
    echo "downloading onnxruntime-qnn==$qv ($arch) from PyPI (no dependencies)" >&2
    python3 -m pip download --quiet --no-deps --only-binary=:all: \
      --platform "manylinux_2_35_$arch" --python-version 3.11 -d "$tmp" "onnxruntime-qnn==$qv" >&2
    local got
    got=$(sha "$tmp/$qwheel")
    if [ "$got" != "$qsum" ]; then
      rm -rf "$tmp"
      echo "error: checksum mismatch for $qwheel: expected $qsum, got $got" >&2
      exit 1
    fi
    mv "$tmp/$qwheel" "$cache/$qwheel"
    rm -rf "$tmp"
  fi
  local part="$qdir.part.$$"
  rm -rf "$part"
  mkdir -p "$part"
  python3 - "$cache/$qwheel" "$part" <<'PY'
import os, shutil, sys, zipfile
wheel, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        top, _, base = name.partition("/")
        if top in ("onnxruntime_qnn", "onnxruntime_qnn.libs") and ".so" in base:
            os.makedirs(os.path.join(out, top), exist_ok=True)
            with z.open(name) as src, open(os.path.join(out, top, base), "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
PY
  rm -rf "$qdir"
  mv "$part" "$qdir"
  echo "onnxruntime-qnn $qv ready: $qlib" >&2
  echo "$qlib"
}

if [ -f "$lib" ]; then
  echo "$lib"
  [ $want_qnn = 1 ] && fetch_qnn
  exit 0
fi
mkdir -p "$cache"
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
[ $want_qnn = 1 ] && fetch_qnn
exit 0
