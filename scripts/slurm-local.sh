#!/usr/bin/env bash
# A real single-node SLURM on this machine, for tests and for trying `--launcher slurm` locally.
#
#   bash scripts/slurm-local.sh install        install the Debian packages if missing (root + apt-get)
#   bash scripts/slurm-local.sh start  [DIR]   install (as above), start, wait until the node is idle
#   bash scripts/slurm-local.sh status [DIR]   exit 0 when the node answers and is usable
#   bash scripts/slurm-local.sh stop   [DIR]   stop the daemons started from DIR
#
# DIR (default /tmp/marginlab-slurm, or $MARGINLAB_SLURM_DIR) holds everything: slurm.conf, a private
# munge key and socket, state, spool, logs and pid files, so it never touches /etc/slurm or a system
# munged. The node is `hostname -s` at 127.0.0.1 with `nproc` CPUs and 90% of the RAM, one default
# partition `debug`, no accounting database (sacct is unavailable; squeue/scontrol are not).
# Daemons run directly as root (no systemd), with process tracking by /proc (no cgroups in containers).
# `start` is idempotent: a running cluster is reused. On success its last line is `export SLURM_CONF=...`.
set -euo pipefail
# The daemons live in /usr/sbin, which a non-login shell's PATH may lack.
export PATH="$PATH:/usr/sbin:/sbin"

cmd=${1:-}
DIR=${2:-${MARGINLAB_SLURM_DIR:-/tmp/marginlab-slurm}}
CONF=$DIR/slurm.conf
WAIT_S=${MARGINLAB_SLURM_WAIT_S:-60}

die() { echo "slurm-local: $*" >&2; exit 1; }
# Exit 3: SLURM cannot run here at all (missing and not installable, or not root); the tests skip on it.
cannot() { echo "slurm-local: $*" >&2; exit 3; }

have_packages() { command -v slurmctld >/dev/null && command -v slurmd >/dev/null &&
  command -v sbatch >/dev/null && command -v munged >/dev/null; }

install_packages() {
  have_packages && return 0
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    cannot "SLURM is not installed and this is not root with apt-get: run 'sudo apt-get install slurm-wlm munge'"
  fi
  echo "slurm-local: installing Debian packages slurmctld slurmd slurm-client munge..." >&2
  # The parts of slurm-wlm we use, without the ~30 optional plugin packages (hdf5, influxdb, rocm...)
  # that the metapackage and slurm-wlm-basic-plugins' Recommends pull in.
  local pkgs="slurmctld slurmd slurm-client munge"
  export DEBIAN_FRONTEND=noninteractive
  # shellcheck disable=SC2086
  (apt-get install -y -q --no-install-recommends $pkgs >/dev/null 2>&1 ||
    { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends $pkgs >/dev/null 2>&1; }) ||
    cannot "could not install $pkgs with apt-get"
  have_packages || die "installed $pkgs but slurmctld/slurmd/munged are still missing"
}

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1" 2>/dev/null)" 2>/dev/null; }

# Node state as sinfo prints it (idle, mix, alloc, down*, drain...), or nothing when slurmctld is down.
# sinfo retries for MessageTimeout when slurmctld is not listening (yet): cap it.
node_state() { SLURM_CONF=$CONF timeout 3 sinfo -h -N -o '%t' 2>/dev/null | head -n1; }

usable() { case "$(node_state)" in idle* | mix* | alloc* | comp*) return 0 ;; *) return 1 ;; esac; }

start_munge() {
  mkdir -p "$DIR/munge"
  chmod 755 "$DIR/munge" # the socket must be reachable by any user; the key stays 0400
  if [ ! -s "$DIR/munge/munge.key" ]; then
    # 1024 random bytes, what mungekey(8) writes by default.
    head -c 1024 /dev/urandom >"$DIR/munge/munge.key"
  fi
  chmod 400 "$DIR/munge/munge.key"
  pid_alive "$DIR/munge/munged.pid" && return 0
  rm -f "$DIR/munge/munge.socket" "$DIR/munge/munge.socket.lock"
  # --force: munged refuses to run as root (or with a key outside /etc/munge) without it.
  munged --force --socket="$DIR/munge/munge.socket" --key-file="$DIR/munge/munge.key" \
    --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/log/munged.log" \
    --seed-file="$DIR/munge/munged.seed" 9>&- || die "munged did not start (see $DIR/log/munged.log)"
}

