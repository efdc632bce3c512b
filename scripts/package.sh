#!/usr/bin/env bash
# Builds the Debian packages into target/debian/: edgellm_<version>-1_amd64.deb and
# edgellm_<version>-1_arm64.deb (the arm64 binary cross-compiled with Debian's rustc and the
# aarch64 toolchain that `scripts/setup.sh --test` installs), each with the stripped binary,
# both systemd units, the documented config as a conffile under /etc/edgellm/, sysusers.d and
# tmpfiles.d entries (the edgellm user and group, /var/lib/edgellm/models), the README, man pages
# and shell completions. Built with dpkg-deb: the layout is this script, nothing else.
#
#   scripts/package.sh              both architectures
#   scripts/package.sh amd64        one (amd64 or arm64)
#
# Env: EDGELLM_BIN  an amd64 binary already built, packaged as it is (else cargo builds one)
#
# Prints the paths of the packages it wrote.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
arches=("$@")
[ ${#arches[@]} -gt 0 ] || arches=(amd64 arm64)

version="$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -1)"
debver="$version-1"
out="$root/target/debian"
mkdir -p "$out"
# The packages' dates and file times: the last commit's, so a rebuild gives the same bytes.
export SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}"

# The host binary writes the man pages and completions for both (the same command line).
# EDGELLM_BIN names one already built (the tests pass theirs) instead of building it.
if [ -n "${EDGELLM_BIN:-}" ]; then
  host_bin="$EDGELLM_BIN"
else
  cargo build --release --quiet --bin edgellm
  host_bin="$root/target/release/edgellm"
fi

for arch in "${arches[@]}"; do
  case "$arch" in
    amd64)
      bin="$host_bin"
      strip=strip
      objdump=objdump
      ;;
    arm64)
      # As scripts/test.sh cross-compiles: Debian's rustc has the aarch64 std.
      RUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc \
        CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc \
        CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc \
        AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar \
        CARGO_TARGET_DIR="$root/target/cross" RUSTFLAGS="-D warnings" \
        cargo build --release --quiet --target aarch64-unknown-linux-gnu --bin edgellm
      bin="$root/target/cross/aarch64-unknown-linux-gnu/release/edgellm"
      strip=aarch64-linux-gnu-strip
      objdump=aarch64-linux-gnu-objdump
      ;;
    *)
      echo "package.sh: unknown architecture \"$arch\" (amd64 or arm64)" >&2
      exit 2
      ;;
  esac

  stage="$out/stage-$arch"
  rm -rf "$stage"
  install -d "$stage/DEBIAN"
  install -D -m 0755 "$bin" "$stage/usr/bin/edgellm"
  "$strip" --strip-unneeded --remove-section=.comment --remove-section=.note "$stage/usr/bin/edgellm"
  install -D -m 0644 systemd/edgellm.service "$stage/lib/systemd/system/edgellm.service"
  install -D -m 0644 systemd/edgellm.socket "$stage/lib/systemd/system/edgellm.socket"
  install -D -m 0644 packaging/sysusers.conf "$stage/usr/lib/sysusers.d/edgellm.conf"
  install -D -m 0644 packaging/tmpfiles.conf "$stage/usr/lib/tmpfiles.d/edgellm.conf"
  install -D -m 0644 configs/edgellm.toml "$stage/etc/edgellm/edgellm.toml"
  doc="$stage/usr/share/doc/edgellm"
  install -D -m 0644 README.md "$doc/README.md"
  install -D -m 0644 packaging/debian/copyright "$doc/copyright"
  install -D -m 0644 configs/raspberry-pi-5.toml "$doc/examples/raspberry-pi-5.toml"
  {
    echo "edgellm ($debver) unstable; urgency=medium"
    echo
    echo "  * Built from the edgellm source tree, commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)."
    echo
    echo " -- edgellm developers <edgellm@example.org>  $(date -R -u -d "@$SOURCE_DATE_EPOCH")"
  } | gzip -9n > "$doc/changelog.Debian.gz"
  chmod 0644 "$doc/changelog.Debian.gz"
  man="$stage/usr/share/man/man1"
  "$host_bin" manpages "$man"
  gzip -9n "$man"/*.1
  chmod 0644 "$man"/*.gz
  install -d "$stage/usr/share/bash-completion/completions" "$stage/usr/share/zsh/vendor-completions" \
    "$stage/usr/share/fish/vendor_completions.d"
  "$host_bin" completions bash > "$stage/usr/share/bash-completion/completions/edgellm"
  "$host_bin" completions zsh > "$stage/usr/share/zsh/vendor-completions/_edgellm"
  "$host_bin" completions fish > "$stage/usr/share/fish/vendor_completions.d/edgellm.fish"
  chmod 0644 "$stage/usr/share/bash-completion/completions/edgellm" \
    "$stage/usr/share/zsh/vendor-completions/_edgellm" "$stage/usr/share/fish/vendor_completions.d/edgellm.fish"

  # Dependencies from what the binary links: glibc at the newest symbol version it uses.
  glibc="$("$objdump" -T "$stage/usr/bin/edgellm" | grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/GLIBC_//' | sort -V | tail -1)"
  depends="libc6 (>= $glibc)"
  if "$objdump" -p "$stage/usr/bin/edgellm" | grep -q 'NEEDED.*libgcc_s'; then
    depends="$depends, libgcc-s1 (>= 4.2)"
  fi
  depends="$depends, systemd"
  installed_kb="$(du -sk --exclude=DEBIAN "$stage" | cut -f1)"
  cat > "$stage/DEBIAN/control" <<CONTROL
Package: edgellm
Version: $debver
Architecture: $arch
Maintainer: edgellm developers <edgellm@example.org>
Installed-Size: $installed_kb
Depends: $depends
Recommends: ca-certificates
Suggests: mosquitto
Section: net
Priority: optional
Homepage: https://example.org/edgellm
Description: LLM daemon for edge boards
 edgellm answers assistant requests arriving over MQTT, HTTP (OpenAI and
 Ollama APIs) and a Unix socket with a small quantized language model, as a
 systemd service. It runs the model on its own int4 CPU engine, or through
 ONNX Runtime execution providers where the board has an NPU or GPU, inside a
 bounded context window with a sliding KV cache: its memory is fixed at start.
 .
 Models are fetched by name from the Python package index with
 "edgellm models fetch"; nothing phones home.
CONTROL
  echo "/etc/edgellm/edgellm.toml" > "$stage/DEBIAN/conffiles"
  for s in postinst prerm postrm; do
    install -m 0755 "packaging/debian/$s" "$stage/DEBIAN/$s"
  done
  (cd "$stage" && find . -type f ! -path './DEBIAN/*' ! -path './etc/*' -printf '%P\0' | sort -z | xargs -0 md5sum) > "$stage/DEBIAN/md5sums"
  chmod 0644 "$stage/DEBIAN/control" "$stage/DEBIAN/conffiles" "$stage/DEBIAN/md5sums"
  find "$stage" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
  deb="$out/edgellm_${debver}_${arch}.deb"
  dpkg-deb --root-owner-group -Zxz --build "$stage" "$deb" >/dev/null
  rm -rf "$stage"
  echo "$deb"
done
