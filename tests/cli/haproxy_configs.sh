#!/usr/bin/env bash
# Every file in haproxy-conf/ must pass `haproxy -c`. Ports that the scripts
# pass through the environment get sample values here; the TLS front ends
# get a throwaway self-signed certificate, since HAProxy loads it to check.
set -u
dir=$1
export EDGE_PORT=8080 EMX1_PORT=18081 EMX1_ADMIN=19901 EMX2_PORT=18082 EMX2_ADMIN=19902
export PSIM_PORT=19001 PSIM_FRONT_PORT=18090
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
if ! openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=edgemux.test \
    -keyout "$tmp/key.pem" -out "$tmp/cert.pem" >/dev/null 2>&1; then
  echo "FAIL cannot make a test certificate with openssl" >&2
  exit 1
fi
cat "$tmp/cert.pem" "$tmp/key.pem" >"$tmp/edgemux.pem"
export EMX_TLS_PEM=$tmp/edgemux.pem
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
