#!/usr/bin/env bash
# A one-node Ray "cluster" on this machine, with the dashboard and job server, so that the
# `ray job submit` workflow of a real cluster can be rehearsed (and tested) locally.
#
#   cluster/local.sh start [--port P] [--dashboard-port D] [--num-cpus N]
#                          [--object-store-memory BYTES] [--dir STATE_DIR] [--timeout S]
#   cluster/local.sh status [--dir STATE_DIR]
#   cluster/local.sh stop   [--dir STATE_DIR] [--timeout S]
#
# `start` prints one line on stdout, `RAY_ADDRESS=http://127.0.0.1:D RAY_AUTH_MODE=token`: the
# variables `ray job submit` needs (Ray 2.60 clients send the auth token only in token mode):
#
#   eval "export $(cluster/local.sh start --num-cpus 2)"
#   ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \
#       python jobs/train.py --config jobs/configs/tiny/pretrain.yaml
#   cluster/local.sh stop
#
# Only the head started here is ever stopped: `stop` terminates the recorded pid (the
# `ray start --block` process, which shuts its own children down), waits, and then kills what
# is left of that head's processes (its session and their descendants, nothing else). It never
# runs `ray stop`, which would stop every Ray on the machine.
#
# Environment: LLAVA_RAY_VENV (default: <repo>/.venv) is the virtualenv whose `ray` starts the
# head; its bin/ goes first on the head's PATH, so jobs run `python` from that virtualenv.
# RAY_AUTH_MODE (default here: token) is passed on; `disabled` starts an unauthenticated head.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${LLAVA_RAY_VENV:-$repo_root/.venv}"
auth_mode="${RAY_AUTH_MODE:-token}"

usage() {
    sed -n '5,8p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

log() { echo "local.sh: $*" >&2; }
die() {
    log "error: $*"
    exit 1
}

# --- arguments ---------------------------------------------------------------------------
[[ $# -ge 1 ]] || usage
command="$1"
shift
port=""
dashboard_port=""
num_cpus="" # default: Ray counts the machine's (or container's) CPUs
object_store_memory="$((512 * 1024 * 1024))" # small containers: Ray's default is 30% of RAM
state_dir="${TMPDIR:-/tmp}/llava-ray-local-$(id -u)"
timeout_s="120"
while [[ $# -gt 0 ]]; do
    [[ "$1" == -h || "$1" == --help || $# -ge 2 ]] || die "option '$1' needs a value"
    case "$1" in
    --port) port="$2" ;;
    --dashboard-port) dashboard_port="$2" ;;
    --num-cpus) num_cpus="$2" ;;
    --object-store-memory) object_store_memory="$2" ;;
    --dir) state_dir="$2" ;;
    --timeout) timeout_s="$2" ;;
    -h | --help) usage ;;
    *) die "unknown option '$1' (see: $0 --help)" ;;
    esac
    shift 2
done

pid_file="$state_dir/head.pid"
ports_file="$state_dir/ports.env"
log_file="$state_dir/ray-start.log"

# --- helpers -----------------------------------------------------------------------------
python_bin() {
    if [[ -x "$venv/bin/python" ]]; then echo "$venv/bin/python"; else command -v python3; fi
}

