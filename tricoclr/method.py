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
import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from tricoclr.config import Config, ConfigError, MethodConfig, pretrain_epochs
from tricoclr.distributed import gather_from_all_ranks
from tricoclr.feature_queue import FeatureQueue
from tricoclr.losses import contrastive_logits, multi_positive_loss
from tricoclr.mining import (
    exclude_same_video,
    mask_self_positive,
    mine_positives,
    mined_precision_counts,
    same_video_counts,
)


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
    return final - (final - base) * (1 + math.cos(progress * math.pi)) / 2


@torch.no_grad()
def momentum_update(momentum_encoder: nn.Module, encoder: nn.Module, mu: float) -> None:
    """f̄ <- mu f̄ + (1 - mu) f for parameters; buffers (BN statistics) are copied.

    Multi-tensor (``torch._foreach_*``, as torch's optimizers): a few kernels for the whole model
    instead of two per parameter, with the same arithmetic (mul, then add) per element."""
    targets = list(momentum_encoder.parameters())
    sources = [s.detach().to(t.dtype) for t, s in zip(targets, encoder.parameters(), strict=True)]
    torch._foreach_mul_(targets, mu)
    torch._foreach_add_(targets, sources, alpha=1 - mu)
    target_buffers, source_buffers = list(momentum_encoder.buffers()), list(encoder.buffers())
    if target_buffers:
        torch._foreach_copy_(target_buffers, source_buffers)


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
        self._frozen_forward: Callable = self.frozen_forward  # or its compiled version
        self.frozen_compiled = False
        self._snapshot: list[torch.Tensor] = []  # buffers_snapshot's reused storage

    def _oracle_dims(self, encoders: dict[str, nn.Module]) -> tuple[int, ...]:
        return ()

    def bind(self, model: Callable, precision: StepPrecision = StepPrecision()) -> None:
        """The forward of the trained encoder the steps use (a DDP/DeepSpeed wrapper, a compiled
        module...) and how its forwards run; by default the plain encoder in fp32."""
        self._bound = (model, precision)

    def compile_frozen(self, mode: str = "default") -> None:
        """``torch.compile`` the whole no-grad part of the step (:meth:`frozen_forward`: the momentum
        copy's and every sampler's forward, one graph); ``mode`` as torch.compile's (config
        ``model.compile_mode``). The modules themselves stay plain (checkpoints are unchanged)."""
        self._frozen_forward = torch.compile(self.frozen_forward, mode=mode)
        self.frozen_compiled = True

    # ---- the step ----------------------------------------------------------------------------

    @torch.no_grad()
    def frozen_forward(self, key_input: torch.Tensor, *sampler_inputs: torch.Tensor):
        """(key (B, D), oracle (B, D_o) or None): the momentum copy on view 2 of the trained
        modality, the samplers on view 2 of theirs (in ``plan.samplers`` order)."""
        key = self.momentum_encoder(key_input)
        return key, self.oracle(dict(zip(self.plan.samplers, sampler_inputs)))

    @torch.no_grad()
    def oracle(self, views: dict) -> torch.Tensor | None:
        """(B, sum of sampler embed dims) oracle vectors of {sampler name: its view 2 (B, C, ...)};
        None without samplers."""
        return None

    def training_step(self, batch: dict, generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
        """Forwards, mining and loss of one micro-batch; returns (scalar loss, logging statistics).

        ``batch``: '<modality>.view<n>' tensors plus 'video_index' and 'label' (B,). The keys are
        stashed for :meth:`after_optimizer_step` (:meth:`discard_pending` drops a skipped step's).
        ``generator`` draws the mask-self coin flips (cooperative stages, if enabled).
        """
        model, precision = self._bound
        if self.frozen_compiled:
            torch.compiler.cudagraph_mark_step_begin()  # a new step for CUDA graphs (reduce-overhead)
        with precision.frozen_autocast():
            key, oracle = self._frozen_forward(
                batch[f"{self.plan.trained}.view2"], *(batch[f"{name}.view2"] for name in self.plan.samplers)
            )
        with precision.query_autocast():
            query = model(batch[f"{self.plan.trained}.view1"].to(precision.input_dtype))
        loss, stats = self.loss(query, key, oracle, batch, generator)
        self._stash(key, oracle, batch)
        return loss, stats

    def loss(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        oracle: torch.Tensor | None,
        batch: dict,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, dict]:
        """The multi-positive loss of (B, D) queries against their (B, D) keys and the queue.

        Nothing here waits on the host (fixed shapes, the queue's fullness read on the device): the
        statistics are 0-dim tensors (``mined_precision`` NaN without a labelled queue positive),
        read by the caller on log steps only."""
        queue = self.queue
        logits = contrastive_logits(query.float(), key.float(), queue.keys, self.cfg.temperature)
        mask = mine_positives(
            oracle,
            queue.oracle if oracle is not None else None,
            self.cfg.topk,
            video_ids=batch["video_index"],
            queue_video_ids=queue.video_ids,
            same_video_positives=self.plan.cooperative and self.cfg.same_video_positives,
            queue_full=queue.full_on_device,
            similarity=self.cfg.oracle_similarity,
            oracle_dims=self.oracle_dims,
        )
        if self.plan.cooperative and self.cfg.mask_self_positive:
            mask = mask_self_positive(mask, self.cfg.mask_self_probability, generator)
        if not self.plan.cooperative and self.cfg.infonce_same_video == "exclude":
            logits = exclude_same_video(logits, batch["video_index"], queue.video_ids)
        # Column 0 is a positive unless mask_self_positive dropped it where another one exists.
        loss = multi_positive_loss(logits, mask, check_positives=False)
        # Oracle-mined positives alone, and the share of same-video entries among all queue
        # positives, separately: together they would read high while the queue fills.
        matched, counted = mined_precision_counts(
            mask, batch["label"], queue.labels, batch["video_index"], queue.video_ids
        )
        same, positives = same_video_counts(mask, batch["video_index"], queue.video_ids)
        stats = {
            "positives_per_sample": mask.float().sum(dim=1).mean(),
            "mined_precision": matched.float() / counted.float(),  # 0 / 0 = NaN: not logged
            "same_video_share": same.float() / positives.float(),
        }
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
        # Copies: a compiled forward in CUDA-graph mode overwrites its outputs at the next micro-step.
        oracle = None if oracle is None else oracle.detach().float().clone()
        self._pending.append(
            (key.detach().float().clone(), oracle, batch["video_index"].detach(), batch["label"].detach())
        )

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
        non-finite loss leaves no trace (NaN running statistics would poison every later step).
        The returned list is the stage's own, valid until the next call."""
        buffers = [b.detach() for m in (encoder, self.momentum_encoder) for b in m.buffers()]
        # One preallocated copy per stage, refreshed by a multi-tensor copy: a few kernels per step
        # instead of a clone per buffer (three per batch-norm layer).
        layout = [(b.shape, b.dtype, b.device) for b in buffers]
        if [(s.shape, s.dtype, s.device) for s in self._snapshot] != layout:
            self._snapshot = [torch.empty_like(b) for b in buffers]
        if buffers:
            torch._foreach_copy_(self._snapshot, buffers)
        return self._snapshot

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
    def oracle(self, views: dict) -> torch.Tensor:
        parts = [F.normalize(sampler(views[name]).float(), dim=1) for name, sampler in self.samplers.items()]
        return torch.cat(parts, dim=1)
