#!/usr/bin/env bash
# HTTP pool throughput: a center and one agent on loopback, a 64 KiB file copied to the
# agent (so its pool holds it), then wrk against the agent's pool with a URL the center
# signed, and against the center's redirect endpoint. Needs wrk and curl.
# Usage: bench/scripts/pool-wrk.sh [SECONDS] [CONNECTIONS]
set -euo pipefail
secs=${1:-10} conns=${2:-32}
source "$(dirname "$0")/local-fleet.sh"
start_agent pool-1
head -c 65536 /dev/urandom >"$dir/file.bin"
md5=$(md5sum "$dir/file.bin" | cut -d' ' -f1)
"$octo" cp --mkdir "$dir/file.bin" "pool-1:$dir/dest/" >/dev/null 2>&1
until curl -s --cacert "$OCTO_CA" -H "Authorization: Bearer $OCTO_TOKEN" "$api/api/v1/files" | grep -q '"holds":1'; do sleep 0.1; done
# The center served the copy itself, so the next request is redirected to the agent.
pool_url=$(curl -s --cacert "$OCTO_CA" -o /dev/null -w '%{redirect_url}' -H "Authorization: Bearer $OCTO_TOKEN" "$api/api/v1/files/$md5")
echo "pool URL: $pool_url"
curl -sf "$pool_url" | md5sum | grep -q "$md5" && echo "curl of the signed URL: MD5 ok"
echo "== wrk: agent pool, 64 KiB file, ${conns} connections, ${secs}s"
wrk -t2 -c"$conns" -d"${secs}s" "$pool_url"
echo "== wrk: center redirect (302 to the least-loaded holder), ${conns} connections, ${secs}s"
wrk -t2 -c"$conns" -d"${secs}s" -H "Authorization: Bearer $OCTO_TOKEN" "$api/api/v1/files/$md5"
