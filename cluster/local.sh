#!/usr/bin/env bash
# A multi-node Ray cluster on this one machine: a head and N worker nodes on 127.0.0.1, each
# a separate raylet with its own CPU count, token authentication on. It behaves like a real
# cluster for placement, node failures and job submission, without a cloud account.
#
#   cluster/local.sh up N     start the head (if not running) and worker nodes until N are alive;
#                             prints the address for `codistill train --address`
#   cluster/local.sh status   `ray status` of this cluster
#   cluster/local.sh down     stop every process of this cluster, and nothing else on the machine
#                             (unlike `ray stop`, which stops every Ray instance of the user)
#
# Settings, from the environment:
#   CODISTILL_CLUSTER_DIR  where Ray keeps its sessions and sockets (default /tmp/codistill-cluster;
#                          keep it short: Unix socket paths are limited to 107 characters)
#   HEAD_PORT              GCS port of the head (default 6390; `ray start` default 6379 is left free)
#   DASHBOARD_PORT         dashboard and job-submission port (default 8275)
#   HEAD_CPUS              CPUs the head offers to tasks (default 0: it only coordinates, like the
#                          CPU head of a cloud cluster, so peers run on the worker nodes)
#   WORKER_CPUS            CPUs each worker node offers (default 2)
#   OBJECT_STORE_MB        object store of each node (default 256: the machine is shared)
#   RAY                    the ray executable (default: .venv/bin/ray of this project, else on PATH)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
project="$(dirname "$here")"
cluster_dir="${CODISTILL_CLUSTER_DIR:-/tmp/codistill-cluster}"
ray_tmp="$cluster_dir/ray"
head_port="${HEAD_PORT:-6390}"
dashboard_port="${DASHBOARD_PORT:-8275}"
head_cpus="${HEAD_CPUS:-0}"
worker_cpus="${WORKER_CPUS:-2}"
object_store_bytes=$((${OBJECT_STORE_MB:-256} * 1024 * 1024))
address="127.0.0.1:$head_port"

if [[ -n "${RAY:-}" ]]; then
    ray_bin="$RAY"
elif [[ -x "$project/.venv/bin/ray" ]]; then
    ray_bin="$project/.venv/bin/ray"
else
    ray_bin="$(command -v ray || true)"
fi
[[ -x "$ray_bin" ]] || { echo "local.sh: no ray executable; run 'make install' or set RAY" >&2; exit 2; }
# Job entrypoints run in the head's environment: `codistill` must be on its PATH.
export PATH="$(dirname "$ray_bin"):$PATH"
# Token authentication, as Ray 2.60 does by default; the token lives in ~/.ray/auth_token,
# which every node here (and every client on this machine) reads.
export RAY_AUTH_MODE=token
export RAY_USAGE_STATS_ENABLED=0
# Ray Train's controller polls its workers every 2 s by default; the nodes of this cluster
# share one machine, so poll 4x as often (a run's end, a checkpoint, a dead worker seen sooner).
export RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="${RAY_TRAIN_HEALTH_CHECK_INTERVAL_S:-0.5}"
# Ray starts its workers at nice 15: the peers would yield to every other process on the machine.
export RAY_worker_niceness="${RAY_worker_niceness:-0}"

# Processes of this cluster: everything whose command line names its session folders (GCS,
# raylets, dashboard, monitors), plus all their descendants (workers rename themselves).
cluster_pids() {
    local roots pid
    roots="$(pgrep -f -- "$ray_tmp/session_" || true)"
    descendants() { for pid in "$@"; do echo "$pid"; descendants $(pgrep -P "$pid" || true); done; }
    descendants $roots | grep -v -x -e "$$" -e "$BASHPID" | sort -u
}

raylet_count() { pgrep -f -- "raylet.*$ray_tmp/session_" | wc -l; }

up() {
    local want="$1" have i
    [[ "$want" =~ ^[0-9]+$ ]] || { echo "local.sh: up needs a number of worker nodes, got '$want'" >&2; exit 2; }
    mkdir -p "$cluster_dir"
    "$ray_bin" get-auth-token --generate >/dev/null 2>&1 || true
    if ! pgrep -f -- "gcs_server.*$ray_tmp/session_" >/dev/null; then
        "$ray_bin" start --head --node-ip-address=127.0.0.1 --port="$head_port" \
            --num-cpus="$head_cpus" --num-gpus=0 --temp-dir="$ray_tmp" \
            --object-store-memory="$object_store_bytes" \
            --include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port="$dashboard_port" \
            --dashboard-agent-listen-port=$((dashboard_port + 100)) --disable-usage-stats \
            >"$cluster_dir/head.log" 2>&1 || { cat "$cluster_dir/head.log" >&2; exit 1; }
    fi
    have=$(($(raylet_count) - 1))
    for ((i = have + 1; i <= want; i++)); do
        # Several nodes on one host: each needs its own dashboard-agent port.
        "$ray_bin" start --address="$address" --node-ip-address=127.0.0.1 \
            --num-cpus="$worker_cpus" --num-gpus=0 --temp-dir="$ray_tmp" \
            --object-store-memory="$object_store_bytes" \
            --dashboard-agent-listen-port=$((dashboard_port + 100 + i)) \
            >"$cluster_dir/worker-$i.log" 2>&1 || { cat "$cluster_dir/worker-$i.log" >&2; exit 1; }
    done
    echo "$address" >"$cluster_dir/address"
    echo "Ray cluster on this machine: head + $want worker nodes ($worker_cpus CPUs each), token authentication on."
    echo "Clients send the token only when told to:"
    echo "  export RAY_AUTH_MODE=token"
    echo "  codistill train configs/dml_mnist1d.yaml --address $address"
    echo "  RAY_API_SERVER_ADDRESS=http://127.0.0.1:$dashboard_port ray job submit --working-dir . -- codistill train configs/dml_mnist1d.yaml"
    echo "address=$address"
    echo "dashboard=http://127.0.0.1:$dashboard_port"
}

down() {
    local pids left
    pids="$(cluster_pids)"
    if [[ -z "$pids" ]]; then
        echo "No processes of the cluster in $ray_tmp."
        return 0
    fi
    kill -TERM $pids 2>/dev/null || true
    # Ray stops cleanly on SIGTERM, but the GCS and the autoscaler monitor may linger: 5 s, then SIGKILL.
    for _ in $(seq 10); do
        left="$(for p in $pids; do [[ "$(ps -o stat= -p "$p" 2>/dev/null)" =~ ^[^Z] ]] && echo "$p"; done || true)"
        [[ -z "$left" ]] && break
        sleep 0.5
    done
    [[ -n "$left" ]] && kill -KILL $left 2>/dev/null || true
    rm -f "$cluster_dir/address"
    echo "Stopped $(wc -w <<<"$pids") processes of the cluster in $ray_tmp."
}

case "${1:-}" in
    up) up "${2:-2}" ;;
    down) down ;;
    status) "$ray_bin" status --address="$address" ;;
    *) echo "usage: cluster/local.sh up N | status | down" >&2; exit 2 ;;
esac
