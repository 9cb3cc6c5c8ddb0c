#!/usr/bin/env bash
# One `accelerate launch` on this node; a SIGUSR1 (SLURM's warning before the time limit) is
# forwarded to the training processes, which checkpoint at the next optimizer step, write
# OUTPUT_DIR/PREEMPTED and exit. Usage: node_launch.sh NUM_MACHINES MACHINE_RANK MAIN_ADDR PORT -- train args...
set -euo pipefail
num_machines=$1 machine_rank=$2 main_addr=$3 main_port=$4
shift 4
[ "${1:-}" = "--" ] && shift
gpus_per_node=${GPUS_PER_NODE:-$(nvidia-smi -L 2>/dev/null | wc -l)}
[ "$gpus_per_node" -ge 1 ] || gpus_per_node=1
config_file=${ACCELERATE_CONFIG:-accelerate_configs/1node_8gpu.yaml}

accelerate launch --config_file "$config_file" \
  --num_machines "$num_machines" --machine_rank "$machine_rank" \
  --num_processes $((num_machines * gpus_per_node)) \
  --main_process_ip "$main_addr" --main_process_port "$main_port" \
  tricoclr/train.py "$@" &
launcher=$!

# shellcheck disable=SC2329  # invoked by the trap below
forward_usr1() {
  echo "node $machine_rank: SIGUSR1 received, asking the trainers to checkpoint" >&2
  pkill -USR1 -P "$launcher" || true
}
trap forward_usr1 USR1
# `wait` returns early when a trapped signal arrives: keep waiting until the launcher exits.
status=0
while kill -0 "$launcher" 2>/dev/null; do
  wait "$launcher" || status=$?
done
exit "$status"
