#!/usr/bin/env bash
# One `accelerate launch` on this node. A SIGUSR1 (SLURM's warning ahead of the time limit) is
# forwarded to the training processes themselves, which checkpoint at the next optimizer step (all
# ranks together), write OUTPUT_DIR/PREEMPTED and exit 0. The launcher is bypassed on purpose:
# torchrun's agent handles only the signals in TORCHELASTIC_SIGNALS_TO_HANDLE, and by stopping the
# workers, not by passing the signal on.
#   node_launch.sh NUM_MACHINES MACHINE_RANK MAIN_ADDR MAIN_PORT -- TRAIN_ARGS...
# Environment: GPUS_PER_NODE (default: nvidia-smi's count, at least 1), ACCELERATE_CONFIG (default
# accelerate_configs/1node_8gpu.yaml).
set -euo pipefail
num_machines=$1 machine_rank=$2 main_addr=$3 main_port=$4
shift 4
[ "${1:-}" = "--" ] && shift
if [ -z "${GPUS_PER_NODE:-}" ]; then
  GPUS_PER_NODE=$( (nvidia-smi -L 2>/dev/null || true) | wc -l)
fi
[ "$GPUS_PER_NODE" -ge 1 ] || GPUS_PER_NODE=1
config_file=${ACCELERATE_CONFIG:-accelerate_configs/1node_8gpu.yaml}

accelerate launch --config_file "$config_file" \
  --num_machines "$num_machines" --machine_rank "$machine_rank" \
  --num_processes $((num_machines * GPUS_PER_NODE)) \
  --main_process_ip "$main_addr" --main_process_port "$main_port" \
  tricoclr/train.py "$@" &
launcher=$!

# shellcheck disable=SC2329,SC2317  # invoked by the trap below
forward_usr1() {
  echo "node $machine_rank: SIGUSR1 received, asking the trainers to checkpoint" >&2
  # The trainers are the launcher's children (torchrun's workers, or the one process it starts).
  pkill -USR1 -P "$launcher" || true
}
trap forward_usr1 USR1

# `wait` returns early (status > 128) when a trapped signal arrives: wait again while the launcher runs.
while :; do
  status=0
  wait "$launcher" || status=$?
  if [ "$status" -le 128 ] || ! kill -0 "$launcher" 2>/dev/null; then
    break
  fi
done
exit "$status"
