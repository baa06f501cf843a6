#!/usr/bin/env bash
# edgemux benchmarks (docs/benchmarks.md). Builds Release, then measures on
# this machine, in one run, with the server side pinned to one core and the
# load generator to another:
#   A  edges -> platform-sim                      (direct baseline)
#   B  edges -> HAProxy (tunnel) -> platform-sim
#   C  edges -> edgemux -> platform-sim
#   D  edges -> HAProxy -> edgemux -> platform-sim
# Parts (PARTS, default all): throughput latency capacity callgrind syscalls memory storm
#   (only when named: memory-busy wss scale workers sdk-write tunnels)
#
#   scripts/bench.sh                      # everything
#   PARTS="throughput" RUNS=3 scripts/bench.sh
#
# Knobs (environment): RUNS (5), LAT_RUNS (5), STORM_RATE (none), EDGES (1000), SIZE (512), WINDOW (1),
# WARMUP (2s), DURATION (10s), SERVER_CPU (0), LOAD_CPU (1), IDLE_EDGES (19000),
# CG_WHO ("edgemux haproxy"), CG_EDGES (100), CG_SHORT/CG_LONG (20000/60000 requests),
# CG_WORKERS (1: server.workers of the main edgemux, as in the callgrind and syscalls parts), BASE_PORT (23000),
# BUSY_EDGES (2000), BUSY_PROCS (1), WSS_EDGES (9000),
# SDKW_ROUNDS (3), SDKW_REQUESTS (300), SDKW_TLS (0; 1: also wss direct), SDKW_MULTIPART (0; bytes:
# also multipart PUTs of that size, 8 KiB chunks, direct), SDKW_ROUTE (none; an unused
# 127.x address: also through HAProxy from it with a `quickack 1` route, added and removed by the script),
# TUN_ROUNDS (3), TUN_ARGS (more tools/bench/tunnel_bench.py options, e.g. "--size 32 --idle 100"),
# OUT, BUILD, SRC (the source tree to build; default this checkout — point it
# at a clean export, e.g. `git archive HEAD`, while the tree is being edited).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
SRC=${SRC:-$ROOT}
BUILD=${BUILD:-$ROOT/build/bench}
PARTS=${PARTS:-"throughput latency capacity callgrind syscalls memory storm"}
RUNS=${RUNS:-5}
LAT_RUNS=${LAT_RUNS:-5}
EDGES=${EDGES:-1000}
SIZE=${SIZE:-512}
WINDOW=${WINDOW:-1}
WARMUP=${WARMUP:-2s}
DURATION=${DURATION:-10s}
SERVER_CPU=${SERVER_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
IDLE_EDGES=${IDLE_EDGES:-19000}
CG_EDGES=${CG_EDGES:-100}
CG_SHORT=${CG_SHORT:-20000}
CG_LONG=${CG_LONG:-60000}
BASE_PORT=${BASE_PORT:-23000}
OUT=${OUT:-$BUILD/bench-results/$(date +%Y%m%d-%H%M%S)}
KEY=bench-app-key-0123456789abcdef0123

PSIM_PORT=$((BASE_PORT + 1))
EMX_PORT=$((BASE_PORT + 2))
EMX_ADMIN=$((BASE_PORT + 3))
PSIM_FRONT_PORT=$((BASE_PORT + 4))
HAP_EDGE_PORT=$((BASE_PORT + 5))
WS_PATH=/Thingworx/WS

mkdir -p "$OUT"
log() { printf '%s\n' "$*" | tee -a "$OUT/summary.txt" >&2; }
has_part() { [[ " $PARTS " == *" $1 "* ]]; }

echo "== build (Release) in $BUILD" >&2
# No tests: a benchmark build needs only the binaries it runs.
cmake -S "$SRC" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DEMX_TESTS=OFF >"$OUT/cmake.log"
TARGETS=(edgemux edgemux-bench platform-sim emx-transport-ws emx-discovery-static)
if has_part tunnels; then TARGETS+=(edge-sim); fi
cmake --build "$BUILD" -j2 --target "${TARGETS[@]}" >>"$OUT/cmake.log"
BENCH=$BUILD/tools/bench/edgemux-bench
PSIM=$BUILD/tools/platform-sim/platform-sim
EMX=$BUILD/module/edgemux
PLUGINS=$BUILD/plugins

# ---- processes: every one we start is recorded and stopped by its PID ----
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  PIDS=()
}
trap cleanup EXIT

wait_port() { # port (30 s: HAProxy under valgrind starts slowly)
  for _ in $(seq 600); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.05
  done
  echo "port $1 never opened" >&2
  return 1
}

start_psim() { # [extra taskset prefix...]
  taskset -c "$SERVER_CPU" "$@" "$PSIM" --bind 127.0.0.1 --port "$PSIM_PORT" --app-key "$KEY" \
    --quiet >"$OUT/psim.log" 2>&1 &
  PSIM_PID=$!
  PIDS+=("$PSIM_PID")
  wait_port "$PSIM_PORT"
}

write_emx_conf() {
  cat >"$OUT/instances.yaml" <<EOF
instances:
  - id: psim
    address: 127.0.0.1
    port: $PSIM_PORT
EOF
  cat >"$OUT/edgemux.yaml" <<EOF
server:
  name: bench-1
  workers: ${CG_WORKERS:-1}
log:
  level: warn
edge:
  address: 127.0.0.1
  port: $EMX_PORT
  deflate: false
platform:
  app_key: $KEY
discovery:
  plugin: static
  file: $OUT/instances.yaml
admin:
  listen: 127.0.0.1:$EMX_ADMIN
EOF
}

