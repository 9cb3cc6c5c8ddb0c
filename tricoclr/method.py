"""One stage of cooperative contrastive learning, for any number of modalities.

Stage (trained modality m, frozen samplers S = the others in the stage, possibly none):
    q = f_m(view 1 of m)                 the encoder being trained
    k = f̄_m(view 2 of m)                 its momentum copy
    o = concat_{s in S} f_s(view 2 of s)  the oracle (each part L2-normalised)
    logits = [q·k, q·B] / tau             B: queue of past keys, O: queue of their oracle vectors
    P = {k} ∪ top-k of B by o·O (once the queue is full) ∪ same-video entries (cooperative)
        (method.oracle_similarity=standardized: by the sum of per-sampler z-scored cosines instead)
    L = -log sum_{p in P} softmax(logits)_p
With S empty (M = 1) this is InfoNCE with a MoCo queue; |S| = 1 is CoCLR; |S| = 2 the paper.

The stage owns the momentum copy, the samplers and the queue; the trainer owns the trained encoder
(it goes through ``accelerator.prepare``), the optimizer and the data. Nothing here names a
modality: inputs are looked up by the names the stage was built with.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from tricoclr.distributed import gather_from_all_ranks
from tricoclr.feature_queue import FeatureQueue
from tricoclr.losses import contrastive_logits, multi_positive_loss
from tricoclr.mining import (exclude_same_video, mask_self_positive, mine_positives, mined_precision,
                             same_video_share)


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


def build_schedule(config: dict) -> list[StagePlan]:
    """InfoNCE pre-training of every modality, then ``cycles`` x one stage per modality.

    With one modality there is nothing to cooperate with: the schedule is its InfoNCE stage.
    """
    from tricoclr.config import pretrain_epochs

    mods = list(config["modalities"])
    plans = [StagePlan(f"pretrain-{m}", m, (), pretrain_epochs(config, m)) for m in mods]
    if len(mods) > 1:
        order = config["schedule"]["order"] or mods
        for cycle in range(1, config["schedule"]["cycles"] + 1):
            for m in order:
                samplers = tuple(s for s in mods if s != m)
                plans.append(StagePlan(f"cycle{cycle}-{m}", m, samplers, config["schedule"]["stage_epochs"]))
    return plans


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


class CooperativeStage(nn.Module):
    """Momentum copy + frozen samplers + queues for one stage, and its loss."""

    def __init__(self, plan: StagePlan, encoders: dict[str, nn.Module], method_cfg: dict):
        super().__init__()
        self.plan = plan
        self.cfg = method_cfg
        trained = encoders[plan.trained].requires_grad_(True)  # it may have been a sampler before
        self.momentum_encoder = copy.deepcopy(trained).requires_grad_(False)
        self.samplers = nn.ModuleDict({name: encoders[name] for name in plan.samplers})
        for sampler in self.samplers.values():
            sampler.requires_grad_(False).eval()
        embed_dim = trained.architecture["embed_dim"]
        # The oracle's blocks, one per sampler in concatenation order (for standardized mining).
        self.oracle_dims = tuple(s.architecture["embed_dim"] for s in self.samplers.values())
        self.queue = FeatureQueue(method_cfg["queue_size"], embed_dim, sum(self.oracle_dims))
        self._pending: list[tuple[torch.Tensor, ...]] = []

    def train(self, mode: bool = True):
        super().train(mode)
        for sampler in self.samplers.values():
            sampler.eval()  # samplers always use their running statistics
        return self

    @torch.no_grad()
    def keys_and_oracle(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        key = self.momentum_encoder(batch[f"{self.plan.trained}.view2"])
        if not self.samplers:
            return key, None
        parts = [F.normalize(sampler(batch[f"{name}.view2"]).float(), dim=1) for name, sampler in self.samplers.items()]
        return key, torch.cat(parts, dim=1)

    def loss(self, query: torch.Tensor, key: torch.Tensor, oracle: torch.Tensor | None, batch: dict,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
        """The stage's loss for one micro-batch, plus statistics for logging."""
        queue = self.queue
        logits = contrastive_logits(query.float(), key.float(), queue.keys, self.cfg["temperature"])
        mask = mine_positives(
            oracle,
            queue.oracle if oracle is not None else None,
            self.cfg["topk"],
            video_ids=batch["video_index"],
            queue_video_ids=queue.video_ids,
            same_video_positives=self.plan.cooperative and self.cfg["same_video_positives"],
            queue_full=queue.is_full,
            similarity=self.cfg["oracle_similarity"],
            oracle_dims=self.oracle_dims,
        )
        if self.plan.cooperative and self.cfg["mask_self_positive"]:
            mask = mask_self_positive(mask, self.cfg["mask_self_probability"], generator)
        if not self.plan.cooperative and self.cfg["infonce_same_video"] == "exclude":
            logits = exclude_same_video(logits, batch["video_index"], queue.video_ids)
        loss = multi_positive_loss(logits, mask)
        stats = {"positives_per_sample": mask.float().sum(dim=1).mean().item()}
        # Oracle-mined positives alone, and the share of same-video entries among all queue
        # positives, separately: together they would read high while the queue fills.
        precision = mined_precision(mask, batch["label"], queue.labels, batch["video_index"], queue.video_ids)
        if precision is not None:
            stats["mined_precision"] = precision
        share = same_video_share(mask, batch["video_index"], queue.video_ids)
        if share is not None:
            stats["same_video_share"] = share
        return loss, stats

    def stash_for_enqueue(self, key: torch.Tensor, oracle: torch.Tensor | None, batch: dict) -> None:
        """Keep a micro-step's keys: all micro-steps of an optimizer step are enqueued together,
        so k micro-steps of batch b see the same negatives as one step of k*b."""
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
