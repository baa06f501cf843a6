#!/usr/bin/env bash
# docker-compose.yml is valid for every discovery choice (there is no Docker
# engine in CI: `docker-compose config` checks the file itself), each choice
# names edgemux configs that exist and pass `edgemux -t` with the plugins
# just built, the compose HAProxy config passes `haproxy -c`, and the
# Prometheus and Grafana services mount the shipped rules, dashboard and
# provisioning, with a Prometheus config `promtool check config` accepts.
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

# Prometheus and Grafana: the services, what they mount, and that the
# Prometheus config scrapes the edgemux admin ports with the rules loaded.
resolved=$(env -u EDGEMUX_DISCOVERY docker-compose --project-directory "$src" \
  -f "$src/docker-compose.yml" config 2>&1)
for img in 'prom/prometheus:' 'grafana/grafana:'; do
  grep -q "image: $img" <<<"$resolved" && ok "service with image $img" || fail "no service runs $img"
done
promcfg=$src/compose/prometheus/prometheus.yml
mounts=(
  "compose/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml"
  "dist/prometheus/edgemux-rules.yml:/etc/prometheus/rules/edgemux-rules.yml"
  "dist/grafana/provisioning:/etc/grafana/provisioning"
  "dist/grafana/edgemux-dashboard.json:/var/lib/grafana/dashboards/edgemux/"
)
for m in "${mounts[@]}"; do
  grep -qF "./$m" "$src/docker-compose.yml" && [ -e "$src/${m%%:*}" ] && ok "mounted: $m" ||
    fail "not mounted or missing: $m"
done
grep -q '^  - /etc/prometheus/rules/edgemux-rules.yml$' "$promcfg" &&
  ok "prometheus.yml loads the mounted rules" || fail "prometheus.yml does not load /etc/prometheus/rules/edgemux-rules.yml"
grep -q 'path: /var/lib/grafana/dashboards/edgemux$' "$src/dist/grafana/provisioning/dashboards/edgemux.yml" &&
  ok "the dashboard provider reads the mounted directory" || fail "the dashboard provider path is not the mounted directory"
grep -q 'url: http://prometheus:9090$' "$src/dist/grafana/provisioning/datasources/prometheus.yml" &&
  ok "the Grafana datasource is the prometheus service" || fail "the Grafana datasource does not point at prometheus:9090"
# Scrape targets: each edgemux service on the admin port its configs listen on.
for n in 1 2; do
  grep -q "\"edgemux-$n:9900\"" "$promcfg" && ok "prometheus scrapes edgemux-$n:9900" ||
    fail "prometheus does not scrape edgemux-$n:9900"
  for d in static dns-srv consul zookeeper; do
    grep -q '^  listen: 0.0.0.0:9900' "$src/compose/edgemux/$d/edgemux-$n.yaml" ||
      fail "$d/edgemux-$n.yaml: admin not on 0.0.0.0:9900 (prometheus scrapes there)"
  done
done
grep -q '^  - job_name: edgemux$' "$promcfg" && ok "scrape job named edgemux (EdgemuxDown)" ||
  fail "no scrape job named edgemux (the rules' EdgemuxDown expects it)"
if command -v promtool >/dev/null; then
  sed "s|/etc/prometheus/rules/edgemux-rules.yml|$(cd "$src" && pwd)/dist/prometheus/edgemux-rules.yml|" \
    "$promcfg" >"$tmp/prometheus.yml"
  if out=$(promtool check config "$tmp/prometheus.yml" 2>&1); then
    ok "promtool check config compose/prometheus/prometheus.yml"
  else
    fail "promtool check config compose/prometheus/prometheus.yml" "$out"
  fi
else
  echo "skip promtool check config (promtool not installed: Debian package prometheus)"
fi

[ "$fails" -eq 0 ]
