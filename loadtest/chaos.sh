#!/usr/bin/env bash
# The chaos soak (docs/reliability.md): realtime streams and sync uploads (with a retry storm) against a
# release `voicegate serve` on a private redis-server, while the node is SIGKILLed and restarted once and
# Redis is stopped for 20 s and started again in each of two identical load cycles. The harness runs with
# --survive-node-loss (streams reconnect, unanswered uploads are sent again) and checks the accounting of
# every phase:
#
#   phase kill   : SIGKILL of the node under load, restarted at once   → 0 ms doubled, lost within the bound
#   cycle 1, 2   : Redis stopped REDIS_DOWN s under load, restarted    → exact: 0 doubled, 0 lost, 0 broken
#   after each phase, idle: descriptors, RSS, upload and spool files   → no leftovers, no descriptor growth,
#                                                                        RSS after cycle 2 within 5 % of 1
#
# The idle readings come IDLE_SECS (60) after a phase, and the server passivates idle meter actors after
# PASSIVATION_S (30; VOICEGATE_METER_IDLE_PASSIVATION_S, 900 in production): every reading sees the
# phase's users' actors gone (the count is printed), so RSS compares the state the node keeps, not how
# many users happen to be resident. CYCLES (2) sets the number of identical cycles.
#
# Prints one line per phase and a verdict, exits non-zero when any judgement fails; leaves reports, logs
# and samples in $OUT (default /tmp/voicegate-chaos). Redis runs with AOF (appendfsync always), as
# docs/metering.md requires for a Redis restart to lose nothing.
#
#   loadtest/chaos.sh                                         # ~32 min: 300 s kill phase, 2 × 720 s cycles
#   STREAMS=20 KILL_SECS=60 CYCLE_SECS=90 FAULT_AT=30 loadtest/chaos.sh   # a quick look (~6 min)
#
# Environment: BIN (release binaries, default target/release), PORT (8091), REDIS_PORT (6391), OUT,
# STREAMS (300 realtime streams, one user each), UPLOADERS (4 users, FILES 5 files per upload every
# ROUND_SECS 10 s), STORM (20,000 immediate retries of a refused upload by a restricted user, from 15 s
# into each phase), KILL_SECS (300: the kill phase's audio per stream), CYCLE_SECS (720: each cycle's),
# FAULT_AT (120: seconds into a phase when the fault starts), REDIS_DOWN (20 s), IDLE_SECS (60: the pause
# before the idle readings).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release}
PORT=${PORT:-8091}
REDIS_PORT=${REDIS_PORT:-6391}
OUT=${OUT:-/tmp/voicegate-chaos}
STREAMS=${STREAMS:-300}
UPLOADERS=${UPLOADERS:-4}
FILES=${FILES:-5}
ROUND_SECS=${ROUND_SECS:-10}
STORM=${STORM:-20000}
KILL_SECS=${KILL_SECS:-300}
CYCLE_SECS=${CYCLE_SECS:-720}
FAULT_AT=${FAULT_AT:-120}
REDIS_DOWN=${REDIS_DOWN:-20}
IDLE_SECS=${IDLE_SECS:-60}
CYCLES=${CYCLES:-2}
PASSIVATION_S=${PASSIVATION_S:-30}
ADMIN_KEY=${ADMIN_KEY:-chaos-soak}
export ADMIN_KEY
rm -rf "$OUT"
mkdir -p "$OUT/redis" "$OUT/uploads" "$OUT/spool"
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

redis_start() {
  redis-server --port "$REDIS_PORT" --dir "$OUT/redis" --appendonly yes --appendfsync always --save '' \
    --daemonize yes --pidfile "$OUT/redis.pid" --logfile "$OUT/redis.log" >/dev/null
  for _ in $(seq 1 100); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "redis-server did not start" >&2
  return 1
}
redis_stop() { redis-cli -p "$REDIS_PORT" shutdown >/dev/null 2>&1 || true; }

