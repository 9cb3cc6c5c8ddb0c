#!/usr/bin/env bash
# After the launch ends: if the trainer wrote OUTPUT_DIR/PREEMPTED (it checkpointed on a warning),
# requeue this job, and the requeued job resumes from the newest checkpoint (same command, same
# output_dir); otherwise pass the launch's exit status on.
#   requeue_or_finish.sh OUTPUT_DIR STATUS [TERMINATED]
# TERMINATED=1: the checkpoint answered a SIGTERM (scancel, or SLURM's own preemption or requeue),
# not the warning: no requeue then (a cancelled job stays cancelled; SLURM requeues the jobs it
# preempts itself), and the same command resumes from the checkpoint.
# MAX_REQUEUES (optional): stop with an error instead of requeueing once the job has been requeued
# that many times (SLURM_RESTART_COUNT); the checkpoint stays, the same command resumes it.
set -euo pipefail
output_dir=$1 status=$2 terminated=${3:-0}
if [ ! -f "$output_dir/PREEMPTED" ]; then
  exit "$status"
fi
rm -f "$output_dir/PREEMPTED"
if [ -z "${SLURM_JOB_ID:-}" ]; then
  echo "checkpoint written before the time limit (not under SLURM: run the same command to resume)" >&2
  exit 0
fi
if [ "$terminated" = 1 ]; then
  echo "checkpoint written after a SIGTERM (scancel or preemption): job $SLURM_JOB_ID is not requeued by" \
    "this script; submit the same command to resume (a job SLURM requeues resumes by itself)." >&2
  exit 0
fi
restarts=${SLURM_RESTART_COUNT:-0}
if [ -n "${MAX_REQUEUES:-}" ] && [ "$restarts" -ge "$MAX_REQUEUES" ]; then
  echo "checkpoint written; not requeueing job $SLURM_JOB_ID: requeued $restarts times already" \
    "(MAX_REQUEUES=$MAX_REQUEUES). Submit the same command to resume." >&2
  exit 1
fi
echo "checkpoint written before the time limit: requeueing job $SLURM_JOB_ID (restart $((restarts + 1)))" >&2
# On success SLURM ends this script at once (the job goes back to PENDING).
if ! scontrol requeue "$SLURM_JOB_ID"; then
  echo "checkpoint written, but job $SLURM_JOB_ID could not be requeued (cancelled, or not" \
    "requeueable): submit the same command to resume." >&2
fi
exit 0
