#!/usr/bin/env bash
# Makes, from Debian packages, the base images that docker/Dockerfile and docker/lb name, under
# the same tags a registry serves them with, so that the same Dockerfile builds where no registry
# can be reached:
#   debian:bookworm-slim   debootstrap --variant=minbase bookworm, documentation trimmed
#   rust:1.95-bookworm     the same Debian plus the C toolchain, with the Rust toolchain of this
#                          machine (rustup's `1.95.0`, or the one `rustc` runs) copied in where the
#                          official image keeps it (/usr/local/cargo, /usr/local/rustup)
# Where a registry serves these images, do not run this: `docker build` pulls them.
#
# This machine's CA bundle goes into both images (as a local CA, which update-ca-certificates
# keeps), so that apt, cargo and pip inside a build reach the registries this machine reaches.
# An image that already exists is kept (FORCE=1 remakes it).
#
# Usage: docker/base-images.sh [WORKDIR]   (needs root for debootstrap; ~2 GB in WORKDIR)
set -euo pipefail

WORK=${1:-/tmp/blip2-base-images}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm
RUST_VERSION=1.95
FORCE=${FORCE:-0}
HOST_CA=/etc/ssl/certs/ca-certificates.crt

have_image() { [ "$FORCE" != 1 ] && docker image inspect "$1" >/dev/null 2>&1; }
log() { echo "base-images: $*" >&2; }

if ! command -v debootstrap >/dev/null; then
  log "installing debootstrap"
  apt-get update -qq && apt-get install -y -qq debootstrap >/dev/null
fi
mkdir -p "$WORK"

# A minbase Debian root in $1 with extra packages $2 (comma separated, may be empty).
bootstrap() {
  local dir=$1 include=$2
  rm -rf "$dir"
  debootstrap --variant=minbase ${include:+--include="$include"} "$SUITE" "$dir" "$MIRROR" >&2
  # What a registry's image has and a bare debootstrap lacks: the security and update suites,
  # no recommends (the slim habit), no cached package lists.
  cat >"$dir/etc/apt/sources.list" <<EOF
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb http://deb.debian.org/debian-security $SUITE-security main
EOF
  echo 'APT::Install-Recommends "false";' >"$dir/etc/apt/apt.conf.d/99no-recommends"
  if [ -f "$HOST_CA" ]; then
    mkdir -p "$dir/usr/local/share/ca-certificates"
    # One certificate per file: update-ca-certificates reads each .crt as one CA.
    awk -v d="$dir/usr/local/share/ca-certificates" '
      /BEGIN CERTIFICATE/ { n++; f = sprintf("%s/host-%04d.crt", d, n) }
      f { print > f }
      /END CERTIFICATE/ { close(f); f = "" }' "$HOST_CA"
    mkdir -p "$dir/etc/ssl/certs"
    cp "$HOST_CA" "$dir/etc/ssl/certs/ca-certificates.crt"
  fi
  rm -rf "$dir"/var/lib/apt/lists/* "$dir"/var/cache/apt/*.bin "$dir"/var/cache/apt/archives/*.deb
  rm -rf "$dir"/usr/share/doc/* "$dir"/usr/share/man/* "$dir"/usr/share/info/*
}

import() {
  local dir=$1 tag=$2
  shift 2
  tar --numeric-owner -C "$dir" -c . | docker import "$@" - "$tag" >/dev/null
  log "made $tag ($(docker image inspect -f '{{.Size}}' "$tag" | awk '{printf "%.0f MB", $1/1e6}'))"
}

if have_image debian:bookworm-slim; then
  log "debian:bookworm-slim exists"
else
  bootstrap "$WORK/slim" ""
  import "$WORK/slim" debian:bookworm-slim --change 'CMD ["bash"]'
  rm -rf "$WORK/slim"
fi

if have_image "rust:$RUST_VERSION-bookworm"; then
  log "rust:$RUST_VERSION-bookworm exists"
else
  sysroot=$(rustc +"$RUST_VERSION.0" --print sysroot 2>/dev/null || rustc --print sysroot)
  version=$("$sysroot/bin/rustc" --version | awk '{print $2}')
  case "$version" in
    "$RUST_VERSION".*) ;;
    *) log "this machine's Rust is $version, not $RUST_VERSION"; exit 1 ;;
  esac
  # The official image's build tools (buildpack-deps has these and more).
  bootstrap "$WORK/rust" "ca-certificates,gcc,g++,libc6-dev,make,pkg-config,git,curl,xz-utils"
  dest="$WORK/rust/usr/local/rustup/toolchains/$version-x86_64-unknown-linux-gnu"
  mkdir -p "$dest" "$WORK/rust/usr/local/cargo/bin"
  # The compiler, the standard library and cargo; not the offline documentation.
  tar -C "$sysroot" --exclude=./share/doc -c . | tar -C "$dest" -x
  for tool in cargo rustc rustdoc cargo-clippy clippy-driver rustfmt cargo-fmt; do
    [ -e "$dest/bin/$tool" ] && ln -s "../../rustup/toolchains/$version-x86_64-unknown-linux-gnu/bin/$tool" \
      "$WORK/rust/usr/local/cargo/bin/$tool"
  done
  chroot "$WORK/rust" update-ca-certificates >/dev/null 2>&1 || true
  import "$WORK/rust" "rust:$RUST_VERSION-bookworm" \
    --change 'ENV RUSTUP_HOME=/usr/local/rustup' \
    --change 'ENV CARGO_HOME=/usr/local/cargo' \
    --change 'ENV PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change "ENV RUST_VERSION=$version" \
    --change 'CMD ["bash"]'
  rm -rf "$WORK/rust"
fi