start_emx() { # [prefix command...], e.g. valgrind
  taskset -c "$SERVER_CPU" "$@" "$EMX" -c "$OUT/edgemux.yaml" -p "$PLUGINS" >>"$OUT/edgemux.log" 2>&1 &
  EMX_PID=$!
  PIDS+=("$EMX_PID")
  for _ in $(seq 600); do
    if [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$EMX_ADMIN/ready")" = 200 ]; then
      return 0
    fi
    sleep 0.1
  done
  echo "edgemux never became ready (see $OUT/edgemux.log)" >&2
  return 1
}

start_haproxy() { # [prefix command...]
  PSIM_PORT=$PSIM_PORT PSIM_FRONT_PORT=$PSIM_FRONT_PORT EDGE_PORT=$HAP_EDGE_PORT EMX1_PORT=$EMX_PORT \
    taskset -c "$SERVER_CPU" "$@" haproxy -db -f "$ROOT/haproxy-conf/bench-tunnel.cfg" \
    >>"$OUT/haproxy.log" 2>&1 &
  HAP_PID=$!
  PIDS+=("$HAP_PID")
  wait_port "$PSIM_FRONT_PORT"
  wait_port "$HAP_EDGE_PORT"
}

url_of() { # config letter
  case $1 in
  A) echo "ws://127.0.0.1:$PSIM_PORT$WS_PATH" ;;
  B) echo "ws://127.0.0.1:$PSIM_FRONT_PORT$WS_PATH" ;;
  C) echo "ws://127.0.0.1:$EMX_PORT$WS_PATH" ;;
  D) echo "ws://127.0.0.1:$HAP_EDGE_PORT$WS_PATH" ;;
  esac
}

start_config() { # letter: the server side of that path
  start_psim
  case $1 in
  B) start_haproxy ;;
  C) start_emx ;;
  D) start_emx && start_haproxy ;;
  esac
}

cpu_ticks() { # pids... -> utime+stime summed
  local t=0 p
  for p in "$@"; do
    # Fields 14 and 15 of /proc/PID/stat, after the parenthesised name.
    t=$((t + $(sed 's/.*) //' "/proc/$p/stat" | awk '{print $12 + $13}')))
  done
  echo "$t"
}

# run_bench NAME LETTER bench-args... : one bench run against a fresh server
# side; records the JSON and the server side's CPU use.
run_bench() {
  local name=$1 letter=$2
  shift 2
  start_config "$letter"
  local servers=("${PIDS[@]}") hz t0 t1 w0 w1
  hz=$(getconf CLK_TCK)
  t0=$(cpu_ticks "${servers[@]}")
  w0=$(date +%s.%N)
  local watch=() p
  for p in "${servers[@]}"; do watch+=(--watch-pid "$p"); done
  taskset -c "$LOAD_CPU" "$BENCH" --url "$(url_of "$letter")" --app-key "$KEY" --quiet \
    "${watch[@]}" --json "$OUT/$name.json" "$@" >"$OUT/$name.txt" 2>"$OUT/$name.err" || true
  w1=$(date +%s.%N)
  t1=$(cpu_ticks "${servers[@]}")
  cleanup
  # Server-side CPU over the bench's whole run (connect, warm-up, drain too).
  awk -v t="$((t1 - t0))" -v hz="$hz" -v a="$w0" -v b="$w1" \
    'BEGIN { printf "%.1f\n", 100 * t / hz / (b - a) }' >"$OUT/$name.cpu"
  printf '%-12s %s  server cpu %s%%\n' "$name" \
    "$(jq -r '"\(.throughput) answers/s (\(.answers_per_server_cpu_s)/server-cpu-s, server \(.server_cpu_s)s gen \(.generator_cpu_s)s in \(.measured_s)s) p50 \(.latency_ms.p50) p99 \(.latency_ms.p99) ms no_answer \(.outcomes.no_answer) lost \(.outcomes.connection_lost)"' \
      "$OUT/$name.json" 2>/dev/null || echo FAILED)" "$(cat "$OUT/$name.cpu")" | tee -a "$OUT/summary.txt" >&2
}

median() { sort -g | awk '{v[NR]=$1} END {if (NR%2) print v[(NR+1)/2]; else print (v[NR/2]+v[NR/2+1])/2}'; }
field_median() { # prefix jq-filter
  for f in "$OUT/$1"-*.json; do jq -r "$2" "$f"; done | median
}

write_emx_conf
{
  echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), kernel $(uname -r)"
  echo "haproxy: $(haproxy -v | head -1)"
  echo "libwebsockets: $(dpkg-query -W -f '${Version}' libwebsockets17 2>/dev/null || echo '?'), libuv: $(dpkg-query -W -f '${Version}' libuv1 2>/dev/null || echo '?')"
  echo "edgemux: built from $SRC ($(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?') checked out)"
  echo "pinning: server side on cpu $SERVER_CPU, load generator on cpu $LOAD_CPU"
  echo "kernel: net.core.somaxconn $(cat /proc/sys/net/core/somaxconn), tcp_max_syn_backlog $(cat /proc/sys/net/ipv4/tcp_max_syn_backlog), open files $(ulimit -n)"
} | tee "$OUT/conditions.txt" >&2

