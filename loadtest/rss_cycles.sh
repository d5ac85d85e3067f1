#!/usr/bin/env bash
# RSS of a release `voicegate serve` (on a private redis-server) after each of CYCLES identical load cycles,
# read IDLE_SECS after the cycle (meter actors passivate after 20 s here): does memory level off (the
# allocator's working set) or climb with every cycle (something kept)? Used to narrow down the chaos
# soak's RSS judgement (docs/reliability.md).
#
#   LOAD="realtime --streams 300 --duration 40 --ramp 10" loadtest/rss_cycles.sh
#   LOAD="--retry-storm 20000 realtime --streams 0" loadtest/rss_cycles.sh
#   LOAD="sync --uploaders 4 --files 5 --rounds 6 --round-interval 10" loadtest/rss_cycles.sh
#
# Environment: BIN (target/release), PORT (8095), REDIS_PORT (6395), OUT (/tmp/voicegate-rss), CYCLES (5),
# IDLE_SECS (30), USERS (fresh: new users every cycle; fixed: the same users).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release}
PORT=${PORT:-8095}
REDIS_PORT=${REDIS_PORT:-6395}
OUT=${OUT:-/tmp/voicegate-rss}
CYCLES=${CYCLES:-5}
IDLE_SECS=${IDLE_SECS:-30}
USERS=${USERS:-fresh}
LOAD=${LOAD:-realtime --streams 300 --duration 40 --ramp 10}
export ADMIN_KEY=${ADMIN_KEY:-rss-cycles}
rm -rf "$OUT"
mkdir -p "$OUT"
redis-server --port "$REDIS_PORT" --save '' --appendonly no --daemonize yes --pidfile "$OUT/redis.pid" \
  --logfile "$OUT/redis.log"
trap 'kill "$pid" 2>/dev/null || true; redis-cli -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true' EXIT
for _ in $(seq 1 50); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
FAIR_USE_DAILY_SPEECH_MS=600000 VOICEGATE_REDIS_URL="redis://127.0.0.1:$REDIS_PORT" VOICEGATE_STT=none \
  RUST_LOG=warn VOICEGATE_METER_IDLE_PASSIVATION_S=20 \
  "$BIN/voicegate" serve --bind "127.0.0.1:$PORT" >>"$OUT/server.log" 2>&1 &
pid=$!
for _ in $(seq 1 100); do curl -fs "http://127.0.0.1:$PORT/readyz" >/dev/null 2>&1 && break; sleep 0.2; done
rss() { awk '/^VmRSS/ {print $2}' "/proc/$pid/status"; }
actors() { curl -fs "http://127.0.0.1:$PORT/metrics" | awk '/^voicegate_meter_live_actors / {print $2}'; }
echo "start    RSS $(rss) KiB" | tee "$OUT/rss.txt"
for c in $(seq 1 "$CYCLES"); do
  prefix="c${c}u"
  [ "$USERS" = fixed ] && prefix="fixedu"
  # shellcheck disable=SC2086 # LOAD is a list of arguments
  set +e
  "$BIN/voicegate-loadtest" --url "http://127.0.0.1:$PORT" --quiet --users-prefix "$prefix" $LOAD \
    >"$OUT/cycle$c.txt" 2>&1
  rc=$?
  set -e
  sleep "$IDLE_SECS"
  echo "cycle $c  RSS $(rss) KiB  harness exit $rc  live meter actors $(actors)" | tee -a "$OUT/rss.txt"
done
