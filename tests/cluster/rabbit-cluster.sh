#!/usr/bin/env bash
# rabbit-cluster.sh — a throwaway 3-node RabbitMQ cluster on this one host, for the cluster tests
# (tests/cluster/run.sh starts it, runs them and takes it down). Adapted from the team's shared
# tools/rabbit-cluster.sh; its state lives in /tmp/hookrelay-cluster by default.
#
# It runs beside the default broker (rabbit@<hostname> on 5672) and never touches it: the nodes have
# their own names, ports, data/log/config dirs, Erlang cookie and (by default) their own epmd, so
# nothing here can even reach the default node, let alone join it or stop it.
#
# Usage:
#   rabbit-cluster.sh up [BASE_PORT]   start hrc1..3@localhost on AMQP BASE..BASE+2 (default 5680),
#                                      cluster them, print amqp:// URLs
#   rabbit-cluster.sh status           cluster_status (asked of the first node that answers)
#   rabbit-cluster.sh kill N           SIGKILL node N's Erlang VM (pid recorded at start)
#   rabbit-cluster.sh stop N           graceful stop of node N (SIGTERM)
#   rabbit-cluster.sh start N          restart node N; it rejoins the cluster from its own data dir
#   rabbit-cluster.sh down             stop all three, stop our epmd, remove the temp dirs
#   rabbit-cluster.sh urls             one amqp:// URL per line (node 1..3)
#   rabbit-cluster.sh pids | rss       beam.smp pid / resident memory per node
#   rabbit-cluster.sh ctl N ARGS...    rabbitmqctl -n hrcN@localhost ARGS...     (right cookie + epmd)
#   rabbit-cluster.sh queues N ARGS... rabbitmq-queues -n hrcN@localhost ARGS...
#   rabbit-cluster.sh diag N ARGS...   rabbitmq-diagnostics -n hrcN@localhost ARGS...
#   rabbit-cluster.sh env              shell exports for driving the nodes with the CLI by hand
#
# Environment (all optional):
#   HRC_DIR            state dir, default /tmp/hookrelay-cluster (one subdir per node, plus home/ with the cookie)
#   HRC_PREFIX         node name prefix, default hrc  -> hrc1@localhost ...
#   HRC_EPMD_PORT      epmd port, default BASE_PORT-1300 (4380 for 5680): a private epmd, killed by
#                      `down`. 4369 shares the system epmd; an epmd that was already running is
#                      never killed.
#   HRC_START_TIMEOUT  seconds to wait for a node to boot, default 120
#   HRC_CONF_EXTRA     extra rabbitmq.conf lines for every node (e.g. "cluster_partition_handling = pause_minority")
#
# Ports for BASE (default 5680): AMQP BASE+i-1, Erlang distribution BASE+20000+i-1, CLI distribution
# BASE+31000..+19, epmd BASE-1300. All listeners are bound to 127.0.0.1.
#
# Why not /usr/sbin/rabbitmqctl: the Debian wrapper re-runs every command as user rabbitmq with
# HOME=/var/lib/rabbitmq, i.e. with the default node's cookie. We call /usr/lib/rabbitmq/bin/*
# directly, with HOME pointing at our own cookie, and run the nodes as the calling user.
set -euo pipefail

HRC_DIR=${HRC_DIR:-/tmp/hookrelay-cluster}
HRC_PREFIX=${HRC_PREFIX:-hrc}
RMQ_BIN=${RMQ_BIN:-/usr/lib/rabbitmq/bin}
START_TIMEOUT=${HRC_START_TIMEOUT:-120}
STATE="$HRC_DIR/cluster.env"
MARKER="$HRC_DIR/.rabbit-cluster"
NODES=(1 2 3)

die() { echo "rabbit-cluster: $*" >&2; exit 1; }
log() { echo "rabbit-cluster: $*" >&2; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

case "$HRC_DIR" in /|"") die "refusing HRC_DIR='$HRC_DIR'";; esac
[ -x "$RMQ_BIN/rabbitmq-server" ] || die "no RabbitMQ scripts in $RMQ_BIN"

