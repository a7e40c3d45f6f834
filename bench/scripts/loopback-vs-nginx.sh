#!/usr/bin/env bash
# Benchmark: one pair on loopback, unshaped. `octo get` of a file vs nginx serving the
# same file to `curl | md5sum` (both end with the bytes on this machine and their MD5
# known). Prints wall times, MB/s and the getter's peak RSS.
#
#   bench/scripts/loopback-vs-nginx.sh [SIZE_MiB=1024] [RUNS=3]
#
# Needs nginx and curl (apt-get install nginx-light curl) and a release build of octo
# (cargo build --release -p octopus-tools). The page cache is warmed first so both
# read the source from memory.
set -euo pipefail
SIZE_MIB=${1:-1024}
RUNS=${2:-3}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
OCTO=${OCTO:-$ROOT/target/release/octo}
W=$(mktemp -d /tmp/octo-lb.XXXXXX)
trap 'kill $SHARE_PID 2>/dev/null || true; [ -f $W/nginx.pid ] && kill $(cat $W/nginx.pid) 2>/dev/null || true; rm -rf $W' EXIT
SHARE_PID=
mkdir -p $W/www $W/dst
chmod 755 $W $W/www  # nginx workers run as www-data
head -c $((SIZE_MIB * 1048576)) /dev/urandom > $W/www/file.bin
cat $W/www/file.bin > /dev/null
WANT=$(md5sum < $W/www/file.bin | cut -d' ' -f1)

cat > $W/nginx.conf <<NG
worker_processes 1;
pid $W/nginx.pid;
error_log $W/nginx.err;
events { worker_connections 64; }
http {
  access_log off;
  sendfile on; tcp_nopush on;
  server { listen 127.0.0.1:18080; root $W/www; }
}
NG
nginx -c $W/nginx.conf
sleep 0.3

now() { date +%s.%N; }
echo "size: ${SIZE_MIB} MiB, runs: $RUNS, $(nproc) cores, $(lscpu | sed -n 's/^Model name: *//p')"
for i in $(seq $RUNS); do
  t0=$(now); GOT=$(curl -s http://127.0.0.1:18080/file.bin | md5sum | cut -d' ' -f1); t1=$(now)
  [ "$GOT" = "$WANT" ] || { echo "nginx md5 mismatch"; exit 1; }
  awk -v a=$t0 -v b=$t1 -v s=$SIZE_MIB 'BEGIN{printf "nginx|curl|md5sum  run %d: %.2fs  %.0f MB/s\n", '$i', b-a, s*1048576/(b-a)/1e6}'
done

$OCTO share --json --listen 127.0.0.1:0 $W/www/file.bin > $W/share.out 2>$W/share.err &
SHARE_PID=$!
for _ in $(seq 600); do [ -s $W/share.out ] && break; sleep 0.1; done
TICKET=$(head -1 $W/share.out | sed 's/.*"ticket":"\([^"]*\)".*/\1/')
for i in $(seq $RUNS); do
  rm -rf $W/dst/*
  t0=$(now)
  /usr/bin/time -f "%M" -o $W/rss $OCTO get --json --linger 0 "$TICKET" $W/dst/ > $W/get.out 2>$W/get.err
  t1=$(now)
  grep -q "$WANT" $W/get.out || { echo "octo md5 mismatch"; cat $W/get.out $W/get.err; exit 1; }
  awk -v a=$t0 -v b=$t1 -v s=$SIZE_MIB -v r=$(cat $W/rss) 'BEGIN{printf "octo get           run %d: %.2fs  %.0f MB/s  peak RSS %.1f MiB\n", '$i', b-a, s*1048576/(b-a)/1e6, r/1024}'
done