LOAD_ARGS=(--edges "$EDGES" --size "$SIZE" --window "$WINDOW" --warmup "$WARMUP" --duration "$DURATION")

if has_part throughput; then
  log "== throughput: $EDGES edges, $SIZE-byte requests, closed loop window $WINDOW, $RUNS x (A B C D)"
  for i in $(seq "$RUNS"); do
    for L in A B C D; do run_bench "tp-$L-$i" "$L" "${LOAD_ARGS[@]}"; done
  done
  for L in A B C D; do
    eval "TP_$L=$(field_median "tp-$L" .throughput)"
    eval "P99_$L=$(field_median "tp-$L" .latency_ms.p99)"
  done
  log "medians (answers/s): A $TP_A  B $TP_B  C $TP_C  D $TP_D"
  log "median p99 (ms):     A $P99_A  B $P99_B  C $P99_C  D $P99_D"
  log "ratios: C/A $(awk -v a="$TP_C" -v b="$TP_A" 'BEGIN{printf "%.3f", a/b}')  C/B $(awk -v a="$TP_C" -v b="$TP_B" 'BEGIN{printf "%.3f", a/b}')  D/B $(awk -v a="$TP_D" -v b="$TP_B" 'BEGIN{printf "%.3f", a/b}')  B/A $(awk -v a="$TP_B" -v b="$TP_A" 'BEGIN{printf "%.3f", a/b}')"
  for L in A B C D; do
    eval "EFF_$L=$(field_median "tp-$L" .answers_per_server_cpu_s)"
    log "$L: median answers per server CPU-second $(eval echo \$EFF_$L), server CPU share in the window $(field_median "tp-$L" '100 * .server_cpu_s / .measured_s')%, generator $(field_median "tp-$L" '100 * .generator_cpu_s / .measured_s')%"
  done
  log "efficiency ratios (answers per server CPU-second): C/A $(awk -v a="$EFF_C" -v b="$EFF_A" 'BEGIN{printf "%.3f", a/b}')  C/B $(awk -v a="$EFF_C" -v b="$EFF_B" 'BEGIN{printf "%.3f", a/b}')  D/B $(awk -v a="$EFF_D" -v b="$EFF_B" 'BEGIN{printf "%.3f", a/b}')"
fi

if has_part capacity; then
  # platform-sim's own capacity: the direct path with more load than A.
  log "== platform-sim capacity (direct, $EDGES edges, window 8 and 32)"
  for w in 8 32; do
    for i in $(seq 3); do
      run_bench "cap-w$w-$i" A --edges "$EDGES" --size "$SIZE" --window "$w" --warmup "$WARMUP" --duration "$DURATION"
    done
    log "platform-sim capacity, window $w: median $(field_median "cap-w$w" .throughput) answers/s"
  done
fi

if has_part latency; then
  if [ -z "${TP_C:-}" ]; then
    # C's peak: the median of this run's throughput rounds
    TP_C=$(field_median tp-C .throughput 2>/dev/null || true)
  fi
  RATE=$(awk -v t="${TP_C:-0}" 'BEGIN{printf "%d", t / 2}')
  if [ "$RATE" -gt 0 ]; then
    log "== latency at half of C's peak: open loop $RATE requests/s, $EDGES edges, $LAT_RUNS x (A C)"
    for i in $(seq "$LAT_RUNS"); do
      for L in A C; do
        run_bench "lat-$L-$i" "$L" --edges "$EDGES" --size "$SIZE" --rate "$RATE" --warmup "$WARMUP" --duration "$DURATION"
      done
    done
    LA=$(field_median lat-A .latency_ms.p99)
    LC=$(field_median lat-C .latency_ms.p99)
    log "p99 at $RATE/s: A $LA ms  C $LC ms  C-A $(awk -v a="$LC" -v b="$LA" 'BEGIN{printf "%.3f", a-b}') ms (medians of $LAT_RUNS)"
    PA=$(field_median lat-A .latency_ms.p50)
    PC=$(field_median lat-C .latency_ms.p50)
    log "p50 at $RATE/s: A $PA ms  C $PC ms (medians of $LAT_RUNS)"
  else
    log "== latency: skipped (no throughput figure for C)"
  fi
fi

# Total instructions of a callgrind output file.
cg_ir() { awk '/^(summary|totals):/ {print $2; exit}' "$1"; }

if has_part callgrind; then
  log "== callgrind: instructions per routed message, $CG_EDGES edges, window 1, $CG_SHORT and $CG_LONG requests"
  # Ir(long) - Ir(short) over the extra requests: start-up and connection
  # set-up cancel out.
  for who in ${CG_WHO:-edgemux haproxy}; do
    for n in $CG_SHORT $CG_LONG; do
      cg="$OUT/callgrind.$who.$n"
      start_psim
      if [ $who = edgemux ]; then
        start_emx valgrind --tool=callgrind --callgrind-out-file="$cg" -q
        letter=C
      else
        start_haproxy valgrind --tool=callgrind --callgrind-out-file="$cg" -q
        letter=B
      fi
      taskset -c "$LOAD_CPU" "$BENCH" --url "$(url_of $letter)" --app-key "$KEY" --quiet \
        --edges "$CG_EDGES" --window 1 --size "$SIZE" --warmup 0 --duration 600s --requests "$n" \
        --connect-spread 500ms --json "$OUT/cg-$who-$n.json" >"$OUT/cg-$who-$n.txt" 2>&1 || true
      # The server ends normally on SIGTERM, which writes the profile.
      if [ $who = edgemux ]; then kill -TERM "$EMX_PID"; wait "$EMX_PID" || true; else kill -TERM "$HAP_PID"; wait "$HAP_PID" || true; fi
      cleanup
    done
    s=$(cg_ir "$OUT/callgrind.$who.$CG_SHORT")
    l=$(cg_ir "$OUT/callgrind.$who.$CG_LONG")
    as=$(jq .outcomes.answered "$OUT/cg-$who-$CG_SHORT.json")
    al=$(jq .outcomes.answered "$OUT/cg-$who-$CG_LONG.json")
    log "$who: Ir $s ($as answered) and $l ($al answered): $(awk -v s="$s" -v l="$l" -v a="$as" -v b="$al" 'BEGIN{printf "%.0f", (l-s)/(b-a)}') instructions per request+answer"
  done
