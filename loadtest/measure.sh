#!/usr/bin/env bash
# One measurement, end to end, as docs/performance.md records them: a private redis-server, a release
# `voicegate serve` on it, the server's idle RSS, then `voicegate-loadtest <scenario args…>` while the
# server's RSS and CPU time are sampled every second from /proc; prints a summary and leaves the files in
# $OUT (default /tmp/voicegate-measure). Everything it starts is stopped at the end.
#
#   loadtest/measure.sh realtime --streams 600 --duration 300 --ramp 30
#   loadtest/measure.sh sync --uploaders 20 --files 10 --rounds 1
#   loadtest/measure.sh sync --uploaders 20 --files 10 --rounds 6 --v2 --pipeline   # v2 as the app uses it
#   ADMIN_KEY=storm FAIR_USE_DAILY_SPEECH_MS=600000 loadtest/measure.sh realtime --streams 0 --retry-storm 1000
#
# The environment reaches both the server and the harness (ADMIN_KEY above: the server's admin routes and
# the storm's key); the harness also gets VOICEGATE_SERVER_PID, so a retry storm (--retry-storm) reads the
# server's CPU over its own window from /proc, and the summary prints the CPU per refusal
# (docs/performance.md, "Retry storm").
#
# Environment: BIN (directory of the release binaries, default target/release), PORT (8089),
# REDIS_PORT (6390), REDIS_NICE (redis-server's niceness, default NICE; lower emulates a Redis on its own host), STORE=memory (the server's in-memory store instead of the redis-server), OUT, NICE (niceness of redis, server and harness, default -10 when root: other work
# on a shared machine, builds above all, must not starve the measured processes), PERF=1 to record a CPU profile of the server with `perf record` (linux-perf)
# during the run (the server's /metrics at the end always lands in $OUT/metrics.txt), SERVE_ARGS (extra `voicegate serve` arguments), VOICEGATE_STT (default none here, so figures
# stay comparable with the runs before speech-to-text; set it to measure a provider).
# VOICEGATE_STT=deepgram without VOICEGATE_DEEPGRAM_URL: the script starts `deepgram-double` (a local server
# speaking Deepgram's live protocol, loadtest/src/bin/deepgram_double.rs; pinned like the harness), points
# the server at it with a placeholder key, and prints the audio it received beside the server's
# voicegate_stt_forwarded_samples_total{provider="deepgram"}.
# The server runs with admission control on (its defaults): past the capacity it measures it refuses new
# sessions 503 at_capacity, which the harness counts as errors unless it runs with --retry-refused S. To find
# where the node breaks without it: SERVE_ARGS="--admission-cpu-percent 0 --admission-late-percent 0".
# SERVER_CPUS / HARNESS_CPUS: CPU lists (taskset -c) for the server and for the harness, e.g. SERVER_CPUS=1
# HARNESS_CPUS=0 for the server on one core and the harness on the other; Redis runs on REDIS_CPUS (default
# HARNESS_CPUS: in production it is another host's process, so it does not take the server's core).
# A realtime run with --pace above 4 needs the server's intake limit raised, e.g.
# VOICEGATE_LISTEN_MAX_PACE=10 loadtest/measure.sh realtime --pace 10 … (the environment reaches the server).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release}
PORT=${PORT:-8089}
REDIS_PORT=${REDIS_PORT:-6390}
OUT=${OUT:-/tmp/voicegate-measure}
mkdir -p "$OUT"
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
if [ "$(id -u)" = 0 ]; then NICE=${NICE:--10}; else NICE=${NICE:-0}; fi
# The pinning prefixes (empty: not pinned). Arrays, not a function: the server's `$!` must be its own pid.
server_pin=(); harness_pin=(); redis_pin=()
[ -n "${SERVER_CPUS:-}" ] && server_pin=(taskset -c "$SERVER_CPUS")
[ -n "${HARNESS_CPUS:-}" ] && harness_pin=(taskset -c "$HARNESS_CPUS")
[ -n "${REDIS_CPUS:-${HARNESS_CPUS:-}}" ] && redis_pin=(taskset -c "${REDIS_CPUS:-$HARNESS_CPUS}")
# `${a[@]+"${a[@]}"}`: an empty array expands to nothing under `set -u` on any bash.
run() { ${harness_pin[@]+"${harness_pin[@]}"} nice -n "$NICE" "$@"; }
# With autogroup scheduling, niceness only orders threads within one session; between sessions the
# autogroup's own nice decides. Raise ours too (root only), or a build in another session still takes
# its equal share of the cores.
if [ "$(id -u)" = 0 ] && [ -w "/proc/$$/autogroup" ]; then echo "$NICE" >"/proc/$$/autogroup" || true; fi

