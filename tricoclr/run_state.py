"""The state a training run carries: the stage in progress, and the hooks a caller may give.

:class:`TrainerHooks` are the trainer's explicit extension points (tests and probes observe a run
through them instead of overriding the trainer's internals); :class:`StageRun` is what the
trainer's stage loop passes between its functions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from tricoclr.config import Config, ConfigError
from tricoclr.data.dataset import EpochLoader, StageViews
from tricoclr.method import InfoNCEStage, StagePlan


class TrainerHooks:
    """Points where a caller observes or adjusts a run (tests, probes); each does nothing here."""

    def encoders_built(self, encoders: dict) -> None:
        """After the encoders are built with their initial weights, before any are loaded."""

    def prepared(self, model, optimizer) -> None:
        """After a stage's encoder and optimizer went through ``accelerator.prepare``."""

    def step_logged(self, global_step: int, loss: float) -> None:
        """After a good optimizer step was logged; ``loss`` averaged over ranks and micro-steps."""

    def stage_finished(self, plan: StagePlan, stage: InfoNCEStage, encoders: dict) -> None:
        """At the end of a stage (also of a run that stops inside one)."""


@dataclass
class StageRun:
    """A stage in progress: what it trains with and where it is."""

    index: int
    plan: StagePlan
    stage: InfoNCEStage
    encoder: torch.nn.Module
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    loader: EpochLoader
    views: StageViews
    seed: int
    steps_per_epoch: int
    total_steps: int
    stage_step: int = 0
    nonfinite_in_a_row: int = 0
    images_logged: bool = False
    progress: object = None
    window: dict = field(default_factory=dict)  # seconds waiting / computing, samples since the last log
    compute_start: float = 0.0
    snapshot: list = field(default_factory=list)  # BN statistics before the step (for a skip)


def stage_length(plan: StagePlan, batches_per_epoch: int, config: Config) -> tuple[int, int]:
    """(optimizer steps per epoch, steps of the stage): ``plan.epochs`` epochs (at least one step),
    capped by ``max_steps_per_stage``. ConfigError if an epoch is shorter than one optimizer step."""
    steps_per_epoch = batches_per_epoch // config.grad_accum_steps
    if steps_per_epoch == 0:
        raise ConfigError(
            f"stage {plan.name}: {batches_per_epoch} batches per epoch are fewer "
            f"than grad_accum_steps={config.grad_accum_steps}"
        )
    total_steps = max(1, math.ceil(plan.epochs * steps_per_epoch))
    if config.max_steps_per_stage is not None:
        total_steps = min(total_steps, config.max_steps_per_stage)
    return steps_per_epoch, total_steps
