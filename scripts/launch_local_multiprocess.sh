#!/usr/bin/env bash
# Runs N train.py processes on this machine as one multi-process JAX job:
#
#   bash scripts/launch_local_multiprocess.sh 2 --config=configs/demo.py:mha,tiny \
#       --workdir=runs/mp-demo
#
# The first argument is the number of processes; the rest go to train.py.
# Each process gets LOCAL_DEVICES (default 2) fake CPU devices and the job's
# coordinator listens on a free port of localhost; CPU collectives use gloo.
# Process i writes its output to $LOG_DIR/process_<i>.log (process 0's is
# also printed) and its PID to $LOG_DIR/process_<i>.pid. SIGTERM or SIGINT
# to this script is passed on to every process: they stop together at the
# next log boundary and save a checkpoint. Exits with the first nonzero exit
# status, in process order, or 0.
set -uo pipefail
if [[ $# -lt 1 || ! "$1" =~ ^[0-9]+$ || "$1" -lt 1 ]]; then
  echo "usage: $0 NUM_PROCESSES [train.py flags...]" >&2
  exit 2
fi
num_processes=$1
shift
cd "$(dirname "$0")/.."
python=${PYTHON:-python}
log_dir=${LOG_DIR:-$(mktemp -d -t mqa-mp-XXXXXX)}
mkdir -p "$log_dir"
port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])')
echo "launching $num_processes processes, coordinator localhost:$port, logs in $log_dir" >&2

pids=()
for ((i = 0; i < num_processes; i++)); do
  JAX_COORDINATOR_ADDRESS=localhost:$port JAX_NUM_PROCESSES=$num_processes \
  JAX_PROCESS_ID=$i JAX_PLATFORMS=${JAX_PLATFORMS:-cpu} \
  JAX_CPU_COLLECTIVES_IMPLEMENTATION=${JAX_CPU_COLLECTIVES_IMPLEMENTATION:-gloo} \
  XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${LOCAL_DEVICES:-2}" \
    "$python" train.py "$@" >"$log_dir/process_$i.log" 2>&1 &
  pids+=($!)
  echo $! >"$log_dir/process_$i.pid"
done
forward() { kill -s "$1" "${pids[@]}" 2>/dev/null; }
trap 'forward TERM' TERM
trap 'forward INT' INT
tail -n +1 -f --pid="${pids[0]}" "$log_dir/process_0.log" &

status=0
for ((i = 0; i < num_processes; i++)); do
  # `wait` returns early when a trapped signal arrives: wait again.
  while true; do
    wait "${pids[$i]}"
    code=$?
    kill -0 "${pids[$i]}" 2>/dev/null || break
  done
  echo "process $i exited with status $code" >&2
  if [[ $status -eq 0 && $code -ne 0 ]]; then status=$code; fi
done
wait
exit $status
