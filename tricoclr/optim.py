"""The optimizer of a stage and its learning-rate schedule (per optimizer step)."""

from __future__ import annotations

import math

import torch

from tricoclr.config import OptimConfig


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str, min_ratio: float) -> float:
    """Linear warm-up, then cosine decay to ``min_ratio`` (or constant), per optimizer step."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant" or total_steps <= warmup_steps:
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def build_optimizer(
    encoder: torch.nn.Module, opt: OptimConfig, global_batch: int, fused: bool
) -> torch.optim.Optimizer:
    """Adam, AdamW or SGD (momentum 0.9) over the encoder's trainable parameters; with
    ``optim.lr_reference_batch`` the learning rate scales linearly with the global batch."""
    lr = opt.lr
    if opt.lr_reference_batch:
        lr = lr * global_batch / opt.lr_reference_batch  # linear scaling rule
    params = [p for p in encoder.parameters() if p.requires_grad]
    extra = {"fused": True} if fused else {}
    if opt.name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=opt.weight_decay, **extra)
    if opt.name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=opt.weight_decay, **extra)
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=opt.weight_decay, **extra)


def build_scheduler(optimizer: torch.optim.Optimizer, opt: OptimConfig, total_steps: int):
    """A LambdaLR of :func:`lr_factor`, stepped once per optimizer step whatever the world size
    (so not prepared by Accelerate)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, opt.warmup_steps, opt.schedule, opt.min_lr_ratio)
    )
