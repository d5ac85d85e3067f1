#!/usr/bin/env bash
# Installs the system packages VoiceGate needs on a Debian machine, only those missing.
#   cmake + a C compiler: the `opus` crate builds libopus from source.
#   redis-server: tests start their own on a free loopback port (and `serve --redis-url` can use one).
#   pkg-config: build scripts that look for system libraries.
#   prometheus (+ promtool): server/tests/integration/dashboards_prometheus.rs runs the dashboards and alert rules.
set -euo pipefail
need=()
command -v cmake >/dev/null 2>&1 || need+=(cmake)
command -v cc >/dev/null 2>&1 || need+=(gcc)
command -v pkg-config >/dev/null 2>&1 || need+=(pkg-config)
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v prometheus >/dev/null 2>&1 || need+=(prometheus)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}" >&2
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  # The Debian packages start a system Redis on 6379 and a Prometheus on 9090; tests never use them.
  for svc in redis-server prometheus; do
    if printf '%s\n' "${need[@]}" | grep -qx "$svc"; then
      (command -v systemctl >/dev/null 2>&1 && $SUDO systemctl disable --now "$svc" >/dev/null 2>&1) || true
    fi
  done
fi
command -v cargo >/dev/null 2>&1 || { echo "cargo (Rust toolchain) is required: https://rustup.rs" >&2; exit 1; }