${redis_pin[@]+"${redis_pin[@]}"} nice -n "${REDIS_NICE:-$NICE}" redis-server --port "$REDIS_PORT" --save '' --appendonly no --daemonize yes \
  --pidfile "$OUT/redis.pid" --logfile "$OUT/redis.log" >/dev/null
# A daemonized redis-server calls setsid(), so it lands in an autogroup of its own at nice 0: with the
# cores saturated by the (nice −10) server and harness it got ~1/10 of their weight and its replies
# came seconds late (store timeouts in the server's log from ~1,200 streams). Give its autogroup the
# same niceness: Redis is another host's process in production, it must not be starved here.
for _ in $(seq 1 50); do [ -s "$OUT/redis.pid" ] && break; sleep 0.1; done
redis_pid=$(cat "$OUT/redis.pid" 2>/dev/null || true)
if [ "$(id -u)" = 0 ] && [ -n "$redis_pid" ] && [ -w "/proc/$redis_pid/autogroup" ]; then
  echo "${REDIS_NICE:-$NICE}" >"/proc/$redis_pid/autogroup" || true
fi
server_pid=""
sampler_pid=""
perf_pid=""
double_pid=""
cleanup() {
  [ -n "$double_pid" ] && kill -TERM "$double_pid" 2>/dev/null || true
  [ -n "$perf_pid" ] && kill -INT "$perf_pid" 2>/dev/null && wait "$perf_pid" 2>/dev/null || true
  [ -n "$sampler_pid" ] && kill "$sampler_pid" 2>/dev/null || true
  if [ -n "$server_pid" ]; then
    kill -TERM "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
  redis-cli -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true
}
trap cleanup EXIT

rm -f "$OUT/deepgram-double.addr" "$OUT/deepgram-double.json"
if [ "${VOICEGATE_STT:-none}" = deepgram ] && [ -z "${VOICEGATE_DEEPGRAM_URL:-}" ]; then
  # Not through `run`: a function in the background would be a subshell, and `$!` its pid.
  ${harness_pin[@]+"${harness_pin[@]}"} nice -n "$NICE" "$BIN/deepgram-double" --bind 127.0.0.1:0 --addr-file "$OUT/deepgram-double.addr" \
    >"$OUT/deepgram-double.json" 2>"$OUT/deepgram-double.log" &
  double_pid=$!
  for _ in $(seq 1 100); do
    [ -s "$OUT/deepgram-double.addr" ] && break
    sleep 0.1
  done
  if ! [ -s "$OUT/deepgram-double.addr" ] || ! kill -0 "$double_pid" 2>/dev/null; then
    echo "deepgram-double did not start (see $OUT/deepgram-double.log)" >&2
    exit 3
  fi
  VOICEGATE_DEEPGRAM_URL="ws://$(cat "$OUT/deepgram-double.addr")"
  export VOICEGATE_DEEPGRAM_URL
  export DEEPGRAM_API_KEY=${DEEPGRAM_API_KEY:-load-test-placeholder-key}
fi
redis_url="redis://127.0.0.1:$REDIS_PORT"
[ "${STORE:-redis}" = memory ] && redis_url=""
VOICEGATE_REDIS_URL="$redis_url" VOICEGATE_STT="${VOICEGATE_STT:-none}" RUST_LOG=${RUST_LOG:-warn} \
  ${server_pin[@]+"${server_pin[@]}"} nice -n "$NICE" "$BIN/voicegate" serve --bind "127.0.0.1:$PORT" ${SERVE_ARGS:-} >"$OUT/server.log" 2>&1 &