fi

if has_part syscalls; then
  # System calls of edgemux per routed message (perf tracepoints; callgrind
  # sees only user space), path C, the callgrind part's load.
  log "== syscalls: edgemux, $CG_EDGES edges, window 1, $CG_LONG requests"
  start_psim
  start_emx
  perf stat -x, -e syscalls:sys_enter_ioctl,syscalls:sys_enter_write,syscalls:sys_enter_writev,syscalls:sys_enter_read,syscalls:sys_enter_sendto,syscalls:sys_enter_recvfrom,syscalls:sys_enter_epoll_wait,syscalls:sys_enter_epoll_ctl \
    -p "$EMX_PID" -o "$OUT/syscalls.csv" &
  PERF_PID=$!
  sleep 1
  taskset -c "$LOAD_CPU" "$BENCH" --url "$(url_of C)" --app-key "$KEY" --quiet \
    --edges "$CG_EDGES" --window 1 --size "$SIZE" --warmup 0 --duration 600s --requests "$CG_LONG" \
    --connect-spread 500ms --json "$OUT/sys.json" >"$OUT/sys.txt" 2>&1 || true
  kill -INT "$PERF_PID"; wait "$PERF_PID" || true
  cleanup
  a=$(jq .outcomes.answered "$OUT/sys.json")
  awk -F, -v a="$a" '$3 ~ /syscalls/ {sub(/syscalls:sys_enter_/, "", $3); printf "%s %d (%.3f per answer)\n", $3, $1, $1 / a}' \
    "$OUT/syscalls.csv" | while read -r l; do log "  $l"; done
fi

sockmem() { awk '/^TCP:/ {for (i=1;i<NF;i++) if ($i=="mem") print $(i+1)}' /proc/net/sockstat; }
rss_kb() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }

if has_part memory; then
  log "== memory: $IDLE_EDGES idle edges (AUTH and BIND done, plain ws) on one edgemux"
  start_psim
  start_emx
  sleep 2
  # Baseline before any edge connected: the per-edge cost is measured
  # against it. After a first cycle the allocator keeps the freed memory and
  # reuses it, so a baseline taken then hides the cost (reported separately).
  rf=$(rss_kb "$EMX_PID"); kf=$(sockmem)
  idle_cycle() { # name -> leaves the bench holding; sets IDLE_PID
    taskset -c "$LOAD_CPU" "$BENCH" --url "$(url_of C)" --app-key "$KEY" --idle --duration 0 \
      --edges "$IDLE_EDGES" --connect-spread 10s --connect-timeout 120s \
      --json "$OUT/$1.json" >"$OUT/$1.txt" 2>"$OUT/$1.err" &
    IDLE_PID=$!
    for _ in $(seq 1500); do
      grep -q 'ready and bound after' "$OUT/$1.err" 2>/dev/null && break
      sleep 0.1
    done
    sleep 2
  }
  idle_cycle idle-warm
  kill -INT "$IDLE_PID"; wait "$IDLE_PID" || true
  sleep 3
  r0=$(rss_kb "$EMX_PID"); k0=$(sockmem)
  idle_cycle idle
  r1=$(rss_kb "$EMX_PID"); k1=$(sockmem)
  n=$(grep -o '[0-9]*/[0-9]* edges ready and bound' "$OUT/idle.err" | cut -d/ -f1)
  kill -INT "$IDLE_PID"; wait "$IDLE_PID" || true
  cleanup
  pg=$(getconf PAGESIZE)
  log "edgemux RSS: $rf KiB before any edge, $r1 KiB at $n idle edges: $(awk -v a="$rf" -v b="$r1" -v n="$n" 'BEGIN{printf "%.0f", (b-a)*1024/n}') bytes per edge"
  log "edgemux RSS after a first cycle of $IDLE_EDGES edges connected and closed: $r0 KiB (kept by the allocator; $(awk -v a="$r0" -v b="$r1" -v n="$n" 'BEGIN{printf "%.0f", (b-a)*1024/n}') bytes per edge against it)"
  log "kernel TCP memory (/proc/net/sockstat, both ends of loopback): $kf before any edge, $k0 after the first cycle, $k1 pages at $n edges: $(awk -v a="$kf" -v b="$k1" -v n="$n" -v p="$pg" 'BEGIN{printf "%.0f", (b-a)*p/n}') bytes per edge"
fi

