#!/usr/bin/env bash
# A real one-node SLURM on this machine, for tests (root, Debian, after slurm/install.sh).
#
#   bash slurm/cluster.sh start    start munged, MariaDB, slurmdbd, slurmctld, slurmd (idempotent);
#                                  returns when `sinfo` shows the node idle and `sacct` answers
#   bash slurm/cluster.sh stop     stop the daemons this script started (by their pid files)
#   bash slurm/cluster.sh status   print daemon pids, `sinfo` and `sacct`; exit 0 only when usable
#
# The node is this host (`hostname -s`) with its CPUs as the consumable resource
# (select/cons_tres, CR_CPU): a job asking for more CPUs than the machine has pends forever.
# Processes are tracked through /proc (proctrack/linuxproc), no cgroups, no task binding,
# so it runs in containers. KillOnBadExit=1: a task that exits non-zero or is killed ends
# the whole step, so a lost rank never leaves its peers waiting.
# Accounting goes through slurmdbd to MariaDB, so `sacct` works (submitit reads job states
# with it). Everything runs as root; logs are in $HALO_SLURM_LOG (default /var/log/slurm).
set -euo pipefail

ETC=/etc/slurm                      # Debian's slurm-wlm reads /etc/slurm/slurm.conf
LOG=${HALO_SLURM_LOG:-/var/log/slurm}
RUN=/run/halo-slurm                 # pid files of the daemons started here
CLUSTER=halo
NODE=$(hostname -s)
DBPASS=halo-slurm-test              # local test database only, listens on 127.0.0.1

log() { echo "cluster.sh: $*" >&2; }

alive() {  # alive NAME: the daemon recorded in $RUN/NAME.pid is running
    local f="$RUN/$1.pid"
    [ -s "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local limit=$1 what=$2; shift 2
    local end=$((SECONDS + limit))
    until "$@" >/dev/null 2>&1; do
        if [ $SECONDS -ge $end ]; then
            log "timed out after ${limit}s waiting for $what"
            return 1
        fi
        sleep 0.3
    done
}

write_configs() {
    local cpus mem
    cpus=$(nproc --all)
    # RealMemory a bit below the machine's, so slurmd never marks the node invalid.
    mem=$(( $(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo) - 512 ))
    mkdir -p "$ETC" "$LOG" /var/spool/slurmctld /var/spool/slurmd
    cat > "$ETC/slurm.conf.new" <<EOF
# Written by halo slurm/cluster.sh: a one-node test cluster.
ClusterName=$CLUSTER
SlurmctldHost=$NODE
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
ReturnToService=2
KillOnBadExit=1
KillWait=5
Waittime=0
InactiveLimit=0
MinJobAge=300
SlurmctldTimeout=30
SlurmdTimeout=60
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
NodeName=$NODE CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
    mv "$ETC/slurm.conf.new" "$ETC/slurm.conf"
    umask 077
    cat > "$ETC/slurmdbd.conf" <<EOF
# Written by halo slurm/cluster.sh.
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$DBPASS
StorageLoc=slurm_acct_db
LogFile=$LOG/slurmdbd.log
PidFile=$RUN/slurmdbd.pid
EOF
    umask 022
    chmod 600 "$ETC/slurmdbd.conf"
}

start_munge() {
    alive munged && return 0
    mkdir -p /run/munge /var/lib/munge /var/log/munge /etc/munge
    if [ ! -s /etc/munge/munge.key ]; then
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown -R munge:munge /run/munge /var/lib/munge /var/log/munge /etc/munge
    chmod 0400 /etc/munge/munge.key
    chmod 0755 /run/munge
    rm -f /run/munge/munged.pid
    runuser -u munge -- /usr/sbin/munged --force 2>>"$LOG/munged.log"
    wait_for 10 munged test -s /run/munge/munged.pid
    cp /run/munge/munged.pid "$RUN/munged.pid"
    wait_for 10 "munge round trip" bash -c 'munge -n | unmunge'
}

start_mariadb() {
    if ! alive mariadbd; then
        mkdir -p /run/mysqld
        chown mysql:mysql /run/mysqld
        rm -f /run/mysqld/mysqld.pid
        if [ ! -d /var/lib/mysql/mysql ]; then
            mariadb-install-db --user=mysql --datadir=/var/lib/mysql >>"$LOG/mariadb.log" 2>&1
        fi
        setsid /usr/sbin/mariadbd --user=mysql --datadir=/var/lib/mysql \
            --socket=/run/mysqld/mysqld.sock --bind-address=127.0.0.1 \
            --pid-file=/run/mysqld/mysqld.pid >>"$LOG/mariadb.log" 2>&1 < /dev/null &
        wait_for 60 mariadb mysqladmin --socket=/run/mysqld/mysqld.sock ping
        cp /run/mysqld/mysqld.pid "$RUN/mariadbd.pid"
    fi
    mysql --socket=/run/mysqld/mysqld.sock -u root <<EOF
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DBPASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
FLUSH PRIVILEGES;
EOF
}

start_slurmdbd() {
    alive slurmdbd && return 0
    /usr/sbin/slurmdbd
    wait_for 30 slurmdbd sacctmgr -n list cluster
}

register() {  # cluster, account and user in the accounting database
    if [ -z "$(sacctmgr -n -P list cluster "$CLUSTER" format=cluster </dev/null)" ]; then
        sacctmgr -i add cluster "$CLUSTER" >/dev/null
    fi
    if [ -z "$(sacctmgr -n -P list account halo format=account </dev/null)" ]; then
        sacctmgr -i add account halo cluster="$CLUSTER" description=halo organization=halo >/dev/null
    fi
    if [ -z "$(sacctmgr -n -P list assoc user=root account=halo format=user </dev/null)" ]; then
        sacctmgr -i add user root account=halo cluster="$CLUSTER" >/dev/null
    fi
}

node_idle() {
    local state
    state=$(sinfo -h -n "$NODE" -o %T 2>/dev/null)
    case "$state" in
        idle|mixed|allocated) return 0 ;;
        *) return 1 ;;
    esac
}

