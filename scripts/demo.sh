#!/usr/bin/env bash
# The demo cluster on loopback: HAProxy in front of two edgemux processes,
# three simulated platform instances (one platform-sim process) found by
# static discovery, and edge-sim sending traffic through HAProxy. Installs what
# it needs (scripts/deps.sh), builds (Release, build/demo-build), runs, prints
# what went where and each edgemux's status page URL, and stops everything
# again.
#
#   scripts/demo.sh                  run, print the summary, stop
#   scripts/demo.sh --keep           leave the cluster and its status pages running
#                                    (build/demo/stop.sh stops it)
#   scripts/demo.sh --duration 60s   edge-sim load duration (default 20s)
#   scripts/demo.sh --edges 200      simulated devices (default 50)
#
# The same through the environment: DEMO_KEEP=1, DEMO_DURATION=60s, DEMO_EDGES=200.
# Exit status: 0 when every request of edge-sim got an answer (no no_answer
# in its ledger), 1 otherwise or when the cluster did not come up.
set -euo pipefail

usage() { sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; }

keep=${DEMO_KEEP:-0}
duration=${DEMO_DURATION:-20s}
edges=${DEMO_EDGES:-50}
while [ $# -gt 0 ]; do
  case $1 in
    --keep) keep=1 ;;
    --duration) duration=${2:?--duration needs a value}; shift ;;
    --duration=*) duration=${1#*=} ;;
    --edges) edges=${2:?--edges needs a value}; shift ;;
    --edges=*) edges=${1#*=} ;;
    -h|--help) usage; exit 0 ;;
    *) echo "demo: unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done
[ "$keep" = 0 ] || keep=1

cd "$(dirname "$0")/.."
root=$(pwd)
build=$root/build/demo-build
run=$root/build/demo
jobs=$(nproc)

step() { printf '\n=== %s (%s)\n' "$*" "$(date +%T)"; }

# A cluster left running by an earlier `--keep` would hold the ports and the
# run directory: stop it first.
if [ -x "$run/stop.sh" ]; then
  step "stopping the demo cluster left running by an earlier --keep"
  "$run/stop.sh" || true
fi

step "dependencies"
scripts/deps.sh

step "build (Release, ${build#"$root"/})"
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$build" -j "$jobs" >"$root/build/demo-build.log" 2>&1 || {
  tail -n 40 "$root/build/demo-build.log" >&2
  echo "demo: build failed (full log: build/demo-build.log)" >&2
  exit 1
}
edgemux=$build/module/edgemux
psim=$build/tools/platform-sim/platform-sim
esim=$build/tools/edge-sim/edge-sim
for b in "$edgemux" "$psim" "$esim" "$build/plugins/emx-transport-ws.so" \
         "$build/plugins/emx-discovery-static.so"; do
  [ -e "$b" ] || { echo "demo: the build did not produce $b" >&2; exit 1; }
done

step "run directory ${run#"$root"/}"
rm -rf "$run"
mkdir -p "$run"
chmod 700 "$run"

# Free ports on 127.0.0.1: the preferred one when it can be bound (so the
# printed instructions are the usual ones), otherwise one the kernel picks.
# SO_REUSEADDR as the servers use it, so a port in TIME_WAIT from the last run
# still counts as free.
read -r EDGE_PORT EMX1_PORT EMX1_ADMIN EMX2_PORT EMX2_ADMIN \
        PLAT1 PLAT2 PLAT3 CONTROL STATS_PORT < <(python3 - \
  8080 18081 19901 18082 19902 9001 9002 9003 9100 8404 <<'EOF'
import socket, sys
held, out = [], []
def try_bind(port):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("127.0.0.1", port))
    except OSError:
        s.close()
        return None
    held.append(s)  # keep it bound so no later pick returns the same port
    return s.getsockname()[1]
for want in map(int, sys.argv[1:]):
    out.append(try_bind(want) or try_bind(0))
print(*out)
EOF
)
export EDGE_PORT EMX1_PORT EMX1_ADMIN EMX2_PORT EMX2_ADMIN

# App key: random, only in a file only root can read.
(umask 077; python3 -c 'import secrets; print(secrets.token_hex(24))' >"$run/appkey")
chmod 600 "$run/appkey"
# Admin token: the admin actions (maintenance, closing a device) need it.
(umask 077; python3 -c 'import secrets; print(secrets.token_hex(24))' >"$run/admin-token")
chmod 600 "$run/admin-token"

cat >"$run/instances.yaml" <<EOF
# Written by scripts/demo.sh: the three platform-sim instances.
instances:
  - {id: platform-1, address: 127.0.0.1, port: $PLAT1}
  - {id: platform-2, address: 127.0.0.1, port: $PLAT2}
  - {id: platform-3, address: 127.0.0.1, port: $PLAT3}
EOF

