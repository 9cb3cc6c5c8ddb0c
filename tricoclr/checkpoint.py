"""Exact-resume checkpoints, the run's recorded config and its random states.

A checkpoint ``checkpoints/step-XXXXXXXX/`` holds Accelerate's state (the trained encoder,
optimizer, scaler, or the DeepSpeed engine's files), ``stage.safetensors`` (every encoder, the
momentum copy, the queues), ``trainer_state.json`` (stage, cycle, epoch, step, data position, LR
scheduler) and one ``rng-rank<r>.json`` per rank (Python, NumPy, torch CPU and CUDA generators).
It is written into a temporary folder and renamed once every rank's files are in: a crash
mid-write leaves the previous checkpoint the newest complete one.

A training run's output layout (``output_dir``):
  config.yaml, run_info.json        the resolved config, git commit, package versions
  encoders/<modality>.safetensors   latest backbone + head of each encoder (rewritten per stage)
  encoders/<stage>/<modality>.safetensors   a snapshot at the end of every stage
  checkpoints/step-XXXXXXXX/        the newest ``keep_checkpoints`` exact-resume checkpoints
  tb/                               TensorBoard logs
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file

from tricoclr.config import Config, ConfigError, clip_settings, dump_config
from tricoclr.durable import fsync_dir, fsync_file, write_text_atomic
from tricoclr.method import InfoNCEStage, StagePlan
from tricoclr.models.encoder import load_encoder, save_encoder

log = logging.getLogger("tricoclr.train")

STATE_FILE = "trainer_state.json"
PREEMPTED_MARKER = "PREEMPTED"  # slurm/requeue_or_finish.sh requeues the job when it exists
STAGE_TENSORS = "stage.safetensors"
# Keys that may change between a run and its resume without changing what it computes.
RESUME_NEUTRAL_KEYS = {
    "resume",
    "allow_config_change",
    "max_steps",
    "checkpoint_every_steps",
    "keep_checkpoints",
    "log_every_steps",
}
RESUME_NEUTRAL_DATA_KEYS = {"workers", "prefetch_factor", "pin_memory", "val_path"}
PACKAGES = ["torch", "torchvision", "torchaudio", "accelerate", "webdataset", "lmdb", "av", "numpy", "deepspeed"]


class PreemptionRequested(Exception):
    """Raised after the checkpoint that a preemption signal asked for has been written."""


@dataclass(frozen=True)
class StagePosition:
    """Where a checkpoint is: ``stage_step`` optimizer steps into stage ``index`` (``plan``);
    ``done``: the stage is complete (the checkpoint then points at the start of the next)."""

    index: int
    plan: StagePlan
    stage_step: int
    steps_per_epoch: int
    done: bool


def newest_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint (temporary folders of an interrupted save are ignored)."""
    root = output_dir / "checkpoints"
    if not root.is_dir():
        return None
    complete = sorted(p for p in root.glob("step-*") if (p / STATE_FILE).is_file())
    return complete[-1] if complete else None


# ---- the run's config and environment ------------------------------------------------------------


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _package_versions() -> dict:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def _comparable(config: dict) -> dict:
    comparable = {k: v for k, v in config.items() if k not in RESUME_NEUTRAL_KEYS}
    comparable["data"] = {k: v for k, v in config["data"].items() if k not in RESUME_NEUTRAL_DATA_KEYS}
    return comparable


def check_same_run(config: Config, config_path: Path) -> None:
    """ConfigError unless the run recorded in ``config_path`` computes what ``config`` does. Keys
    added since it was written take their defaults (it ran with that behaviour), so it resumes."""
    with open(config_path) as f:
        previous = Config.from_dict(yaml.safe_load(f) or {}).to_dict()
    changed = _changed_keys(_comparable(previous), _comparable(config.to_dict()))
    if changed and not config.allow_config_change:
        shown = ", ".join(changed[:8]) + (f" and {len(changed) - 8} more" if len(changed) > 8 else "")
        raise ConfigError(
            f"{config_path.parent} holds a run with a different config ({config_path}: {shown} changed); "
            "refusing to resume. Use another output_dir, or allow_config_change=true to resume anyway."
        )


