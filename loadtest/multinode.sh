#!/usr/bin/env bash
# Two VoiceGate nodes on one Redis Cluster (3 masters, 3 replicas: loadtest/redis-cluster.sh), a
# `voicegate-loadtest --survive-node-loss mixed` run spread over both (stream i on node i mod 2, a user's
# uploads and status read on the other node), and one fault at FAULT_AT seconds:
#
#   loadtest/multinode.sh scale      no fault: the accounting is exact; CPU per stream-second per node
#   loadtest/multinode.sh nodeloss   node 1 SIGKILLed (not restarted): its streams reconnect to node 2, its
#                                    unanswered uploads are sent again; nothing doubled, loss within bound
#   loadtest/multinode.sh failover   a master (the one serving slot 0) SIGKILLed: its replica is promoted,
#                                    the nodes go on without a restart; nothing doubled, loss within bound
#                                    (WAIT_REPLICAS=1: zero); RESTART_LOST s after the promotion
#                                    the lost master is started again and rejoins as a replica (default
#                                    10 with WAIT_REPLICAS, else not: until then the promoted master has
#                                    no replica and its users' flushes cannot be acknowledged)
#   loadtest/multinode.sh reshard    1,000 slots moved between two masters (`redis-cli --cluster reshard`):
#                                    exact, only retried errors
#
# Prints the harness's table, the fault's timeline, and per node its CPU over the run and per
# stream-second; leaves everything in $OUT (default /tmp/voicegate-multinode). Every process it starts is
# stopped at the end. The harness gets no niceness of its own: server nodes, Redis and harness share the
# cores as they come.
#
# Environment: BIN (target/release), OUT, STREAMS (600: 300 per node), DURATION (180 s of audio per
# stream), RAMP (30), UPLOADERS (4, FILES 5 files every ROUND_SECS 10 s), FAULT_AT (90), WAIT_REPLICAS
# (0: VOICEGATE_REDIS_WAIT_REPLICAS of both nodes), RESTART_LOST (above), PORT1/PORT2 (8093/8094), REDIS_PORTS (7100…7105).
set -euo pipefail
cd "$(dirname "$0")/.."
scenario=${1:-}
case "$scenario" in scale | nodeloss | failover | reshard) ;; *)
  echo "usage: $0 scale|nodeloss|failover|reshard" >&2
  exit 2
  ;;
esac
BIN=${BIN:-target/release}
OUT=${OUT:-/tmp/voicegate-multinode}
STREAMS=${STREAMS:-600}
DURATION=${DURATION:-180}
RAMP=${RAMP:-30}
UPLOADERS=${UPLOADERS:-4}
FILES=${FILES:-5}
ROUND_SECS=${ROUND_SECS:-10}
FAULT_AT=${FAULT_AT:-90}
WAIT_REPLICAS=${WAIT_REPLICAS:-0}
if [ "$WAIT_REPLICAS" -gt 0 ]; then RESTART_LOST=${RESTART_LOST:-10}; else RESTART_LOST=${RESTART_LOST:-0}; fi
PORT1=${PORT1:-8093}
PORT2=${PORT2:-8094}
read -r -a ports <<<"${REDIS_PORTS:-7100 7101 7102 7103 7104 7105}"
rm -rf "$OUT"
mkdir -p "$OUT"
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do
    for _ in $(seq 1 300); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
  done
  loadtest/redis-cluster.sh stop "$OUT/cluster" >/dev/null 2>&1 || true
}
trap cleanup EXIT

seeds=$(loadtest/redis-cluster.sh start "$OUT/cluster" "${ports[@]}" | paste -sd, -)
log() { echo "$(date -u +%T.%3N) $*" | tee -a "$OUT/events.txt"; }
log "cluster up: $seeds"

start_node() {
  local port=$1 name=$2
  VOICEGATE_REDIS_CLUSTER_NODES="$seeds" VOICEGATE_REDIS_WAIT_REPLICAS="$WAIT_REPLICAS" \
    VOICEGATE_STT=none RUST_LOG=${RUST_LOG:-warn} \
    VOICEGATE_UPLOAD_DIR="$OUT/$name-uploads" VOICEGATE_SYNC_SPOOL_DIR="$OUT/spool" \
    "$BIN/voicegate" serve --bind "127.0.0.1:$port" >"$OUT/$name.log" 2>&1 &
  local pid=$!
  for _ in $(seq 1 150); do
    curl -fs "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 && { echo "$pid"; return 0; }
    sleep 0.2
  done
  echo "node $name did not become ready" >&2
  return 1
}
mkdir -p "$OUT/node1-uploads" "$OUT/node2-uploads" "$OUT/spool"
# (Started in a command substitution, the nodes are not this shell's children: cleanup polls them.)
node1=$(start_node "$PORT1" node1)
pids+=("$node1")
node2=$(start_node "$PORT2" node2)
pids+=("$node2")
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }
tck=$(getconf CLK_TCK)
c1a=$(cpu_ticks "$node1")
c2a=$(cpu_ticks "$node2")
# A node's CPU is read every second, so a node that dies keeps its last reading.
(
  while true; do
    echo "$(cpu_ticks "$node1") $(cpu_ticks "$node2")" >"$OUT/cpu.now.tmp" && mv "$OUT/cpu.now.tmp" "$OUT/cpu.now"
    sleep 1
  done
) &
sampler=$!
pids+=("$sampler")

