"""The method: one stage of cooperative contrastive learning, for any number of modalities.

Stage (trained modality m, frozen samplers S = the others in the stage, possibly none):
    q = f_m(view 1 of m)                 the encoder being trained
    k = f̄_m(view 2 of m)                 its momentum copy
    o = concat_{s in S} f_s(view 2 of s)  the oracle (each part L2-normalised)
    logits = [q·k, q·B] / tau             B: queue of past keys, O: queue of their oracle vectors
    P = {k} ∪ top-k of B by o·O (once the queue is full) ∪ same-video entries (cooperative)
        (method.oracle_similarity=standardized: by the sum of per-sampler z-scored cosines instead)
    L = -log sum_{p in P} softmax(logits)_p
With S empty (M = 1) this is InfoNCE with a MoCo queue (:class:`InfoNCEStage`); |S| = 1 is CoCLR;
|S| = 2 the paper (:class:`CooperativeStage`). docs/design.md derives it and gives the policies.

A stage owns its step: :meth:`InfoNCEStage.training_step` (forwards, mining, loss; the keys are
stashed) and :meth:`InfoNCEStage.after_optimizer_step` (EMA of the momentum copy, then enqueue).
It holds the momentum copy, the samplers and the queue; the caller owns the trained encoder (it
may be wrapped by DDP or DeepSpeed, see :meth:`InfoNCEStage.bind`), the optimizer and the data.
Nothing here names a modality: inputs are looked up by the names the stage was built with.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from tricoclr.config import Config, ConfigError, MethodConfig, pretrain_epochs
from tricoclr.distributed import gather_from_all_ranks
from tricoclr.feature_queue import FeatureQueue
from tricoclr.losses import contrastive_logits, multi_positive_loss
from tricoclr.mining import mask_self_positive, mine_positives, mined_precision


@dataclass(frozen=True)
class StagePlan:
    """A stage of the schedule: ``name`` like 'pretrain-rgb' or 'cycle1-flow'."""

    name: str
    trained: str
    samplers: tuple[str, ...]
    epochs: float

    @property
    def cooperative(self) -> bool:
        return bool(self.samplers)


def build_schedule(config: Config) -> list[StagePlan]:
    """InfoNCE pre-training of every modality, then ``cycles`` x one stage per modality.

    With one modality there is nothing to cooperate with: the schedule is its InfoNCE stage.
    """
    mods = list(config.modalities)
    plans = [StagePlan(f"pretrain-{m}", m, (), pretrain_epochs(config, m)) for m in mods]
    if len(mods) > 1:
        order = config.schedule.order or mods
        for cycle in range(1, config.schedule.cycles + 1):
            for m in order:
                samplers = tuple(s for s in mods if s != m)
                plans.append(StagePlan(f"cycle{cycle}-{m}", m, samplers, config.schedule.stage_epochs))
    return plans


def start_index(schedule: list[StagePlan], config: Config) -> int:
    """Index of ``schedule.start_stage`` in the schedule (0 when unset); ConfigError if absent."""
    start = config.schedule.start_stage
    names = [plan.name for plan in schedule]
    if start and start not in names:
        raise ConfigError(f"schedule.start_stage '{start}' is not a stage of this schedule: {names}")
    return names.index(start) if start else 0


def momentum_at(step: int, total_steps: int, base: float, final: float) -> float:
    """EMA coefficient: constant, or a cosine from ``base`` to ``final`` over the stage."""
    if final == base or total_steps <= 1:
        return base
    progress = min(1.0, step / (total_steps - 1))
    return final - (final - base) * (1 + torch.cos(torch.tensor(progress * torch.pi)).item()) / 2


@torch.no_grad()
def momentum_update(momentum_encoder: nn.Module, encoder: nn.Module, mu: float) -> None:
    """f̄ <- mu f̄ + (1 - mu) f for parameters; buffers (BN statistics) are copied."""
    for target, source in zip(momentum_encoder.parameters(), encoder.parameters()):
        target.mul_(mu).add_(source.detach().to(target.dtype), alpha=1 - mu)
    for target, source in zip(momentum_encoder.buffers(), encoder.buffers()):
        target.copy_(source)


@dataclass(frozen=True)
class StepPrecision:
    """How a step's forwards run: the context of the trained encoder's forward, the context of the
    frozen forwards (momentum copy, samplers), and the dtype the trained encoder's input must have.
    Plain fp32 by default; the trainer's backend supplies autocast or DeepSpeed's casts."""

    query_autocast: Callable = nullcontext
    frozen_autocast: Callable = nullcontext
    input_dtype: torch.dtype = torch.float32


def build_stage(plan: StagePlan, encoders: dict[str, nn.Module], method_cfg: MethodConfig) -> InfoNCEStage:
    """The stage class for a plan: InfoNCE without samplers, cooperative with them."""
    return (CooperativeStage if plan.cooperative else InfoNCEStage)(plan, encoders, method_cfg)


class InfoNCEStage(nn.Module):
    """One modality trained alone: momentum copy + queue of keys; InfoNCE (MoCo) loss.

    ``encoders[plan.trained]`` is the encoder being trained (set to require gradients); the
    momentum copy is a deep copy of it taken now. ``method_cfg``: the ``method`` config section.
    """

    def __init__(self, plan: StagePlan, encoders: dict[str, nn.Module], method_cfg: MethodConfig):
        super().__init__()
        self.plan = plan
        self.cfg = method_cfg
        trained = encoders[plan.trained].requires_grad_(True)  # it may have been a sampler before
        self.momentum_encoder = copy.deepcopy(trained).requires_grad_(False)
        self.oracle_dims = self._oracle_dims(encoders)
        self.queue = FeatureQueue(method_cfg.queue_size, trained.architecture["embed_dim"], sum(self.oracle_dims))
        self._pending: list[tuple[torch.Tensor, ...]] = []
        # Not registered as submodules: the trainer owns (and wraps) the trained encoder.
        self._bound = (trained, StepPrecision())

    def _oracle_dims(self, encoders: dict[str, nn.Module]) -> tuple[int, ...]:
        return ()

    def bind(self, model: Callable, precision: StepPrecision = StepPrecision()) -> None:
        """The forward of the trained encoder the steps use (a DDP/DeepSpeed wrapper, a compiled
        module...) and how its forwards run; by default the plain encoder in fp32."""
        self._bound = (model, precision)

    # ---- the step ----------------------------------------------------------------------------

    @torch.no_grad()
    def oracle(self, batch: dict) -> torch.Tensor | None:
        """(B, sum of sampler embed dims) oracle vectors; None without samplers."""
        return None

    def training_step(self, batch: dict, generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
        """Forwards, mining and loss of one micro-batch; returns (scalar loss, logging statistics).

        ``batch``: '<modality>.view<n>' tensors plus 'video_index' and 'label' (B,). The keys are
        stashed for :meth:`after_optimizer_step` (:meth:`discard_pending` drops a skipped step's).
        ``generator`` draws the mask-self coin flips (cooperative stages, if enabled).
        """
        model, precision = self._bound
        with precision.frozen_autocast():
            with torch.no_grad():
                key = self.momentum_encoder(batch[f"{self.plan.trained}.view2"])
            oracle = self.oracle(batch)
        with precision.query_autocast():
            query = model(batch[f"{self.plan.trained}.view1"].to(precision.input_dtype))
        loss, stats = self.loss(query, key, oracle, batch, generator)
        self._stash(key, oracle, batch)
        return loss, stats

    def loss(self, query: torch.Tensor, key: torch.Tensor, oracle: torch.Tensor | None, batch: dict,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
        """The multi-positive loss of (B, D) queries against their (B, D) keys and the queue."""
        queue = self.queue
        logits = contrastive_logits(query.float(), key.float(), queue.keys, self.cfg.temperature)
        mask = mine_positives(
            oracle,
            queue.oracle if oracle is not None else None,
            self.cfg.topk,
            video_ids=batch["video_index"],
            queue_video_ids=queue.video_ids,
            same_video_positives=self.plan.cooperative and self.cfg.same_video_positives,
            queue_full=queue.is_full,
            similarity=self.cfg.oracle_similarity,
            oracle_dims=self.oracle_dims,
        )
        if self.plan.cooperative and self.cfg.mask_self_positive:
            mask = mask_self_positive(mask, self.cfg.mask_self_probability, generator)
        loss = multi_positive_loss(logits, mask)
        stats = {"positives_per_sample": mask.float().sum(dim=1).mean().item()}
        precision = mined_precision(mask, batch["label"], queue.labels)
        if precision is not None:
            stats["mined_precision"] = precision
        return loss, stats

    def after_optimizer_step(self, encoder: nn.Module, stage_step: int, total_steps: int) -> None:
        """After the optimizer stepped ``encoder`` (unwrapped): EMA of the momentum copy with the
        coefficient of ``stage_step`` (:func:`momentum_at`), then enqueue the step's keys."""
        mu = momentum_at(stage_step, total_steps, self.cfg.momentum, self.cfg.momentum_final)
        momentum_update(self.momentum_encoder, encoder, mu)
        self.enqueue_pending()

    # ---- the queue ---------------------------------------------------------------------------

    def _stash(self, key: torch.Tensor, oracle: torch.Tensor | None, batch: dict) -> None:
        """Keep a micro-step's keys: all micro-steps of an optimizer step are enqueued together,
        so n micro-steps of batch b see the same negatives as one step of n*b."""
        self._pending.append((key.detach().float(), None if oracle is None else oracle.detach().float(),
                              batch["video_index"].detach(), batch["label"].detach()))

    def discard_pending(self) -> None:
        """Drop the stashed keys of an optimizer step that is skipped (every rank does it together)."""
        self._pending.clear()

    @torch.no_grad()
    def enqueue_pending(self) -> None:
        """Gather the stashed keys from every rank and enqueue them on every rank.

        Order: micro-step by micro-step, and within a micro-step in rank order. Rank r's micro-step
        j holds the (j * ranks + r)-th slice of the optimizer step's global batch (the LMDB
        sampler's layout), so the queue receives the samples in the order of the global batch:
        the same queue, in the same order, whatever the split into ranks and micro-steps.
        """
        if not self._pending:
            return
        micro_steps = len(self._pending)
        keys, oracles, ids, labels = zip(*self._pending)
        self._pending.clear()

        def gather(parts: tuple[torch.Tensor, ...]) -> torch.Tensor:
            # One all-gather of (micro_steps, b, ...) per tensor, then rank-major -> micro-step-major.
            stacked = gather_from_all_ranks(torch.stack(parts))
            ranks = stacked.shape[0] // micro_steps
            stacked = stacked.reshape(ranks, micro_steps, *stacked.shape[1:]).transpose(0, 1)
            return stacked.reshape(-1, *stacked.shape[3:])

        oracle = gather(oracles) if oracles[0] is not None else None
        self.queue.enqueue(gather(keys), oracle, video_ids=gather(ids), labels=gather(labels))

    # ---- skipped steps -----------------------------------------------------------------------

    def buffers_snapshot(self, encoder: nn.Module) -> list[torch.Tensor]:
        """Copies of the BN statistics of the trained encoder and of the momentum copy, taken before
        an optimizer step's forwards: a skipped step puts them back, so a batch that produced a
        non-finite loss leaves no trace (NaN running statistics would poison every later step)."""
        return [b.detach().clone() for m in (encoder, self.momentum_encoder) for b in m.buffers()]

    @torch.no_grad()
    def restore_buffers(self, encoder: nn.Module, snapshot: list[torch.Tensor]) -> None:
        buffers = [b for m in (encoder, self.momentum_encoder) for b in m.buffers()]
        for buffer, saved in zip(buffers, snapshot, strict=True):
            buffer.copy_(saved)


class CooperativeStage(InfoNCEStage):
    """One modality trained with the others as frozen samplers whose embeddings (the oracle) mine
    extra positives from the queue (CoCLR for two modalities, TriCoCLR for three)."""

    def __init__(self, plan: StagePlan, encoders: dict[str, nn.Module], method_cfg: MethodConfig):
        super().__init__(plan, encoders, method_cfg)
        self.samplers = nn.ModuleDict({name: encoders[name] for name in plan.samplers})
        for sampler in self.samplers.values():
            sampler.requires_grad_(False).eval()

    def _oracle_dims(self, encoders: dict[str, nn.Module]) -> tuple[int, ...]:
        # The oracle's blocks, one per sampler in concatenation order (for standardized mining).
        return tuple(encoders[name].architecture["embed_dim"] for name in self.plan.samplers)

    def train(self, mode: bool = True):
        super().train(mode)
        for sampler in self.samplers.values():
            sampler.eval()  # samplers always use their running statistics
        return self

    @torch.no_grad()
    def oracle(self, batch: dict) -> torch.Tensor:
        parts = [F.normalize(sampler(batch[f"{name}.view2"]).float(), dim=1) for name, sampler in self.samplers.items()]
        return torch.cat(parts, dim=1)