def _changed_keys(previous: dict, current: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ, e.g. ['optim.lr'] (a section compared key by key)."""
    changed = []
    for key in sorted(set(previous) | set(current), key=str):
        old, new = previous.get(key), current.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            changed += _changed_keys(old, new, f"{prefix}{key}.")
        elif old != new:
            changed.append(f"{prefix}{key}")
    return changed


def write_run_info(accelerator, config: Config, resuming: bool, global_batch: int) -> None:
    """config.yaml (the resolved config) and run_info.json (commit, packages, layout)."""
    output_dir = Path(config.output_dir)
    config_path = output_dir / "config.yaml"
    if resuming and config_path.exists():
        check_same_run(config, config_path)
    # Every rank has read the previous config before the main process replaces it.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        tmp_config = config_path.with_name(".config.yaml.tmp")
        dump_config(config, tmp_config)
        os.replace(tmp_config, config_path)
        info = {
            "git_commit": _git_commit(),
            "packages": _package_versions(),
            "python": sys.version.split()[0],
            "world_size": accelerator.num_processes,
            "mixed_precision": str(accelerator.mixed_precision),
            "global_batch": global_batch,
            "argv": sys.argv,
        }
        with open(output_dir / "run_info.json", "w") as f:
            json.dump(info, f, indent=2)
    accelerator.wait_for_everyone()


def clean_up_interrupted_writes(accelerator, output_dir: Path) -> None:
    """Remove what a killed run left half-written, and a stale preemption marker (this run is
    the requeued one, or a manual restart: either way not preempted yet)."""
    if accelerator.is_main_process:
        for tmp in (output_dir / "checkpoints").glob(".tmp-step-*"):
            log.warning("removing %s: a checkpoint write that did not complete", tmp)
            shutil.rmtree(tmp, ignore_errors=True)
        (output_dir / PREEMPTED_MARKER).unlink(missing_ok=True)
    accelerator.wait_for_everyone()


def mark_preempted(accelerator, output_dir: Path, global_step: int) -> None:
    """The marker slurm/requeue_or_finish.sh looks for, written after the checkpoint."""
    if accelerator.is_main_process:
        write_text_atomic(output_dir / PREEMPTED_MARKER, f"{global_step}\n")
    accelerator.wait_for_everyone()


# ---- resume ----------------------------------------------------------------------------------------


def read_resume_state(ckpt: Path, encoders: dict, accelerator, config: Config) -> dict:
    """The checkpoint's trainer state; every encoder gets the checkpoint's weights. ConfigError if
    the rank layout differs (unless allow_config_change)."""
    state = json.loads((ckpt / STATE_FILE).read_text())
    check_resume_layout(ckpt, state, accelerator.num_processes, config)
    tensors = load_file(ckpt / STAGE_TENSORS)
    for name, encoder in encoders.items():
        encoder.load_state_dict(_subdict(tensors, f"encoder.{name}."))
    return state


def check_resume_layout(ckpt: Path, state: dict, world_size: int, config: Config) -> None:
    """An exact resume needs the same world size and accumulation: they decide which samples
    each rank reads at each step, and every rank's random state is saved per rank."""
    saved = (state.get("world_size"), state.get("grad_accum_steps"))
    now = (world_size, config.grad_accum_steps)
    if None in saved or saved == now:
        return
    message = f"{ckpt} was written by {saved[0]} ranks x grad_accum_steps {saved[1]}; this run has {now[0]} x {now[1]}"
    if not config.allow_config_change:
        raise ConfigError(
            message + ". Resume with the same layout, or allow_config_change=true (the continuation is then not exact)."
        )
    log.warning("%s: resuming anyway (allow_config_change), not exactly", message)


def load_latest_encoders(encoders: dict, output_dir: Path) -> None:
    """A run started at a later stage begins from the latest saved weights of every encoder."""
    for name, encoder in encoders.items():
        path = output_dir / "encoders" / f"{name}.safetensors"
        if path.exists():
            loaded, _ = load_encoder(path)
            encoder.load_state_dict(loaded.state_dict())
            log.info("loaded %s encoder from %s", name, path)
        else:
            log.warning("no saved %s encoder in %s: starting it from random weights", name, path.parent)


def restore_stage(accelerator, ckpt: Path, state: dict, stage: InfoNCEStage, scheduler, steps_per_epoch: int) -> int:
    """Load a checkpoint into a freshly built stage; returns the stage step to continue from.

    A checkpoint written at the end of a stage (stage_step 0 of the next one) holds no state of
    the stage about to start (a new optimizer, a fresh queue): only the random states are restored.
    """
    stage_step = state["stage_step"]
    if stage_step > 0:
        if state.get("steps_per_epoch", steps_per_epoch) != steps_per_epoch:
            raise ConfigError(
                f"{ckpt} was written with {state['steps_per_epoch']} steps per epoch, this run has "
                f"{steps_per_epoch}: the data (or batch size, ranks, accumulation) changed; cannot resume "
                "mid-stage at the same data position"
            )
        # Model, optimizer and scaler (or the DeepSpeed engine): files this run wrote.
        accelerator.load_state(str(ckpt))
        tensors = load_file(ckpt / STAGE_TENSORS)  # load_state_dict copies to the modules' device
        stage.momentum_encoder.load_state_dict(_subdict(tensors, "momentum."))
        stage.queue.load_state_dict(_subdict(tensors, "queue."))
        scheduler.load_state_dict(state["scheduler"])
        for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):
            group["lr"] = lr
    rng_file = ckpt / f"rng-rank{accelerator.process_index}.json"
    if rng_file.exists():  # absent only after a world-size change (allow_config_change)
        set_rng_state(json.loads(rng_file.read_text()))
    return stage_step


