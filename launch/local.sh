#!/usr/bin/env bash
# Runs one command as N cooperating JAX processes on this machine (over loopback).
#
#   launch/local.sh N [--cpu-devices K] [--port P] -- jaxsft train CONFIG --set ...
#
# Each process gets JAXSFT_COORDINATOR / JAXSFT_NUM_PROCESSES / JAXSFT_PROCESS_ID, which
# `jaxsft train` reads to join the job (jaxsft/train/distributed.py). --cpu-devices gives
# each process K fake CPU devices (for trying meshes without accelerators). Output of
# process i goes to its log file (LOG_DIR, default ./launch-logs/process_i.log) and,
# for process 0, to the terminal too. If one process fails, the others are stopped.
set -euo pipefail

usage() { echo "usage: $0 N [--cpu-devices K] [--port P] -- COMMAND..." >&2; exit 2; }
[ $# -ge 1 ] || usage
n=$1; shift
[[ "$n" =~ ^[1-9][0-9]*$ ]] || usage
cpu_devices=""; port=${PORT:-$((20000 + RANDOM % 20000))}
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
  case "$1" in
    --cpu-devices) cpu_devices=$2; shift 2 ;;
    --port) port=$2; shift 2 ;;
    *) usage ;;
  esac
done
[ "${1:-}" = "--" ] || usage
shift
[ $# -gt 0 ] || usage

log_dir=${LOG_DIR:-launch-logs}
mkdir -p "$log_dir"
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; }
trap cleanup INT TERM

for ((i = 0; i < n; i++)); do
  (
    export JAXSFT_COORDINATOR="127.0.0.1:$port" JAXSFT_NUM_PROCESSES="$n" JAXSFT_PROCESS_ID="$i"
    if [ -n "$cpu_devices" ]; then
      export JAX_PLATFORMS=cpu XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$cpu_devices"
    fi
    if [ "$i" -eq 0 ]; then
      exec "$@" > >(tee "$log_dir/process_$i.log") 2>&1
    else
      exec "$@" > "$log_dir/process_$i.log" 2>&1
    fi
  ) &
  pids+=($!)
done

status=0
for i in "${!pids[@]}"; do
  if ! wait "${pids[$i]}"; then
    echo "launch/local.sh: process $i failed (see $log_dir/process_$i.log)" >&2
    status=1
    cleanup
  fi
done
exit $status
