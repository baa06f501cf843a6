#!/usr/bin/env bash
# Installs what building and testing edgemux needs (Debian 12, as root).
# Safe to run again: apt-get skips what is present.
set -euo pipefail

packages=(
  build-essential cmake pkg-config clang libclang-rt-14-dev
  llvm
  libuv1-dev libyaml-dev libcmocka-dev uthash-dev libssl-dev zlib1g-dev
  libwebsockets-dev libwebsockets-evlib-uv libcurl4-openssl-dev libjansson-dev
  libhttp-parser-dev
  zookeeper libzookeeper-mt-dev
  libc-ares-dev knot knot-dnsutils
  libsystemd-dev man-db docker-compose
  haproxy python3 procps iproute2 curl valgrind openssl
  chromium
  prometheus
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "deps: missing packages: ${missing[*]} (run as root to install them)" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
# prometheus: the alert rule tests run its promtool, and the scrape test
# starts a prometheus of its own (temp config and data, a free port on
# 127.0.0.1); one the package's service may have started is left alone.
# knot: the dns-srv tests start a knotd of their own (own config, control
# socket and a free port on 127.0.0.1). A knotd the package's service may
# have started answers on port 53 and its own socket, which the tests never
# use, so it is left alone.
