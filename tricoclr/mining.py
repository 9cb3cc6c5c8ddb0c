"""Positive mining: which queue entries count as positives for each query (docs/design.md, "The method").

The oracle of a sample is the concatenation, over the frozen samplers s != m, of f_s(view 2 of s),
each part L2-normalised; so o·o' is a sum of per-sampler cosines and an entry is mined when the
samplers agree on it overall, not when any single one does. That sum is the default
(``cosine_sum``, docs/design.md). A sampler whose cosines spread wider than the others' then decides the
ranking almost alone; ``standardized`` (config ``method.oracle_similarity``) z-scores each
sampler's cosines over the queue before summing, so every sampler weighs the same.

Everything here is a pure function of tensors returning a bool mask aligned with the logits of
``tricoclr.losses.contrastive_logits``: column 0 is the sample's own key, column 1 + j is queue
entry j.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tricoclr.config import ORACLE_SIMILARITIES


def check_oracle_similarity(mode: str) -> None:
    """ValueError unless ``mode`` is one of ORACLE_SIMILARITIES."""
    if mode not in ORACLE_SIMILARITIES:
        raise ValueError(f"oracle similarity must be one of {ORACLE_SIMILARITIES}, got {mode!r}")


def oracle_similarity(
    oracle: torch.Tensor,
    queue_oracle: torch.Tensor,
    mode: str = "cosine_sum",
    block_dims: Sequence[int] | None = None,
) -> torch.Tensor:
    """(B, K) float32 similarity of each sample's oracle to each queue entry's, for ranking.

    - ``cosine_sum``: o·o', the sum over samplers of their cosines (the paper's; the default, docs/design.md).
    - ``standardized``: each sampler's block (``block_dims``: the embed dim of each sampler, in the
      order of the oracle's parts) gives a (B, K) matrix of cosines; each row of it is z-scored
      over the K queue entries (mean 0, standard deviation 1; a row with no spread contributes 0),
      and the blocks are summed. A sampler whose cosines spread 10x wider than another's no longer
      decides the ranking alone. With one sampler the ranking is the same as ``cosine_sum``'s
      (z-scoring a row is increasing).
    """
    check_oracle_similarity(mode)
    # float32 so that the ranking does not depend on the autocast dtype.
    oracle = oracle.float()
    queue_oracle = queue_oracle.to(oracle.device).float()
    if mode == "cosine_sum":
        return oracle @ queue_oracle.t()
    if block_dims is None or sum(block_dims) != oracle.shape[1] or any(d <= 0 for d in block_dims):
        raise ValueError(
            f"standardized oracle similarity needs the positive dims of the samplers' blocks summing to the "
            f"oracle dim {oracle.shape[1]}, got {block_dims}"
        )
    total = torch.zeros(oracle.shape[0], queue_oracle.shape[0], device=oracle.device)
    for part, queue_part in zip(oracle.split(list(block_dims), dim=1), queue_oracle.split(list(block_dims), dim=1)):
        cosine = part @ queue_part.t()
        std, mean = torch.std_mean(cosine, dim=1, correction=0, keepdim=True)
        spread = std > 1e-6
        total += torch.where(spread, (cosine - mean) / std.clamp_min(1e-6), torch.zeros_like(cosine))
    return total


def _same_video_mask(video_ids: torch.Tensor, queue_video_ids: torch.Tensor) -> torch.Tensor:
    """(B, K) True where a queue entry comes from the sample's video. Ids < 0 (an unfilled
    queue slot, or an unknown video) never match anything."""
    same = video_ids.reshape(-1, 1) == queue_video_ids.reshape(1, -1).to(video_ids.device)
    return same & (queue_video_ids.reshape(1, -1).to(video_ids.device) >= 0)


@torch.no_grad()
def mine_positives(
    oracle: torch.Tensor | None,
    queue_oracle: torch.Tensor | None,
    k: int = 5,
    *,
    video_ids: torch.Tensor | None = None,
    queue_video_ids: torch.Tensor | None = None,
    same_video_positives: bool = False,
    queue_full: bool | torch.Tensor = True,
    similarity: str = "cosine_sum",
    oracle_dims: Sequence[int] | None = None,
) -> torch.Tensor:
    """Positive mask (B, 1 + K) for a batch against the queue.

    - Column 0 (the sample's own key) is always positive.
    - Oracle mining (needs ``queue_full``, an oracle with D_o > 0 and k > 0): the k queue entries
      whose oracle vectors are most similar to the sample's oracle become positives: largest dot
      product (``similarity="cosine_sum"``), or largest sum of per-sampler z-scored cosines
      (``"standardized"``, see ``oracle_similarity``). k larger than K is clamped to K.
    - ``same_video_positives``: queue entries whose video id equals the sample's are positives
      too (so never negatives), also before the queue is full. They are left out of the top-k
      ranking, so the oracle adds k entries from *other* videos (as CoCLR does).
    - M = 1 (``oracle`` None or D_o = 0): no oracle mining; only the key (plus same-video entries
      if asked). This makes ``multi_positive_loss`` equal to InfoNCE.

    Args:
        oracle: (B, D_o) oracle vectors of the batch, or None.
        queue_oracle: (K, D_o) oracle vectors of the queue entries, or None.
        k: number of oracle-mined positives per sample (CoCLR: 5).
        video_ids: (B,) int source-video id of each sample (>= 0).
        queue_video_ids: (K,) int source-video id of each queue entry (-1 for unfilled slots).
        same_video_positives: see above (on for cooperative stages, off for InfoNCE).
        queue_full: whether every queue slot holds a real entry; oracle mining waits for it. A
            0-dim bool tensor (``FeatureQueue.full_on_device``) keeps the decision on the device:
            the top-k is then always computed and masked, so the step never waits on the host.
        similarity: ``cosine_sum`` (default) or ``standardized``.
        oracle_dims: the dims of the samplers' blocks of the oracle, in order (needed by
            ``standardized``).

    Returns:
        bool tensor (B, 1 + K) on the device of the inputs.
    """
    check_oracle_similarity(similarity)  # up front: mining may start late
    batch_size, queue_size, device = _mask_shape(oracle, queue_oracle, video_ids, queue_video_ids)
    queue_mask = torch.zeros(batch_size, queue_size, dtype=torch.bool, device=device)

    if same_video_positives:
        if video_ids is None or queue_video_ids is None:
            raise ValueError("same_video_positives needs video_ids and queue_video_ids")
        same_video = _same_video_mask(video_ids.to(device), queue_video_ids)
        queue_mask |= same_video
    else:
        same_video = None

    has_oracle = oracle is not None and queue_oracle is not None and oracle.shape[1] > 0
    top = min(int(k), queue_size)
    device_flag = isinstance(queue_full, torch.Tensor)
    if (device_flag or queue_full) and has_oracle and top > 0:
        if queue_oracle.shape[1] != oracle.shape[1]:
            raise ValueError(f"oracle dim {oracle.shape[1]} differs from queue_oracle dim {queue_oracle.shape[1]}")
        scores = oracle_similarity(oracle, queue_oracle.to(device), similarity, oracle_dims)
        if same_video is not None:
            scores = scores.masked_fill(same_video, float("-inf"))
        top_indices = scores.topk(top, dim=1).indices
        # If a row has fewer than k other-video entries, topk also returns some -inf
        # (same-video) columns: they are positives already, so nothing changes.
        if device_flag:  # fixed shapes whatever the flag: no host sync
            mined = torch.zeros_like(queue_mask).scatter_(1, top_indices, True)
            queue_mask |= mined & queue_full.to(device=device, dtype=torch.bool)
        else:
            queue_mask.scatter_(1, top_indices, True)

    key_column = torch.ones(batch_size, 1, dtype=torch.bool, device=device)
    return torch.cat([key_column, queue_mask], dim=1)


def _mask_shape(oracle, queue_oracle, video_ids, queue_video_ids):
    """(B, K, device) from whichever inputs are given."""
    if oracle is not None and queue_oracle is not None:
        if oracle.dim() != 2 or queue_oracle.dim() != 2:
            raise ValueError("oracle must be (B, D_o) and queue_oracle (K, D_o)")
        return oracle.shape[0], queue_oracle.shape[0], oracle.device
    if video_ids is not None and queue_video_ids is not None:
        return video_ids.shape[0], queue_video_ids.shape[0], video_ids.device
    raise ValueError(
        "mine_positives needs oracle and queue_oracle (possibly with 0 columns) or video_ids "
        "and queue_video_ids to know the batch and queue sizes"
    )


def mask_self_positive(
    positive_mask: torch.Tensor,
    probability: float,
    generator: torch.Generator | None = None,
    *,
    per_row: bool = False,
) -> torch.Tensor:
    """Randomly drop the self-positive (column 0) where other positives exist.

    CoCLR's later fix (TengdaHan/CoCLR issue #43): after InfoNCE pre-training q·k is already
    high, so the multi-positive loss starts near zero and its gradient is small; with probability
    ``probability`` (0.9 there) the key is removed from the positives of every row that has
    another positive, so the mined positives drive the gradient. Rows whose only positive is the
    key keep it (the loss needs at least one positive per row).

    CoCLR draws once per iteration for the whole batch; ``per_row=True`` draws per row instead.
    Draws are made on the CPU from ``generator`` (or torch's global generator), so they are the
    same on any device.

    Returns a new mask; the input is not modified.
    """
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"probability must be in [0, 1], got {probability}")
    has_other_positive = positive_mask[:, 1:].any(dim=1)
    shape = (positive_mask.shape[0],) if per_row else ()
    # The CPU draw moves to the device as a tensor (no bool() of it): the step never waits on the host.
    draw = torch.rand(shape, generator=generator) < probability
    drop = has_other_positive & draw.to(positive_mask.device, non_blocking=True)
    masked = positive_mask.clone()
    masked[:, 0] &= ~drop
    return masked


def exclude_same_video(logits: torch.Tensor, video_ids: torch.Tensor, queue_video_ids: torch.Tensor) -> torch.Tensor:
    """Logits with the queue entries from each sample's own video set to -inf (neither positive
    nor negative): for InfoNCE stages on small datasets, where a queue larger than about one
    epoch's worth of videos holds other clips of the anchor's video, which as negatives ask the
    encoder to tell apart clips of one video (measured, docs/demo_data.md).

    Args:
        logits: (B, 1 + K) from ``contrastive_logits``; column 0 (the key) is never touched.
        video_ids: (B,) source-video id of each sample; queue_video_ids: (K,), -1 for unfilled.

    Returns a new tensor; the input is not modified.
    """
    same = _same_video_mask(video_ids.to(logits.device), queue_video_ids)
    excluded = torch.cat([torch.zeros_like(same[:, :1]), same], dim=1)
    return logits.masked_fill(excluded, float("-inf"))


@torch.no_grad()
def mined_precision(
    positive_mask: torch.Tensor,
    labels: torch.Tensor,
    queue_labels: torch.Tensor,
    video_ids: torch.Tensor | None = None,
    queue_video_ids: torch.Tensor | None = None,
) -> float | None:
    """Fraction of the oracle-mined queue positives (columns 1..) that share the anchor's class
    label; pairs where either label is unknown (< 0) are ignored. With ``video_ids`` and
    ``queue_video_ids``, entries from the anchor's own video are left out: they always share its
    class, so counting them would make the precision start high while the queue fills and fall
    to the oracle's own once it holds more videos (see :func:`same_video_share`). Without them
    every queue positive counts. For logging only: labels never influence training. None when
    there is no such positive.
    """
    matched, counted = mined_precision_counts(positive_mask, labels, queue_labels, video_ids, queue_video_ids)
    total = int(counted)
    if total == 0:
        return None
    return int(matched) / total


@torch.no_grad()
def mined_precision_counts(
    positive_mask: torch.Tensor,
    labels: torch.Tensor,
    queue_labels: torch.Tensor,
    video_ids: torch.Tensor | None = None,
    queue_video_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(matched, counted) 0-dim int64 tensors on the mask's device: the queue positives whose
    labels agree with the anchor's, and all with both labels known (see ``mined_precision``, also
    for the video ids). Tensors, so the training step computes them without a host sync; they are
    read on log steps."""
    queue_positives = positive_mask[:, 1:]
    labels = labels.reshape(-1, 1).to(queue_positives.device)
    queue_labels = queue_labels.reshape(1, -1).to(queue_positives.device)
    counted = queue_positives & (labels >= 0) & (queue_labels >= 0)
    if video_ids is not None and queue_video_ids is not None:
        counted = counted & ~_same_video_mask(video_ids.to(queue_positives.device), queue_video_ids)
    return (counted & (labels == queue_labels)).sum(), counted.sum()


@torch.no_grad()
def same_video_share(
    positive_mask: torch.Tensor, video_ids: torch.Tensor, queue_video_ids: torch.Tensor
) -> float | None:
    """Fraction of the queue positives (columns 1..) that are other clips of the anchor's own
    video (positives by construction, not mined). For logging only; None when there is no
    queue positive."""
    same, total = same_video_counts(positive_mask, video_ids, queue_video_ids)
    return None if int(total) == 0 else int(same) / int(total)


@torch.no_grad()
def same_video_counts(
    positive_mask: torch.Tensor, video_ids: torch.Tensor, queue_video_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(same-video, all) queue positives as 0-dim int64 tensors (no host sync; see
    ``same_video_share``)."""
    queue_positives = positive_mask[:, 1:]
    same = _same_video_mask(video_ids.to(queue_positives.device), queue_video_ids)
    return (queue_positives & same).sum(), queue_positives.sum()
