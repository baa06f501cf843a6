#!/usr/bin/env bash
# docker-compose.yml is valid for every discovery choice (there is no Docker
# engine in CI: `docker-compose config` checks the file itself), each choice
# names edgemux configs that exist and pass `edgemux -t` with the plugins
# just built, and the compose HAProxy config passes `haproxy -c`.
#   compose_config.sh SOURCE_DIR EDGEMUX PLUGIN_DIR
set -u
src=$1 bin=$2 plugins=$3
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fails=0
ok() { printf 'ok   %s\n' "$1"; }
fail() { printf 'FAIL %s\n%s\n' "$1" "${2:-}"; fails=$((fails + 1)); }

compose() { docker-compose --project-directory "$src" -f "$src/docker-compose.yml" "$@"; }

if out=$(env -u EDGEMUX_DISCOVERY docker-compose --project-directory "$src" \
  -f "$src/docker-compose.yml" config -q 2>&1); then
  ok "config (default: static)"
else
  fail "config (default)" "$out"
fi

export EDGEMUX_APP_KEY=compose-check-key
for d in static dns-srv consul zookeeper; do
  profile=()
  [ "$d" != static ] && profile=(--profile "$d")
  if out=$(EDGEMUX_DISCOVERY=$d compose "${profile[@]}" config -q 2>&1); then
    ok "config EDGEMUX_DISCOVERY=$d ${profile[*]}"
  else
    fail "config EDGEMUX_DISCOVERY=$d" "$out"
    continue
  fi
  resolved=$(EDGEMUX_DISCOVERY=$d compose "${profile[@]}" config 2>&1)
  for n in 1 2; do
    path=/etc/edgemux/compose/$d/edgemux-$n.yaml
    grep -qF -- "- $path" <<<"$resolved" && ok "edgemux-$n runs $path" ||
      fail "edgemux-$n does not run $path" "$resolved"
    file=$src/compose/edgemux/$d/edgemux-$n.yaml
    [ -f "$file" ] || { fail "missing $file"; continue; }
    grep -q "^  name: edgemux-$n\$" "$file" && ok "$d/edgemux-$n.yaml names edgemux-$n" ||
      fail "$d/edgemux-$n.yaml does not name edgemux-$n"
    # Paths inside the containers point at the mounted compose/ directory.
    sed "s|/etc/edgemux/compose/|$src/compose/|g" "$file" >"$tmp/$d-$n.yaml"
    so=$plugins/emx-discovery-$d.so
    if [ ! -f "$so" ]; then
      echo "skip edgemux -t $d/edgemux-$n.yaml ($(basename "$so") not built)"
      continue
    fi
    out=$("$bin" -t -c "$tmp/$d-$n.yaml" -p "$plugins" 2>&1) && grep -q 'is valid' <<<"$out" &&
      ok "edgemux -t $d/edgemux-$n.yaml" || fail "edgemux -t $d/edgemux-$n.yaml" "$out"
  done
done

if out=$(haproxy -c -f "$src/haproxy-conf/compose.cfg" 2>&1); then
  ok "haproxy -c compose.cfg"
else
  fail "haproxy -c compose.cfg" "$out"
fi
# The compose HAProxy config must reach the services the compose file names.
for svc in edgemux-1:8080 edgemux-2:8080 platform:9001; do
  grep -q " $svc " "$src/haproxy-conf/compose.cfg" && ok "compose.cfg uses $svc" ||
    fail "compose.cfg does not use $svc"
done
grep -q 'compose.cfg:/usr/local/etc/haproxy/haproxy.cfg' "$src/docker-compose.yml" &&
  ok "haproxy service mounts compose.cfg" || fail "haproxy service does not mount compose.cfg"

[ "$fails" -eq 0 ]
