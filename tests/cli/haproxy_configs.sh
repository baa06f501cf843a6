#!/usr/bin/env bash
# Every file in haproxy-conf/ must pass `haproxy -c`. Ports that the scripts
# pass through the environment get sample values here.
set -u
dir=$1
export EDGE_PORT=8080 EMX1_PORT=18081 EMX1_ADMIN=19901 EMX2_PORT=18082 EMX2_ADMIN=19902
fails=0
for cfg in "$dir"/*.cfg; do
  if out=$(haproxy -c -f "$cfg" 2>&1); then
    echo "ok   $cfg"
  else
    printf 'FAIL %s\n%s\n' "$cfg" "$out"
    fails=$((fails + 1))
  fi
done
[ "$fails" -eq 0 ]