server_pid=""
server_start() {
  # The storm needs its users over a cap: 10 min of speech a day. Streams send at most CYCLE_SECS of
  # audio (about 60 % speech), so a 720 s stream stays below it.
  VOICEGATE_REDIS_URL="redis://127.0.0.1:$REDIS_PORT" VOICEGATE_STT=none RUST_LOG=${RUST_LOG:-warn} \
    VOICEGATE_UPLOAD_DIR="$OUT/uploads" VOICEGATE_SYNC_SPOOL_DIR="$OUT/spool" \
    FAIR_USE_DAILY_SPEECH_MS=${FAIR_USE_DAILY_SPEECH_MS:-600000} \
    VOICEGATE_METER_IDLE_PASSIVATION_S="$PASSIVATION_S" \
    "$BIN/voicegate" serve --bind "127.0.0.1:$PORT" >>"$OUT/server.log" 2>&1 &
  server_pid=$!
  for _ in $(seq 1 150); do
    curl -fs "http://127.0.0.1:$PORT/readyz" >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  echo "the server did not become ready" >&2
  return 1
}

cleanup() {
  [ -n "$server_pid" ] && kill -TERM "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null || true
  redis-cli -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true
}
trap cleanup EXIT

rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$server_pid/status"; }
fds() { find "/proc/$server_pid/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l; }
leftovers() { find "$OUT/uploads" "$OUT/spool" -mindepth 1 -type f 2>/dev/null | wc -l; }

# One phase: the harness in the background, `fault` at FAULT_AT seconds, then the harness's verdict.
phase() {
  local name=$1 secs=$2 fault=$3
  local rounds=$(( (secs + ROUND_SECS - 1) / ROUND_SECS ))
  "$BIN/voicegate-loadtest" --url "http://127.0.0.1:$PORT" --quiet --survive-node-loss \
    --report-file "$OUT/$name.json" --settle-secs 60 --retry-storm "$STORM" --storm-after 15 \
    mixed --streams "$STREAMS" --duration "$secs" --ramp 20 \
    --uploaders "$UPLOADERS" --files "$FILES" --rounds "$rounds" --round-interval "$ROUND_SECS" \
    >"$OUT/$name.txt" 2>"$OUT/$name.err" &
  local harness=$!
  sleep "$FAULT_AT"
  "$fault"
  set +e
  wait "$harness"
  local rc=$?
  set -e
  echo "$rc" >"$OUT/$name.rc"
}

kill_node() {
  echo "$(date -u +%T) SIGKILL the node (pid $server_pid)" | tee -a "$OUT/events.txt"
  kill -KILL "$server_pid"
  wait "$server_pid" 2>/dev/null || true
  server_start
  echo "$(date -u +%T) node restarted and ready (pid $server_pid)" | tee -a "$OUT/events.txt"
}

stop_redis() {
  echo "$(date -u +%T) Redis stopped for $REDIS_DOWN s" | tee -a "$OUT/events.txt"
  redis_stop
  sleep "$REDIS_DOWN"
  redis_start
  echo "$(date -u +%T) Redis started" | tee -a "$OUT/events.txt"
}

idle_readings() {
  local name=$1
  sleep "$IDLE_SECS"
  echo "$(fds) $(rss_kib) $(leftovers) $(live_actors) $(heap_kib)" >"$OUT/$name.idle"
}
live_actors() { curl -fs "http://127.0.0.1:$PORT/metrics" | awk '/^voicegate_meter_live_actors / {print $2}'; }
# The allocator's account (voicegate_process_heap_bytes, glibc's mallinfo2) in KiB: "in_use free", so a
# rise in RSS reads as memory the program keeps (in_use) or freed memory the allocator retains (free).
heap_kib() {
  curl -fs "http://127.0.0.1:$PORT/metrics" | awk '
    /^voicegate_process_heap_bytes\{state="in_use"\}/ { u = $2 }
    /^voicegate_process_heap_bytes\{state="free"\}/ { f = $2 }
    END { printf "%d %d", u / 1024, f / 1024 }'
}

# The harness's JSON fields the judgements read (jq-free: python3 is on every machine the scripts set up).
field() {
  python3 -c 'import json,sys
r = json.load(open(sys.argv[1]))
v = r
for k in sys.argv[2].split("."):
    v = v.get(k) if isinstance(v, dict) else None
print("null" if v is None else v)' "$1" "$2"
}

redis_start
server_start
echo "$(fds) $(rss_kib) $(leftovers) $(live_actors) $(heap_kib)" >"$OUT/start.idle"
echo "$(date -u +%T) chaos soak: $STREAMS streams, $UPLOADERS uploaders, storm $STORM; kill phase ${KILL_SECS} s, cycles $CYCLES × ${CYCLE_SECS} s" | tee -a "$OUT/events.txt"

phase kill "$KILL_SECS" kill_node
idle_readings kill
for c in $(seq 1 "$CYCLES"); do
  phase "cycle$c" "$CYCLE_SECS" stop_redis
  idle_readings "cycle$c"
done

ok=1
report() {
  local name=$1 exact=$2
  local f="$OUT/$name.json"
  local passed doubled lost bound broken unanswered metered resent reconnects storm_refused errors
  passed=$(field "$f" accounting.passed)
  doubled=$(field "$f" accounting.node_loss.doubled_ms)
  lost=$(field "$f" accounting.node_loss.lost_ms)
  bound=$(field "$f" accounting.node_loss.lost_bound_ms)
  broken=$(field "$f" accounting.node_loss.sessions_broken)
  unanswered=$(field "$f" accounting.node_loss.files_unanswered)
  metered=$(field "$f" accounting.server_ms)
  resent=$(field "$f" sync.uploads_resent)
  reconnects=$(field "$f" realtime.reconnect_attempts)
  storm_refused=$(field "$f" storm.refusals)
  errors=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["errors"] or "none")' "$f")
  read -r fd rss left actors heap_used heap_free <"$OUT/$name.idle"
  printf '%-7s harness exit %s; metered %s ms; doubled %s ms; lost %s ms (bound %s); sessions broken %s, files unanswered %s; uploads resent %s, reconnect attempts %s; storm refusals %s; errors %s; idle: %s fds, RSS %s KiB (heap in use %s KiB, freed and held %s KiB), %s upload/spool files, %s meter actors\n' \
    "$name" "$(cat "$OUT/$name.rc")" "$metered" "$doubled" "$lost" "$bound" "$broken" "$unanswered" "$resent" "$reconnects" "$storm_refused" "$errors" "$fd" "$rss" "$heap_used" "$heap_free" "$left" "$actors"
  [ "$passed" = True ] || { echo "  ✗ $name: accounting check failed"; ok=0; }
  [ "$doubled" = 0 ] || { echo "  ✗ $name: speech doubled"; ok=0; }
  if [ "$exact" = 1 ]; then
    [ "$lost" = 0 ] && [ "$broken" = 0 ] && [ "$unanswered" = 0 ] || { echo "  ✗ $name: a Redis restart must lose nothing"; ok=0; }
  fi
  [ "$left" = 0 ] || { echo "  ✗ $name: upload or spool files left"; ok=0; }
}
echo "start   idle: $(awk '{printf "%s fds, RSS %s KiB (heap in use %s KiB, freed and held %s KiB), %s upload/spool files, %s meter actors", $1, $2, $5, $6, $3, $4}' "$OUT/start.idle")"
report kill 0
for c in $(seq 1 "$CYCLES"); do report "cycle$c" 1; done
# Every later cycle against the first: RSS within 5 %, descriptors not above.
read -r fd1 rss1 _ <"$OUT/cycle1.idle"
for c in $(seq 2 "$CYCLES"); do
  read -r fdc rssc _ <"$OUT/cycle$c.idle"
  awk -v a="$rss1" -v b="$rssc" -v c="$c" 'BEGIN { printf "RSS after cycle %d vs cycle 1: %+.2f %% (limit ±5 %%)\n", c, (b - a) * 100 / a }'
  awk -v a="$rss1" -v b="$rssc" 'BEGIN { exit !((b - a) * 100 / a <= 5 && (a - b) * 100 / a <= 5) }' || { echo "  ✗ RSS moved"; ok=0; }
  [ "$fdc" -le "$fd1" ] || { echo "  ✗ descriptors grew ($fd1 → $fdc)"; ok=0; }
done
# The periodic heap trims since the node's restart (VOICEGATE_HEAP_TRIM_SECS): how many, and how long.
curl -fs "http://127.0.0.1:$PORT/metrics" | awk '
  /^voicegate_process_heap_trim_seconds_count/ { n = $2 }
  /^voicegate_process_heap_trim_seconds_sum/ { s = $2 }
  /^voicegate_process_heap_trim_seconds_bucket/ { match($0, /le="[^"]*"/); k++; le[k] = substr($0, RSTART + 4, RLENGTH - 5); c[k] = $2 }
  END { for (i = 1; i <= k; i++) if (c[i] == n) { max = le[i]; break }
        if (n > 0) printf "heap trims since the restart: %d, mean %.2f ms, all within %s s\n", n, s * 1000 / n, max
        else print "heap trims since the restart: none (VOICEGATE_HEAP_TRIM_SECS=0?)" }'
if [ "$ok" = 1 ]; then echo "chaos soak: PASS"; else echo "chaos soak: FAIL"; exit 1; fi