# The master serving slot 0, and its id; another master's id (for the reshard).
master_of_slot0() {
  redis-cli -p "${ports[0]}" cluster nodes | awk '$3 ~ /master/ && $8 != "" { for (i = 9; i <= NF; i++) { split($i, r, "-"); if (r[1] == 0) print $1, $2 } }'
}

fault() {
  case "$scenario" in
  scale) ;;
  nodeloss)
    log "SIGKILL node 1 (pid $node1); node 2 serves on"
    kill -KILL "$node1"
    ;;
  failover)
    read -r id addr < <(master_of_slot0)
    local port=${addr%%@*}
    port=${port##*:}
    local pid
    pid=$(cat "$OUT/cluster/$port/redis.pid")
    log "SIGKILL Redis master $addr (serving slot 0, pid $pid)"
    kill -KILL "$pid"
    for _ in $(seq 1 200); do
      if redis-cli -p "${ports[1]}" cluster nodes | grep -v "$id" | grep -q "master.* 0-"; then
        log "a replica was promoted for slot 0: $(redis-cli -p "${ports[1]}" cluster nodes | grep -v "$id" | grep "master.* 0-" | awk '{print $2}')"
        break
      fi
      sleep 0.1
    done
    if [ "$RESTART_LOST" -gt 0 ]; then
      sleep "$RESTART_LOST"
      loadtest/redis-cluster.sh restart "$OUT/cluster" "$port"
      log "the lost master $port started again: a connected replica now"
    fi
    ;;
  reshard)
    read -r from _ < <(master_of_slot0)
    local to
    to=$(redis-cli -p "${ports[0]}" cluster nodes | awk -v f="$from" '$3 ~ /master/ && $1 != f && $8 != "" {print $1; exit}')
    log "reshard: moving 1000 slots from $from to $to"
    redis-cli --cluster reshard "127.0.0.1:${ports[0]}" --cluster-from "$from" --cluster-to "$to" \
      --cluster-slots 1000 --cluster-yes >"$OUT/reshard.log" 2>&1
    log "reshard done ($(grep -c '^Moving slot' "$OUT/reshard.log") slots moved)"
    ;;
  esac
}

rounds=$(((DURATION + RAMP + ROUND_SECS - 1) / ROUND_SECS))
t0=$(date +%s.%N)
"$BIN/voicegate-loadtest" --url "http://127.0.0.1:$PORT1,http://127.0.0.1:$PORT2" --quiet --survive-node-loss \
  --report-file "$OUT/report.json" --settle-secs 60 \
  mixed --streams "$STREAMS" --duration "$DURATION" --ramp "$RAMP" \
  --uploaders "$UPLOADERS" --files "$FILES" --rounds "$rounds" --round-interval "$ROUND_SECS" \
  >"$OUT/report.txt" 2>"$OUT/harness.err" &
harness=$!
sleep "$FAULT_AT"
fault
set +e
wait "$harness"
rc=$?
set -e
t1=$(date +%s.%N)
read -r c1b c2b <"$OUT/cpu.now"
cat "$OUT/report.txt"
echo "harness exit code $rc"
cat "$OUT/events.txt"
awk -v a1="$c1a" -v b1="$c1b" -v a2="$c2a" -v b2="$c2b" -v tck="$tck" -v t0="$t0" -v t1="$t1" \
  -v streams="$STREAMS" -v dur="$DURATION" 'BEGIN {
  s1 = (b1 - a1) / tck; s2 = (b2 - a2) / tck; ss = streams / 2 * dur;
  printf "node 1 CPU %.1f s, node 2 CPU %.1f s over %.1f s wall; per stream-second (each node %d streams × %d s): %.3f / %.3f ms\n",
    s1, s2, t1 - t0, streams / 2, dur, s1 * 1000 / ss, s2 * 1000 / ss }'
for n in node1 node2; do
  echo "$n warnings: $(grep -c ' WARN ' "$OUT/$n.log" || true), errors: $(grep -c ' ERROR ' "$OUT/$n.log" || true)"
done
exit "$rc"
