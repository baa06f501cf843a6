#!/usr/bin/env bash
# Smoke test: edgemux-bench runs 2 s against platform-sim (direct edges) and
# reports answers. It checks that the tool works, not how fast anything is.
set -eu
bench=$1 psim=$2
dir=$(mktemp -d)
psim_pid=
cleanup() {
  [ -n "$psim_pid" ] && kill "$psim_pid" 2>/dev/null
  rm -rf "$dir"
}
trap cleanup EXIT
"$psim" --port 0 --app-key smoke-key --quiet >"$dir/psim.out" 2>&1 &
psim_pid=$!
for _ in $(seq 50); do
  grep -q 'platform-sim ready' "$dir/psim.out" && break
  sleep 0.1
done
port=$(sed -n 's/.*ports=\([0-9]*\).*/\1/p' "$dir/psim.out")
[ -n "$port" ] || { echo "platform-sim did not start"; cat "$dir/psim.out"; exit 1; }
"$bench" --url "ws://127.0.0.1:$port/Thingworx/WS" --app-key smoke-key --edges 20 --window 2 \
  --size 512 --warmup 0.5s --duration 1.5s --connect-spread 50ms --json "$dir/r.json" \
  >"$dir/table.txt"
cat "$dir/table.txt"
grep -q 'throughput' "$dir/table.txt"
grep -q '"answered":[1-9]' "$dir/r.json" || { echo "no answers"; cat "$dir/r.json"; exit 1; }
grep -q '"no_answer":0,' "$dir/r.json"
grep -q '"0x40":[1-9]' "$dir/r.json"
echo "smoke ok"
