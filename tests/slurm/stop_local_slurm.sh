#!/usr/bin/env bash
# Stops the cluster started by tests/slurm/start_local_slurm.sh: cancels its jobs, then stops
# slurmd, slurmctld and, if that script started it, munged. `--purge` also deletes the state
# directory (saved job state, spool, logs, slurm.conf). Safe to run when nothing is running.
#
# Environment: VP_SLURM_DIR, as for the start script (default /tmp/vp-slurm).
set -euo pipefail

STATE_DIR=${VP_SLURM_DIR:-/tmp/vp-slurm}
PURGE=0
[[ ${1:-} == --purge ]] && PURGE=1

log() { echo "[local-slurm] $*"; }

# Stops the process whose PID is in $1: TERM, up to 10 s grace, then KILL.
stop_pidfile() {
    local pidfile=$1 name=$2 pid
    [[ -s $pidfile ]] || return 0
    pid=$(cat "$pidfile")
    if kill -0 "$pid" 2>/dev/null; then
        log "stopping $name (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null || true; fi
    fi
    rm -f "$pidfile"
}

if [[ -f $STATE_DIR/slurm.conf ]]; then
    # Jobs first, so that slurmd can still tear their steps down.
    SLURM_CONF="$STATE_DIR/slurm.conf" scancel --full --quiet --state=RUNNING 2>/dev/null || true
    SLURM_CONF="$STATE_DIR/slurm.conf" scancel --quiet --state=PENDING 2>/dev/null || true
fi
stop_pidfile "$STATE_DIR/slurmd.pid" slurmd
stop_pidfile "$STATE_DIR/slurmctld.pid" slurmctld

if [[ -f $STATE_DIR/munged.started-by-us ]]; then
    stop_pidfile /run/munge/munged.pid munged
    rm -f "$STATE_DIR/munged.started-by-us"
fi

if ((PURGE)); then
    log "removing $STATE_DIR"
    rm -rf "$STATE_DIR"
fi
