#!/usr/bin/env bash
# One `accelerate launch` on this node:
#   node_launch.sh NUM_MACHINES MACHINE_RANK MAIN_ADDR MAIN_PORT -- TRAIN_ARGS...
# Environment: GPUS_PER_NODE (processes on this node; default: the GPUs SLURM allocated here, 1
# without GPUs, nvidia-smi's count outside SLURM), ACCELERATE_CONFIG (default
# accelerate_configs/1node_8gpu.yaml), TRICOCLR_PREEMPT_FILE (set by the batch scripts).
#
# Signals: under SLURM a warning (SIGUSR1) or a SIGTERM may reach every process of the step at any
# time (srun and scancel signal the whole step under proctrack/linuxproc and /cgroup). This script
# records it in TRICOCLR_PREEMPT_FILE (the trap is its first command); the launcher ignores both (inherited
# through exec: it would die of USR1, and torchrun's agent stops its workers on TERM), so the
# trainers, which inherit the ignore until tricoclr/train.py installs its handlers, checkpoint at
# the next step and exit 0. The script then returns the launcher's real exit status.
# shellcheck disable=SC2016  # expanded when the trap runs
trap 'signal_arrived=1; [ -z "${TRICOCLR_PREEMPT_FILE:-}" ] || : 2>/dev/null >"$TRICOCLR_PREEMPT_FILE" || true' USR1 TERM
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=slurm/common.sh
source "$here/common.sh"
root=$(dirname "$here")
num_machines=$1 machine_rank=$2 main_addr=$3 main_port=$4
shift 4
[ "${1:-}" = "--" ] && shift

# On the other nodes of a multi-node job the request file's folder (made on the batch node) does
# not exist: make it here, so a signal this node's processes get is kept for its trainers too.
made_request_dir=""
if [ -n "${TRICOCLR_PREEMPT_FILE:-}" ] && [ ! -d "$(dirname "$TRICOCLR_PREEMPT_FILE")" ]; then
  made_request_dir=$(dirname "$TRICOCLR_PREEMPT_FILE")
  mkdir -p "$made_request_dir"
  trap 'rm -rf "$made_request_dir"' EXIT
fi

processes=$(processes_per_node)
config_file=$(in_project "${ACCELERATE_CONFIG:-accelerate_configs/1node_8gpu.yaml}" "$root")
echo "node $machine_rank: $processes process(es), accelerate config $config_file" >&2

(
  trap '' USR1 TERM
  # torchrun's agent (accelerate's multi-process launcher) handles these by stopping its workers:
  # leave SIGTERM out (PET_ variable: torch's launcher option; the other: older versions).
  export PET_SIGNALS_TO_HANDLE=SIGINT,SIGHUP,SIGQUIT TORCHELASTIC_SIGNALS_TO_HANDLE=SIGINT,SIGHUP,SIGQUIT
  exec accelerate launch --config_file "$config_file" \
    --num_machines "$num_machines" --machine_rank "$machine_rank" \
    --num_processes $((num_machines * processes)) \
    --main_process_ip "$main_addr" --main_process_port "$main_port" \
    "$root/tricoclr/train.py" "$@"
) &
wait_for_exit $!
echo "node $machine_rank: launcher exited with status $status" >&2
exit "$status"
