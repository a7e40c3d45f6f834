# Sourced by the bench scripts: builds octo, starts a center on loopback in a temp
# dir, and defines `start_agent NAME [ARGS...]`. Sets $octo, $dir, $api, $enroll,
# OCTO_CENTER, OCTO_CA (the center's ca.pem, for curl --cacert too) and OCTO_TOKEN; everything is stopped and removed on exit.
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
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
export OCTO_CENTER=$api OCTO_CA=$dir/center/ca.pem OCTO_TOKEN=$(cat "$dir/center/admin.token")
enroll=$("$octo" token create --scope enroll --ttl 1h)
start_agent() { # name, extra args...
  local name=$1; shift
  "$octo" agent --center "${api#https://}" --token "$enroll" --data-dir "$dir/$name" --name "$name" --json "$@" \
    >"$dir/$name.out" 2>"$dir/$name.log" &
  pids+=($!)
  until grep -q '"ready"' "$dir/$name.out" 2>/dev/null; do sleep 0.1; done
}
