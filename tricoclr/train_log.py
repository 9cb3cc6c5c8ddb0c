"""What a training run reports: per-step scalars, augmented clips, the online kNN monitor."""

from __future__ import annotations

import logging
import math

from tqdm.auto import tqdm

from tricoclr import preemption
from tricoclr.data import modalities as registry
from tricoclr.data.dataset import DataStats
from tricoclr.eval.features import leave_one_out_r1

log = logging.getLogger("tricoclr.train")


def step_values(plan_name: str, loss: float, lr: float, queue_fill: float, stats: dict, window: dict) -> dict:
    """TensorBoard scalars of an optimizer step. ``loss``: averaged over ranks and micro-steps;
    ``window``: seconds waiting for data / computing and samples since the last logged step."""
    # The step's statistics may be device tensors: read (a host sync) here, on log steps only.
    values = {
        f"loss/{plan_name}": loss,
        "train/loss": loss,
        "train/lr": lr,
        "train/queue_fill": queue_fill,
        "train/positives_per_sample": float(stats["positives_per_sample"]),
        "train/broken_records": DataStats.broken_records,
    }
    # Oracle-mined precision (same-video entries left out) and the same-video share of the queue
    # positives, logged apart: together they read high while the queue fills. NaN: nothing to count.
    for name in ("mined_precision", "same_video_share"):
        value = stats.get(name)
        if value is not None and not math.isnan(float(value)):
            values[f"train/{name}"] = float(value)
    elapsed = window["wait"] + window["compute"]
    if elapsed > 0:
        values["train/samples_per_s"] = window["samples"] / elapsed
        values["train/data_wait_fraction"] = window["wait"] / elapsed
    return values


def history_entry(plan_name: str, step: int, loss: float, values: dict) -> dict:
    """The run history's record of a logged step: its stage, step, loss and ``train/*`` scalars."""
    scalars = {k.split("/")[1]: v for k, v in values.items() if k.startswith("train/")}
    return {"stage": plan_name, "step": step, "loss": loss, **scalars}


def stage_started(plan, total_steps: int, steps_per_epoch: int, num_videos: int) -> None:
    """One log line when a stage starts: what it trains against which oracle, and for how long."""
    oracle = list(plan.samplers) or "none (InfoNCE)"
    log.info(
        f"stage {plan.name}: trains {plan.trained}, oracle {oracle}, {_count(total_steps, 'step')} "
        f"({steps_per_epoch} per epoch, {_count(num_videos, 'video')})"
    )


def configure(is_main: bool) -> None:
    """Log lines with time and source; INFO from the main process only (every rank would repeat it)."""
    logging.basicConfig(
        level=logging.INFO if is_main else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # one line per saved file otherwise


def nothing_left(output_dir, step: int) -> None:
    """The log line of a re-run that found its run already complete (else it would end silently)."""
    log.info(
        f"nothing left to train: the run in {output_dir} resumed at global step {step}, the end of its "
        "schedule (or of max_steps); its encoders are in encoders/. Use another output_dir for a new run."
    )


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def preemption_requested(step: int) -> None:
    """The log line the SLURM scripts' users (and tests) look for when a warning signal stopped a run."""
    log.warning(
        f"preemption requested (SIGUSR1/SIGTERM or {preemption.REQUEST_FILE_ENV}): "
        f"checkpoint written at step {step}, exiting"
    )


def log_augmented_clips(accelerator, plan_name: str, batch: dict, views, step: int) -> None:
    """An image of a few augmented clips per stage (middle frame of each view), main process."""
    if not accelerator.is_main_process:
        return
    try:
        writer = accelerator.get_tracker("tensorboard", unwrap=True)
    except (ValueError, KeyError):
        return
    for name in views.all:
        for view in views.views_of(name):
            tensor = batch[f"{name}.view{view}"][:4].detach().float().cpu()
            # the registry entry says how the modality is drawn: (B, 3, H, W) in [0, 1]
            writer.add_images(f"augmented/{plan_name}/{name}.view{view}", registry.get(name).draw(tensor), step)


def knn_monitor(accelerator, encoder, modality: str, data_cfg, step: int) -> None:
    """Leave-one-out kNN R@1 of the encoder on ``data.val_path``, logged as monitor/knn_R@1/<m>."""
    r1 = leave_one_out_r1(encoder, modality, data_cfg["val_path"], data_cfg, device=accelerator.device)
    encoder.train()
    accelerator.log({f"monitor/knn_R@1/{modality}": r1}, step=step)


def progress_bar(enabled: bool, total: int, initial: int, desc: str):
    if not enabled:
        return None
    # disable=None: no bar when stderr is not a terminal (logs, batch jobs)
    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, leave=False, disable=None)
