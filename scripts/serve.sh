#!/usr/bin/env bash
# Run the main job: `voicegate serve` (release build). Extra arguments go to `voicegate serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
exec cargo run --release --locked -p voicegate-server --bin voicegate -- serve "$@"
