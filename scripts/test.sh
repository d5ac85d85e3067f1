#!/usr/bin/env bash
# Run every test: formatting, clippy (-D warnings), the docs (-D warnings: no broken or private intra-doc
# link), then the whole test suite (nextest when present). The suite includes `layers::` in the engine's
# integration tests: no module imports one that imports it back, in any crate (docs/architecture.md, "Layers").
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
start=$(date +%s)
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