write_edgemux_config() { # name edge_port admin_port
  cat >"$run/$1.yaml" <<EOF
# Written by scripts/demo.sh (see conf/edgemux.yaml for every key).
server:
  name: $1
plugins:
  dir: $build/plugins
log:
  level: info
edge:
  address: 127.0.0.1
  port: $2
platform:
  app_key_file: $run/appkey
  pipes_per_instance: 2
discovery:
  plugin: static
  file: $run/instances.yaml
transport:
  plugin: ws
admin:
  listen: 127.0.0.1:$3
  token_file: $run/admin-token
EOF
}
write_edgemux_config edgemux-1 "$EMX1_PORT" "$EMX1_ADMIN"
write_edgemux_config edgemux-2 "$EMX2_PORT" "$EMX2_ADMIN"

# HAProxy runs haproxy-conf/demo.cfg unchanged plus this file: a stats page
# (CSV at /stats;csv) that shows which edgemux got which connections.
cat >"$run/haproxy-stats.cfg" <<EOF
# Written by scripts/demo.sh: HAProxy's stats page for the demo.
listen stats
    bind 127.0.0.1:$STATS_PORT
    mode http
    http-request set-log-level silent
    stats enable
    stats uri /stats
    stats refresh 5s
EOF

for cfg in edgemux-1 edgemux-2; do
  "$edgemux" -t -c "$run/$cfg.yaml" >"$run/$cfg.check.log" 2>&1 || {
    cat "$run/$cfg.check.log" >&2; echo "demo: $cfg.yaml is not valid" >&2; exit 1; }
done
haproxy -c -f haproxy-conf/demo.cfg -f "$run/haproxy-stats.cfg" >"$run/haproxy.check.log" 2>&1 || {
  cat "$run/haproxy.check.log" >&2; echo "demo: the HAProxy config is not valid" >&2; exit 1; }

# --- processes --------------------------------------------------------------
# Every process started here is recorded in $run/pids ("pid name"); only those
# are ever signalled. Each runs in its own session, so a Ctrl-C in the terminal
# reaches this script (which stops them in order), and a kept cluster
# outlives the terminal.
pids=()
start() { # name log command...
  local name=$1 log=$2; shift 2
  setsid "$@" </dev/null >"$log" 2>&1 &
  pids+=("$!")
  echo "$! $name" >>"$run/pids"
}

# Stops the processes listed in a pids file: SIGTERM to each (those still
# alive and still running from this run directory), up to 10 s for them to
# exit, then SIGKILL. Also written into stop.sh for --keep. (A process that
# exited but is not reaped yet, a zombie, counts as gone.)
# shellcheck disable=SC2317  # called from cleanup and from stop.sh
stop_pids() {
  local file=$1 dir=$2 pid name live=() i
  [ -f "$file" ] || return 0
  while read -r pid name; do
    if [ -r "/proc/$pid/cmdline" ] && tr "\0" " " <"/proc/$pid/cmdline" | grep -qF "$dir/"; then
      kill -TERM "$pid" 2>/dev/null && live+=("$pid") && echo "stopping $name (pid $pid)"
    fi
  done < <(tac "$file")
  for ((i = 0; i < 100; i++)); do
    local still=()
    for pid in "${live[@]}"; do
      case $(ps -o stat= -p "$pid" 2>/dev/null || echo Z) in Z*) ;; *) still+=("$pid") ;; esac
    done
    live=("${still[@]}")
    [ ${#live[@]} -eq 0 ] && break
    sleep 0.1
  done
  for pid in "${live[@]}"; do
    echo "pid $pid did not exit after SIGTERM: SIGKILL"; kill -KILL "$pid" 2>/dev/null || true
  done
  rm -f "$file"
}

# shellcheck disable=SC2317  # called from the EXIT trap
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [ "$keep" = 1 ] && [ "${kept:-0}" = 1 ]; then
    exit "$rc"
  fi
  if [ -n "${esim_pid:-}" ] && kill -INT "$esim_pid" 2>/dev/null; then
    step "interrupted: stopping edge-sim (pid $esim_pid)"
    for _ in $(seq 150); do
      case $(ps -o stat= -p "$esim_pid" 2>/dev/null || echo Z) in Z*) break ;; esac
      sleep 0.1
    done
    kill -KILL "$esim_pid" 2>/dev/null || true
    wait "$esim_pid" 2>/dev/null || true
    sed -n '/^edge-sim summary/,$p' "$run/edge-sim.log"
  fi
  if [ -f "$run/pids" ]; then
    step "stopping the demo cluster"
    stop_pids "$run/pids" "$run"
    # Reap our own children so none is left as a zombie of this shell.
    wait "${pids[@]}" 2>/dev/null || true
    rm -f "$run/stop.sh"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