node_name()  { echo "$HRC_PREFIX$1@localhost"; }
node_dir()   { echo "$HRC_DIR/$HRC_PREFIX$1"; }
check_n()    { case "${1:-}" in 1|2|3) ;; *) die "node number must be 1, 2 or 3 (got '${1:-}')";; esac; }

set_ports() {
  BASE_PORT=$1
  EPMD_PORT=${HRC_EPMD_PORT:-$((BASE_PORT - 1300))}
  CTL_MIN=$((BASE_PORT + 31000))
}

load_state() {
  [ -f "$STATE" ] || die "no cluster state in $HRC_DIR (run: $0 up)"
  # shellcheck disable=SC1090
  . "$STATE"
}

# Environment shared by the nodes and every CLI call. `env -i` keeps the caller's RABBITMQ_* out.
common_env() {
  CENV=(
    "PATH=$RMQ_BIN:/usr/sbin:/usr/bin:/sbin:/bin"
    "HOME=$HRC_DIR/home"            # $HOME/.erlang.cookie: read by the server and by the CLI
    "LANG=C.UTF-8" "LC_ALL=C.UTF-8" # the Elixir CLI wants a UTF-8 locale
    "ERL_EPMD_PORT=$EPMD_PORT" "ERL_EPMD_ADDRESS=127.0.0.1"
    "RABBITMQ_CTL_DIST_PORT_MIN=$CTL_MIN" "RABBITMQ_CTL_DIST_PORT_MAX=$((CTL_MIN + 19))"
  )
}

cli() { # cli TOOL N ARGS...
  local tool=$1 n=$2; shift 2
  common_env
  env -i "${CENV[@]}" "$RMQ_BIN/$tool" -n "$(node_name "$n")" "$@"
}
ctl() { local n=$1; shift; cli rabbitmqctl "$n" "$@"; }

amqp_port() { echo $((BASE_PORT + $1 - 1)); }
dist_port() { echo $((BASE_PORT + 20000 + $1 - 1)); }
url()       { echo "amqp://guest:guest@127.0.0.1:$(amqp_port "$1")/%2f"; }

port_busy() { ss -Hltn "sport = :$1" 2>/dev/null | grep -q .; }

# Is PID the beam.smp of our node N? Checked through /proc so a recycled pid is never signalled.
is_our_beam() {
  local pid=$1 n=$2 env
  [ -n "$pid" ] && [ -r "/proc/$pid/environ" ] || return 1
  [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = beam.smp ] || return 1
  env=$({ tr '\0' '\n' <"/proc/$pid/environ"; } 2>/dev/null) || return 1
  grep -qx "RABBITMQ_NODENAME=$(node_name "$n")" <<<"$env" && grep -qx "HOME=$HRC_DIR/home" <<<"$env"
}
beam_pid() { # pid of node N's running VM, or nothing
  local p
  p=$(cat "$(node_dir "$1")/beam.pid" 2>/dev/null || true)
  if is_our_beam "$p" "$1"; then echo "$p"; return; fi
  p=$(cat "$(node_dir "$1")/rabbit.pid" 2>/dev/null || true)   # written by rabbit itself at boot
  if is_our_beam "$p" "$1"; then echo "$p"; return; fi
  p=$(cat "$(node_dir "$1")/launcher.pid" 2>/dev/null || true)  # still booting: the launcher's child
  [ -z "$p" ] || for p in $(ps -o pid= --ppid "$p" 2>/dev/null); do
    if is_our_beam "$p" "$1"; then echo "$p"; return; fi
  done
}

