"""CoCLR's multi-instance InfoNCE: several positives per query, one softmax over all."""

from __future__ import annotations

import torch


def multi_positive_loss(
    logits: torch.Tensor, positive_mask: torch.Tensor, *, check_positives: bool = True
) -> torch.Tensor:
    """L = -log sum_{p in P} softmax(logits)_p, averaged over the batch.

    Computed as logsumexp(logits over all) - logsumexp(logits over positives), which never
    takes the log of an underflowed probability.

    Args:
        logits: (B, N) e.g. from ``contrastive_logits`` (N = 1 + K).
        positive_mask: (B, N) bool, True where the column is a positive for the row. Every row
            needs at least one positive (ValueError otherwise).
        check_positives: verify that; the check reads the mask on the host (a device sync), so
            the training step, whose masks always have one by construction, turns it off.

    Returns:
        scalar loss (float32). With only column 0 positive it equals ``infonce_loss``.
    """
    if positive_mask.shape != logits.shape:
        raise ValueError(f"positive_mask {tuple(positive_mask.shape)} does not match logits {tuple(logits.shape)}")
    positive_mask = positive_mask.to(device=logits.device, dtype=torch.bool)
    if check_positives and not bool(positive_mask.any(dim=1).all()):
        raise ValueError("every row of positive_mask needs at least one positive")
    logits = logits.float()
    log_all = torch.logsumexp(logits, dim=1)
    # -inf outside the positives: exp(-inf) = 0 adds nothing and passes no gradient.
    log_positives = torch.logsumexp(logits.masked_fill(~positive_mask, float("-inf")), dim=1)
    return (log_all - log_positives).mean()