start_slurm() {
    if ! alive slurmctld; then
        /usr/sbin/slurmctld
        wait_for 30 slurmctld scontrol ping
    fi
    if ! alive slurmd; then
        /usr/sbin/slurmd
    fi
    local end=$((SECONDS + 60))
    until node_idle; do
        case "$(sinfo -h -n "$NODE" -o %T 2>/dev/null)" in
            down*|drain*|fail*) scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true ;;
        esac
        if [ $SECONDS -ge $end ]; then
            log "node $NODE not idle after 60s: $(sinfo -h -n "$NODE" -o '%T %E' 2>&1)"
            return 1
        fi
        sleep 0.3
    done
    wait_for 30 sacct sacct -n -X -S now-1minute
}

usable() {
    alive munged && alive mariadbd && alive slurmdbd && alive slurmctld && alive slurmd \
        && node_idle && sacct -n -X -S now-1minute >/dev/null 2>&1
}

start() {
    if [ "$(id -u)" != 0 ]; then
        log "must run as root"; exit 1
    fi
    mkdir -p "$RUN" "$LOG"
    if usable; then
        return 0
    fi
    write_configs
    start_munge
    start_mariadb
    start_slurmdbd
    register
    start_slurm
    log "SLURM cluster '$CLUSTER' up on node $NODE ($(nproc --all) CPUs)"
}

stop_one() {  # stop_one NAME: TERM the recorded pid, wait, then KILL
    local f="$RUN/$1.pid" pid
    [ -s "$f" ] || return 0
    pid=$(cat "$f")
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 1 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.2
        done
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$f"
}

stop() {
    # Reverse start order; running jobs are killed with their slurmd's steps.
    scancel --user=root >/dev/null 2>&1 || true
    for d in slurmd slurmctld slurmdbd mariadbd munged; do
        stop_one "$d"
    done
}

status() {
    local d
    for d in munged mariadbd slurmdbd slurmctld slurmd; do
        if alive "$d"; then echo "$d: running (pid $(cat "$RUN/$d.pid"))"; else echo "$d: stopped"; fi
    done
    sinfo 2>&1 || true
    sacct -n -X -S now-1hour 2>&1 | tail -n 5 || true
    usable
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