write_node_files() {
  local d; d=$(node_dir "$1")
  mkdir -p "$d/mnesia" "$d/log"
  echo '[].' >"$d/enabled_plugins"   # no management / prometheus plugin: lighter, no extra ports
  : >"$d/rabbitmq-env.conf"          # keep /etc/rabbitmq/rabbitmq-env.conf out
  echo '[].' >"$d/advanced.config"   # keep /etc/rabbitmq/advanced.config out
  # The settings below are RabbitMQ's defaults, spelled out; HRC_CONF_EXTRA adds lines for a test.
  cat >"$d/rabbitmq.conf" <<EOF
# generated by rabbit-cluster.sh for $(node_name "$1")
cluster_name = $HRC_PREFIX
loopback_users.guest = true
log.console = false
log.file.level = info
disk_free_limit.absolute = 50MB
${HRC_CONF_EXTRA:-}
EOF
}

launch() { # start node N's VM in the background (own session, so it outlives this script)
  local n=$1 d; d=$(node_dir "$n")
  rm -f "$d/beam.pid" "$d/rabbit.pid"
  common_env
  setsid env -i "${CENV[@]}" \
    RABBITMQ_NODENAME="$(node_name "$n")" \
    RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
    RABBITMQ_NODE_PORT="$(amqp_port "$n")" \
    RABBITMQ_DIST_PORT="$(dist_port "$n")" \
    RABBITMQ_MNESIA_BASE="$d/mnesia" \
    RABBITMQ_LOG_BASE="$d/log" \
    RABBITMQ_CONFIG_FILE="$d/rabbitmq.conf" \
    RABBITMQ_ADVANCED_CONFIG_FILE="$d/advanced.config" \
    RABBITMQ_ENABLED_PLUGINS_FILE="$d/enabled_plugins" \
    RABBITMQ_CONF_ENV_FILE="$d/rabbitmq-env.conf" \
    RABBITMQ_PID_FILE="$d/rabbit.pid" \
    RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}" \
    "$RMQ_BIN/rabbitmq-server" >>"$d/console.log" 2>&1 </dev/null &
  echo $! >"$d/launcher.pid"
}

await_node() { # wait until node N's rabbit app runs, then record the VM's OS pid
  local n=$1 d out pid; d=$(node_dir "$n")
  # `rabbitmqctl wait` follows the pid file and gives up if the VM dies; its own --timeout is not
  # a bound on the whole wait, hence timeout(1).
  common_env
  if ! out=$(env -i "${CENV[@]}" timeout "$START_TIMEOUT" "$RMQ_BIN/rabbitmqctl" -n "$(node_name "$n")" \
               wait --timeout "$START_TIMEOUT" "$d/rabbit.pid" 2>&1); then
    echo "$out" >&2
    tail -n 20 "$d/console.log" >&2 || true
    die "$(node_name "$n") did not start within ${START_TIMEOUT}s (logs: $d/log)"
  fi
  pid=$(ctl "$n" eval 'os:getpid().' | tr -dc 0-9)
  is_our_beam "$pid" "$n" || die "$(node_name "$n") reported pid '$pid', which is not its beam.smp"
  echo "$pid" >"$d/beam.pid"
}

ensure_epmd() {
  if port_busy "$EPMD_PORT"; then
    EPMD_OURS=0
    [ "$EPMD_PORT" = 4369 ] || log "epmd port $EPMD_PORT already in use; sharing that epmd"
  else
    ERL_EPMD_PORT=$EPMD_PORT ERL_EPMD_ADDRESS=127.0.0.1 epmd -daemon
    EPMD_OURS=1
  fi
}

running_count() { # number of running nodes the cluster reports, asked of node N
  ctl "$1" cluster_status --formatter json 2>/dev/null |
    python3 -c 'import json,sys; print(len(json.load(sys.stdin).get("running_nodes", [])))' 2>/dev/null || echo 0
}

