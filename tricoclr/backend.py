"""Where Accelerate's backends differ: DDP with autocast, or a DeepSpeed engine.

Only the trained encoder and its optimizer go through ``accelerator.prepare`` (DDP, or one
DeepSpeed engine: Accelerate's DeepSpeed integration takes one model per prepare); the momentum
copy, the frozen samplers and the queues stay outside it (``tricoclr.method``). Accelerate and
DeepSpeed are imported here only, so the evaluation never loads them.
"""

from __future__ import annotations

import logging
import os
from contextlib import nullcontext
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import GradientAccumulationPlugin, ProjectConfiguration

from tricoclr.config import Config
from tricoclr.distributed import usable_cpus
from tricoclr.method import StepPrecision

log = logging.getLogger("tricoclr.train")


def make_accelerator(config: Config) -> Accelerator:
    """Accumulation over ``grad_accum_steps`` micro-steps (not tied to the loader's end),
    TensorBoard logs under ``output_dir/tb``."""
    output_dir = Path(config.output_dir)
    return Accelerator(
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=config.grad_accum_steps, sync_with_dataloader=False
        ),
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "tb")),
        step_scheduler_with_optimizer=False,
    )


def share_cores_with_workers(accelerator: Accelerator, workers: int) -> int | None:
    """On a CPU, leave a core to each data worker: intra-op threads = this process's share of the
    cores minus ``workers`` (at least 1), never more than torch uses now. Returns the new thread
    count, or None when nothing changed (an accelerator, no workers, or ``OMP_NUM_THREADS`` set:
    the user's choice wins; torchrun sets it for several processes per node).

    Why: torch's default (one thread per core) plus the workers oversubscribes the cores. Measured,
    the demo's TriCoCLR stage (720 steps, 2 workers, 2 cores): 70.9 s with 2 threads, 48.8 s with 1.
    """
    if accelerator.device.type != "cpu" or workers == 0 or "OMP_NUM_THREADS" in os.environ:
        return None
    per_process = max(1, usable_cpus() // int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes)))
    threads = max(1, per_process - workers)
    if threads >= torch.get_num_threads():
        return None
    torch.set_num_threads(threads)
    log.info(f"{threads} intra-op thread(s) per process, leaving a core to each of the {workers} data workers")
    return threads


class Backend:
    """The backend-specific parts of a stage for ``accelerator`` under ``config``."""

    def __init__(self, accelerator: Accelerator, config: Config):
        self.accelerator = accelerator
        self.config = config

    @property
    def deepspeed(self) -> bool:
        return getattr(self.accelerator.state, "deepspeed_plugin", None) is not None

    def prepare(self, encoder: torch.nn.Module, optimizer: torch.optim.Optimizer):
        """(model, optimizer) wrapped by Accelerate; DeepSpeed's config is filled in first."""
        self._configure_deepspeed()
        return self.accelerator.prepare(encoder, optimizer)

    def _configure_deepspeed(self) -> None:
        """The project config is the one source of the batch size, accumulation and clipping: write
        them into the DeepSpeed config, so DeepSpeed's loss scaling (1 / accumulation steps) and its
        accumulation boundary agree with the training loop."""
        if not self.deepspeed:
            return
        cfg, ds = self.config, self.accelerator.state.deepspeed_plugin.deepspeed_config
        steps = cfg.grad_accum_steps
        configured = ds.get("gradient_accumulation_steps", "auto")
        if configured not in ("auto", steps):
            log.warning(
                "DeepSpeed config has gradient_accumulation_steps=%s; using grad_accum_steps=%d", configured, steps
            )
        ds["gradient_accumulation_steps"] = steps
        ds["train_micro_batch_size_per_gpu"] = cfg.batch_size
        ds["train_batch_size"] = cfg.batch_size * steps * self.accelerator.num_processes
        ds["gradient_clipping"] = float(cfg.optim.grad_clip or 0.0)
        self.accelerator.gradient_accumulation_steps = steps

    def precision(self, model) -> StepPrecision:
        """How a step's forwards run: the trained encoder under Accelerate's autocast (off under
        DeepSpeed, whose engine casts the module itself to bf16/fp16: its inputs must have that
        dtype); the frozen encoders under the same autocast, or under DeepSpeed torch's autocast
        in the engine's precision."""
        acc = self.accelerator
        if not self.deepspeed:
            return StepPrecision(acc.autocast, acc.autocast, torch.float32)
        input_dtype = next(acc.unwrap_model(model).parameters()).dtype
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(str(acc.mixed_precision))
        frozen = nullcontext
        if dtype is not None and acc.device.type != "cpu":
            frozen = lambda: torch.autocast(acc.device.type, dtype=dtype)  # noqa: E731
        return StepPrecision(acc.autocast, frozen, input_dtype)

    def step_forward(self, model):
        """The trained encoder's forward the step calls: ``model`` itself, or with ``model.compile``
        its ``torch.compile`` (forward and backward; DDP's compiled path). A DeepSpeed engine is
        left eager (it casts and partitions the module itself): a warning says so."""
        cfg = self.config.model
        if not cfg.compile:
            return model
        if self.deepspeed:
            log.warning(
                "model.compile: the trained encoder runs eager under DeepSpeed (only the frozen forwards are compiled)"
            )
            return model
        return torch.compile(model, mode=cfg.compile_mode)

    def agree(self, loss: torch.Tensor, preempt: bool) -> list[float]:
        """[non-finite count, loss sum, preemption requests] over all ranks: one all-reduce per
        micro-step carries every decision the ranks must take together (skip a step, stop), or
        DDP would deadlock. ``loss``: this rank's 0-dim micro-step loss."""
        finite = torch.isfinite(loss.detach())
        kept = torch.where(finite, loss.detach().float(), torch.zeros_like(loss, dtype=torch.float32))
        flags = torch.stack([(~finite).float(), kept, torch.tensor(float(preempt), device=loss.device)])
        return self.accelerator.reduce(flags, "sum").tolist()

    def backward_nothing(self, model) -> None:
        """Stand-in for the backward of a micro-step whose optimizer step will be skipped.

        DDP: a forward with gradient sync on arms the reducer, and an armed reducer all-reduces at
        the next backward even under ``no_sync``; a zero loss over every parameter completes the
        cycle (all ranks do it: the decision is all-reduced). DeepSpeed with accumulation: the engine
        counts micro-steps and reduces gradients in its own buffers, so it gets the zero loss too and
        steps on the earlier micro-steps' gradients (a partial step, warned about); without
        accumulation it gets nothing, and the step is skipped exactly.
        """
        if self.deepspeed and self.config.grad_accum_steps == 1:
            return
        params = [p for p in model.parameters() if p.requires_grad]
        self.accelerator.backward(torch.stack([p.sum() for p in params]).sum() * 0.0)

    def warn_partial_skip(self) -> None:
        if self.deepspeed and self.config.grad_accum_steps > 1:
            log.warning(
                "under DeepSpeed with gradient accumulation the engine has stepped on the gradients "
                "of the micro-steps before the non-finite one"
            )

    def optimizer_step(self, model, optimizer) -> None:
        """Clip (a no-op under DeepSpeed, whose config clips), then step. Under DeepSpeed the engine
        stepped inside ``accelerator.backward``."""
        clip = self.config.optim.grad_clip
        if clip:
            self.accelerator.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()

    def release(self, encoder: torch.nn.Module) -> None:
        """Give the stage's engine/DDP wrapper back; the encoder goes on as a plain fp32 module."""
        if self.deepspeed and any(p.dtype != torch.float32 for p in encoder.parameters()):
            # The engine cast the module to bf16/fp16 and holds the fp32 weights (partitioned):
            # gather them, so the encoder goes on (and is saved) at full precision.
            from deepspeed.utils import safe_get_full_fp32_param  # only under DeepSpeed (optional)

            full = [safe_get_full_fp32_param(p) for p in encoder.parameters()]
            encoder.float()
            with torch.no_grad():
                for param, value in zip(encoder.parameters(), full):
                    param.copy_(value)
        self.accelerator.free_memory()
        encoder.to("cpu")
