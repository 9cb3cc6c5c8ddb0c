#!/usr/bin/env bash
# After the launch ends: if the trainer wrote OUTPUT_DIR/PREEMPTED (it checkpointed on SIGUSR1),
# requeue this job, and the requeued job resumes from the newest checkpoint (same command, same
# output_dir); otherwise pass the launch's exit status on.
#   requeue_or_finish.sh OUTPUT_DIR STATUS
set -euo pipefail
output_dir=$1 status=$2
if [ -f "$output_dir/PREEMPTED" ]; then
  echo "checkpoint written before the time limit: requeueing job ${SLURM_JOB_ID:-(not under SLURM)}" >&2
  rm -f "$output_dir/PREEMPTED"
  if [ -n "${SLURM_JOB_ID:-}" ]; then
    scontrol requeue "$SLURM_JOB_ID"
  fi
  exit 0
fi
exit "$status"