if has_part storm; then
  log "== reconnect storm: $IDLE_EDGES edges on one edgemux dropped at once, reconnect every 1s"
  start_psim
  start_emx
  # STORM_RATE: requests per second from the connected edges meanwhile
  taskset -c "$LOAD_CPU" "$BENCH" --url "$(url_of C)" --app-key "$KEY" --storm --duration 0 \
    --edges "$IDLE_EDGES" --connect-spread 10s --connect-timeout 120s --retry-interval 1s --quiet \
    ${STORM_RATE:+--rate "$STORM_RATE"} --json "$OUT/storm.json" >"$OUT/storm.txt" 2>&1 || true
  cleanup
  log "storm: all ready and bound again after $(jq .storm_recover_s "$OUT/storm.json")s (connect p99 $(jq .connect_ms.p99 "$OUT/storm.json") ms)"
  grep -E "answers by code|AUTH/BIND|outcomes|connects" "$OUT/storm.txt" | while read -r l; do log "  $l"; done
fi

# ---- extra edgemux configurations (memory-busy, wss, scale, workers) ----
# emx_conf NAME PORT ADMIN [lines of the edge section...] -> $OUT/NAME.yaml
emx_conf() {
  local name=$1 port=$2 admin=$3
  shift 3
  {
    printf 'server:\n  name: %s\nlog:\n  level: warn\nedge:\n  address: 127.0.0.1\n  port: %s\n' "$name" "$port"
    for l in "$@"; do printf '  %s\n' "$l"; done
    printf 'platform:\n  app_key: %s\ndiscovery:\n  plugin: static\n  file: %s\nadmin:\n  listen: 127.0.0.1:%s\n' \
      "$KEY" "$OUT/instances.yaml" "$admin"
  } >"$OUT/$name.yaml"
}
# start_emx_conf NAME ADMIN [cpu list] -> EMX_PID
start_emx_conf() {
  taskset -c "${3:-$SERVER_CPU}" "$EMX" -c "$OUT/$1.yaml" -p "$PLUGINS" >>"$OUT/$1.log" 2>&1 &
  EMX_PID=$!
  PIDS+=("$EMX_PID")
  for _ in $(seq 600); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$2/ready")" = 200 ] && return 0
    sleep 0.1
  done
  echo "edgemux $1 never became ready" >&2
  return 1
}
wait_bound() { # err-file: until the bench says its edges are ready and bound
  for _ in $(seq 3000); do
    grep -q 'ready and bound after' "$1" 2>/dev/null && return 0
    sleep 0.1
  done
  return 1
}
bound_count() { grep -o '[0-9]*/[0-9]* edges ready and bound' "$1" | tail -1 | cut -d/ -f1; }

BUSY_EDGES=${BUSY_EDGES:-2000}
# BUSY_PROCS: bench processes for the busy edges (default 1). One process with
# 2,000 permessage-deflate edges stalls after ~51,000 requests (the same with
# every server tree; see docs/benchmarks.md, 2026-12-05); 2 does not.
BUSY_PROCS=${BUSY_PROCS:-1}
if has_part memory-busy; then
  # RSS per busy edge, plain and permessage-deflate: edges exchanging
  # messages (closed loop); peak RSS in the run against RSS before any edge.
  for mode in plain deflate; do
    log "== memory per busy edge ($mode): $BUSY_EDGES edges, closed loop window 1, $SIZE B, one edgemux"
    if [ $mode = deflate ]; then
      emx_conf mb "$EMX_PORT" "$EMX_ADMIN" "deflate: true"; flag=(--deflate)
    else
      emx_conf mb "$EMX_PORT" "$EMX_ADMIN" "deflate: false"; flag=()
    fi
    start_psim
    start_emx_conf mb "$EMX_ADMIN"
    sleep 2
    rf=$(rss_kb "$EMX_PID")
    taskset -c "$LOAD_CPU" "$BENCH" --url "$(url_of C)" --app-key "$KEY" --quiet "${flag[@]}" \
      --edges "$BUSY_EDGES" --procs "$BUSY_PROCS" --size "$SIZE" --window 1 --warmup 2s --duration 8s \
      --json "$OUT/mb-$mode.json" >"$OUT/mb-$mode.txt" 2>&1 &
    bp=$!
    peak=0
    while kill -0 "$bp" 2>/dev/null; do
      r=$(rss_kb "$EMX_PID"); [ "$r" -gt "$peak" ] && peak=$r
      sleep 0.2
    done
    wait "$bp" || true
    after=$(rss_kb "$EMX_PID")
    cleanup
    log "$mode: edgemux RSS $rf KiB before any edge, peak $peak KiB with $BUSY_EDGES busy edges ($(jq .throughput "$OUT/mb-$mode.json") answers/s): $(awk -v a="$rf" -v b="$peak" -v n="$BUSY_EDGES" 'BEGIN{printf "%.0f", (b-a)*1024/n}') bytes per edge; $after KiB after they closed"
  done
fi

