"""The training loop: the whole stage schedule under Accelerate, with exact, atomic checkpoints.

Run it with ``accelerate launch tricoclr/train.py --config CONFIG [dotted.key=value ...]`` (or plain
``python tricoclr/train.py``). Per stage: the trained encoder and its optimizer go through
``accelerator.prepare`` (DDP or a DeepSpeed engine: DeepSpeed takes one model per prepare); the
momentum copy, the frozen samplers and the queues stay outside it (``tricoclr.method``).

Output layout (``output_dir``):
  config.yaml, run_info.json        the resolved config, git commit, package versions
  encoders/<modality>.safetensors   latest backbone + head of each encoder (rewritten per stage)
  encoders/<stage>/<modality>.safetensors   a snapshot at the end of every stage
  checkpoints/step-XXXXXXXX/        the newest ``keep_checkpoints`` exact-resume checkpoints
  tb/                               TensorBoard logs
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tricoclr import modalities as registry
from tricoclr.config import DEFAULTS, ConfigError, dump_config
from tricoclr.data.dataset import DataStats, EpochLoader, StageViews, finish_batch
from tricoclr.data.sampling import sample_generator
from tricoclr.durable import fsync_dir, fsync_file, write_text_atomic
from tricoclr.distributed import convert_to_global_batchnorm
from tricoclr.method import CooperativeStage, StagePlan, build_schedule, momentum_at, momentum_update
from tricoclr.models.encoder import Encoder, load_encoder, save_encoder

log = logging.getLogger("tricoclr.train")

STATE_FILE = "trainer_state.json"
PREEMPTED_MARKER = "PREEMPTED"  # slurm/requeue_or_finish.sh requeues the job when it exists
STAGE_TENSORS = "stage.safetensors"
# Keys that may change between a run and its resume without changing what it computes.
RESUME_NEUTRAL_KEYS = {"resume", "allow_config_change", "max_steps", "checkpoint_every_steps",
                       "keep_checkpoints", "log_every_steps"}
RESUME_NEUTRAL_DATA_KEYS = {"workers", "prefetch_factor", "pin_memory", "val_path"}
MAX_CONSECUTIVE_NONFINITE = 5


class PreemptionRequested(Exception):
    """Raised after the checkpoint that a preemption signal asked for has been written."""


def build_encoder(config: dict, modality: str) -> Encoder:
    spec = registry.get(modality)
    backbone = config["model"]["backbones"][modality]
    options = {"stem": config["model"]["flow_stem"]} if spec.in_channels == 2 and backbone == "s3d" else None
    encoder = Encoder(backbone, spec.in_channels,
                      embed_dim=config["model"]["embed_dim"], backbone_options=options)
    if config["method"]["batchnorm"] == "global":
        convert_to_global_batchnorm(encoder)
    return encoder


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str, min_ratio: float) -> float:
    """Linear warm-up, then cosine decay to ``min_ratio`` (or constant), per optimizer step."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant" or total_steps <= warmup_steps:
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _package_versions() -> dict:
    from importlib import metadata

    names = ["torch", "torchvision", "torchaudio", "accelerate", "webdataset", "lmdb", "av", "numpy", "deepspeed"]
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def _with_defaults_for_new_keys(saved: dict) -> dict:
    """A run's saved config, with the keys added to DEFAULTS since it was written filled in with
    their defaults: it ran with that behaviour (e.g. method.oracle_similarity=cosine_sum), so it
    still resumes. Keys it has are never changed."""
    def fill(node: dict, defaults: dict) -> None:
        for key, value in defaults.items():
            if key not in node:
                node[key] = copy.deepcopy(value)
            elif isinstance(value, dict) and isinstance(node[key], dict):
                fill(node[key], value)

    filled = copy.deepcopy(saved)
    fill(filled, DEFAULTS)
    return filled


def _comparable(config: dict) -> dict:
    comparable = {k: v for k, v in config.items() if k not in RESUME_NEUTRAL_KEYS}
    comparable["data"] = {k: v for k, v in config["data"].items() if k not in RESUME_NEUTRAL_DATA_KEYS}
    return comparable


