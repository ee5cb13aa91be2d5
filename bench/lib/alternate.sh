# bench/lib/alternate.sh — sourced by the scripts that alternate a few servers on one fio workload
# (bench/ceiling/run.sh, bench/qd1/placement.sh): a work directory on /dev/shm with a 1 GiB random source
# image, the server PID in SRV stopped (and the directory removed) on any exit, and two helpers.
#   bench_setup NAME   sets WORK (/dev/shm/nbdmirror-NAME.XXXXXX) and SRV="", installs the traps, writes
#                      $WORK/src.img
#   up URI             waits (bounded) until the server answers nbdinfo
#   cpu PID            utime+stime of the process, in clock ticks

bench_setup() {
  WORK=$(mktemp -d "/dev/shm/nbdmirror-$1.XXXXXX")
  SRV=""
  trap bench_cleanup EXIT
  trap 'exit 130' INT TERM
  head -c 1G /dev/urandom > "$WORK/src.img"
}

bench_cleanup() { [[ -n $SRV ]] && kill "$SRV" 2>/dev/null && wait "$SRV" 2>/dev/null; rm -rf "$WORK"; }

up() { for _ in $(seq 100); do timeout 3 nbdinfo --size "$1" >/dev/null 2>&1 && return 0; sleep 0.1; done; echo "server did not come up: $1" >&2; return 1; }
cpu() { awk '{print $14+$15}' "/proc/$1/stat"; }
