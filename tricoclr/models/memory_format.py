"""Channels-last memory layout for an encoder, whatever its convolutions' rank."""

from __future__ import annotations

import torch
from torch import nn


def to_channels_last(module: nn.Module) -> nn.Module:
    """Put ``module``'s 5-D weights in ``channels_last_3d`` and its 4-D weights in ``channels_last``,
    in place; returns it. ``Module.to(memory_format=channels_last_3d)`` alone raises on a 2-D CNN's
    4-D weights (the audio ResNet), and a 3-D CNN may hold both (S3D's separable convolutions are
    5-D). Values are unchanged; cuDNN's kernels for these layouts are faster under autocast."""
    with torch.no_grad():
        for param in module.parameters():
            layout = {5: torch.channels_last_3d, 4: torch.channels_last}.get(param.dim())
            if layout is not None and not param.is_contiguous(memory_format=layout):
                param.data = param.data.contiguous(memory_format=layout)
    return module