def newest_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint (temporary folders of an interrupted save are ignored)."""
    root = output_dir / "checkpoints"
    if not root.is_dir():
        return None
    complete = sorted(p for p in root.glob("step-*") if (p / STATE_FILE).is_file())
    return complete[-1] if complete else None


class Trainer:
    def __init__(self, config: dict, accelerator=None):
        from accelerate import Accelerator
        from accelerate.utils import GradientAccumulationPlugin, ProjectConfiguration

        self.config = config
        self.output_dir = Path(config["output_dir"])
        if config["deterministic"]:
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.accelerator = accelerator or Accelerator(
            gradient_accumulation_plugin=GradientAccumulationPlugin(
                num_steps=config["grad_accum_steps"], sync_with_dataloader=False),
            log_with="tensorboard",
            project_config=ProjectConfiguration(project_dir=str(self.output_dir), logging_dir=str(self.output_dir / "tb")),
            step_scheduler_with_optimizer=False,
        )
        self.schedule = build_schedule(config)
        self.encoders: dict[str, Encoder] = {}
        self.global_step = 0
        self._preempt_signal = False
        self.history: list[dict] = []

    # ---- set-up -----------------------------------------------------------------------------

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def _write_run_info(self, resuming: bool) -> None:
        config_path = self.output_dir / "config.yaml"
        if resuming and config_path.exists():
            import yaml

            with open(config_path) as f:
                previous = yaml.safe_load(f)
            previous = _with_defaults_for_new_keys(previous)
            if _comparable(previous) != _comparable(self.config) and not self.config["allow_config_change"]:
                raise ConfigError(
                    f"{self.output_dir} holds a run with a different config ({config_path}); refusing to "
                    "resume. Use another output_dir, or allow_config_change=true to resume anyway."
                )
        # Every rank has read the previous config before the main process replaces it.
        self.accelerator.wait_for_everyone()
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            tmp_config = config_path.with_name(".config.yaml.tmp")
            dump_config(self.config, tmp_config)
            os.replace(tmp_config, config_path)
            info = {
                "git_commit": _git_commit(),
                "packages": _package_versions(),
                "python": sys.version.split()[0],
                "world_size": self.accelerator.num_processes,
                "mixed_precision": str(self.accelerator.mixed_precision),
                "global_batch": self.global_batch,
                "argv": sys.argv,
            }
            with open(self.output_dir / "run_info.json", "w") as f:
                json.dump(info, f, indent=2)
        self.accelerator.wait_for_everyone()

    @property
    def global_batch(self) -> int:
        return self.config["batch_size"] * self.accelerator.num_processes * self.config["grad_accum_steps"]

    def _build_encoders(self) -> None:
        # Same initial weights on every rank and for every world size: seeded per modality.
        for index, name in enumerate(self.config["modalities"]):
            torch.manual_seed(self.config["seed"] * 1000 + index)
            self.encoders[name] = build_encoder(self.config, name)

    def _load_latest_encoders(self) -> None:
        """A run started at a later stage begins from the latest saved weights of every encoder."""
        for name, encoder in self.encoders.items():
            path = self.output_dir / "encoders" / f"{name}.safetensors"
            if path.exists():
                loaded, _ = load_encoder(path)
                encoder.load_state_dict(loaded.state_dict())
                log.info("loaded %s encoder from %s", name, path)
            else:
                log.warning("no saved %s encoder in %s: starting it from random weights", name, path.parent)

    def _install_signal_handler(self) -> None:
        def request_save(signum, frame):
            self._preempt_signal = True
            log.warning("signal %d received: checkpoint at the next optimizer step, then exit", signum)

        for sig in (signal.SIGUSR1, signal.SIGTERM):
            try:
                signal.signal(sig, request_save)
            except ValueError:  # not the main thread (e.g. inside a notebook worker)
                pass

    # ---- the schedule -----------------------------------------------------------------------

    def run(self) -> dict:
        logging.basicConfig(level=logging.INFO if self.is_main else logging.WARNING,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        logging.getLogger("accelerate").setLevel(logging.WARNING)  # one line per saved file otherwise
        ckpt = newest_checkpoint(self.output_dir) if self.config["resume"] else None
        self._write_run_info(resuming=ckpt is not None)
        self._clean_up_interrupted_writes()
        self._build_encoders()
        self._install_signal_handler()
        self.accelerator.init_trackers("tricoclr")
        resume_state = None
        if ckpt is not None:
            with open(ckpt / STATE_FILE) as f:
                resume_state = json.load(f)
            self._check_resume_layout(ckpt, resume_state)
            self.global_step = resume_state["global_step"]
            tensors = load_file(ckpt / STAGE_TENSORS)
            for name, encoder in self.encoders.items():
                encoder.load_state_dict(_subdict(tensors, f"encoder.{name}."))
            log.info("resuming from %s (stage %s, step %d)", ckpt, resume_state["stage"], self.global_step)
        elif self.config["schedule"]["start_stage"]:
            self._load_latest_encoders()
        if self.is_main:
            log.info("global batch = batch_size %d x %d ranks x grad_accum_steps %d = %d",
                     self.config["batch_size"], self.accelerator.num_processes,
                     self.config["grad_accum_steps"], self.global_batch)
        first = self._first_stage_index(resume_state)
        try:
            for index in range(first, len(self.schedule)):
                if self._budget_left() == 0:
                    break
                state = resume_state if resume_state and resume_state["stage_index"] == index else None
                self._run_stage(index, self.schedule[index], state, ckpt if state else None)
                resume_state = None
        finally:
            self.accelerator.end_training()
        return {"global_step": self.global_step, "history": self.history}

    def _clean_up_interrupted_writes(self) -> None:
        """Remove what a killed run left half-written, and a stale preemption marker (this run is
        the requeued one, or a manual restart: either way not preempted yet)."""
        if self.is_main:
            for tmp in (self.output_dir / "checkpoints").glob(".tmp-step-*"):
                log.warning("removing %s: a checkpoint write that did not complete", tmp)
                shutil.rmtree(tmp, ignore_errors=True)
            (self.output_dir / PREEMPTED_MARKER).unlink(missing_ok=True)
        self.accelerator.wait_for_everyone()

    def _check_resume_layout(self, ckpt: Path, state: dict) -> None:
        """An exact resume needs the same world size and accumulation: they decide which samples
        each rank reads at each step, and every rank's random state is saved per rank."""
        saved = (state.get("world_size"), state.get("grad_accum_steps"))
        now = (self.accelerator.num_processes, self.config["grad_accum_steps"])
        if None in saved or saved == now:
            return
        message = (f"{ckpt} was written by {saved[0]} ranks x grad_accum_steps {saved[1]}; this run has "
                   f"{now[0]} x {now[1]}")
        if not self.config["allow_config_change"]:
            raise ConfigError(message + ". Resume with the same layout, or allow_config_change=true "
                              "(the continuation is then not exact).")
        log.warning("%s: resuming anyway (allow_config_change), not exactly", message)

    def _first_stage_index(self, resume_state: dict | None) -> int:
        if resume_state is not None:
            return resume_state["stage_index"]
        start = self.config["schedule"]["start_stage"]
        if not start:
            return 0
        names = [plan.name for plan in self.schedule]
        if start not in names:
            raise ConfigError(f"schedule.start_stage '{start}' is not a stage of this schedule: {names}")
        return names.index(start)

    def _budget_left(self) -> int | None:
        if self.config["max_steps"] is None:
            return None
        return max(0, self.config["max_steps"] - self.global_step)

    def _stage_total_steps(self, plan: StagePlan, steps_per_epoch: int) -> int:
        total = max(1, math.ceil(plan.epochs * steps_per_epoch))
        if self.config["max_steps_per_stage"] is not None:
            total = min(total, self.config["max_steps_per_stage"])
        return total

    # ---- one stage --------------------------------------------------------------------------

    def _run_stage(self, index: int, plan: StagePlan, resume_state: dict | None, ckpt: Path | None) -> None:
        cfg, acc = self.config, self.accelerator
        views = StageViews(both_views=(plan.trained,), view2_only=plan.samplers)
        stage_seed = cfg["seed"] * 1009 + index
        loader = EpochLoader(cfg["data"]["path"], views, cfg["data"], stage_seed, cfg["batch_size"],
                             rank=acc.process_index, world_size=acc.num_processes)
        k = cfg["grad_accum_steps"]
        steps_per_epoch = loader.batches_per_epoch() // k
        if steps_per_epoch == 0:
            raise ConfigError(f"stage {plan.name}: {loader.batches_per_epoch()} batches per epoch are fewer "
                              f"than grad_accum_steps={k}")
        total_steps = self._stage_total_steps(plan, steps_per_epoch)
        num_epochs = math.ceil(total_steps / steps_per_epoch)

        encoder = self.encoders[plan.trained]
        # Train mode before the stage copies it: the momentum copy must run in train mode too (MoCo,
        # CoCLR), also when this encoder was a frozen eval-mode sampler in the previous stage.
        encoder.to(acc.device).train()
        if cfg["model"]["channels_last"]:
            encoder.to(memory_format=torch.channels_last_3d)
        stage = CooperativeStage(plan, self.encoders, cfg["method"])
        stage.queue.reset(generator=torch.Generator().manual_seed(stage_seed))
        stage.to(acc.device).train()
        optimizer = self._build_optimizer(encoder)
        model, optimizer = self._prepare(encoder, optimizer)
        # Not prepared on purpose: it steps once per optimizer step whatever the world size.
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(
            s, total_steps, cfg["optim"]["warmup_steps"], cfg["optim"]["schedule"], cfg["optim"]["min_lr_ratio"]))

        stage_step = 0
        if resume_state is not None:
            stage_step = self._restore_stage(ckpt, resume_state, stage, scheduler, steps_per_epoch)
        start_epoch, start_step_in_epoch = divmod(stage_step, steps_per_epoch)
        if self.is_main:
            log.info("stage %s: trains %s, oracle %s, %d steps (%d per epoch, %d videos)", plan.name,
                     plan.trained, list(plan.samplers) or "none (InfoNCE)", total_steps, steps_per_epoch,
                     loader.num_videos)

        progress = _progress_bar(self.is_main, total_steps, stage_step, plan.name)
        input_dtype = _input_dtype(acc, model)
        frozen_autocast = self._frozen_autocast()
        nonfinite_in_a_row = 0
        logged_images = resume_state is not None or not cfg["monitor"]["augment_images"]
        finished = stage_step >= total_steps
        for epoch in range(start_epoch, num_epochs):
            if finished:
                break
            first_step = start_step_in_epoch if epoch == start_epoch else 0
            loader.set_epoch(epoch, start_batch=first_step * k)
            acc.step = 0  # accumulation counter: every epoch starts at a step boundary
            batches_left = (steps_per_epoch - first_step) * k
            wait_start = time.perf_counter()
            window = {"wait": 0.0, "compute": 0.0, "samples": 0}
            micro_step, step_bad, loss_sum, snapshot = 0, False, 0.0, None
            for batch_number, cpu_batch in enumerate(loader):
                if batch_number >= batches_left:
                    break
                window["wait"] += time.perf_counter() - wait_start
                compute_start = time.perf_counter()
                batch = finish_batch(cpu_batch, views, acc.device)
                if not logged_images:
                    self._log_augmented_clips(plan, batch, views)
                    logged_images = True
                if micro_step == 0:
                    snapshot = stage.buffers_snapshot(encoder)
                micro_step += 1
                with acc.accumulate(model):
                    with frozen_autocast():
                        key, oracle = stage.keys_and_oracle(batch)
                    with acc.autocast():
                        query = model(batch[f"{plan.trained}.view1"].to(input_dtype))
                    generator = sample_generator(stage_seed, self.global_step, -1, 0, "mask-self")
                    loss, stats = stage.loss(query, key, oracle, batch, generator)
                    # One all-reduce per micro-step carries every decision that all ranks must take
                    # together (skip, preempt), or DDP would deadlock: [non-finite, loss, signal].
                    finite = torch.isfinite(loss.detach())
                    flags = acc.reduce(torch.stack([
                        (~finite).float(),
                        torch.where(finite, loss.detach().float(), torch.zeros_like(loss, dtype=torch.float32)),
                        torch.tensor(float(self._preempt_signal), device=loss.device),
                    ]), "sum").tolist()
                    step_bad = step_bad or flags[0] > 0
                    if not step_bad:
                        acc.backward(loss)
                        stage.stash_for_enqueue(key, oracle, batch)
                        loss_sum += flags[1]
                    else:
                        self._backward_nothing(model)
                    window["samples"] += query.shape[0] * acc.num_processes
                    if not acc.sync_gradients:
                        window["compute"] += time.perf_counter() - compute_start
                        wait_start = time.perf_counter()
                        continue
                    # ---- an optimizer step (the last micro-step of k) ----
                    if step_bad:
                        nonfinite_in_a_row += 1
                        self._skip_step(model, optimizer, scheduler, stage, encoder, snapshot)
                        if nonfinite_in_a_row >= MAX_CONSECUTIVE_NONFINITE:
                            raise FloatingPointError(
                                f"{nonfinite_in_a_row} optimizer steps in a row had a non-finite loss (stage "
                                f"{plan.name}, step {self.global_step + 1}); stopping. The last good checkpoint "
                                f"is the newest one in {self.output_dir / 'checkpoints'}.")
                    else:
                        nonfinite_in_a_row = 0
                        self._optimizer_step(model, optimizer, scheduler, stage, stage_step, total_steps)
                    stage_step += 1
                    self.global_step += 1
                    window["compute"] += time.perf_counter() - compute_start
                    if not step_bad:
                        mean_loss = loss_sum / (k * acc.num_processes)
                        self._log_step(plan, mean_loss, stats, scheduler, stage, window, progress)
                    micro_step, step_bad, loss_sum = 0, False, 0.0
                    stage_complete = stage_step >= total_steps
                    finished = stage_complete or self._budget_left() == 0
                    preempt = flags[2] > 0
                    epoch_end = stage_step % steps_per_epoch == 0
                    if finished or preempt or epoch_end or self.global_step % cfg["checkpoint_every_steps"] == 0:
                        self._save_checkpoint(index, plan, stage, stage_step, steps_per_epoch, scheduler,
                                              done=stage_complete)
                    if finished and not stage_complete and self.is_main:
                        self._save_latest_encoder(plan)  # the run ends inside this stage
                    if preempt:
                        if self.is_main:
                            write_text_atomic(self.output_dir / PREEMPTED_MARKER, f"{self.global_step}\n")
                        acc.wait_for_everyone()
                        raise PreemptionRequested(f"checkpoint written at step {self.global_step}")
                    if epoch_end and not finished:
                        self._epoch_end(plan, epoch)
                    if finished:
                        break
                wait_start = time.perf_counter()
        if progress is not None:
            progress.close()
        self._finish_stage(plan, model, stage)
        self._release_stage(model, encoder)

    def _prepare(self, encoder: torch.nn.Module, optimizer: torch.optim.Optimizer):
        """Only the trained encoder and its optimizer go through Accelerate (DDP or one DeepSpeed
        engine: Accelerate's DeepSpeed integration takes one model per prepare)."""
        self._configure_deepspeed()
        return self.accelerator.prepare(encoder, optimizer)

    def _configure_deepspeed(self) -> None:
        """The project config is the one source of the batch size, accumulation and clipping: write
        them into the DeepSpeed config, so DeepSpeed's loss scaling (1 / accumulation steps) and its
        accumulation boundary agree with this loop."""
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        if plugin is None:
            return
        cfg, ds = self.config, plugin.deepspeed_config
        k = cfg["grad_accum_steps"]
        configured = ds.get("gradient_accumulation_steps", "auto")
        if configured not in ("auto", k):
            log.warning("DeepSpeed config has gradient_accumulation_steps=%s; using grad_accum_steps=%d",
                        configured, k)
        ds["gradient_accumulation_steps"] = k
        ds["train_micro_batch_size_per_gpu"] = cfg["batch_size"]
        ds["train_batch_size"] = cfg["batch_size"] * k * self.accelerator.num_processes
        ds["gradient_clipping"] = float(cfg["optim"]["grad_clip"] or 0.0)
        self.accelerator.gradient_accumulation_steps = k

    def _frozen_autocast(self):
        """The autocast for the momentum copy and the samplers. Under DeepSpeed Accelerate's own
        autocast is off (the engine casts the trained encoder's weights instead), so the frozen
        encoders get torch's autocast in the engine's precision."""
        acc = self.accelerator
        if self._deepspeed:
            dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(str(acc.mixed_precision))
            if dtype is not None and acc.device.type != "cpu":
                return lambda: torch.autocast(acc.device.type, dtype=dtype)
            return nullcontext
        return acc.autocast

    @property
    def _deepspeed(self) -> bool:
        return getattr(self.accelerator.state, "deepspeed_plugin", None) is not None

    def _optimizer_step(self, model, optimizer, scheduler, stage, stage_step: int, total_steps: int) -> None:
        cfg, acc = self.config, self.accelerator
        if cfg["optim"]["grad_clip"]:
            acc.clip_grad_norm_(model.parameters(), cfg["optim"]["grad_clip"])  # a no-op under DeepSpeed
        optimizer.step()  # under DeepSpeed the engine stepped inside accelerator.backward
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        mu = momentum_at(stage_step, total_steps, cfg["method"]["momentum"], cfg["method"]["momentum_final"])
        momentum_update(stage.momentum_encoder, acc.unwrap_model(model), mu)
        stage.enqueue_pending()

    def _backward_nothing(self, model) -> None:
        """Stand-in for the backward of a micro-step whose optimizer step will be skipped.

        DDP: a forward with gradient sync on arms the reducer, and an armed reducer all-reduces at
        the next backward even under ``no_sync``; a zero loss over every parameter completes the
        cycle (all ranks do it: the decision is all-reduced). DeepSpeed with accumulation: the engine
        counts micro-steps and reduces gradients in its own buffers, so it gets the zero loss too and
        steps on the earlier micro-steps' gradients (a partial step, warned about); without
        accumulation it gets nothing, and the step is skipped exactly.
        """
        acc = self.accelerator
        if self._deepspeed and self.config["grad_accum_steps"] == 1:
            return
        params = [p for p in model.parameters() if p.requires_grad]
        acc.backward(torch.stack([p.sum() for p in params]).sum() * 0.0)

    def _skip_step(self, model, optimizer, scheduler, stage, encoder, snapshot) -> None:
        """No update, no enqueue, BN statistics put back; the step still counts (the data position and
        the LR schedule are functions of the step), so a resume lands where a run without the skip
        would."""
        log.warning("non-finite loss at step %d (on some rank): skipping the optimizer step", self.global_step + 1)
        if self._deepspeed and self.config["grad_accum_steps"] > 1:
            log.warning("under DeepSpeed with gradient accumulation the engine has stepped on the gradients "
                        "of the micro-steps before the non-finite one")
        optimizer.zero_grad(set_to_none=True)
        stage.discard_pending()
        stage.restore_buffers(encoder, snapshot)
        scheduler.step()

    def _restore_stage(self, ckpt: Path, resume_state: dict, stage: CooperativeStage, scheduler,
                       steps_per_epoch: int) -> int:
        """Load a checkpoint into a freshly built stage; returns the stage step to continue from.

        A checkpoint written at the end of a stage (stage_step 0 of the next one) holds no state of
        the stage about to start (a new optimizer, a fresh queue): only the random states are restored.
        """
        acc = self.accelerator
        stage_step = resume_state["stage_step"]
        if stage_step > 0:
            if resume_state.get("steps_per_epoch", steps_per_epoch) != steps_per_epoch:
                raise ConfigError(
                    f"{ckpt} was written with {resume_state['steps_per_epoch']} steps per epoch, this run has "
                    f"{steps_per_epoch}: the data (or batch size, ranks, accumulation) changed; cannot resume "
                    "mid-stage at the same data position")
            # Model, optimizer and scaler (or the DeepSpeed engine): files this run wrote.
            acc.load_state(str(ckpt))
            tensors = load_file(ckpt / STAGE_TENSORS)  # load_state_dict copies to the modules' device
            stage.momentum_encoder.load_state_dict(_subdict(tensors, "momentum."))
            stage.queue.load_state_dict(_subdict(tensors, "queue."))
            scheduler.load_state_dict(resume_state["scheduler"])
            for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):
                group["lr"] = lr
        rng_file = ckpt / f"rng-rank{acc.process_index}.json"
        if rng_file.exists():  # absent only after a world-size change (allow_config_change)
            _set_rng_state(json.loads(rng_file.read_text()))
        return stage_step

    def _epoch_end(self, plan, epoch) -> None:
        if self.config["data"]["val_path"] and self.config["monitor"]["knn_every_epochs"]:
            if (epoch + 1) % self.config["monitor"]["knn_every_epochs"] == 0:
                self._knn_monitor(plan)

    def _release_stage(self, model, encoder) -> None:
        """Give the stage's engine/DDP wrapper back; the encoder goes on as a plain fp32 module."""
        if self._deepspeed and any(p.dtype != torch.float32 for p in encoder.parameters()):
            # The engine cast the module to bf16/fp16 and holds the fp32 weights (partitioned):
            # gather them, so the encoder goes on (and is saved) at full precision.
            from deepspeed.utils import safe_get_full_fp32_param

            full = [safe_get_full_fp32_param(p) for p in encoder.parameters()]
            encoder.float()
            with torch.no_grad():
                for param, value in zip(encoder.parameters(), full):
                    param.copy_(value)
        self.accelerator.free_memory()
        encoder.to("cpu")

    def _build_optimizer(self, encoder: torch.nn.Module) -> torch.optim.Optimizer:
        opt = self.config["optim"]
        lr = opt["lr"]
        if opt["lr_reference_batch"]:
            lr = lr * self.global_batch / opt["lr_reference_batch"]  # linear scaling rule
        params = [p for p in encoder.parameters() if p.requires_grad]
        fused = {"fused": True} if self.accelerator.device.type == "cuda" else {}
        if opt["name"] == "adam":
            return torch.optim.Adam(params, lr=lr, weight_decay=opt["weight_decay"], **fused)
        if opt["name"] == "adamw":
            return torch.optim.AdamW(params, lr=lr, weight_decay=opt["weight_decay"], **fused)
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=opt["weight_decay"], **fused)

    # ---- checkpoints and encoders -----------------------------------------------------------

    def _save_checkpoint(self, index: int, plan: StagePlan, stage: CooperativeStage, stage_step: int,
                         steps_per_epoch: int, scheduler, done: bool) -> None:
        """Write into a temporary folder, wait for every rank, then rename: a crash mid-write leaves
        the previous checkpoint the newest complete one (``newest_checkpoint`` ignores the rest).

        Contents: Accelerate's state (the trained encoder, optimizer, scaler, or the DeepSpeed
        engine's files), ``stage.safetensors`` (every encoder, the momentum copy, the queues),
        ``trainer_state.json`` (stage, cycle, epoch, step, data position, LR scheduler) and one
        ``rng-rank<r>.json`` per rank (Python, NumPy, torch CPU and CUDA generators).
        """
        acc = self.accelerator
        root = self.output_dir / "checkpoints"
        final = root / f"step-{self.global_step:08d}"
        tmp = root / f".tmp-step-{self.global_step:08d}"
        if final.exists():
            return
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        write_text_atomic(tmp / f"rng-rank{acc.process_index}.json", json.dumps(_rng_state()))
        if self.is_main:
            tensors = {}
            for name, encoder in self.encoders.items():
                tensors.update({f"encoder.{name}.{k}": _cpu(v) for k, v in encoder.state_dict().items()})
            tensors.update({f"momentum.{k}": _cpu(v) for k, v in stage.momentum_encoder.state_dict().items()})
            tensors.update({f"queue.{k}": _cpu(v) for k, v in stage.queue.state_dict().items()})
            save_file(tensors, str(tmp / STAGE_TENSORS))
            epoch, step_in_epoch = divmod(stage_step, steps_per_epoch)
            state = {
                "stage_index": index + 1 if done else index,
                "stage": plan.name,
                "cycle": _cycle_of(plan),
                "stage_step": 0 if done else stage_step,
                "global_step": self.global_step,
                # Data position: the next batch is batch (step_in_epoch * grad_accum_steps) of epoch.
                "epoch": 0 if done else epoch,
                "step_in_epoch": 0 if done else step_in_epoch,
                "steps_per_epoch": steps_per_epoch,
                "world_size": acc.num_processes,
                "grad_accum_steps": self.config["grad_accum_steps"],
                "scheduler": scheduler.state_dict(),  # plain numbers (its lambda is stored as None)
            }
            write_text_atomic(tmp / STATE_FILE, json.dumps(state, indent=1))
            if done:
                self._save_stage_encoders(plan)
        # Every rank's files are in tmp (DeepSpeed shards, RNG states) before it becomes a checkpoint.
        acc.wait_for_everyone()
        if self.is_main:
            for path in tmp.rglob("*"):
                if path.is_file():
                    fsync_file(path)
            os.replace(tmp, final)
            fsync_dir(root)
            for old in sorted(p for p in root.glob("step-*") if (p / STATE_FILE).is_file())[: -self.config["keep_checkpoints"]]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()

    def _save_stage_encoders(self, plan: StagePlan) -> None:
        """encoders/<modality>.safetensors (latest) and encoders/<stage>/<modality>.safetensors."""
        self._save_latest_encoder(plan, snapshot=True)

    def _save_latest_encoder(self, plan: StagePlan, snapshot: bool = False) -> None:
        encoder = self.encoders[plan.trained]
        from tricoclr.eval.features import EVAL_DATA_KEYS

        # The clip settings travel with the weights, so evaluation presents clips the same way.
        data = json.dumps({k: self.config["data"][k] for k in EVAL_DATA_KEYS})
        extra = {"stage": plan.name, "global_step": str(self.global_step), "data": data}
        paths = [self.output_dir / "encoders" / f"{plan.trained}.safetensors"]
        if snapshot:
            paths.append(self.output_dir / "encoders" / plan.name / f"{plan.trained}.safetensors")
        for path in paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_encoder(encoder, path, modality=plan.trained, extra=extra)

    def _finish_stage(self, plan: StagePlan, model, stage: CooperativeStage) -> None:
        """End of a stage (also of a run that stops inside one); a subclass may look at the stage here."""
        self.history.append({"stage": plan.name, "global_step": self.global_step})
        self.accelerator.wait_for_everyone()

    # ---- logging ----------------------------------------------------------------------------

    def _log_step(self, plan, value: float, stats, scheduler, stage, window, progress) -> None:
        """``value``: the step's loss averaged over ranks and micro-steps (the global batch's loss)."""
        every = self.config["log_every_steps"]
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{value:.3f}", queue=f"{stage.queue.fill_fraction:.2f}")
        if self.global_step % every != 0 and self.global_step != 1:
            return
        elapsed = window["wait"] + window["compute"]
        values = {
            f"loss/{plan.name}": value,
            "train/loss": value,
            "train/lr": scheduler.get_last_lr()[0],
            "train/queue_fill": stage.queue.fill_fraction,
            "train/positives_per_sample": stats["positives_per_sample"],
            "train/broken_records": DataStats.broken_records,
        }
        for name in ("mined_precision", "same_video_share"):
            if name in stats:
                values[f"train/{name}"] = stats[name]
        if elapsed > 0:
            values["train/samples_per_s"] = window["samples"] / elapsed
            values["train/data_wait_fraction"] = window["wait"] / elapsed
        window.update(wait=0.0, compute=0.0, samples=0)
        self.accelerator.log(values, step=self.global_step)
        self.history.append({"stage": plan.name, "step": self.global_step, "loss": value,
                             **{k.split("/")[1]: v for k, v in values.items() if k.startswith("train/")}})

    def _log_augmented_clips(self, plan, batch, views) -> None:
        """An image of a few augmented clips per stage (middle frame of each view)."""
        if not self.is_main:
            return
        try:
            writer = self.accelerator.get_tracker("tensorboard", unwrap=True)
        except (ValueError, KeyError):
            return
        for name in views.all:
            for view in views.views_of(name):
                tensor = batch[f"{name}.view{view}"][:4].detach().float().cpu()
                if tensor.dim() == 5:  # (B, C, T, H, W): middle frame
                    image = tensor[:, :, tensor.shape[2] // 2]
                else:  # (B, 1, F, T) spectrogram
                    image = tensor.flip(2)
                if image.shape[1] == 2:
                    image = torch.cat([image, torch.zeros_like(image[:, :1])], dim=1)
                low = image.amin(dim=(1, 2, 3), keepdim=True)
                high = image.amax(dim=(1, 2, 3), keepdim=True)
                image = (image - low) / (high - low).clamp_min(1e-6)
                writer.add_images(f"augmented/{plan.name}/{name}.view{view}", image, self.global_step)

    def _knn_monitor(self, plan) -> None:
        from tricoclr.eval.features import leave_one_out_r1

        encoder = self.encoders[plan.trained]
        r1 = leave_one_out_r1(encoder, plan.trained, self.config["data"]["val_path"], self.config["data"],
                              device=self.accelerator.device)
        encoder.train()
        self.accelerator.log({f"monitor/knn_R@1/{plan.trained}": r1}, step=self.global_step)


def _subdict(tensors: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _cpu(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().cpu().contiguous()


def _cycle_of(plan: StagePlan) -> int:
    """0 for the InfoNCE pre-training stages, c for the stages of 'cycle<c>-...'."""
    head = plan.name.split("-")[0]
    return int(head[len("cycle"):]) if head.startswith("cycle") else 0


def _input_dtype(accelerator, model) -> torch.dtype:
    """The dtype the trained encoder's inputs must have: a DeepSpeed engine casts the module itself
    to bf16/fp16 (Accelerate's autocast is off there); otherwise fp32 and autocast does the rest."""
    if getattr(accelerator.state, "deepspeed_plugin", None) is None:
        return torch.float32
    return next(accelerator.unwrap_model(model).parameters()).dtype


def _rng_state() -> dict:
    """Every generator this process has, as JSON (no pickle): Python, NumPy, torch CPU and CUDA."""
    import random

    import numpy as np

    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def _set_rng_state(state: dict) -> None:
    import random

    import numpy as np

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _progress_bar(enabled: bool, total: int, initial: int, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    # disable=None: no bar when stderr is not a terminal (logs, batch jobs)
    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, leave=False, disable=None)