# ---- save ------------------------------------------------------------------------------------------


def trainer_state(position: StagePosition, global_step: int, world_size: int, config: Config, scheduler) -> dict:
    """The JSON state of a checkpoint (see the module docstring)."""
    done = position.done
    epoch, step_in_epoch = divmod(position.stage_step, position.steps_per_epoch)
    return {
        "stage_index": position.index + 1 if done else position.index,
        "stage": position.plan.name,
        "cycle": cycle_of(position.plan),
        "stage_step": 0 if done else position.stage_step,
        "global_step": global_step,
        # Data position: the next batch is batch (step_in_epoch * grad_accum_steps) of epoch.
        "epoch": 0 if done else epoch,
        "step_in_epoch": 0 if done else step_in_epoch,
        "steps_per_epoch": position.steps_per_epoch,
        "world_size": world_size,
        "grad_accum_steps": config.grad_accum_steps,
        "scheduler": scheduler.state_dict(),  # plain numbers (its lambda is stored as None)
    }


def stage_tensors(encoders: dict, stage: InfoNCEStage) -> dict[str, torch.Tensor]:
    """Every encoder, the momentum copy and the queues, flat, on the CPU."""
    tensors = {}
    for name, encoder in encoders.items():
        tensors.update({f"encoder.{name}.{k}": _cpu(v) for k, v in encoder.state_dict().items()})
    tensors.update({f"momentum.{k}": _cpu(v) for k, v in stage.momentum_encoder.state_dict().items()})
    tensors.update({f"queue.{k}": _cpu(v) for k, v in stage.queue.state_dict().items()})
    return tensors


def save_checkpoint(
    accelerator,
    config: Config,
    global_step: int,
    encoders: dict,
    stage: InfoNCEStage,
    state: dict,
    on_main: Callable[[], None] | None = None,
) -> None:
    """Write checkpoint ``step-<global_step>`` (no-op if it exists). ``on_main`` runs on the main
    process once the checkpoint's files are written and before it is committed (renamed)."""
    root = Path(config.output_dir) / "checkpoints"
    final = root / f"step-{global_step:08d}"
    tmp = root / f".tmp-step-{global_step:08d}"
    if final.exists():
        return
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    write_text_atomic(tmp / f"rng-rank{accelerator.process_index}.json", json.dumps(rng_state()))
    if accelerator.is_main_process:
        save_file(stage_tensors(encoders, stage), str(tmp / STAGE_TENSORS))
        write_text_atomic(tmp / STATE_FILE, json.dumps(state, indent=1))
        if on_main is not None:
            on_main()
    # Every rank's files are in tmp (DeepSpeed shards, RNG states) before it becomes a checkpoint.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _commit(tmp, final, root, config.keep_checkpoints)
    accelerator.wait_for_everyone()


def _commit(tmp: Path, final: Path, root: Path, keep: int) -> None:
    for path in tmp.rglob("*"):
        if path.is_file():
            fsync_file(path)
    os.replace(tmp, final)
    fsync_dir(root)
    for old in sorted(p for p in root.glob("step-*") if (p / STATE_FILE).is_file())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def save_trained_encoder(config: Config, plan: StagePlan, encoder, global_step: int, snapshot: bool) -> None:
    """encoders/<modality>.safetensors (latest) and, with ``snapshot``,
    encoders/<stage>/<modality>.safetensors. The clip settings travel with the weights, so
    evaluation presents clips the same way."""
    data = json.dumps(clip_settings(config.data))
    extra = {"stage": plan.name, "global_step": str(global_step), "data": data}
    folder = Path(config.output_dir) / "encoders"
    paths = [folder / f"{plan.trained}.safetensors"]
    if snapshot:
        paths.append(folder / plan.name / f"{plan.trained}.safetensors")
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_encoder(encoder, path, modality=plan.trained, extra=extra)


# ---- small helpers ---------------------------------------------------------------------------------


def _subdict(tensors: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def _cpu(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().cpu().contiguous()


def cycle_of(plan: StagePlan) -> int:
    """0 for the InfoNCE pre-training stages, c for the stages of 'cycle<c>-...'."""
    head = plan.name.split("-")[0]
    return int(head[len("cycle") :]) if head.startswith("cycle") else 0


def rng_state() -> dict:
    """Every generator this process has, as JSON (no pickle): Python, NumPy, torch CPU and CUDA."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])
