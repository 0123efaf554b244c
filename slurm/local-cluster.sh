#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine, for tests and for trying `bench grid --cluster
# local-slurm` on a laptop (what it does and why: docs/local-slurm.md).
#
#   slurm/local-cluster.sh start    # idempotent; prints `export SLURM_CONF=...` on stdout
#   slurm/local-cluster.sh status   # running or stopped (exit 0 / 3)
#   slurm/local-cluster.sh stop     # cancels its jobs, kills their processes, stops its daemons
#
#   eval "$(slurm/local-cluster.sh start)"   # then sinfo, sbatch, bench grid ... --cluster local-slurm
#
# Everything lives in ${LOCAL_SLURM_DIR:-/tmp/redi-bench-slurm}: slurm.conf, a private munge key and
# socket, state, spool, pid and log files. The controller and node daemons listen on non-default ports
# (LOCAL_SLURM_CTLD_PORT, LOCAL_SLURM_D_PORT; default 16817/16818) and munged on its own socket, so
# this cluster never meets a real one or the system's munged. Needs root (slurmd runs jobs as their
# user) and `apt-get install -y slurm-wlm munge`. No accounting daemon: `sacct` fails, job states come
# from `squeue -t all` (ended jobs stay listed for MinJobAge seconds; plain squeue omits them) and from submitit's result files.
set -euo pipefail

DIR="${LOCAL_SLURM_DIR:-/tmp/redi-bench-slurm}"
CTLD_PORT="${LOCAL_SLURM_CTLD_PORT:-16817}"
D_PORT="${LOCAL_SLURM_D_PORT:-16818}"
CONF="$DIR/slurm.conf"
MUNGE_SOCKET="$DIR/munge/munge.socket"

log() { echo "local-cluster: $*" >&2; }
die() { log "error: $*"; exit 2; }

# A pid from one of our pid files, only if that process is alive AND is the daemon we started
# (its command line names our folder): a stale pid file never makes us signal someone else.
our_pid() {
    local file="$1" pid
    [[ -s "$file" ]] || return 1
    pid="$(tr -dc '0-9' <"$file")"
    [[ -n "$pid" && -r "/proc/$pid/cmdline" ]] || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$DIR" || return 1
    echo "$pid"
}

running() {
    our_pid "$DIR/munged.pid" >/dev/null && our_pid "$DIR/slurmctld.pid" >/dev/null \
        && our_pid "$DIR/slurmd.pid" >/dev/null
}