WSS_EDGES=${WSS_EDGES:-9000}
if has_part wss; then
  # edgemux's memory per idle edge over wss. The bench has no TLS client, so
  # HAProxy in tcp mode takes plain TCP from the bench and opens TLS to
  # edgemux; one HAProxy holds ~9,900 client connections under the file limit.
  openssl req -x509 -newkey rsa:2048 -nodes -keyout "$OUT/key.pem" -out "$OUT/cert.pem" -days 2 \
    -subj /CN=127.0.0.1 >/dev/null 2>&1
  for mode in ws wss; do
    log "== memory per idle edge over $mode (bench -> HAProxy tcp -> edgemux): $WSS_EDGES edges"
    ssl=""
    if [ $mode = wss ]; then
      emx_conf mw "$EMX_PORT" "$EMX_ADMIN" "deflate: false" "tls_cert: $OUT/cert.pem" "tls_key: $OUT/key.pem"
      ssl="ssl verify none"
    else
      emx_conf mw "$EMX_PORT" "$EMX_ADMIN" "deflate: false"
    fi
    printf '%s\n' global '  maxconn 9800' defaults '  mode tcp' '  timeout connect 5s' \
      '  timeout client 1h' '  timeout server 1h' frontend\ edges "  bind 127.0.0.1:$HAP_EDGE_PORT" \
      '  maxconn 9800' '  default_backend emx' backend\ emx \
      "  server emx1 127.0.0.1:$EMX_PORT $ssl maxconn 9800" >"$OUT/hap-tcp.cfg"
    start_psim
    start_emx_conf mw "$EMX_ADMIN"
    taskset -c "$LOAD_CPU" haproxy -db -f "$OUT/hap-tcp.cfg" >>"$OUT/haproxy-tcp.log" 2>&1 &
    PIDS+=($!)
    wait_port "$HAP_EDGE_PORT"
    sleep 2
    rf=$(rss_kb "$EMX_PID")
    taskset -c "$LOAD_CPU" "$BENCH" --url "$(url_of D)" --app-key "$KEY" --idle --duration 0 \
      --no-source-ips --edges "$WSS_EDGES" --connect-spread 10s --connect-timeout 120s \
      --json "$OUT/mw-$mode.json" >"$OUT/mw-$mode.txt" 2>"$OUT/mw-$mode.err" &
    bp=$!
    wait_bound "$OUT/mw-$mode.err" || true
    sleep 2
    r1=$(rss_kb "$EMX_PID"); n=$(bound_count "$OUT/mw-$mode.err")
    kill -INT "$bp"; wait "$bp" || true
    cleanup
    log "$mode: edgemux RSS $rf KiB before any edge, $r1 KiB at $n idle edges: $(awk -v a="$rf" -v b="$r1" -v n="$n" 'BEGIN{printf "%.0f", (b-a)*1024/n}') bytes per edge"
  done
fi

SCALE_EDGES=${SCALE_EDGES:-100000}
SCALE_EMX=${SCALE_EMX:-6}
if has_part scale; then
  # Idle edges across several edgemux processes (each under the 20,000-file
  # limit), one bench process per edgemux; nothing pinned.
  per=$(((SCALE_EDGES + SCALE_EMX - 1) / SCALE_EMX))
  log "== scale: $SCALE_EDGES idle edges, $SCALE_EMX edgemux x $per, one bench process each"
  k0=$(sockmem); s0=$(grep '^TCP:' /proc/net/sockstat)
  start_psim
  taskset -p -c 0-1 "$PSIM_PID" >/dev/null
  EPIDS=(); BPIDS=(); rf=0
  for i in $(seq 0 $((SCALE_EMX - 1))); do
    emx_conf "sc$i" $((BASE_PORT + 10 + 2 * i)) $((BASE_PORT + 11 + 2 * i)) "deflate: false"
    start_emx_conf "sc$i" $((BASE_PORT + 11 + 2 * i)) 0-1
    EPIDS+=("$EMX_PID"); rf=$((rf + $(rss_kb "$EMX_PID")))
  done
  t0=$(date +%s.%N)
  for i in $(seq 0 $((SCALE_EMX - 1))); do
    n=$per; [ $(((i + 1) * per)) -gt "$SCALE_EDGES" ] && n=$((SCALE_EDGES - i * per))
    "$BENCH" --url "ws://127.0.0.1:$((BASE_PORT + 10 + 2 * i))$WS_PATH" --app-key "$KEY" --idle \
      --duration 0 --edges "$n" --connect-spread 30s --connect-timeout 300s \
      --json "$OUT/sc$i.json" >"$OUT/sc$i.txt" 2>"$OUT/sc$i.err" &
    BPIDS+=($!)
  done
  for i in $(seq 0 $((SCALE_EMX - 1))); do wait_bound "$OUT/sc$i.err" || true; done
  t1=$(date +%s.%N)
  sleep 3
  re=0; rb=0; bound=0
  for p in "${EPIDS[@]}"; do re=$((re + $(rss_kb "$p"))); done
  for p in "${BPIDS[@]}"; do rb=$((rb + $(rss_kb "$p"))); done
  for i in $(seq 0 $((SCALE_EMX - 1))); do bound=$((bound + $(bound_count "$OUT/sc$i.err"))); done
  k1=$(sockmem); s1=$(grep '^TCP:' /proc/net/sockstat); slab=$(awk '/^Slab:/ {print $2}' /proc/meminfo)
  for p in "${BPIDS[@]}"; do kill -INT "$p"; done
  for p in "${BPIDS[@]}"; do wait "$p" || true; done
  cleanup
  log "scale: $bound of $SCALE_EDGES edges ready and bound (AUTH and BIND answered) $(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.1f", b-a}') s after the first bench started"
  log "scale: edgemux RSS total $re KiB ($rf KiB before any edge: $(awk -v a="$rf" -v b="$re" -v n="$bound" 'BEGIN{printf "%.0f", (b-a)*1024/n}') bytes per edge); bench processes $rb KiB; kernel TCP buffer pages $k0 -> $k1; Slab $slab KiB"
  log "scale: sockstat before: $s0"
  log "scale: sockstat at $bound edges: $s1"
fi

