#!/usr/bin/env bash
# Growth curve of the managed bench: one source + N agents, `octo cp` to all of them,
# for several N at one link rate. Prints one line per N. Needs root (namespaces).
# Usage: bench/scripts/managed-growth.sh SIZE RATE N1 N2 ...
#   e.g. bench/scripts/managed-growth.sh 50MiB 20Mbit 4 8 16 32 48
set -euo pipefail
cd "$(dirname "$0")/../.."
size=$1 rate=$2
shift 2
cargo build --release -q -p octopus-tools
printf '%6s %9s %9s %12s %12s %14s %9s\n' agents ideal_s last_s last/ideal one_server_s src_upload/size cpu_busy
for n in "$@"; do
  out=$(./target/release/octo swarm-bench --managed --json --hosts "$n" --size "$size" --rate "$rate" --timeout 900)
  python3 - "$out" <<'PY'
import json, sys
v = json.loads(sys.argv[1].strip().splitlines()[-1])
print(f"{v['hosts']:6d} {v['ideal_s']:9.2f} {v['last_s']:9.2f} {v['last_over_ideal']:12.2f} "
      f"{v['one_server_s']:12.1f} {v['source_upload_over_size']:14.2f} {v['cpu']['busy']*100:8.0f}%"
      f"   second copy: {v['second']['received_bytes']} bytes")
PY
done
