#!/usr/bin/env bash
# After the launch ends: if the trainer wrote OUTPUT_DIR/PREEMPTED, requeue this job (the requeued
# job resumes from the newest checkpoint); otherwise pass the exit status on.
# Usage: requeue_or_finish.sh OUTPUT_DIR STATUS
set -euo pipefail
output_dir=$1 status=$2
if [ -f "$output_dir/PREEMPTED" ]; then
  echo "checkpoint written before the time limit: requeueing job ${SLURM_JOB_ID:-?}" >&2
  rm -f "$output_dir/PREEMPTED"
  if [ -n "${SLURM_JOB_ID:-}" ]; then
    scontrol requeue "$SLURM_JOB_ID"
  fi
  exit 0
fi
exit "$status"