# Print N distinct free TCP ports on 127.0.0.1. Bound together so they cannot repeat; another
# program may still take one before Ray binds it, which `start` then reports from the log.
free_ports() {
    "$(python_bin)" - "$1" <<'EOF'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

ray_bin() {
    if [[ -x "$venv/bin/ray" ]]; then echo "$venv/bin/ray"; else command -v ray || die "no 'ray' in $venv/bin or on PATH"; fi
}

# Ray 2.60 protects the GCS and the dashboard with a token (RAY_AUTH_TOKEN, the file named by
# RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token); `ray job submit` finds it the same way.
# `--generate` creates ~/.ray/auth_token only when no token exists at all.
auth_token() {
    if [[ "$auth_mode" == token ]]; then
        RAY_AUTH_MODE=token "$(ray_bin)" get-auth-token --generate 2>/dev/null || return 1
    fi
    return 0
}

dashboard_answers() { # $1: dashboard port, $2: token. The token goes through stdin, not argv.
    printf 'Authorization: Bearer %s\n' "$2" |
        curl --silent --fail --max-time 2 --header @- "http://127.0.0.1:$1/api/version" >/dev/null 2>&1
}

# Running, i.e. existing and not a zombie (a dead child of this script stays a zombie until
# the script exits, and `kill -0` still succeeds on it).
running() {
    local stat
    stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
    stat="${stat##*) }"
    [[ "${stat:0:1}" != Z ]]
}

# The recorded pid is ours only if it is running and still the `ray start --block` we launched
# (pids are reused; never signal a stranger).
recorded_head_alive() {
    [[ -f "$pid_file" ]] || return 1
    local pid
    pid="$(cat "$pid_file")"
    running "$pid" || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "start --head --block"
}

load_state() {
    [[ -f "$ports_file" ]] || die "no head recorded in $state_dir (start one with: $0 start --dir $state_dir)"
    # shellcheck disable=SC1090
    source "$ports_file"
}

# --- commands ----------------------------------------------------------------------------
cmd_start() {
    if recorded_head_alive; then
        load_state
        die "a head started by this script is already running (pid $HEAD_PID, RAY_ADDRESS=http://127.0.0.1:$DASHBOARD_PORT); stop it first: $0 stop --dir $state_dir"
    fi
    local ray token
    ray="$(ray_bin)"
    token="$(auth_token)" || die "could not read or create a Ray auth token (ray get-auth-token --generate)"
    mkdir -p "$state_dir"
    rm -f "$pid_file" "$ports_file"

    # Ray's fixed default ports (10001 client server, 52365 agent) would collide with any other
    # head on this machine, so every port it listens on is chosen here.
    local client_port agent_port
    read -r p1 p2 p3 p4 <<<"$(free_ports 4)"
    port="${port:-$p1}"
    dashboard_port="${dashboard_port:-$p2}"
    client_port="$p3"
    agent_port="$p4"

    local cpu_args=()
    [[ -z "$num_cpus" ]] || cpu_args=(--num-cpus "$num_cpus")

    # setsid: the head leads a session of its own, which its raylet, GCS, dashboard and
    # workers inherit, so `stop` can find exactly this head's processes. In a script (no job
    # control) the background child is not a group leader, so setsid does not fork and $! is
    # the ray process itself.
    log "starting a Ray head: GCS port $port, dashboard 127.0.0.1:$dashboard_port, ${num_cpus:-all} CPUs (log: $log_file)"
    # RAY_AUTH_MODE=token unless told otherwise: with the mode unset, Ray 2.60 authenticates
    # only if a token happens to exist already, and the GCS listens on the machine's address,
    # not only on loopback.
    PATH="$venv/bin:$PATH" RAY_AUTH_MODE="$auth_mode" RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0 \
        setsid "$ray" start --head --block --port "$port" \
        --dashboard-host 127.0.0.1 --dashboard-port "$dashboard_port" --include-dashboard true \
        --ray-client-server-port "$client_port" --dashboard-agent-listen-port "$agent_port" \
        ${cpu_args[@]+"${cpu_args[@]}"} --object-store-memory "$object_store_memory" \
        --disable-usage-stats </dev/null >"$log_file" 2>&1 &
    local pid=$!
    echo "$pid" >"$pid_file"
    cat >"$ports_file" <<EOF
HEAD_PID=$pid
GCS_PORT=$port
DASHBOARD_PORT=$dashboard_port
CLIENT_PORT=$client_port
AGENT_PORT=$agent_port
AUTH_MODE=$auth_mode
EOF

    # The job server answers only once the dashboard is up (5-15 s on an idle 2-core machine).
    local waited=0
    until dashboard_answers "$dashboard_port" "$token"; do
        if ! running "$pid"; then
            tail -n 30 "$log_file" >&2 || true
            cmd_stop # sweeps whatever it had started
            die "the Ray head exited while starting (log above, full log: $log_file)"
        fi
        if ((waited >= timeout_s)); then
            tail -n 30 "$log_file" >&2 || true
            log "the dashboard did not answer within ${timeout_s}s; stopping the head"
            cmd_stop
            exit 1
        fi
        sleep 1
        waited=$((waited + 1))
    done
    log "ready after ~${waited}s (pid $pid); stop with: $0 stop --dir $state_dir"
    echo "RAY_ADDRESS=http://127.0.0.1:$dashboard_port RAY_AUTH_MODE=$auth_mode"
}

cmd_stop() {
    if [[ ! -f "$pid_file" ]]; then
        log "no head recorded in $state_dir: nothing to stop"
        return 0
    fi
    local pid snapshot
    pid="$(cat "$pid_file")"
    if ! recorded_head_alive && running "$pid"; then
        # The pid now belongs to another program, and so do its group and session.
        log "pid $pid is no longer the recorded Ray head; leaving it alone"
        rm -f "$pid_file"
        return 0
    fi
    # Taken before anything is signalled, while the process tree is still intact.
    snapshot="$(head_processes "$pid")"
    if recorded_head_alive; then
        # `ray start --block` handles SIGTERM by shutting its raylet, GCS, dashboard and
        # workers down; RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0 (set at start) skips the drain.
        log "stopping the Ray head (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        wait_for_exit "$timeout_s" "$pid:$(start_time "$pid" || true)"
    else
        log "the recorded head (pid $pid) is not running"
    fi
    # Workers exit shortly after their raylet; give them a moment, then kill what is left.
    wait_for_exit 10 "$snapshot"
    local leftovers
    leftovers="$(still_running "$snapshot")"
    if [[ -n "$leftovers" ]]; then
        log "killing leftovers of this head: $(echo "$leftovers" | cut -d: -f1 | tr '\n' ' ')"
        echo "$leftovers" | cut -d: -f1 | xargs -r kill -KILL 2>/dev/null || true
        sleep 1
    fi
    forget_cluster_address
    rm -f "$pid_file"
    log "stopped"
}

# `ray start` records its GCS address in /tmp/ray/ray_current_cluster and a plain `ray.init()`
# connects there; once this head is gone that record would make it wait on a dead address. Remove
# it only when it still names this head's GCS port.
forget_cluster_address() {
    local record="${RAY_TMPDIR:-/tmp/ray}/ray_current_cluster"
    [[ -f "$ports_file" && -f "$record" ]] || return 0
    local gcs_port
    gcs_port="$(sed -n 's/^GCS_PORT=//p' "$ports_file")"
    if [[ -n "$gcs_port" ]] && grep -Eq ":${gcs_port}\$" "$record"; then
        rm -f "$record"
    fi
}

# Start time of a process (field 22 of /proc/PID/stat, in clock ticks since boot). The command
# name (field 2) may contain spaces, so fields are counted after its closing parenthesis.
start_time() {
    local stat
    stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
    stat="${stat##*) }"
    awk '{ print $20 }' <<<"$stat"
}

# "pid:start_time" for every process of the head started here: its session (setsid made the
# head a session leader; Ray workers keep the session though each takes a process group of its
# own) and every descendant (a job's entrypoint runs in a session of its own). The start time
# tells a leftover from an unrelated process that later reused its pid.
head_processes() { # $1: head pid
    local member
    for member in $(ps -eo pid=,ppid=,sid= | awk -v head="$1" '
        { parent[$1] = $2; session[$1] = $3 }
        END {
            for (p in session) if (session[p] == head) keep[p] = 1
            grew = 1
            while (grew) {
                grew = 0
                for (p in parent) if (!(p in keep) && (parent[p] in keep)) { keep[p] = 1; grew = 1 }
            }
            for (p in keep) print p
        }'); do
        echo "$member:$(start_time "$member" || echo gone)"
    done
}

still_running() { # $1: "pid:start_time" lines; prints those still alive as the same process
    local entry
    for entry in $1; do
        running "${entry%%:*}" && [[ "$(start_time "${entry%%:*}" || true)" == "${entry#*:}" ]] && echo "$entry"
    done
    return 0
}

wait_for_exit() { # $1: seconds, $2: "pid:start_time" lines
    local waited=0
    while [[ -n "$(still_running "$2")" ]] && ((waited < $1)); do
        sleep 1
        waited=$((waited + 1))
    done
}

cmd_status() {
    load_state
    auth_mode="$AUTH_MODE"
    if ! recorded_head_alive; then
        echo "not running (last head: pid $HEAD_PID, state in $state_dir)"
        return 1
    fi
    if dashboard_answers "$DASHBOARD_PORT" "$(auth_token)"; then
        echo "running: pid $HEAD_PID, GCS port $GCS_PORT, RAY_ADDRESS=http://127.0.0.1:$DASHBOARD_PORT RAY_AUTH_MODE=$AUTH_MODE"
    else
        echo "starting or unhealthy: pid $HEAD_PID alive but http://127.0.0.1:$DASHBOARD_PORT/api/version does not answer (log: $log_file)"
        return 1
    fi
}

case "$command" in
start) cmd_start ;;
stop) cmd_stop ;;
status) cmd_status ;;
-h | --help) usage ;;
*) die "unknown command '$command' (start, stop or status)" ;;
esac
