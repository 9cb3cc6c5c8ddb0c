"""InfoNCE with a MoCo queue of negatives (the M = 1 loss; the logits every stage uses)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def contrastive_logits(
    query: torch.Tensor, key: torch.Tensor, queue_keys: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Logits of each query against its own key and against every queued key.

    Args:
        query: (B, D) L2-normalised outputs of the encoder being trained (view 1).
        key: (B, D) L2-normalised outputs of its momentum copy (view 2), same row order.
        queue_keys: (K, D) keys of past batches; K may be 0 (empty queue).
        temperature: tau > 0.

    Returns:
        (B, 1 + K): column 0 is q·k, columns 1.. are q·queue_keys[j], all divided by tau.
    """
    if query.shape != key.shape:
        raise ValueError(f"query {tuple(query.shape)} and key {tuple(key.shape)} differ in shape")
    if queue_keys.dim() != 2 or queue_keys.shape[1] != query.shape[1]:
        raise ValueError(f"queue_keys must be (K, {query.shape[1]}), got {tuple(queue_keys.shape)}")
    # Keys are targets, never trained through: no gradient reaches the momentum encoder or queue.
    key = key.detach().to(query.dtype)
    queue_keys = queue_keys.detach().to(query.dtype)
    positive = (query * key).sum(dim=1, keepdim=True)
    negatives = query @ queue_keys.t()
    return torch.cat([positive, negatives], dim=1) / temperature


def infonce_loss(query: torch.Tensor, key: torch.Tensor, queue_keys: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo's InfoNCE: cross-entropy of ``contrastive_logits`` with the key (column 0) as target.

    Returns the mean over the batch. With an empty queue the only logit is the positive one and
    the loss is exactly 0.
    """
    logits = contrastive_logits(query, key, queue_keys, temperature)
    target = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    # float32 softmax: bf16/fp16 logits of 1/0.07 scale lose too much in log-sum-exp.
    return F.cross_entropy(logits.float(), target)
