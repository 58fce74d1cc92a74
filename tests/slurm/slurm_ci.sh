#!/usr/bin/env bash
# The project's single-machine SLURM for CI (after shared/slurm/ci-slurm.sh, the tested reference).
# Single-node SLURM (Debian 12 "bookworm" slurm-wlm 22.05 + munge) for CI tests.
# Runs as root, needs no systemd, no cgroups, no accounting DB, no network
# beyond the Debian mirror. All state/logs/sockets live under $SLURM_CI_DIR.
#
#   source recipe.sh
#   slurm_ci_install          # apt-get install (about 10-15 s)
#   slurm_ci_start            # munged + slurmctld + slurmd, waits for node idle (about 1-2 s)
#   export SLURM_CONF=$SLURM_CI_DIR/etc/slurm.conf   # done by slurm_ci_start too
#   trap slurm_ci_stop EXIT   # recommended in .ci/run
#   ... tests: sbatch / srun / squeue / scontrol / scancel ...
#   slurm_ci_stop             # kills the daemons by PID (from their pid files), ~2 s
#
#   bash tests/slurm/slurm_ci.sh install | start | stop
#
# Notes
#  * Clients find the cluster via SLURM_CONF (exported here). Tests that
#    spawn sbatch must inherit it, or set SLURM_CI_SYSTEM_CONF=1 to also
#    symlink /etc/slurm/slurm.conf -> our config.
#  * A requeued job waits cred_expire seconds before it may start again;
#    we set cred_expire=10 (Slurm's default is 120).
#  * scancel --signal=USR1 JOBID signals job steps only; add --batch to hit
#    the batch shell. --signal=B:USR1@N may fire up to ~60 s early.

SLURM_CI_DIR=${SLURM_CI_DIR:-/tmp/slurm-ci}   # keep short: unix socket path < 108 chars
# SLURM_CI_NODES=N (N>1) emulates N nodes c[1-N] on this one machine with one
# slurmd per node (Debian's build supports multiple slurmd); each gets all CPUs.
SLURM_CI_NODES=${SLURM_CI_NODES:-1}

slurm_ci_install() {
    local added_policy=0
    export DEBIAN_FRONTEND=noninteractive
    # Keep package postinst scripts from trying to start the services.
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        added_policy=1
    fi
    [ "${SLURM_CI_APT_UPDATE:-1}" = 1 ] && apt-get update -q
    apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge
    local rc=$?
    [ $added_policy = 1 ] && rm -f /usr/sbin/policy-rc.d
    return $rc
}