WK_EDGES=${WK_EDGES:-1000}
if has_part workers; then
  # One edgemux with server.workers 1 against the same with 2, the same
  # edges split over two bench processes in both cases, every process free
  # to run on both cores (the generator needs CPU too: compare answers per
  # server CPU-second, and how the answers spread over the workers).
  emx_conf wk1 $((BASE_PORT + 10)) $((BASE_PORT + 11)) "deflate: false"
  emx_conf wk2 $((BASE_PORT + 10)) $((BASE_PORT + 11)) "deflate: false"
  sed -i 's/^server:$/server:\n  workers: 1/' "$OUT/wk1.yaml"
  sed -i 's/^server:$/server:\n  workers: 2/' "$OUT/wk2.yaml"
  log "== workers: server.workers 1 vs 2, $WK_EDGES edges, $SIZE B, window 1, $RUNS rounds, unpinned"
  hz=$(getconf CLK_TCK)
  for i in $(seq "$RUNS"); do
    for k in 1 2; do
      start_psim
      taskset -p -c 0-1 "$PSIM_PID" >/dev/null
      start_emx_conf wk$k $((BASE_PORT + 11)) 0-1; ep=$EMX_PID
      t0=$(cpu_ticks "$ep"); p0=$(cpu_ticks "$PSIM_PID"); bp=()
      for j in 0 1; do
        "$BENCH" --url "ws://127.0.0.1:$((BASE_PORT + 10))$WS_PATH" --app-key "$KEY" --quiet \
          --edges $((WK_EDGES / 2)) --size "$SIZE" --window 1 --warmup 2s --duration 8s \
          --json "$OUT/wk$k-$i-$j.json" >"$OUT/wk$k-$i-$j.txt" 2>&1 &
        bp+=($!)
      done
      # the edges are connected during the window (the bench processes
      # close them when they end)
      sleep 6
      mx=$(curl -s "http://127.0.0.1:$((BASE_PORT + 11))/metrics")
      edges=$(awk '/^emx_worker_edges_connected\{/ {split($1, a, "\""); printf "%sw%s=%s", sep, a[2], $2; sep=" "} END {print ""}' <<<"$mx")
      handed=$(awk '/^emx_worker_sockets_handed_in_total\{/ {split($1, a, "\""); printf "%sw%s=%s", sep, a[2], $2; sep=" "} END {print ""}' <<<"$mx")
      for p in "${bp[@]}"; do wait "$p" || true; done
      t1=$(cpu_ticks "$ep"); p1=$(cpu_ticks "$PSIM_PID")
      spread=$(curl -s "http://127.0.0.1:$((BASE_PORT + 11))/metrics" |
        awk '/^emx_worker_edge_messages_total\{worker="[0-9]+",direction="to_edge"\}/ {split($1, a, "\""); printf "%sw%s=%s", sep, a[2], $2; sep=" "} END {print ""}')
      cleanup
      tp=$(jq -s 'map(.throughput) | add' "$OUT/wk$k-$i-0.json" "$OUT/wk$k-$i-1.json")
      gen=$(jq -s 'map(.generator_cpu_s) | add' "$OUT/wk$k-$i-0.json" "$OUT/wk$k-$i-1.json")
      cpu=$(awk -v a="$t0" -v b="$t1" -v hz="$hz" 'BEGIN{printf "%.2f", (b-a)/hz}')
      pcpu=$(awk -v a="$p0" -v b="$p1" -v hz="$hz" 'BEGIN{printf "%.2f", (b-a)/hz}')
      echo "$tp" >"$OUT/wk$k-$i.tp"
      # answers in the 8 s window per edgemux CPU-second over the whole run
      # (warm-up included: a lower bound)
      per=$(awk -v t="$tp" -v c="$cpu" 'BEGIN{printf "%.0f", t * 8 / c}')
      echo "$per" >"$OUT/wk$k-$i.per"
      log "workers $k round $i: $tp answers/s; edgemux CPU $cpu s, platform-sim $pcpu s, generators $gen s (8 s window); >= $per answers per edgemux CPU-second; edges per worker: $edges (sockets handed over: ${handed:-none}); answers per worker: $spread"
    done
  done
  m1=$(cat "$OUT"/wk1-*.tp | median); m2=$(cat "$OUT"/wk2-*.tp | median)
  c1=$(cat "$OUT"/wk1-*.per | median); c2=$(cat "$OUT"/wk2-*.per | median)
  log "workers: median answers/s: workers 1 $m1, workers 2 $m2: ratio $(awk -v a="$m2" -v b="$m1" 'BEGIN{printf "%.3f", a/b}'); answers per edgemux CPU-second: $c1 vs $c2"
fi

