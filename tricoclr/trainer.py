"""The training loop: the whole stage schedule under Accelerate, with exact, atomic checkpoints.

Run it with ``accelerate launch tricoclr/train.py --config CONFIG [dotted.key=value ...]`` (or plain
``python tricoclr/train.py``). Per stage the method's stage (``tricoclr.method``) computes each
micro-step's loss and, after the optimizer step, updates its momentum copy and queue; the trainer
owns the data, the optimizer, the schedule and when to checkpoint, stop or skip a step.
Checkpoints and the output layout are ``tricoclr.checkpoint``'s, backend differences
``tricoclr.backend``'s, what is logged ``tricoclr.train_log``'s.
"""

from __future__ import annotations

import logging
import math
import time
from functools import partial
from pathlib import Path

import torch

from tricoclr import checkpoint, preemption, train_log
from tricoclr.backend import Backend, make_accelerator, share_cores_with_workers
from tricoclr.checkpoint import PreemptionRequested, StagePosition, newest_checkpoint  # noqa: F401 (API)
from tricoclr.config import Config, ConfigError
from tricoclr.data.dataset import EpochLoader, StageViews, finish_batch
from tricoclr.data.samples import missing_modalities
from tricoclr.data.sampling import sample_generator
from tricoclr.data.store import open_store
from tricoclr.method import StagePlan, build_schedule, build_stage, start_index
from tricoclr.models.build import build_encoders
from tricoclr.models.memory_format import to_channels_last
from tricoclr.optim import build_optimizer, build_scheduler
from tricoclr.run_state import StageRun, TrainerHooks, stage_length

log = logging.getLogger("tricoclr.train")
MAX_CONSECUTIVE_NONFINITE = 5


