#!/usr/bin/env bash
# HTTP pool throughput: a center and one agent on loopback, a 64 KiB file copied to the
# agent (so its pool holds it), then wrk against the agent's pool with a URL the center
# signed, and against the center's redirect endpoint. Needs wrk and curl.
# Usage: bench/scripts/pool-wrk.sh [SECONDS] [CONNECTIONS]
set -euo pipefail
cd "$(dirname "$0")/../.."
secs=${1:-10} conns=${2:-32}
cargo build --release -q -p octopus-tools
octo=$PWD/target/release/octo
dir=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$dir"; }
trap cleanup EXIT
"$octo" center --listen 127.0.0.1:0 --data-dir "$dir/center" --json >"$dir/center.out" 2>"$dir/center.log" &
pids+=($!)
until grep -q '"ready"' "$dir/center.out" 2>/dev/null; do sleep 0.1; done
api=$(python3 -c 'import json,sys; print(json.loads(open(sys.argv[1]).readline())["api"])' "$dir/center.out")
export OCTO_CENTER=$api OCTO_TOKEN=$(cat "$dir/center/admin.token")
enroll=$("$octo" token create --scope enroll --ttl 1h)
"$octo" agent --center "${api#http://}" --token "$enroll" --data-dir "$dir/agent" --name pool-1 --json \
  >"$dir/agent.out" 2>"$dir/agent.log" &
pids+=($!)
until grep -q '"ready"' "$dir/agent.out" 2>/dev/null; do sleep 0.1; done
head -c 65536 /dev/urandom >"$dir/file.bin"
md5=$(md5sum "$dir/file.bin" | cut -d' ' -f1)
"$octo" cp --mkdir "$dir/file.bin" "pool-1:$dir/dest/" >/dev/null 2>&1
until curl -s -H "Authorization: Bearer $OCTO_TOKEN" "$api/api/v1/files" | grep -q '"holds":1'; do sleep 0.1; done
# The center served the copy itself, so the next request is redirected to the agent.
pool_url=$(curl -s -o /dev/null -w '%{redirect_url}' -H "Authorization: Bearer $OCTO_TOKEN" "$api/api/v1/files/$md5")
echo "pool URL: $pool_url"
curl -sf "$pool_url" | md5sum | grep -q "$md5" && echo "curl of the signed URL: MD5 ok"
echo "== wrk: agent pool, 64 KiB file, ${conns} connections, ${secs}s"
wrk -t2 -c"$conns" -d"${secs}s" "$pool_url"
echo "== wrk: center redirect (302 to the least-loaded holder), ${conns} connections, ${secs}s"
wrk -t2 -c"$conns" -d"${secs}s" -H "Authorization: Bearer $OCTO_TOKEN" "$api/api/v1/files/$md5"
