#!/usr/bin/env bash
# Installs the system packages VoiceGate needs on a Debian machine, only those missing.
#   cmake + a C compiler: the `opus` crate builds libopus from source, and `aws-lc-sys` (rustls' crypto
#   provider for the outbound TLS client) builds AWS-LC.
#   redis-server: tests start their own on a free loopback port (and `serve --redis-url` can use one);
#   redis-tools (redis-cli): loadtest/redis-cluster.sh joins a local Redis Cluster for the cluster tests.
#   pkg-config: build scripts that look for system libraries.
#   openssl (the command): engine/src/outbound.rs's tests make a test CA and a server certificate with it.
#   prometheus (+ promtool): server/tests/integration/dashboards_prometheus.rs runs the dashboards and alert rules.
#   python3-pip: fetches the local speech-to-text engine's wheel (below); nothing runs Python afterwards.
# Then the local speech-to-text engine (docs/stt.md): Moonshine base-en from the PyPI wheel moonshine-cpp,
# version and sha256 pinned, unpacked into $VOICEGATE_STT_LOCAL_DIR (default ~/.cache/voicegate/moonshine-cpp-0.1.4).
set -euo pipefail
need=()
command -v cmake >/dev/null 2>&1 || need+=(cmake)
command -v cc >/dev/null 2>&1 || need+=(gcc)
command -v pkg-config >/dev/null 2>&1 || need+=(pkg-config)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || need+=(redis-tools)
command -v prometheus >/dev/null 2>&1 || need+=(prometheus)
python3 -m pip --version >/dev/null 2>&1 || need+=(python3-pip)
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

# --- Local speech-to-text engine: Moonshine base-en (MIT code and weights) ---
# Fast when present: the unpacked folder carries a marker naming the verified wheel hash.
MOONSHINE_VERSION=0.1.4
MOONSHINE_SHA256=f7afc662bdd3ef98815ee3b940438b456e77d5a77cea5396ed9c572785412ebd
MOONSHINE_WHEEL="moonshine_cpp-${MOONSHINE_VERSION}-py3-none-manylinux2014_x86_64.whl"
cache_root="${XDG_CACHE_HOME:-$HOME/.cache}/voicegate"
stt_dir="${VOICEGATE_STT_LOCAL_DIR:-$cache_root/moonshine-cpp-${MOONSHINE_VERSION}}"
if [ "$(uname -s)-$(uname -m)" != "Linux-x86_64" ]; then
  echo "deps.sh: the local STT engine's wheel is x86_64 Linux only here; skipping it (VOICEGATE_STT=none or a remote provider)" >&2
elif [ "$(cat "$stt_dir/.installed" 2>/dev/null)" != "$MOONSHINE_SHA256" ]; then
  wheels="$cache_root/wheels"
  mkdir -p "$wheels"
  if [ ! -f "$wheels/$MOONSHINE_WHEEL" ] || ! echo "$MOONSHINE_SHA256  $wheels/$MOONSHINE_WHEEL" | sha256sum -c --status; then
    echo "fetching moonshine-cpp==$MOONSHINE_VERSION (54 MB)" >&2
    req="$(mktemp)"
    echo "moonshine-cpp==$MOONSHINE_VERSION --hash=sha256:$MOONSHINE_SHA256" >"$req"
    python3 -m pip download --quiet --no-deps --only-binary=:all: --platform manylinux2014_x86_64 \
      --python-version 3.11 --require-hashes -r "$req" -d "$wheels"
    rm -f "$req"
  fi
  echo "$MOONSHINE_SHA256  $wheels/$MOONSHINE_WHEEL" | sha256sum -c --status \
    || { echo "deps.sh: $MOONSHINE_WHEEL does not match its pinned sha256" >&2; exit 1; }
  tmp="$(mktemp -d)"
  python3 -m zipfile -e "$wheels/$MOONSHINE_WHEEL" "$tmp"
  rm -rf "$stt_dir"
  mkdir -p "$(dirname "$stt_dir")"
  mv "$tmp/moonshine_cpp-${MOONSHINE_VERSION}.data/purelib/moonshine_cpp" "$stt_dir"
  rm -rf "$tmp"
  # libmoonshine.so names ONNX Runtime by its SONAME; the wheel ships the versioned file only.
  ln -sf libonnxruntime.so.1.22.1 "$stt_dir/libonnxruntime.so.1"
  echo "$MOONSHINE_SHA256" >"$stt_dir/.installed"
  echo "local STT engine installed in $stt_dir" >&2
fi
