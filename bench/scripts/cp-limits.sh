#!/usr/bin/env bash
# Rate limits through `octo cp`: a center and two agents on loopback; a copy with a
# per-task --limit-down, then a copy to an agent started with its own --limit-down.
# The achieved rate is size / (finished_at - started_at) from `octo task show --json`
# (it includes the final MD5 pass, so it slightly understates the transfer rate).
# Usage: bench/scripts/cp-limits.sh [SIZE_MiB] [RATE]   (RATE in octo's syntax, e.g. 20MB)
set -euo pipefail
mib=${1:-100} rate=${2:-20MB}
source "$(dirname "$0")/local-fleet.sh"
start_agent task-limited
start_agent agent-limited --limit-down "$rate"
head -c $((mib << 20)) /dev/urandom >"$dir/pkg.bin"
report() { # label, task json
  python3 - "$1" "$2" "$rate" "$mib" <<'PY'
import json, re, sys
label, task, rate, mib = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], int(sys.argv[4])
units = {"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "KiB": 1024, "MiB": 1 << 20, "GiB": 1 << 30}
m = re.fullmatch(r"([\d.]+)(\w*)", rate)
limit = float(m.group(1)) * units[m.group(2)]
h = task["hosts"][0]
secs = (h["finished_at"] - h["started_at"]) / 1000
got = (mib << 20) / secs
print(f"{label:<28} limit {limit/1e6:7.2f} MB/s  achieved {got/1e6:7.2f} MB/s  ({(got/limit-1)*100:+.1f}%)  {secs:.2f}s  {h['state']}")
PY
}
"$octo" cp --json --limit-down "$rate" "$dir/pkg.bin" "task-limited:$dir/out-task/" --mkdir >"$dir/cp1.json"
id=$(python3 -c 'import json,sys; print([json.loads(l) for l in open(sys.argv[1]) if "created" in l][0]["id"])' "$dir/cp1.json")
report "per task (--limit-down)" "$("$octo" task show "$id" --json)"
"$octo" cp --json "$dir/pkg.bin" "agent-limited:$dir/out-agent/" --mkdir >"$dir/cp2.json"
id=$(python3 -c 'import json,sys; print([json.loads(l) for l in open(sys.argv[1]) if "created" in l][0]["id"])' "$dir/cp2.json")
report "per agent (agent --limit-down)" "$("$octo" task show "$id" --json)"