class Trainer:
    """Runs ``config``'s stage schedule (resuming from ``output_dir`` when it holds a checkpoint)."""

    def __init__(self, config: Config, accelerator=None, hooks: TrainerHooks | None = None):
        self.config = config
        self.output_dir = Path(config.output_dir)
        if config.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.accelerator = accelerator or make_accelerator(config)
        self.backend = Backend(self.accelerator, config)
        self.hooks = hooks or TrainerHooks()
        self.schedule = build_schedule(config)
        self.encoders: dict[str, torch.nn.Module] = {}
        self.global_step = 0
        self.history: list[dict] = []

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def global_batch(self) -> int:
        return self.config.batch_size * self.accelerator.num_processes * self.config.grad_accum_steps

    def run(self) -> dict:
        """The schedule from the start (or its checkpoint); returns global_step and the history."""
        train_log.configure(self.is_main)
        share_cores_with_workers(self.accelerator, self.config.data.workers)
        ckpt, resume_state = self._start()
        first = resume_state["stage_index"] if resume_state else start_index(self.schedule, self.config)
        resumed_at = self.global_step if ckpt is not None else None
        try:
            for index in range(first, len(self.schedule)):
                if self._budget_left() == 0:
                    break
                state = resume_state if resume_state and resume_state["stage_index"] == index else None
                self._run_stage(index, self.schedule[index], state, ckpt if state else None)
                resume_state = None
        finally:
            self.accelerator.end_training()
        if resumed_at == self.global_step and self.is_main:
            train_log.nothing_left(self.output_dir, self.global_step)
        return {"global_step": self.global_step, "history": self.history}

    def _start(self) -> tuple[Path | None, dict | None]:
        acc, cfg = self.accelerator, self.config
        ckpt = newest_checkpoint(self.output_dir) if cfg.resume else None
        checkpoint.write_run_info(acc, cfg, resuming=ckpt is not None, global_batch=self.global_batch)
        checkpoint.clean_up_interrupted_writes(acc, self.output_dir)
        missing = missing_modalities(open_store(cfg.data.path).videos(), cfg.modalities, cfg.data)
        if missing:  # now, not after training every stage before the first that needs one
            raise ConfigError(
                f"no video of {cfg.data.path} has usable {', '.join(missing)} (prepared with --flow none or "
                f"--no-audio, or silent?): drop them from modalities (e.g. modalities=[rgb])"
            )
        self.encoders = build_encoders(cfg)
        self.hooks.encoders_built(self.encoders)
        # The entry point installed them at import; again for runs that build a Trainer directly.
        preemption.install()
        acc.init_trackers("tricoclr")
        resume_state = None
        if ckpt is not None:
            resume_state = checkpoint.read_resume_state(ckpt, self.encoders, acc, cfg)
            self.global_step = resume_state["global_step"]
            log.info("resuming from %s (stage %s, step %d)", ckpt, resume_state["stage"], self.global_step)
        elif cfg.schedule.start_stage:
            checkpoint.load_latest_encoders(self.encoders, self.output_dir)
        if self.is_main:
            ranks, steps = acc.num_processes, cfg.grad_accum_steps
            log.info(
                f"global batch = batch_size {cfg.batch_size} x {ranks} ranks x grad_accum_steps {steps} = {self.global_batch}"
            )
        return ckpt, resume_state

    def _budget_left(self) -> int | None:
        return None if self.config.max_steps is None else max(0, self.config.max_steps - self.global_step)

    # ---- one stage --------------------------------------------------------------------------

    def _run_stage(self, index: int, plan: StagePlan, resume_state: dict | None, ckpt: Path | None) -> None:
        run = self._open_stage(index, plan)
        if resume_state is not None:
            run.stage_step = checkpoint.restore_stage(
                self.accelerator, ckpt, resume_state, run.stage, run.scheduler, run.steps_per_epoch
            )
        run.images_logged = resume_state is not None or not self.config.monitor.augment_images
        run.progress = train_log.progress_bar(self.is_main, run.total_steps, run.stage_step, plan.name)
        start_epoch = run.stage_step // run.steps_per_epoch
        for epoch in range(start_epoch, math.ceil(run.total_steps / run.steps_per_epoch)):
            if run.stage_step >= run.total_steps or self._run_epoch(run, epoch):
                break
        if run.progress is not None:
            run.progress.close()
        self.history.append({"stage": plan.name, "global_step": self.global_step})
        self.hooks.stage_finished(plan, run.stage, self.encoders)
        self.accelerator.wait_for_everyone()
        self.backend.release(run.encoder)

    def _open_stage(self, index: int, plan: StagePlan) -> StageRun:
        cfg, acc = self.config, self.accelerator
        views = StageViews(both_views=(plan.trained,), view2_only=plan.samplers)
        seed = cfg.seed * 1009 + index
        loader = EpochLoader(
            cfg.data.path, views, cfg.data, seed, cfg.batch_size, rank=acc.process_index, world_size=acc.num_processes
        )
        steps_per_epoch, total_steps = stage_length(plan, loader.batches_per_epoch(), cfg)
        encoder = self.encoders[plan.trained]
        # Train mode before the stage copies it: the momentum copy must run in train mode too (MoCo,
        # CoCLR), also when this encoder was a frozen eval-mode sampler in the previous stage.
        encoder.to(acc.device).train()
        if cfg.model.channels_last:  # the samplers too (loaded from a checkpoint, they are contiguous)
            for name in (plan.trained, *plan.samplers):
                to_channels_last(self.encoders[name])
        stage = build_stage(plan, self.encoders, cfg.method)
        stage.queue.reset(generator=torch.Generator().manual_seed(seed))
        stage.to(acc.device).train()
        optimizer = build_optimizer(encoder, cfg.optim, self.global_batch, fused=acc.device.type == "cuda")
        model, optimizer = self.backend.prepare(encoder, optimizer)
        self.hooks.prepared(model, optimizer)
        stage.bind(self.backend.step_forward(model), self.backend.precision(model))
        if cfg.model.compile:
            stage.compile_frozen(cfg.model.compile_mode)
        scheduler = build_scheduler(optimizer, cfg.optim, total_steps)
        if self.is_main:
            train_log.stage_started(plan, total_steps, steps_per_epoch, loader.num_videos)
        return StageRun(
            index, plan, stage, encoder, model, optimizer, scheduler, loader, views, seed, steps_per_epoch, total_steps
        )

    def _run_epoch(self, run: StageRun, epoch: int) -> bool:
        """One epoch (from the resume position in the first); returns whether the run stops here."""
        acc, per_step = self.accelerator, self.config.grad_accum_steps
        first_step = run.stage_step % run.steps_per_epoch
        run.loader.set_epoch(epoch, start_batch=first_step * per_step)
        acc.step = 0  # accumulation counter: every epoch starts at a step boundary
        batches_left = (run.steps_per_epoch - first_step) * per_step
        run.window = {"wait": 0.0, "compute": 0.0, "samples": 0}
        micro_steps: list[tuple[bool, float]] = []
        wait_start = time.perf_counter()
        for batch_number, cpu_batch in enumerate(run.loader):
            if batch_number >= batches_left:
                break
            run.window["wait"] += time.perf_counter() - wait_start
            run.compute_start = time.perf_counter()
            flags, stats = self._micro_step(run, cpu_batch, micro_steps)
            if not acc.sync_gradients:
                run.window["compute"] += time.perf_counter() - run.compute_start
            elif self._optimizer_step(run, micro_steps, stats, flags, epoch):
                return True
            else:
                micro_steps = []
            wait_start = time.perf_counter()
        return False

    def _micro_step(self, run: StageRun, cpu_batch: dict, micro_steps: list) -> tuple[list, dict]:
        """Forward and backward of one micro-batch; ``micro_steps`` collects (bad, loss) of the step.
        Returns the all-reduced [non-finite count, loss sum, preemption signal] and the stats."""
        acc = self.accelerator
        batch = finish_batch(cpu_batch, run.views, acc.device)
        if not run.images_logged:
            train_log.log_augmented_clips(acc, run.plan.name, batch, run.views, self.global_step)
            run.images_logged = True
        if not micro_steps:
            run.snapshot = run.stage.buffers_snapshot(run.encoder)
        with acc.accumulate(run.model):
            generator = sample_generator(run.seed, self.global_step, -1, 0, "mask-self")
            loss, stats = run.stage.training_step(batch, generator)
            flags = self.backend.agree(loss, preemption.requested())
            bad = flags[0] > 0 or any(b for b, _ in micro_steps)
            if not bad:
                acc.backward(loss)
            else:
                self.backend.backward_nothing(run.model)
            micro_steps.append((bad, flags[1]))
        run.window["samples"] += batch[f"{run.plan.trained}.view1"].shape[0] * acc.num_processes
        return flags, stats

    def _optimizer_step(self, run: StageRun, micro_steps: list, stats: dict, flags: list, epoch: int) -> bool:
        """The last micro-step of an optimizer step: step (or skip), log; returns whether to stop."""
        acc = self.accelerator
        bad = any(b for b, _ in micro_steps)
        if bad:
            run.nonfinite_in_a_row += 1
            self._skip_step(run)
        else:
            run.nonfinite_in_a_row = 0
            self.backend.optimizer_step(run.model, run.optimizer)
            run.scheduler.step()
            run.optimizer.zero_grad(set_to_none=True)
            run.stage.after_optimizer_step(acc.unwrap_model(run.model), run.stage_step, run.total_steps)
        run.stage_step += 1
        self.global_step += 1
        run.window["compute"] += time.perf_counter() - run.compute_start
        if not bad:
            mean_loss = sum(loss for _, loss in micro_steps) / (self.config.grad_accum_steps * acc.num_processes)
            self._log_step(run, mean_loss, stats)
        return self._after_step(run, preempt=flags[2] > 0, epoch=epoch)

    def _skip_step(self, run: StageRun) -> None:
        """No update, no enqueue, BN statistics put back; the step still counts (the data position and
        the LR schedule are functions of the step), so a resume lands where a run without the skip
        would. Stops the run after MAX_CONSECUTIVE_NONFINITE skipped steps in a row."""
        log.warning("non-finite loss at step %d (on some rank): skipping the optimizer step", self.global_step + 1)
        self.backend.warn_partial_skip()
        run.optimizer.zero_grad(set_to_none=True)
        run.stage.discard_pending()
        run.stage.restore_buffers(run.encoder, run.snapshot)
        run.scheduler.step()
        if run.nonfinite_in_a_row >= MAX_CONSECUTIVE_NONFINITE:
            raise FloatingPointError(
                f"{run.nonfinite_in_a_row} optimizer steps in a row had a non-finite loss (stage "
                f"{run.plan.name}, step {self.global_step + 1}); stopping. The last good checkpoint "
                f"is the newest one in {self.output_dir / 'checkpoints'}."
            )

    def _after_step(self, run: StageRun, preempt: bool, epoch: int) -> bool:
        """What follows an optimizer step: checkpoint (stage end, stop, preemption, epoch end, every
        ``checkpoint_every_steps``), then exit on preemption, kNN monitor at an epoch end, stop."""
        cfg = self.config
        stage_complete = run.stage_step >= run.total_steps
        finished = stage_complete or self._budget_left() == 0
        epoch_end = run.stage_step % run.steps_per_epoch == 0
        if finished or preempt or epoch_end or self.global_step % cfg.checkpoint_every_steps == 0:
            self._save_checkpoint(run, done=stage_complete)
        if finished and not stage_complete and self.is_main:  # the run ends inside this stage
            checkpoint.save_trained_encoder(cfg, run.plan, run.encoder, self.global_step, snapshot=False)
        if preempt:
            train_log.preemption_requested(self.global_step)
            checkpoint.mark_preempted(self.accelerator, self.output_dir, self.global_step)
            raise PreemptionRequested(f"checkpoint written at step {self.global_step}")
        if epoch_end and not finished and cfg.data.val_path and cfg.monitor.knn_every_epochs:
            if (epoch + 1) % cfg.monitor.knn_every_epochs == 0:
                train_log.knn_monitor(self.accelerator, run.encoder, run.plan.trained, cfg.data, self.global_step)
        return finished

    def _save_checkpoint(self, run: StageRun, done: bool) -> None:
        position = StagePosition(run.index, run.plan, run.stage_step, run.steps_per_epoch, done)
        state = checkpoint.trainer_state(
            position, self.global_step, self.accelerator.num_processes, self.config, run.scheduler
        )
        # A finished stage's encoder files are written with (before the commit of) its checkpoint.
        cfg, step = self.config, self.global_step
        on_main = partial(checkpoint.save_trained_encoder, cfg, run.plan, run.encoder, step, snapshot=True)
        checkpoint.save_checkpoint(
            self.accelerator, cfg, step, self.encoders, run.stage, state, on_main if done else None
        )

    def _log_step(self, run: StageRun, loss: float, stats: dict) -> None:
        if run.progress is not None:
            run.progress.update(1)
            run.progress.set_postfix(loss=f"{loss:.3f}", queue=f"{run.stage.queue.fill_fraction:.2f}")
        if self.global_step % self.config.log_every_steps == 0 or self.global_step == 1:
            values = train_log.step_values(
                run.plan.name, loss, run.scheduler.get_last_lr()[0], run.stage.queue.fill_fraction, stats, run.window
            )
            run.window.update(wait=0.0, compute=0.0, samples=0)
            self.accelerator.log(values, step=self.global_step)
            self.history.append(train_log.history_entry(run.plan.name, self.global_step, loss, values))
        self.hooks.step_logged(self.global_step, loss)