server_pid=$!
for _ in $(seq 1 100); do
  curl -fs "http://127.0.0.1:$PORT/readyz" >/dev/null 2>&1 && break
  sleep 0.2
done
curl -fs "http://127.0.0.1:$PORT/readyz" >/dev/null
sleep 3
rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
idle_rss=$(rss_kib "$server_pid")
tck=$(getconf CLK_TCK)

# Sampler: time, RSS KiB, server CPU ticks (user+sys), threads.
(
  while kill -0 "$server_pid" 2>/dev/null; do
    echo "$(date +%s.%N) $(rss_kib "$server_pid") $(cpu_ticks "$server_pid") $(awk '/^Threads/ {print $2}' "/proc/$server_pid/status")"
    sleep 1
  done
) >"$OUT/samples.txt" 2>/dev/null &
sampler_pid=$!

if [ "${PERF:-0}" = 1 ]; then
  perf record -F 499 -g -p "$server_pid" -o "$OUT/perf.data" >/dev/null 2>"$OUT/perf.log" &
  perf_pid=$!
fi

machine_busy() { awk '/^cpu / {print $2 + $3 + $4 + $7 + $8}' /proc/stat; }
threads_cpu() {
  for t in /proc/"$server_pid"/task/*; do
    # tid, name, CPU ticks, then the ns it waited runnable for a core (schedstat: run queue delay).
    echo "${t##*/} $(tr ' ' '_' <"$t/comm") $(awk '{print $14 + $15}' "$t/stat") $(awk '{print $2}' "$t/schedstat" 2>/dev/null || echo 0)"
  done
}
threads_cpu | sort >"$OUT/threads-before.txt"
cpu0=$(cpu_ticks "$server_pid")
busy0=$(machine_busy)
t0=$(date +%s.%N)
# The harness's retry storm (--retry-storm) reads the server's CPU over its window from /proc/<pid>.
export VOICEGATE_SERVER_PID=$server_pid
set +e
run /usr/bin/time -f "%U %S %M" -o "$OUT/harness-time.txt" \
  "$BIN/voicegate-loadtest" --url "http://127.0.0.1:$PORT" --quiet --report-file "$OUT/report.json" "$@" \
  | tee "$OUT/report.txt"
rc=${PIPESTATUS[0]}
set -e
t1=$(date +%s.%N)
# The server's own view of the run (tick lag, meter mailbox waits, store errors) for diagnosis.
curl -fs "http://127.0.0.1:$PORT/metrics" >"$OUT/metrics.txt" 2>/dev/null || true
cpu1=$(cpu_ticks "$server_pid")
busy1=$(machine_busy)
threads_cpu | sort >"$OUT/threads-after.txt"
if [ -n "$perf_pid" ]; then
  kill -INT "$perf_pid" 2>/dev/null || true
  wait "$perf_pid" 2>/dev/null || true
  perf_pid=""
fi

if [ -n "$double_pid" ]; then
  kill -TERM "$double_pid" 2>/dev/null || true
  wait "$double_pid" 2>/dev/null || true
  double_pid=""
fi

