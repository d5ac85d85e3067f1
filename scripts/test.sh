#!/usr/bin/env bash
# Run every test: formatting, clippy (-D warnings), the docs (-D warnings: no broken or private intra-doc
# link), then the whole test suite (nextest when present). The suite includes `layers::` in the engine's
# integration tests: no module imports one that imports it back, in any crate (docs/architecture.md, "Layers").
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
start=$(date +%s)
# The pinned local engine (moonshine-cpp 0.1.4) is compiled for AVX-512 (engine/src/stt/local/ffi.rs,
# cpu_unsupported): on a CPU without it the tests that transcribe with it cannot run, and say so.
if ! grep -qw avx512f /proc/cpuinfo 2>/dev/null || ! grep -qw avx512vl /proc/cpuinfo 2>/dev/null; then
  echo "NOTE: this CPU lacks AVX-512: the 9 tests that transcribe with the local engine return without running (docs/stt.md)"
fi
cargo fmt --all -- --check
cargo clippy --locked --workspace --all-targets -- -D warnings
RUSTDOCFLAGS="-D warnings" cargo doc --locked --no-deps --workspace
if cargo nextest --version >/dev/null 2>&1; then
  # (The workspace has no doc tests to run; nextest's summary is the run's closing line.)
  cargo nextest run --locked --workspace --no-fail-fast
else
  cargo test --locked --workspace --no-fail-fast
fi
echo "all tests passed in $(( $(date +%s) - start )) s"