check_binaries() {
    local missing=()
    for bin in munged slurmctld slurmd sinfo sbatch squeue scontrol srun; do
        command -v "$bin" >/dev/null 2>&1 || [[ -x "/usr/sbin/$bin" ]] || missing+=("$bin")
    done
    ((${#missing[@]} == 0)) || die "missing ${missing[*]}; install with: apt-get install -y slurm-wlm munge"
    [[ "$(id -u)" == 0 ]] || die "must run as root (slurmd starts jobs as their user)"
}

write_conf() {
    local host cpus mem_mb
    host="$(hostname -s)"
    cpus="$(nproc --all)"
    # RealMemory must not exceed what slurmd detects, or the node is drained: use 80% of it.
    mem_mb="$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.8}' /proc/meminfo)"
    cat >"$CONF.tmp" <<EOF
# Written by slurm/local-cluster.sh; regenerated on every start.
ClusterName=redibench
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$D_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire is also how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10
CredType=cred/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# Requeue: jobs may be requeued (scontrol requeue, submitit's checkpoint), and preempted jobs get the
# user signal first so that a checkpointable callable can requeue itself (submitit docs).
JobRequeue=1
SlurmctldParameters=preempt_send_user_signal
# Short waits so that tests are fast: SIGKILL 3 s after SIGTERM, finished jobs listed for 10 min.
KillWait=3
MinJobAge=600
MessageTimeout=5
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
    mv "$CONF.tmp" "$CONF"
}

start_munge() {
    if our_pid "$DIR/munged.pid" >/dev/null; then return; fi
    mkdir -p "$DIR/munge"
    chmod 700 "$DIR/munge"
    if [[ ! -s "$DIR/munge.key" ]]; then
        # A private key: this cluster trusts only itself (munged wants at least 32 bytes).
        (umask 077 && head -c 1024 /dev/urandom >"$DIR/munge.key")
    fi
    chmod 400 "$DIR/munge.key"
    munged --force --socket="$MUNGE_SOCKET" --key-file="$DIR/munge.key" \
        --pid-file="$DIR/munged.pid" --log-file="$DIR/munged.log" --seed-file="$DIR/munged.seed"
    for _ in $(seq 50); do [[ -S "$MUNGE_SOCKET" ]] && return; sleep 0.1; done
    die "munged did not create $MUNGE_SOCKET; see $DIR/munged.log"
}

wait_idle() {
    local state=""
    for _ in $(seq 150); do
        state="$(SLURM_CONF="$CONF" sinfo -h -N -o %T 2>/dev/null | head -1 || true)"
        case "$state" in
            idle*|mixed*|allocated*) return 0 ;;
            drain*|down*)
                SLURM_CONF="$CONF" scontrol update NodeName="$(hostname -s)" State=RESUME >/dev/null 2>&1 || true ;;
        esac
        sleep 0.2
    done
    die "node not idle after 30 s (state: ${state:-unknown}); see $DIR/slurmctld.log and $DIR/slurmd.log"
}

start() {
    check_binaries
    if running; then
        log "already running in $DIR"
        echo "export SLURM_CONF=$CONF"
        return 0
    fi
    # slurmstepd opens a Unix socket $DIR/spool/<node>/<node>_<job>.<step> per job step; Linux caps
    # such paths at 107 characters, and past it every job fails at launch and is requeued forever
    # (slurmd.log: "Unix socket path ... is too long"). Refuse a folder that deep before starting.
    local host socket
    host="$(hostname -s)"
    socket="$DIR/spool/$host/${host}_4294967294.4294967294"
    (( ${#socket} <= 107 )) || die "LOCAL_SLURM_DIR=$DIR is too deep: slurmstepd's socket paths would be" \
        "${#socket} characters (Linux allows 107); choose a shorter folder"
    mkdir -p "$DIR/state" "$DIR/spool"
    write_conf
    start_munge
    if ! our_pid "$DIR/slurmctld.pid" >/dev/null; then
        slurmctld -c -f "$CONF" || die "slurmctld failed; see $DIR/slurmctld.log"
    fi
    if ! our_pid "$DIR/slurmd.pid" >/dev/null; then
        slurmd -f "$CONF" || die "slurmd failed; see $DIR/slurmd.log"
    fi
    wait_idle
    log "running in $DIR (slurmctld port $CTLD_PORT, slurmd port $D_PORT)"
    echo "export SLURM_CONF=$CONF"
}

stop_one() {
    local name="$1" pid
    pid="$(our_pid "$DIR/$name.pid")" || return 0
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 100); do
        [[ -d "/proc/$pid" ]] || { rm -f "$DIR/$name.pid"; return 0; }
        sleep 0.1
    done
    log "$name (pid $pid) ignored SIGTERM for 10 s; sending SIGKILL"
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$DIR/$name.pid"
}

# Every process of this cluster's jobs: each slurmstepd whose cwd or an open file lies in $DIR (its
# log is $DIR/slurmd.log), everything below it, and any process whose environment says it belongs to a
# job of this cluster (SLURM_CONF=$CONF and SLURM_JOB_ID: catches a job's orphans reparented to init).
# This script and its ancestors are never listed, nor is anything of another cluster.
job_pids() {
    local pid link target file roots=() keep=" $$ "
    pid=$$
    while [[ "$pid" -gt 1 ]]; do
        pid="$(awk '{print $4}' "/proc/$pid/stat" 2>/dev/null || echo 1)"
        keep+="$pid "
    done
    for pid in $(pgrep -x slurmstepd || true); do  # candidates only; kept if they are ours
        for link in "/proc/$pid/cwd" "/proc/$pid"/fd/*; do
            target="$(readlink "$link" 2>/dev/null || true)"
            if [[ "$target" == "$DIR" || "$target" == "$DIR/"* ]]; then roots+=("$pid"); break; fi
        done
    done
    for file in $(grep -lzxF "SLURM_CONF=$CONF" /proc/[0-9]*/environ 2>/dev/null || true); do
        if grep -qz '^SLURM_JOB_ID=' "$file" 2>/dev/null; then
            pid="${file#/proc/}"; pid="${pid%/environ}"
            [[ "$keep" == *" $pid "* ]] || roots+=("$pid")
        fi
    done
    ((${#roots[@]})) || return 0
    # The roots and all their descendants (ps lists pid and parent pid of every process).
    ps -e -o pid=,ppid= | awk -v roots="${roots[*]}" -v keep="$keep" '
        { parent[$1] = $2; pids[NR] = $1 }
        END {
            n = split(roots, r, " "); for (i = 1; i <= n; i++) mark[r[i]] = 1
            do { added = 0
                 for (i in pids) { p = pids[i]; if (!(p in mark) && (parent[p] in mark)) { mark[p] = 1; added = 1 } }
            } while (added)
            for (p in mark) if (index(keep, " " p " ") == 0) print p
        }'
}

cancel_jobs() {
    # Cancel every job of this cluster through the controller (SIGTERM, SIGKILL after KillWait=3 s),
    # then wait for the node to report them gone, so that their epilogues and step daemons finish.
    our_pid "$DIR/slurmctld.pid" >/dev/null && our_pid "$DIR/slurmd.pid" >/dev/null || return 0
    local ids
    ids="$(SLURM_CONF="$CONF" squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ' || true)"
    [[ -n "${ids// /}" ]] || return 0
    log "cancelling job(s) $ids"
    # shellcheck disable=SC2086
    SLURM_CONF="$CONF" scancel $ids 2>/dev/null || true
    for _ in $(seq 100); do
        [[ -z "$(SLURM_CONF="$CONF" squeue -h -o %A 2>/dev/null || true)" ]] && return 0
        sleep 0.2
    done
    log "jobs still listed 20 s after scancel; their processes are killed below"
}

kill_job_processes() {
    local pids pid alive
    pids="$(job_pids | tr '\n' ' ')"
    [[ -n "${pids// /}" ]] || return 0
    log "terminating leftover job processes: $pids"
    # shellcheck disable=SC2086
    kill -TERM $pids 2>/dev/null || true
    for _ in $(seq 30); do
        alive=""
        for pid in $pids; do
            # a zombie (state Z) is dead; whoever is its parent reaps it
            [[ -r "/proc/$pid/stat" ]] && [[ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ]] && alive+="$pid "
        done
        [[ -n "$alive" ]] || return 0
        sleep 0.1
    done
    # shellcheck disable=SC2086
    kill -KILL $alive 2>/dev/null || true
}

stop() {
    # Jobs first (scancel through the controller; stopping slurmd alone leaves slurmstepd and the job's
    # processes running), then the node daemon, the controller and munged, then any job process that
    # survived (slurmstepd of this cluster and everything below it).
    cancel_jobs
    stop_one slurmd
    stop_one slurmctld
    stop_one munged
    kill_job_processes
    log "stopped (state and logs kept in $DIR)"
}

status() {
    if running; then
        log "running in $DIR"
        echo "export SLURM_CONF=$CONF"
        SLURM_CONF="$CONF" sinfo -N >&2 || true
        return 0
    fi
    local some=""
    for name in munged slurmctld slurmd; do
        if pid="$(our_pid "$DIR/$name.pid")"; then some+=" $name($pid)"; fi
    done
    log "stopped${some:+ (partly running:$some; run stop, then start)}"
    return 3
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status   (state folder: \${LOCAL_SLURM_DIR:-/tmp/redi-bench-slurm})" >&2; exit 2 ;;
esac