step "starting platform-sim (3 instances), 2 edgemux, HAProxy"
start platform-sim "$run/platform-sim.log" "$psim" --instances 3 --listen "$PLAT1,$PLAT2,$PLAT3" \
  --bind 127.0.0.1 --control "$CONTROL" --app-key-file "$run/appkey"
for _ in $(seq 100); do
  grep -q '^platform-sim ready' "$run/platform-sim.log" 2>/dev/null && break
  kill -0 "${pids[0]}" 2>/dev/null || break
  sleep 0.1
done
grep -q '^platform-sim ready' "$run/platform-sim.log" || {
  cat "$run/platform-sim.log" >&2; echo "demo: platform-sim did not start" >&2; exit 1; }

# platform-sim's control channel: one command, one reply line. A small script
# in the run directory, so it works on a kept cluster too: build/demo/ctl crash 2
cat >"$run/ctl" <<EOF
#!/usr/bin/env python3
# Written by scripts/demo.sh: sends one command to platform-sim's control
# channel (127.0.0.1:$CONTROL) and prints the reply line.
import socket, sys
if len(sys.argv) < 2:
    sys.exit("usage: ctl COMMAND [ARGS] (crash N, restore N, stats, binds, ports, ...)")
s = socket.create_connection(("127.0.0.1", $CONTROL), timeout=20)
s.sendall(" ".join(sys.argv[1:]).encode() + b"\n")
buf = b""
while not buf.endswith(b"\n"):
    chunk = s.recv(65536)
    if not chunk:
        break
    buf += chunk
sys.stdout.write(buf.decode())
EOF
chmod 755 "$run/ctl"
ctl() { "$run/ctl" "$@"; }

start edgemux-1 "$run/edgemux-1.log" "$edgemux" -c "$run/edgemux-1.yaml"
start edgemux-2 "$run/edgemux-2.log" "$edgemux" -c "$run/edgemux-2.yaml"
# demo.cfg's maxconn 20000 needs about 40000 file descriptors; where the limit
# cannot be raised that far (some containers), let HAProxy take fewer.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
haproxy_args=()
fds=$(ulimit -n)
if [ "$fds" != unlimited ] && [ "$fds" -lt 40100 ]; then
  haproxy_args=(-n $(((fds - 100) / 2)))
  echo "open files limited to $fds: HAProxy runs with maxconn ${haproxy_args[1]}"
fi
start haproxy "$run/haproxy.log" haproxy -f "$root/haproxy-conf/demo.cfg" \
  -f "$run/haproxy-stats.cfg" -db "${haproxy_args[@]}"

stats_csv() { curl -fsS --max-time 2 "http://127.0.0.1:$STATS_PORT/stats;csv" 2>/dev/null; }
server_status() { # server name -> HAProxy's status column (UP, DOWN, ...)
  stats_csv | awk -F, -v s="$1" '$1 == "edgemux" && $2 == s { print $18 }'
}
ready() { curl -s -o /dev/null -w '%{http_code}' --max-time 2 "http://127.0.0.1:$1/ready" 2>/dev/null || true; }

step "waiting for HAProxy to see both edgemux up (at most 30 s)"
up=0
for _ in $(seq 150); do
  for i in "${!pids[@]}"; do
    kill -0 "${pids[$i]}" 2>/dev/null || {
      name=$(sed -n "$((i + 1))p" "$run/pids" | cut -d' ' -f2)
      tail -n 20 "$run/$name.log" >&2
      echo "demo: $name (pid ${pids[$i]}) exited; its log: ${run#"$root"/}/$name.log" >&2
      exit 1
    }
  done
  if [ "$(server_status edgemux-1)" = UP ] && [ "$(server_status edgemux-2)" = UP ]; then
    up=1
    break
  fi
  sleep 0.2
done
echo "edgemux-1 /ready: $(ready "$EMX1_ADMIN"), HAProxy: $(server_status edgemux-1 || true)"
echo "edgemux-2 /ready: $(ready "$EMX2_ADMIN"), HAProxy: $(server_status edgemux-2 || true)"
if [ "$up" != 1 ]; then
  echo "demo: the cluster did not come up in 30 s; logs in ${run#"$root"/}/" >&2
  tail -n 20 "$run/edgemux-1.log" "$run/edgemux-2.log" >&2
  exit 1
fi

step "edge-sim: $edges edges through HAProxy (ws://127.0.0.1:$EDGE_PORT/Thingworx/WS) for $duration"
# In the background, so a signal to this script is handled at once (cleanup
# stops edge-sim first: SIGINT makes it drain and print its summary).
esim_rc=0
"$esim" --url "ws://127.0.0.1:$EDGE_PORT/Thingworx/WS" --app-key-file "$run/appkey" \
  --edges "$edges" --rate 2 --size 256 --multipart-share 2% --multipart-size 32KiB \
  --duration "$duration" --ledger "$run/edge-sim-ledger.json" --quiet \
  </dev/null >"$run/edge-sim.log" 2>&1 &