peak_rss=$(awk 'BEGIN {m = 0} $2 > m {m = $2} END {print m}' "$OUT/samples.txt")
read -r h_user h_sys h_maxrss < <(tail -1 "$OUT/harness-time.txt")
streams=$(sed -n 's/.*"peak_concurrent": \([0-9]*\).*/\1/p' "$OUT/report.json" | head -1)
streams=${streams:-0}
{
  echo "server idle RSS:        ${idle_rss} KiB"
  echo "server peak RSS:        ${peak_rss} KiB"
  if [ "$streams" -gt 0 ]; then
    echo "RSS per stream:         $(( (peak_rss - idle_rss) / streams )) KiB above idle (${streams} streams)"
  fi
  awk -v c0="$cpu0" -v c1="$cpu1" -v t0="$t0" -v t1="$t1" -v tck="$tck" 'BEGIN {
    cpu = (c1 - c0) / tck; wall = t1 - t0;
    printf "server CPU:             %.1f s over %.1f s wall (%.2f cores)\n", cpu, wall, cpu / wall }'
  # Server CPU per stream-second: over the audio the server acknowledged (ramp and close included).
  acked=$(sed -n 's/.*"frames_acknowledged": \([0-9]*\).*/\1/p' "$OUT/report.json" | head -1)
  if [ "${acked:-0}" -gt 0 ]; then
    awk -v c0="$cpu0" -v c1="$cpu1" -v tck="$tck" -v f="$acked" 'BEGIN {
      printf "CPU per stream-second:  %.3f ms (%.0f stream-seconds acknowledged)\n", (c1 - c0) / tck * 1000 / (f / 100), f / 100 }'
  fi
  awk -v u="$h_user" -v s="$h_sys" -v m="$h_maxrss" -v t0="$t0" -v t1="$t1" 'BEGIN {
    printf "harness CPU:            %.1f s (%.2f cores), max RSS %d KiB\n", u + s, (u + s) / (t1 - t0), m }'
  # Everything else the machine ran meanwhile (other builds would distort the figures).
  awk -v b0="$busy0" -v b1="$busy1" -v c0="$cpu0" -v c1="$cpu1" -v u="$h_user" -v s="$h_sys" \
      -v t0="$t0" -v t1="$t1" -v tck="$tck" 'BEGIN {
    other = (b1 - b0 - (c1 - c0)) / tck - (u + s);
    printf "other processes CPU:    %.1f s (%.2f cores)\n", other, other / (t1 - t0) }'
  echo "server CPU by thread (s):"
  # Threads alive at the end; those born during the run count from 0.
  join -a 2 -e 0 -o 2.2,1.3,2.3,1.4,2.4 "$OUT/threads-before.txt" "$OUT/threads-after.txt" |
    awk -v tck="$tck" '{c[$1] += ($3 - $2) / tck; w[$1] += ($5 - $4) / 1e9}
      END {for (k in c) printf "  %-20s %8.1f   (waited for a core %.1f s)\n", k, c[k], w[k]}' |
    sort -k2 -nr
  # A retry storm: the server's CPU over the storm's window (the harness reads it), per refusal. With
  # streams running meanwhile it includes theirs: the clean figure is from a run with --streams 0.
  per_refusal=$(sed -n 's/.*"server_cpu_us_per_refusal": \([0-9.e+-]*\).*/\1/p' "$OUT/report.json" | head -1)
  if [ -n "$per_refusal" ]; then
    refusals=$(sed -n 's/.*"refusals": \([0-9]*\).*/\1/p' "$OUT/report.json" | head -1)
    note=""
    [ "$streams" -gt 0 ] && note=" (includes the ${streams} streams' CPU in the storm window)"
    awk -v p="$per_refusal" -v n="$refusals" -v note="$note" \
      'BEGIN {printf "CPU per refusal:        %.1f µs (%d refusals)%s\n", p, n, note}'
  fi
  if [ -s "$OUT/deepgram-double.json" ]; then
    echo "deepgram-double:        $(cat "$OUT/deepgram-double.json")"
    fwd=$(awk '/^voicegate_stt_forwarded_samples_total\{provider="deepgram"\}/ {print $2}' "$OUT/metrics.txt")
    echo "  server forwarded:     ${fwd:-?} samples (voicegate_stt_forwarded_samples_total{provider=\"deepgram\"})"
  fi
  # Store calls that failed (timeouts above all) mean the node was degraded even when the run passed.
  echo "server warnings:        $(grep -c 'WARN' "$OUT/server.log" || true) (store timeouts: $(grep -c 'timed out' "$OUT/server.log" || true))"
  echo "loadtest exit code:     $rc"
} | tee "$OUT/summary.txt"
exit "$rc"