write_conf() {
  local host cpus mem_mb
  host=$(hostname -s)
  cpus=$(nproc)
  mem_mb=$(($(awk '/^MemTotal:/ {print $2}' /proc/meminfo) * 9 / 10 / 1024))
  cat >"$CONF.tmp" <<EOF
# Written by scripts/slurm-local.sh: a single-node SLURM for tests (state and logs under $DIR).
ClusterName=marginlab
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket=$DIR/munge/munge.socket,cred_expire=5
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldPort=${MARGINLAB_SLURMCTLD_PORT:-6817}
SlurmdPort=${MARGINLAB_SLURMD_PORT:-6818}
# No cgroups in containers: track job processes through /proc and bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
MpiDefault=none
# Trust the numbers below rather than the hardware probe (containers report odd topologies).
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
# A job asking more than the node has is rejected at submission instead of pending forever.
EnforcePartLimits=ALL
# Short timeouts: a test cluster must react in seconds.
SlurmctldTimeout=30
SlurmdTimeout=30
MessageTimeout=10
InactiveLimit=0
KillWait=5
MinJobAge=600
# Schedule a submitted job at once (defaults wait up to ~1.3 s per job here).
SchedulerParameters=sched_interval=2,batch_sched_delay=0,sched_min_interval=0
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
# DefMemPerCPU: a job without --mem gets its share, not the whole node (which would run jobs one at a time).
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO DefMemPerCPU=$((mem_mb / cpus))
EOF
  mv "$CONF.tmp" "$CONF"
}

start() {
  install_packages
  mkdir -p "$DIR"/{state,spool,log,run}
  # Two test sessions starting at once must not both start daemons.
  exec 9>"$DIR/.lock"
  # (the daemons are started with fd 9 closed, or they would hold the lock for their lifetime)
  flock -w 120 9 || die "could not lock $DIR/.lock within 120 s"
  if pid_alive "$DIR/run/slurmctld.pid" && pid_alive "$DIR/run/slurmd.pid" && usable; then
    echo "slurm-local: already running ($(node_state))" >&2
    echo "export SLURM_CONF=$CONF"
    return 0
  fi
  [ "$(id -u)" = 0 ] || cannot "starting slurmctld and slurmd needs root (SlurmUser=root)"
  start_munge
  write_conf
  export SLURM_CONF=$CONF
  # -c: a fresh controller state (stale jobs from an earlier life of DIR are dropped).
  pid_alive "$DIR/run/slurmctld.pid" || slurmctld -c -f "$CONF" 9>&- || die "slurmctld did not start (see $DIR/log/slurmctld.log)"
  pid_alive "$DIR/run/slurmd.pid" || slurmd -f "$CONF" 9>&- || die "slurmd did not start (see $DIR/log/slurmd.log)"
  local waited=0
  until usable; do
    if [ "$waited" -ge "$WAIT_S" ]; then
      die "node not idle after ${WAIT_S}s (state '$(node_state)'); see $DIR/log/slurmctld.log and slurmd.log"
    fi
    # A node that registered as down (an earlier crash) is put back into service.
    case "$(node_state)" in down* | drain* | fail*)
      scontrol update NodeName="$(hostname -s)" State=RESUME >/dev/null 2>&1 || true ;;
    esac
    sleep 1
    waited=$((waited + 1))
  done
  echo "slurm-local: node $(hostname -s) $(node_state) after ${waited}s; logs in $DIR/log" >&2
  echo "export SLURM_CONF=$CONF"
}

stop_pid() {
  local f=$1 i
  pid_alive "$f" || { rm -f "$f"; return 0; }
  kill "$(cat "$f")" 2>/dev/null || true
  for i in $(seq 50); do pid_alive "$f" || break; sleep 0.1; done
  pid_alive "$f" && kill -9 "$(cat "$f" 2>/dev/null)" 2>/dev/null
  rm -f "$f"
}

stop() {
  stop_pid "$DIR/run/slurmd.pid"
  stop_pid "$DIR/run/slurmctld.pid"
  stop_pid "$DIR/munge/munged.pid"
  echo "slurm-local: stopped ($DIR)" >&2
}

status() {
  have_packages || die "SLURM is not installed"
  [ -f "$CONF" ] || die "no cluster in $DIR (run: $0 start $DIR)"
  pid_alive "$DIR/run/slurmctld.pid" || die "slurmctld is not running ($DIR)"
  pid_alive "$DIR/run/slurmd.pid" || die "slurmd is not running ($DIR)"
  usable || die "node $(hostname -s) is not usable (state '$(node_state)')"
  echo "slurm-local: running, node $(hostname -s) $(node_state); export SLURM_CONF=$CONF"
}

case "$cmd" in
  install) install_packages ;;
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 install | start|stop|status [DIR]" >&2; exit 2 ;;
esac