esim_pid=$!
wait "$esim_pid" || esim_rc=$?
esim_pid=
sed -n '/^edge-sim summary/,$p' "$run/edge-sim.log"
if ! grep -q '^edge-sim summary' "$run/edge-sim.log"; then
  cat "$run/edge-sim.log"
fi

# The ledger: one entry per request with its outcome.
read -r no_answer multipart < <(python3 - "$run/edge-sim-ledger.json" <<'EOF'
import json, sys
try:
    ledger = json.load(open(sys.argv[1]))
except (OSError, ValueError):
    print("unreadable -")
    sys.exit()
print(sum(e.get("outcome") == "no_answer" for e in ledger),
      sum(bool(e.get("multipart")) for e in ledger))
EOF
)

step "what went where"
echo "platform instances (platform-sim stats):"
ctl stats >"$run/platform-stats.json"
python3 - "$run/platform-stats.json" <<'EOF'
import json, sys
st = json.load(open(sys.argv[1]))
print("  %-10s %6s %10s %10s %6s  %s" % ("instance", "port", "msgs in", "msgs out", "pipes", "pipes per edgemux"))
for i in st["instances"]:
    per = {}
    for p in i.get("pipes", []):
        if p.get("connected"):
            per[p["server"]] = per.get(p["server"], 0) + 1
    print("  %-10s %6d %10d %10d %6d  %s" % (
        "platform-%d" % i["id"], i["port"], i["msgs_in"], i["msgs_out"], i["pipes_connected"],
        ", ".join("%s %d" % kv for kv in sorted(per.items())) or "-"))
print("  (msgs in: every message a platform received: AUTH, BIND, requests, each multipart chunk)")
print("  sessions %d, things bound %d, contract violations %d%s" % (
    st["sessions"], st["things_bound"], st["violations"],
    (" " + json.dumps(st["violations_by_kind"])) if st["violations"] else ""))
EOF

echo "edgemux (HAProxy backend 'edgemux', balance leastconn):"
stats_csv | awk -F, '
  $1 == "edgemux" && $2 ~ /^edgemux-/ {
    printf "  %-10s status %-5s connections sent %s, open now %s\n", $2, $18, $8, $5 }'
echo "  edgemux-1 GET /ready -> $(ready "$EMX1_ADMIN"); edgemux-2 GET /ready -> $(ready "$EMX2_ADMIN")"
echo "  status pages: http://127.0.0.1:$EMX1_ADMIN/ (edgemux-1)  http://127.0.0.1:$EMX2_ADMIN/ (edgemux-2)"
echo "edge-sim: exit status $esim_rc; ledger: $multipart multipart requests, no_answer $no_answer"
echo "logs, configs, key: ${run#"$root"/}/"

rc=0
[ "$no_answer" = 0 ] || rc=1

if [ "$keep" = 1 ]; then
  {
    echo '#!/usr/bin/env bash'
    echo '# Written by scripts/demo.sh --keep: stops the demo cluster it started.'
    declare -f stop_pids
    # shellcheck disable=SC2016  # $0 is for stop.sh to expand
    printf 'stop_pids %q %q\nrm -f "$0"\n' "$run/pids" "$run"
  } >"$run/stop.sh"
  chmod 755 "$run/stop.sh"
  kept=1
  cat <<EOF

=== the demo cluster keeps running
  edges connect to     ws://127.0.0.1:$EDGE_PORT/Thingworx/WS   (app key in $run/appkey)
  more traffic:        $esim --url ws://127.0.0.1:$EDGE_PORT/Thingworx/WS --app-key-file $run/appkey --edges 20 --duration 30s
  edgemux admin:       curl http://127.0.0.1:$EMX1_ADMIN/ready   curl http://127.0.0.1:$EMX2_ADMIN/ready
  status pages:        http://127.0.0.1:$EMX1_ADMIN/   http://127.0.0.1:$EMX2_ADMIN/   (open in a browser)
  admin actions:       curl -X POST -H "Authorization: Bearer \$(cat $run/admin-token)" \\
                         http://127.0.0.1:$EMX1_ADMIN/instances/platform-2/maintenance
  HAProxy stats:       http://127.0.0.1:$STATS_PORT/stats   (CSV: /stats;csv)
  platform-sim:        control channel 127.0.0.1:$CONTROL, one command a line, e.g.
                         $run/ctl stats
                         $run/ctl crash 2      (drop instance 2; then: ctl restore 2)
                       commands: crash N, restore N, stop-reading N, resume-reading N,
                       get N THING PROP, put N THING PROP VALUE, stats, binds, ports
  logs:                $run/*.log
  stop it:             $run/stop.sh
EOF
fi
exit "$rc"
