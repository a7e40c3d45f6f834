#!/usr/bin/env bash
# `octo exec all -- true` fan-out to N simulated agents (`octo load`, real protocol),
# with the center on its embedded store, then with --registry on a standalone
# ZooKeeper (Debian's package) on loopback. Prints p50/p90 round trips for both.
#   bench/scripts/zk-fanout.sh [N=1000] [RUNS=20]
# Needs: cargo build --release -p octopus-tools; apt-get install zookeeper
set -euo pipefail
N=${1:-1000}
RUNS=${2:-20}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
OCTO=${OCTO:-$ROOT/target/release/octo}
W=$(mktemp -d /tmp/octo-zkf.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$W"; }
trap cleanup EXIT
ulimit -n "$(ulimit -Hn)" || true
ms() { date +%s%N | cut -c1-13; }
online() { "$OCTO" agents --json | python3 -c 'import json,sys; print(sum(a["status"]=="online" for a in json.load(sys.stdin)))'; }
wait_online() { for _ in $(seq 1200); do [ "$(online)" -ge "$1" ] && return 0; sleep 0.5; done; echo "only $(online) of $1 online"; exit 1; }
rtt() {
  local i t0 t1; : > $W/rtt
  for i in $(seq $RUNS); do t0=$(ms); "$OCTO" exec all -- true >/dev/null 2>&1 || { echo "exec failed"; exit 1; }; t1=$(ms); echo $((t1 - t0)) >> $W/rtt; done
  sort -n $W/rtt | awk '{a[NR]=$1} END {printf "p50 %d ms, p90 %d ms, min %d ms, max %d ms (%d runs)\n", a[int(NR*0.5+0.5)], a[int(NR*0.9+0.5)], a[1], a[NR], NR}'
}
run_mode() { # label, extra center args...
  local label=$1; shift
  local port=$((20000 + RANDOM % 20000))
  export OCTO_CENTER=https://127.0.0.1:$port OCTO_CA=$W/center-$label/ca.pem
  "$OCTO" center --listen 127.0.0.1:$port --data-dir $W/center-$label --heartbeat 5s --json "$@" >$W/center-$label.out 2>$W/center-$label.err &
  local center=$!; PIDS+=($center)
  for _ in $(seq 300); do curl -s -o /dev/null --cacert $OCTO_CA $OCTO_CENTER/api/v1/info && break; sleep 0.1; done
  export OCTO_TOKEN=$(cat $W/center-$label/admin.token)
  local enroll; enroll=$("$OCTO" token create --scope enroll --ttl 2h)
  local t0; t0=$(ms)
  "$OCTO" load --center 127.0.0.1:$port --token "$enroll" --agents $N --prefix $label --data-dir $W/load-$label --json >$W/load-$label.out 2>$W/load-$label.err &
  local load=$!; PIDS+=($load)
  wait_online $N
  echo "$label: $N agents online after $(( $(ms) - t0 )) ms; exec all -- true: $(rtt)"
  kill $load $center; wait $load $center 2>/dev/null || true
}
echo "machine: $(nproc) cores, $(lscpu | sed -n 's/^Model name: *//p')"
run_mode embedded

# A standalone ZooKeeper with the package's jar, data on disk, default fsync.
ZKP=$((20000 + RANDOM % 20000))
mkdir -p $W/zk/data
cat > $W/zk/zoo.cfg <<CFG
tickTime=2000
dataDir=$W/zk/data
clientPort=$ZKP
clientPortAddress=127.0.0.1
admin.enableServer=false
maxClientCnxns=0
4lw.commands.whitelist=*
CFG
java -cp /usr/share/java/zookeeper.jar:/usr/share/java/slf4j-simple.jar \
  org.apache.zookeeper.server.quorum.QuorumPeerMain $W/zk/zoo.cfg >$W/zk/log 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do echo srvr | nc -q1 127.0.0.1 $ZKP 2>/dev/null | grep -q Mode && break; sleep 0.2; done
run_mode zookeeper --registry zk://127.0.0.1:$ZKP/octo-bench