SDKW_ROUNDS=${SDKW_ROUNDS:-3}
SDKW_REQUESTS=${SDKW_REQUESTS:-300}
if has_part sdk-write; then
  # The C SDK's write pattern (tools/bench/sdk_write.py): one device, GETs one
  # at a time answered by platform-sim; every frame written as header send +
  # payload send with Nagle on ("split"), against whole frames ("whole").
  # Direct to edgemux, then through haproxy-conf/demo.cfg (both of its
  # servers pointed at the one edgemux). The client is this checkout's, so
  # it is the same for any SRC.
  SDKW="$ROOT/tools/bench/sdk_write.py"
  sdkw() { # label port [args...]
    local label=$1 port=$2
    shift 2
    taskset -c "$LOAD_CPU" python3 "$SDKW" --port "$port" --app-key "$KEY" --requests "$SDKW_REQUESTS" \
      --label "$label" --json "$@" >>"$OUT/sdkw.jsonl" || echo "{\"label\": \"$label\", \"failed\": true}" >>"$OUT/sdkw.jsonl"
    tail -1 "$OUT/sdkw.jsonl" | tee -a "$OUT/summary.txt" >&2
  }
  start_demo_haproxy() {
    EDGE_PORT=$HAP_EDGE_PORT EMX1_PORT=$EMX_PORT EMX1_ADMIN=$EMX_ADMIN EMX2_PORT=$EMX_PORT EMX2_ADMIN=$EMX_ADMIN \
      taskset -c "$SERVER_CPU" haproxy -db -f "$ROOT/haproxy-conf/demo.cfg" >>"$OUT/haproxy-demo.log" 2>&1 &
    PIDS+=($!)
    wait_port "$HAP_EDGE_PORT"
    sleep 2.5 # the health check marks the servers up
  }
  if [ -n "${SDKW_ROUTE:-}" ]; then
    ip route add local "$SDKW_ROUTE/32" dev lo table local quickack 1
    trap 'cleanup; ip route del local "$SDKW_ROUTE/32" dev lo table local 2>/dev/null || true' EXIT
  fi
  if [ "${SDKW_TLS:-0}" = 1 ]; then
    openssl req -x509 -newkey rsa:2048 -nodes -keyout "$OUT/key.pem" -out "$OUT/cert.pem" -days 2 \
      -subj /CN=127.0.0.1 >/dev/null 2>&1
    emx_conf sdkw-tls $((BASE_PORT + 6)) $((BASE_PORT + 7)) "deflate: false" "tls_cert: $OUT/cert.pem" "tls_key: $OUT/key.pem"
  fi
  log "== SDK write pattern: 1 device, $SDKW_REQUESTS GETs one at a time, $SDKW_ROUNDS rounds"
  for i in $(seq "$SDKW_ROUNDS"); do
    start_psim
    start_emx
    for w in split whole; do sdkw "direct-$i" "$EMX_PORT" --write "$w"; done
    if [ "${SDKW_MULTIPART:-0}" -gt 0 ]; then
      for w in split whole; do
        sdkw "direct-multipart-$i" "$EMX_PORT" --write "$w" --multipart "$SDKW_MULTIPART" --requests 50
      done
    fi
    start_demo_haproxy
    for w in split whole; do sdkw "haproxy-$i" "$HAP_EDGE_PORT" --write "$w"; done
    if [ -n "${SDKW_ROUTE:-}" ]; then
      for w in split whole; do sdkw "haproxy-quickack-route-$i" "$HAP_EDGE_PORT" --write "$w" --source "$SDKW_ROUTE"; done
    fi
    cleanup
    if [ "${SDKW_TLS:-0}" = 1 ]; then
      start_psim
      start_emx_conf sdkw-tls $((BASE_PORT + 7))
      for w in split whole; do sdkw "wss-direct-$i" $((BASE_PORT + 6)) --write "$w" --tls; done
      cleanup
    fi
  done
  for l in direct direct-multipart haproxy haproxy-quickack-route wss-direct; do
    for w in split whole; do
      sel='select(.write == $w and (.label | test("^" + $l + "-[0-9]+$")))'
      k=$(jq -r --arg l "$l" --arg w "$w" "$sel | .p50_ms" "$OUT/sdkw.jsonl" | wc -l)
      [ "$k" -gt 0 ] || continue
      v=$(jq -r --arg l "$l" --arg w "$w" "$sel | .p50_ms" "$OUT/sdkw.jsonl" | median)
      q=$(jq -r --arg l "$l" --arg w "$w" "$sel | .p99_ms" "$OUT/sdkw.jsonl" | median)
      log "sdk-write $l $w: median over $k rounds: p50 $v ms, p99 $q ms"
    done
  done
fi

TUN_ROUNDS=${TUN_ROUNDS:-3}
if has_part tunnels; then
  # Remote Access tunnels (tools/bench/tunnel_bench.py): edge-sim devices
  # through haproxy-conf/bench-tunnel.cfg's two front ends, straight to
  # platform-sim or through edgemux; one tunnel each way and echoing, 20 at
  # once, memory per idle tunnel, CPU per GB. HAProxy and edgemux on
  # SERVER_CPU, the rest on LOAD_CPU. The script is this checkout's.
  log "== Remote Access tunnels: HAProxy -> platform-sim against HAProxy -> edgemux -> platform-sim, $TUN_ROUNDS rounds"
  # shellcheck disable=SC2086 # TUN_ARGS is a list of options
  if ! python3 "$ROOT/tools/bench/tunnel_bench.py" --emx "$EMX" --plugins "$PLUGINS" --psim "$PSIM" \
    --edge-sim "$BUILD/tools/edge-sim/edge-sim" --haproxy-cfg "$ROOT/haproxy-conf/bench-tunnel.cfg" \
    --server-cpu "$SERVER_CPU" --load-cpu "$LOAD_CPU" --rounds "$TUN_ROUNDS" ${TUN_ARGS:-} \
    --json "$OUT/tunnels.json" >"$OUT/tunnels.txt" 2>&1; then
    log "tunnels: FAILED (see $OUT/tunnels.txt)"
  fi
  while IFS= read -r l; do log "$l"; done <"$OUT/tunnels.txt"
fi

log "results in $OUT"