_slurm_ci_write_conf() {
    local host node_line mem
    host=$(hostname -s)
    # e.g. "NodeName=vm CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=24105"
    node_line=$(slurmd -C | head -n1)
    mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$node_line")
    mem=$(( mem * 90 / 100 ))                      # advertise a bit less than real
    local d=$SLURM_CI_DIR n=$SLURM_CI_NODES sd_spool=$SLURM_CI_DIR/state/d sd_pid=$SLURM_CI_DIR/run/slurmd.pid sd_log=$SLURM_CI_DIR/log/slurmd.log
    if [ "$n" -gt 1 ]; then
        mem=$(( mem / n ))
        node_line=$(sed "s/RealMemory=[0-9]*/RealMemory=$mem/; s/^NodeName=[^ ]*/NodeName=c[1-$n] NodeHostname=$host NodeAddr=127.0.0.1 Port=17001-$((17000 + n))/" <<<"$node_line")
        sd_spool=$d/state/d-%n; sd_pid=$d/run/slurmd-%n.pid; sd_log=$d/log/slurmd-%n.log
    else
        node_line=$(sed "s/RealMemory=[0-9]*/RealMemory=$mem/; s/^NodeName=[^ ]*/NodeName=$host NodeAddr=127.0.0.1/" <<<"$node_line")
    fi
    cat > "$d/etc/slurm.conf" <<EOF
ClusterName=ci
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=${SLURM_CI_CTLD_PORT:-6817}
SlurmdPort=${SLURM_CI_SLURMD_PORT:-6818}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$d/munge/munge.socket.2,cred_expire=10
StateSaveLocation=$d/state/ctld
SlurmdSpoolDir=$sd_spool
SlurmctldPidFile=$d/run/slurmctld.pid
SlurmdPidFile=$sd_pid
SlurmctldLogFile=$d/log/slurmctld.log
SlurmdLogFile=$sd_log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=2
MpiDefault=none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MailProg=/bin/true
ReturnToService=2
InactiveLimit=0
KillWait=5
MinJobAge=300
SlurmctldTimeout=30
SlurmdTimeout=30
$node_line State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

slurm_ci_start() {
    local d=$SLURM_CI_DIR i
    mkdir -p "$d"/{etc,state/ctld,state/d,run,log,munge}
    # munged: socket dir must be o+x and not group/other-writable; key 0600 owned by munge
    chown munge:munge "$d/munge"; chmod 755 "$d/munge"
    if [ ! -s "$d/munge/munge.key" ]; then
        mungekey -c -k "$d/munge/munge.key" || return 1
        chown munge:munge "$d/munge/munge.key"; chmod 600 "$d/munge/munge.key"
    fi
    runuser -u munge -- munged \
        --socket="$d/munge/munge.socket.2" --key-file="$d/munge/munge.key" \
        --log-file="$d/munge/munged.log" --pid-file="$d/munge/munged.pid" \
        --seed-file="$d/munge/munged.seed" || { cat "$d/munge/munged.log"; return 1; }

    _slurm_ci_write_conf
    export SLURM_CONF=$d/etc/slurm.conf
    if [ "${SLURM_CI_SYSTEM_CONF:-0}" = 1 ]; then
        mkdir -p /etc/slurm; ln -sf "$SLURM_CONF" /etc/slurm/slurm.conf
    fi
    # Both daemons fork into the background and write their pid files.
    slurmctld -f "$SLURM_CONF" || { tail -n 30 "$d/log/slurmctld.log"; return 1; }
    if [ "$SLURM_CI_NODES" -gt 1 ]; then
        for i in $(seq 1 "$SLURM_CI_NODES"); do
            slurmd -N "c$i" -f "$SLURM_CONF" || { tail -n 30 "$d/log/slurmd-c$i.log"; return 1; }
        done
    else
        slurmd -f "$SLURM_CONF" || { tail -n 30 "$d/log/slurmd.log"; return 1; }
    fi

    local ready
    for i in $(seq 1 120); do                      # up to 60 s
        ready=$(sinfo -h -N -o %t 2>/dev/null | grep -cE '^(idle|mix|alloc)$')
        if [ "$ready" -ge "$SLURM_CI_NODES" ]; then
            echo "slurm_ci: $ready node(s) ready ($SLURM_CONF)"; return 0
        fi
        sleep 0.5
    done
    echo "slurm_ci: node(s) did not become idle" >&2
    sinfo -N -l; tail -n 30 "$d"/log/*.log
    return 1
}

slurm_ci_stop() {
    local d=$SLURM_CI_DIR f pid pids="" i
    for f in "$d"/run/slurmd*.pid "$d/run/slurmctld.pid" "$d/munge/munged.pid"; do
        [ -s "$f" ] || continue
        pid=$(cat "$f")
        case "$(cat /proc/"$pid"/comm 2>/dev/null)" in slurmd|slurmctld|munged) ;; *) continue ;; esac  # stale pid file
        kill -TERM "$pid" && pids="$pids $pid" && echo "slurm_ci: TERM $(basename "$f" .pid) (pid $pid)"
    done
    for pid in $pids; do                           # each takes ~2 s; wait up to 15 s
        for i in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
        kill -0 "$pid" 2>/dev/null && { echo "slurm_ci: KILL $pid"; kill -KILL "$pid"; }
    done
    return 0
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    case "${1:-}" in
        install) slurm_ci_install ;;
        start) slurm_ci_start ;;
        stop) slurm_ci_stop ;;
        *) echo "usage: $0 {install|start|stop}" >&2; exit 2 ;;
    esac
fi
