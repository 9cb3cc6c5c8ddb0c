#!/usr/bin/env bash
# Functions shared by the SLURM scripts (sourced, not run). The batch scripts find it through the
# project root (project_root in each of them), node_launch.sh next to itself.

# wait_for_exit PID: sets `status` to the real exit status of background process PID. A trapped
# signal interrupts `wait` (status > 128) while the process runs on; the callers' traps set
# signal_arrived=1, and this then waits again (bash keeps a finished child's status for that wait).
wait_for_exit() {
  local pid=$1 again
  signal_arrived=0
  status=0
  wait "$pid" || status=$?
  while [ "$status" -gt 128 ] && [ "$signal_arrived" = 1 ]; do
    signal_arrived=0
    again=0
    wait "$pid" 2>/dev/null || again=$?
    if [ "$again" = 127 ] && ! kill -0 "$pid" 2>/dev/null; then
      return 0  # the process had ended by itself before the signal: the first status was real
    fi
    status=$again
  done
}

# processes_per_node: GPUS_PER_NODE when set; under SLURM the GPUs allocated on this node
# (SLURM_GPUS_ON_NODE), or 1 for an allocation without GPUs; outside SLURM nvidia-smi's count.
processes_per_node() {
  local count
  if [ -n "${GPUS_PER_NODE:-}" ]; then
    count=$GPUS_PER_NODE
  elif [ -n "${SLURM_JOB_ID:-}" ]; then
    count=${SLURM_GPUS_ON_NODE:-1}
  else
    count=$( (nvidia-smi -L 2>/dev/null || true) | wc -l)
  fi
  if ! [ "$count" -ge 1 ] 2>/dev/null; then
    count=1
  fi
  echo "$count"
}

# in_project PATH [ROOT]: PATH as given when it exists from here (the submit directory) or is
# absolute, else ROOT/PATH (so `configs/...` and `accelerate_configs/...` work from anywhere).
in_project() {
  if [ -e "$1" ] || [ "${1#/}" != "$1" ] || [ ! -e "$2/$1" ]; then
    echo "$1"
  else
    echo "$2/$1"
  fi
}

# output_dir_of CONFIG [OVERRIDES...]: the run's output_dir, as the trainer resolves it.
output_dir_of() {
  python -c 'import sys; from tricoclr.config import load_config; print(load_config(sys.argv[1], sys.argv[2:])["output_dir"])' "$@"
}
