"""Collectives that also work in a single process, and batch norm over the global batch.

Everything here works without an initialised process group (world size 1) and on both gloo (CPU)
and NCCL (CUDA), so one code path serves a laptop, one GPU and many.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one, e.g. under SLURM)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of processes in the default group; 1 without a process group."""
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """Rank of this process in the default group; 0 without a process group."""
    return dist.get_rank() if is_distributed() else 0


@torch.no_grad()
def gather_from_all_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from every rank along dim 0, in rank order; no gradient.

    Every rank must pass a tensor of the same shape and dtype. With world size 1 this returns
    the (detached) input itself.
    """
    tensor = tensor.detach()
    if world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


class _AllReduceSum(torch.autograd.Function):
    """Differentiable all-reduce (sum): the gradient of a sum over ranks is the all-reduced sum
    of the ranks' output gradients. (torch.distributed.nn.functional.all_reduce does the same
    but is deprecated and warns on every call in recent torch.)"""

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        reduced = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM, group=group)
        return reduced

    @staticmethod
    def backward(ctx, grad_output):
        grad = grad_output.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def all_reduce_sum_with_grad(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Sum of ``tensor`` over the ranks of ``group`` (default: all), differentiable; identity
    without a process group."""
    if not is_distributed():
        return tensor
    return _AllReduceSum.apply(tensor, group)


class GlobalBatchNorm(_BatchNorm):
    """Batch norm whose batch statistics are computed over the global batch of all ranks.

    In training mode the per-channel mean and variance are all-reduced over the process group
    with a differentiable all-reduce (``all_reduce_sum_with_grad``); so the forward
    pass, the input gradients, and the parameter gradients summed over ranks equal those of one
    process running the whole global batch. Unlike ``nn.SyncBatchNorm`` this also runs on gloo
    (CPU). Running statistics are updated with the global mean and the global unbiased variance,
    as torch does. In eval mode (or with world size 1) it is exactly ``nn.BatchNorm{1,2,3}d``.

    Like any synchronised batch norm, every rank must run the same number of training-mode
    forwards (and backwards through them), in the same order: each does collectives.

    Accepts (N, C) and (N, C, *) inputs, i.e. the shapes of BatchNorm1d, 2d and 3d.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group=None,
        device=None,
        dtype=None,
    ):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.process_group = process_group

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected an input of at least 2 dims (N, C, ...), got {input.dim()}")

    def _group_size(self) -> int:
        if not is_distributed():
            return 1
        return dist.get_world_size(self.process_group)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        uses_batch_statistics = self.training or self.running_mean is None
        if not uses_batch_statistics or self._group_size() == 1:
            # Single process or eval: torch's own kernel, bit-identical to nn.BatchNormNd.
            return super().forward(input)
        return self._global_batch_norm(input)

    def _global_batch_norm(self, input: torch.Tensor) -> torch.Tensor:
        channels = input.shape[1]
        reduce_dims = [0] + list(range(2, input.dim()))
        stat_shape = [1, channels] + [1] * (input.dim() - 2)
        # Statistics in float32 whatever the autocast dtype, as torch's kernels do.
        x = input.float()

        local_count = x.numel() // channels
        count_column = x.new_full((1,), float(local_count))
        sum_and_count = all_reduce_sum_with_grad(torch.cat([x.sum(dim=reduce_dims), count_column]), self.process_group)
        global_count = sum_and_count[-1]
        mean = sum_and_count[:channels] / global_count
        # Two passes (mean, then squared deviations) rather than E[x^2] - mean^2, which cancels.
        centred = x - mean.reshape(stat_shape)
        squared_deviation_sum = all_reduce_sum_with_grad((centred * centred).sum(dim=reduce_dims), self.process_group)
        variance = squared_deviation_sum / global_count

        if self.track_running_stats and self.running_mean is not None:
            self._update_running_stats(mean.detach(), variance.detach(), global_count.detach())

        output = centred * torch.rsqrt(variance + self.eps).reshape(stat_shape)
        if self.affine:
            output = output * self.weight.reshape(stat_shape) + self.bias.reshape(stat_shape)
        return output.to(input.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean, variance, count) -> None:
        self.num_batches_tracked.add_(1)
        if self.momentum is None:  # cumulative moving average, as torch
            factor = 1.0 / float(self.num_batches_tracked)
        else:
            factor = self.momentum
        # On the device (no float(count)): a host sync per batch-norm layer otherwise.
        unbiased = variance * (count / (count - 1.0).clamp_min(1.0))
        self.running_mean.mul_(1.0 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
        self.running_var.mul_(1.0 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)


_CONVERTIBLE = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def convert_to_global_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """Replace every BatchNorm{1,2,3}d (and SyncBatchNorm) in ``module`` by ``GlobalBatchNorm``.

    Weights, running statistics, ``num_batches_tracked``, momentum, eps, the training flag and
    ``requires_grad`` are kept. Returns the converted module (a new object when ``module``
    itself is a batch norm; otherwise ``module``, changed in place).
    """
    if isinstance(module, _CONVERTIBLE) and not isinstance(module, GlobalBatchNorm):
        reference = module.weight if module.affine else module.running_mean
        converted = GlobalBatchNorm(
            module.num_features,
            eps=module.eps,
            momentum=module.momentum,
            affine=module.affine,
            track_running_stats=module.track_running_stats,
            process_group=process_group,
            device=reference.device if reference is not None else None,
            dtype=reference.dtype if reference is not None else None,
        )
        with torch.no_grad():
            if module.affine:
                converted.weight = module.weight
                converted.bias = module.bias
            if module.track_running_stats:
                converted.running_mean = module.running_mean
                converted.running_var = module.running_var
                converted.num_batches_tracked = module.num_batches_tracked
        converted.train(module.training)
        return converted
    for name, child in module.named_children():
        new_child = convert_to_global_batchnorm(child, process_group)
        if new_child is not child:
            module.add_module(name, new_child)
    return module
