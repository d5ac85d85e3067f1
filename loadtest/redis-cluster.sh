#!/usr/bin/env bash
# A local Redis Cluster for tests and measurements: 6 `redis-server --cluster-enabled yes` on loopback
# ports (memory only), joined by `redis-cli --cluster create --cluster-replicas 1` (3 masters, 3 replicas).
#
#   loadtest/redis-cluster.sh start DIR [PORT…6]   start (default ports 7000-7005; each also uses PORT+10000
#                                                  for the cluster bus) and wait until every node says
#                                                  cluster_state:ok and the 3 replicas are attached (30 s at
#                                                  most each); prints the seed URLs
#   loadtest/redis-cluster.sh stop DIR             stop the nodes started in DIR (by their pid files)
#   loadtest/redis-cluster.sh restart DIR PORT     start node PORT of DIR again (after it was killed): it
#                                                  rejoins from its nodes.conf (a lost master comes back as
#                                                  a replica of the one promoted in its place); waits until
#                                                  it answers ROLE as a connected replica (30 s at most)
#
# Used by engine/tests/integration/store_cluster.rs. REDIS_SERVER / REDIS_CLI override the binaries.
set -euo pipefail

server="${REDIS_SERVER:-redis-server}"
cli="${REDIS_CLI:-redis-cli}"
cmd="${1:-}"
dir="${2:-}"
[ -n "$cmd" ] && [ -n "$dir" ] || { echo "usage: $0 start|stop|restart DIR [PORT…]" >&2; exit 2; }
shift 2

stop() {
  # Every node at once (each may take a moment: a replica sync in progress), then wait for each.
  local pids=()
  for pidfile in "$dir"/*/redis.pid; do
    [ -f "$pidfile" ] || continue
    pid="$(cat "$pidfile" 2>/dev/null || true)"
    [ -n "$pid" ] || continue
    kill "$pid" 2>/dev/null || true
    pids+=("$pid")
  done
  for pid in "${pids[@]}"; do
    for _ in $(seq 1 200); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.05
    done
  done
}

start_node() {
  local port=$1
  local node="$dir/$port"
  mkdir -p "$node"
  "$server" --port "$port" --bind 127.0.0.1 --protected-mode no \
    --cluster-enabled yes --cluster-config-file "$node/nodes.conf" --cluster-node-timeout 2000 \
    --dir "$node" --save '' --appendonly no --shutdown-on-sigterm "nosave now" --repl-diskless-sync-delay 0 \
    --daemonize yes --pidfile "$node/redis.pid" --logfile "$node/redis.log"
}

case "$cmd" in
restart)
  [ $# -eq 1 ] || { echo "restart needs one port" >&2; exit 2; }
  start_node "$1"
  for i in $(seq 1 600); do
    case "$("$cli" -p "$1" role 2>/dev/null | tr '\n' ' ')" in slave*connected*) break ;; esac
    [ "$i" = 600 ] && { echo "node $1 is not a connected replica in 30 s" >&2; exit 1; }
    sleep 0.05
  done
  ;;
start)
  if [ $# -eq 0 ]; then set -- 7000 7001 7002 7003 7004 7005; fi
  [ $# -eq 6 ] || { echo "6 ports needed, got $#" >&2; exit 2; }
  mkdir -p "$dir"
  for port in "$@"; do start_node "$port"; done
  for port in "$@"; do
    for i in $(seq 1 200); do
      [ "$("$cli" -p "$port" ping 2>/dev/null)" = "PONG" ] && break
      [ "$i" = 200 ] && { echo "node $port did not start" >&2; stop; exit 1; }
      sleep 0.05
    done
  done
  addrs=()
  for port in "$@"; do addrs+=("127.0.0.1:$port"); done
  if ! "$cli" --cluster create "${addrs[@]}" --cluster-replicas 1 --cluster-yes >"$dir/create.log" 2>&1; then
    cat "$dir/create.log" >&2
    stop
    exit 1
  fi
  for port in "$@"; do
    for i in $(seq 1 600); do
      "$cli" -p "$port" cluster info 2>/dev/null | grep -q '^cluster_state:ok' && break
      [ "$i" = 600 ] && { echo "node $port: cluster not ok in 30 s" >&2; stop; exit 1; }
      sleep 0.05
    done
  done
  # The replicas: each attached to its master with its first sync done (ROLE: slave … connected), so a
  # failover (manual or after a master's loss) can promote it at once.
  for i in $(seq 1 600); do
    attached=0
    for port in "$@"; do
      role="$("$cli" -p "$port" role 2>/dev/null | tr '\n' ' ')"
      case "$role" in slave*connected*) attached=$((attached + 1)) ;; esac
    done
    [ "$attached" = 3 ] && break
    [ "$i" = 600 ] && { echo "replicas not attached in 30 s" >&2; stop; exit 1; }
    sleep 0.05
  done
  # And every node's view (CLUSTER NODES, gossiped) knows the 3 replicas: a server's startup check
  # (VOICEGATE_REDIS_WAIT_REPLICAS) reads it from whichever node it asks.
  for i in $(seq 1 600); do
    known=0
    for port in "$@"; do
      n="$("$cli" -p "$port" cluster nodes 2>/dev/null | awk '$3 ~ /slave/ && $3 !~ /fail/ && $4 != "-"' | wc -l)"
      [ "$n" = 3 ] && known=$((known + 1))
    done
    [ "$known" = "$#" ] && break
    [ "$i" = 600 ] && { echo "the replicas are not known to every node in 30 s" >&2; stop; exit 1; }
    sleep 0.05
  done
  for port in "$@"; do printf 'redis://127.0.0.1:%s/\n' "$port"; done
  ;;
stop)
  stop
  ;;
*)
  echo "usage: $0 start|stop DIR [PORT…6]" >&2
  exit 2
  ;;
esac
