#!/usr/bin/env bash
# Installs the system packages VoiceGate needs on a Debian machine, only those missing.
#   cmake + a C compiler: the `opus` crate builds libopus from source.
#   redis-server: tests start their own on a free loopback port (and `serve --redis-url` can use one).
#   pkg-config: build scripts that look for system libraries.
set -euo pipefail
need=()
command -v cmake >/dev/null 2>&1 || need+=(cmake)
command -v cc >/dev/null 2>&1 || need+=(gcc)
command -v pkg-config >/dev/null 2>&1 || need+=(pkg-config)
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
if [ "${VOICEGATE_WITH_PROMETHEUS:-0}" = 1 ]; then
  command -v prometheus >/dev/null 2>&1 || need+=(prometheus)
fi
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}" >&2
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  # The Debian package starts a system Redis on 6379; tests never use it.
  if printf '%s\n' "${need[@]}" | grep -qx redis-server; then
    (command -v systemctl >/dev/null 2>&1 && $SUDO systemctl disable --now redis-server >/dev/null 2>&1) || true
  fi
fi
command -v cargo >/dev/null 2>&1 || { echo "cargo (Rust toolchain) is required: https://rustup.rs" >&2; exit 1; }
