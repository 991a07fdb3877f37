#!/usr/bin/env bash
# Starts a real one-node Slurm cluster on this machine, for tests/test_slurm.py and for trying
# launch/slurm/pretrain.sbatch by hand.
#
#   tests/slurm/start_local_slurm.sh          # installs slurm-wlm + munge if missing, starts them
#   export SLURM_CONF=/tmp/vp-slurm/slurm.conf  # then sbatch/srun/sinfo talk to this cluster
#   tests/slurm/stop_local_slurm.sh [--purge]
#
# Written for containers and microVMs without systemd or a writable cgroup tree: the daemons are
# started directly (munged as the munge user, slurmctld and slurmd as root, daemonised, PID files
# and logs in the state directory) and the process tracking and task plugins are the ones that
# need no cgroups (proctrack/linuxproc, task/none). No accounting daemon: `sacct` does not work,
# `sbatch --wait` and `scontrol show job` do.
#
# Idempotent: daemons already running are left alone, and the script returns as soon as the node
# is idle. Must run as root (it installs packages and starts slurmd, which launches jobs).
#
# Environment:
#   VP_SLURM_DIR   state, spool, logs and slurm.conf (default /tmp/vp-slurm)
#   VP_SLURM_PORT  slurmctld port; slurmd uses the next one (default 6817)
#
# Exit status: 0 when the node is idle, 77 when Slurm is missing and apt cannot install it (the
# test suite skips on 77), 1 on any other failure (the daemon logs are printed).
set -euo pipefail

STATE_DIR=${VP_SLURM_DIR:-/tmp/vp-slurm}
CTLD_PORT=${VP_SLURM_PORT:-6817}
SLURMD_PORT=$((CTLD_PORT + 1))
CONF="$STATE_DIR/slurm.conf"
export SLURM_CONF="$CONF"

log() { echo "[local-slurm] $*"; }
die() { echo "[local-slurm] error: $*" >&2; exit 1; }

[[ $(id -u) -eq 0 ]] || die "run as root (uid $(id -u)): slurmd must be able to start jobs as any user"

# --- 1. packages --------------------------------------------------------------------------------
have_slurm() {
    command -v slurmctld && command -v slurmd && command -v munged && command -v sbatch
} >/dev/null
if ! have_slurm; then
    log "installing slurm-wlm and munge with apt-get"
    if ! { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
            --no-install-recommends slurm-wlm munge; } >/tmp/vp-slurm-apt.log 2>&1; then
        tail -n 20 /tmp/vp-slurm-apt.log >&2
        echo "[local-slurm] apt-get could not install slurm-wlm (log: /tmp/vp-slurm-apt.log)" >&2
        exit 77
    fi
    have_slurm || { echo "[local-slurm] slurm-wlm installed but its binaries are missing" >&2; exit 77; }
fi

mkdir -p "$STATE_DIR"/{state,spool,log,tmp}

# --- 2. munge: Slurm's authentication ------------------------------------------------------------
# Slurm's auth/munge plugin talks to the default socket /run/munge/munge.socket.2, so munged runs
# with its stock paths; only the fact that we started it is recorded, for the stop script.
if ! munge -n </dev/null >/dev/null 2>&1; then
    if [[ ! -s /etc/munge/munge.key ]]; then
        log "creating /etc/munge/munge.key"
        install -d -o munge -g munge -m 0700 /etc/munge
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
        chown munge:munge /etc/munge/munge.key
        chmod 0400 /etc/munge/munge.key
    fi
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
    log "starting munged"
    runuser -u munge -- /usr/sbin/munged
    touch "$STATE_DIR/munged.started-by-us"
    for _ in $(seq 50); do munge -n </dev/null >/dev/null 2>&1 && break; sleep 0.1; done
    munge -n </dev/null | unmunge >/dev/null || die "munged does not answer (see /var/log/munge/munged.log)"
fi

# --- 3. slurm.conf -------------------------------------------------------------------------------
# The node is named after this host when the name resolves, so that jobs see the same node name a
# real cluster would give them (the sbatch script uses it as MASTER_ADDR); otherwise `localhost`.
NODE_NAME=$(hostname -s)
getent hosts "$NODE_NAME" >/dev/null || NODE_NAME=localhost
CPUS=$(nproc)
# Leave 10% of memory unclaimed: slurmd drains a node whose RealMemory exceeds what it finds.
MEM_MB=$(awk '/^MemTotal:/ { printf "%d", $2 / 1024 * 0.9 }' /proc/meminfo)

NEW_CONF=$(cat <<EOF
# Written by tests/slurm/start_local_slurm.sh; one node, no cgroups, no accounting.
ClusterName=vplocal
SlurmctldHost=$NODE_NAME(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE_DIR/state
SlurmdSpoolDir=$STATE_DIR/spool
TmpFS=$STATE_DIR/tmp
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmdPidFile=$STATE_DIR/slurmd.pid
SlurmctldLogFile=$STATE_DIR/log/slurmctld.log
SlurmdLogFile=$STATE_DIR/log/slurmd.log
# No cgroups in a container: track processes by parent PID, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MailProg=/bin/true
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# Bring the node back by itself after a slurmd restart; keep finished jobs visible to
# \`scontrol show job\` for ten minutes (there is no accounting database to ask instead).
ReturnToService=2
MinJobAge=600
KillWait=5
InactiveLimit=0
NodeName=$NODE_NAME NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=$NODE_NAME Default=YES MaxTime=INFINITE State=UP
EOF
)

pid_alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

if [[ -f $CONF ]] && [[ $(cat "$CONF") != "$NEW_CONF" ]] \
        && { pid_alive "$STATE_DIR/slurmctld.pid" || pid_alive "$STATE_DIR/slurmd.pid"; }; then
    die "$CONF differs from what this script would write and Slurm is running with it; \
run tests/slurm/stop_local_slurm.sh first"
fi
printf '%s\n' "$NEW_CONF" >"$CONF"

# --- 4. daemons ----------------------------------------------------------------------------------
show_logs() {
    for f in "$STATE_DIR"/log/slurmctld.log "$STATE_DIR"/log/slurmd.log; do
        [[ -f $f ]] && { echo "----- $f (last 30 lines)" >&2; tail -n 30 "$f" >&2; }
    done
    return 0
}

if ! pid_alive "$STATE_DIR/slurmctld.pid"; then
    log "starting slurmctld ($NODE_NAME:$CTLD_PORT)"
    slurmctld -f "$CONF" || { show_logs; die "slurmctld did not start"; }
fi
if ! pid_alive "$STATE_DIR/slurmd.pid"; then
    log "starting slurmd"
    slurmd -f "$CONF" -N "$NODE_NAME" || { show_logs; die "slurmd did not start"; }
fi

# --- 5. wait for the node ------------------------------------------------------------------------
deadline=$((SECONDS + ${VP_SLURM_START_TIMEOUT:-60}))
state=""
while ((SECONDS < deadline)); do
    state=$(sinfo -h -N -n "$NODE_NAME" -o '%t' 2>/dev/null || true)
    case $state in
        idle|mix|alloc) log "node $NODE_NAME is $state; export SLURM_CONF=$CONF"; exit 0 ;;
        # A node left down or drained by an earlier run (e.g. the daemons were killed) comes back.
        down*|drain*|drng*) scontrol update NodeName="$NODE_NAME" State=RESUME >/dev/null 2>&1 || true ;;
    esac
    sleep 1
done
show_logs
sinfo -N -l >&2 || true
die "node $NODE_NAME not idle after ${VP_SLURM_START_TIMEOUT:-60}s (state: '${state:-none}')"
