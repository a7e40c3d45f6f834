#!/usr/bin/env bash
# Control-plane benchmark: a real `octo center` (release build) on loopback, then
#  1. 10 real `octo agent` processes: round trip of `octo exec all -- true` (RUNS runs),
#     and an idle agent's RSS;
#  2. N1 simulated agents (`octo load`, real protocol): the same round trip;
#  3. kill -9 and restart the center with those N1 agents: online count every 0.5 s;
#  4. N2 simulated agents connected with heartbeats: the center's RSS and CPU.
#
#   bench/scripts/control-bench.sh [N1=1000] [N2=5000] [RUNS=20]
#
# Needs a release build: cargo build --release -p octopus-tools
set -euo pipefail
N1=${1:-1000}
N2=${2:-5000}
RUNS=${3:-20}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
OCTO=${OCTO:-$ROOT/target/release/octo}
W=$(mktemp -d /tmp/octo-cb.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}" ${CENTER:-}; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$W"; }
trap cleanup EXIT
ulimit -n "$(ulimit -Hn)" || true
PORT=$((20000 + RANDOM % 20000))
ADDR=127.0.0.1:$PORT
export OCTO_CENTER=https://$ADDR OCTO_CA=$W/center/ca.pem

start_center() {
  "$OCTO" center --listen $ADDR --data-dir $W/center --heartbeat 5s --json >>$W/center.out 2>>$W/center.err &
  CENTER=$!
  for _ in $(seq 100); do curl -s -o /dev/null --cacert $OCTO_CA $OCTO_CENTER/api/v1/info && break; sleep 0.1; done
}
online() { "$OCTO" agents --json | python3 -c 'import json,sys; print(sum(a["status"]=="online" for a in json.load(sys.stdin)))'; }
wait_online() { for _ in $(seq 1200); do [ "$(online)" -ge "$1" ] && return 0; sleep 0.5; done; echo "only $(online) of $1 online"; exit 1; }
ms() { date +%s%N | cut -c1-13; }
rtt() { # RUNS round trips of exec TARGET -- true; prints p50 and p90 in ms
  local target=$1 i t0 t1; : > $W/rtt
  for i in $(seq $RUNS); do t0=$(ms); "$OCTO" exec "$target" -- true >/dev/null 2>&1 || { echo "exec failed"; exit 1; }; t1=$(ms); echo $((t1 - t0)) >> $W/rtt; done
  sort -n $W/rtt | awk '{a[NR]=$1} END {printf "p50 %d ms, p90 %d ms, min %d ms, max %d ms (%d runs)\n", a[int(NR*0.5+0.5)], a[int(NR*0.9+0.5)], a[1], a[NR], NR}'
}
cpu_ticks() { awk '{print $14+$15}' /proc/$1/stat; }
rss_mb() { awk '/VmRSS/ {printf "%.1f", $2/1024}' /proc/$1/status; }

echo "machine: $(nproc) cores, $(lscpu | sed -n 's/^Model name: *//p'), $(uname -r)"
start_center
export OCTO_TOKEN=$(cat $W/center/admin.token)
ENROLL=$("$OCTO" token create --scope enroll --ttl 2h)

echo "== 1. 10 real agents"
for i in $(seq 10); do
  "$OCTO" agent --center $ADDR --token "$ENROLL" --data-dir $W/a$i --name real-$i --tag kind=real >/dev/null 2>>$W/agents.err &
  PIDS+=($!)
done
wait_online 10
echo "exec all -- true, 10 agents: $(rtt kind=real)"
sleep 10
echo "idle agent RSS: $(for p in "${PIDS[@]}"; do rss_mb $p; echo; done | sort -n | awk '{a[NR]=$1} END {printf "median %s MB, max %s MB", a[int(NR/2)+1], a[NR]}')"
for p in "${PIDS[@]}"; do kill $p; done; PIDS=()

echo "== 2. $N1 simulated agents"
t0=$(ms)
"$OCTO" load --center $ADDR --token "$ENROLL" --agents $N1 --prefix s1 --data-dir $W/load1 --json >$W/load1.out 2>>$W/load.err &
LOAD1=$!; PIDS+=($LOAD1)
wait_online $N1
echo "all $N1 online after $(( $(ms) - t0 )) ms (enrollment included)"
echo "exec all -- true, $N1 agents: $(rtt sim=1)"

echo "== 3. center restart with $N1 agents"
kill -9 $CENTER; wait $CENTER 2>/dev/null || true
t0=$(ms)
start_center
printf "t_ms online:"
while :; do n=$(online); printf " %d:%d" $(( $(ms) - t0 )) $n; [ "$n" -ge $N1 ] && break; [ $(( $(ms) - t0 )) -gt 60000 ] && break; sleep 0.5; done
echo
echo "back online: $n of $N1 after $(( $(ms) - t0 )) ms"

echo "== 4. $N2 simulated agents with heartbeats every 5 s"
"$OCTO" load --center $ADDR --token "$ENROLL" --agents $((N2 - N1)) --prefix s2 --data-dir $W/load2 --json >$W/load2.out 2>>$W/load.err &
PIDS+=($!)
wait_online $N2
sleep 5
c0=$(cpu_ticks $CENTER); t0=$(ms); sleep 30; c1=$(cpu_ticks $CENTER); t1=$(ms)
echo "center with $N2 agents: RSS $(rss_mb $CENTER) MB, CPU $(awk -v c=$((c1 - c0)) -v t=$((t1 - t0)) 'BEGIN {printf "%.1f", c * 10 / t * 100}')% of one core over 30 s"
echo "exec all -- true, $N2 agents: $(RUNS=5 rtt sim=1)"
