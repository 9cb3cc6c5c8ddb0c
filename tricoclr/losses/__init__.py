"""Losses: small pure functions of tensors. The method class wires them up."""

from .infonce import contrastive_logits, infonce_loss
from .multi_positive import multi_positive_loss

__all__ = ["contrastive_logits", "infonce_loss", "multi_positive_loss"]