cmd_up() {
  local base=${1:-5680}
  if ! [[ "$base" =~ ^[0-9]+$ ]] || [ "$base" -lt 1400 ] || [ "$base" -gt 34000 ]; then
    die "BASE_PORT must be a number in 1400..34000 (got '$base')"
  fi
  set_ports "$base"
  if [ -f "$STATE" ]; then die "a cluster is already set up in $HRC_DIR (run: $0 down)"; fi
  if [ -e "$HRC_DIR" ] && [ ! -f "$MARKER" ]; then die "$HRC_DIR exists and is not ours; set HRC_DIR"; fi
  local i p busy=""
  for i in "${NODES[@]}"; do
    for p in "$(amqp_port "$i")" "$(dist_port "$i")"; do port_busy "$p" && busy="$busy $p"; done
  done
  [ -z "$busy" ] || die "ports in use:$busy (pick another BASE_PORT)"

  local t0 t1; t0=$(now)
  mkdir -p "$HRC_DIR/home"
  touch "$MARKER"
  # If anything below fails, stop whatever was started but keep the logs; `down` removes them.
  trap 'up_failed' EXIT
  (umask 077; head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' | tr a-f A-F >"$HRC_DIR/home/.erlang.cookie")
  chmod 400 "$HRC_DIR/home/.erlang.cookie"
  ensure_epmd
  cat >"$STATE" <<EOF
BASE_PORT=$BASE_PORT
EPMD_PORT=$EPMD_PORT
EPMD_OURS=$EPMD_OURS
CTL_MIN=$CTL_MIN
EOF

  for i in "${NODES[@]}"; do write_node_files "$i"; launch "$i"; done   # boot in parallel
  for i in "${NODES[@]}"; do await_node "$i"; done
  t1=$(now)
  log "3 nodes booted in $(since "$t0")s"

  for i in 2 3; do
    ctl "$i" stop_app >/dev/null
    ctl "$i" join_cluster "$(node_name 1)" >/dev/null
    ctl "$i" start_app >/dev/null
  done
  local running; running=$(running_count 1)
  [ "$running" = 3 ] || die "cluster formed with $running running nodes, expected 3"
  trap - EXIT
  log "joined in $(since "$t1")s; cluster up in $(since "$t0")s"
  for i in "${NODES[@]}"; do url "$i"; done
}

up_failed() {
  local st=$?
  trap - EXIT
  [ "$st" -ne 0 ] || return 0
  log "up failed; stopping what was started (logs kept in $HRC_DIR; run '$0 down' to remove them)"
  stop_pids 10 "${NODES[@]}" || true
  if [ "${EPMD_OURS:-0}" = 1 ]; then ERL_EPMD_PORT=$EPMD_PORT epmd -kill >/dev/null 2>&1 || true; fi
  exit "$st"
}

cmd_status() {
  load_state
  local i
  for i in "${NODES[@]}"; do
    if [ -n "$(beam_pid "$i")" ] && ctl "$i" cluster_status "$@"; then return 0; fi
  done
  die "no node answers"
}

cmd_kill() {
  check_n "${1:-}"; load_state
  local n=$1 pid t0; pid=$(beam_pid "$n")
  [ -n "$pid" ] || die "$(node_name "$n") is not running"
  t0=$(now)
  kill -KILL "$pid"
  while is_our_beam "$pid" "$n"; do sleep 0.05; done   # a zombie no longer counts
  log "killed $(node_name "$n") (pid $pid, SIGKILL; gone after $(since "$t0")s)"
}

stop_pids() { # stop_pids SECONDS N... : SIGTERM the nodes' VMs, SIGKILL whatever outlives SECONDS
  local grace=$1 i pid t0 left; shift
  declare -A pids=()
  for i in "$@"; do pid=$(beam_pid "$i"); [ -z "$pid" ] || { pids[$i]=$pid; kill -TERM "$pid" || true; }; done
  t0=$(now)
  while :; do
    left=""
    for i in "${!pids[@]}"; do is_our_beam "${pids[$i]}" "$i" && left="$left $i"; done
    [ -n "$left" ] || break
    if awk -v a="$t0" -v b="$(now)" -v g="$grace" 'BEGIN { exit !(b - a > g) }'; then
      for i in $left; do log "$(node_name "$i") ignored SIGTERM for ${grace}s; SIGKILL"; kill -KILL "${pids[$i]}" || true; done
      sleep 0.2
    else
      sleep 0.1
    fi
  done
}

cmd_stop() {
  check_n "${1:-}"; load_state
  [ -n "$(beam_pid "$1")" ] || die "$(node_name "$1") is not running"
  local t0; t0=$(now)
  stop_pids 60 "$1"
  log "stopped $(node_name "$1") in $(since "$t0")s"
}

cmd_start() {
  check_n "${1:-}"; load_state
  local n=$1 t0 running
  [ -z "$(beam_pid "$n")" ] || die "$(node_name "$n") is already running (pid $(beam_pid "$n"))"
  t0=$(now)
  launch "$n"
  await_node "$n"
  running=$(running_count "$n")
  log "started $(node_name "$n") (pid $(cat "$(node_dir "$n")/beam.pid")) in $(since "$t0")s; cluster reports $running running nodes"
}

cmd_down() {
  if [ ! -e "$HRC_DIR" ]; then log "nothing to do ($HRC_DIR absent)"; return 0; fi
  [ -f "$MARKER" ] || die "$HRC_DIR is not ours; not touching it"
  local t0 i pid; t0=$(now)
  if [ -f "$STATE" ]; then
    load_state
    stop_pids 30 "${NODES[@]}"
    for i in "${NODES[@]}"; do # the launcher shells exit with their VM; make sure
      pid=$(cat "$(node_dir "$i")/launcher.pid" 2>/dev/null || true)
      if [ -n "$pid" ] && grep -qs rabbitmq-server "/proc/$pid/cmdline"; then kill -TERM "$pid" 2>/dev/null || true; fi
    done
    if [ "${EPMD_OURS:-0}" = 1 ] && port_busy "$EPMD_PORT"; then
      # `epmd -kill` refuses while any node is still registered, so this can never pull the rug
      # from under a node that is not ours.
      ERL_EPMD_PORT=$EPMD_PORT epmd -kill >/dev/null 2>&1 || log "epmd on $EPMD_PORT not killed (nodes still registered?)"
    fi
  fi
  rm -rf "$HRC_DIR"
  log "down in $(since "$t0")s"
}

cmd_pids() { load_state; local i; for i in "${NODES[@]}"; do echo "$(node_name "$i") $(beam_pid "$i")"; done; }

cmd_rss() {
  load_state
  local i pid kb total=0
  for i in "${NODES[@]}"; do
    pid=$(beam_pid "$i")
    if [ -z "$pid" ]; then echo "$(node_name "$i") down"; continue; fi
    kb=$(awk '/^VmRSS:/ { print $2 }' "/proc/$pid/status")
    total=$((total + kb))
    echo "$(node_name "$i") pid $pid rss $((kb / 1024)) MiB"
  done
  echo "total rss $((total / 1024)) MiB"
}

cmd_env() {
  load_state
  common_env
  local v
  for v in "${CENV[@]}"; do printf 'export %q\n' "$v"; done
  echo "# then: rabbitmqctl -n $(node_name 1) cluster_status   (rabbitmqctl here is $RMQ_BIN/rabbitmqctl)"
}

sub=${1:-}; shift || true
case "$sub" in
  up)     cmd_up "$@" ;;
  status) cmd_status "$@" ;;
  kill)   cmd_kill "$@" ;;
  stop)   cmd_stop "$@" ;;
  start)  cmd_start "$@" ;;
  down)   cmd_down ;;
  urls)   load_state; for i in "${NODES[@]}"; do url "$i"; done ;;
  pids)   cmd_pids ;;
  rss)    cmd_rss ;;
  ctl)    check_n "${1:-}"; load_state; cli rabbitmqctl "$@" ;;
  queues) check_n "${1:-}"; load_state; cli rabbitmq-queues "$@" ;;
  diag)   check_n "${1:-}"; load_state; cli rabbitmq-diagnostics "$@" ;;
  env)    cmd_env ;;
  *) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
