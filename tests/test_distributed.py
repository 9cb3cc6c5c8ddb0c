import copy
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from tricoclr.distributed import (
    GlobalBatchNorm,
    convert_to_global_batchnorm,
    gather_from_all_ranks,
    rank,
    world_size,
)


def reference_and_global(batch_norm: nn.modules.batchnorm._BatchNorm):
    """A torch batch norm with non-trivial affine parameters, and its converted twin."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        batch_norm.weight.copy_(torch.rand(batch_norm.num_features, generator=generator) + 0.5)
        batch_norm.bias.copy_(torch.randn(batch_norm.num_features, generator=generator))
    return batch_norm, convert_to_global_batchnorm(copy.deepcopy(batch_norm))


# ---- single process ------------------------------------------------------------------------------


def test_helpers_without_a_process_group():
    assert world_size() == 1 and rank() == 0
    tensor = torch.arange(6.0).reshape(3, 2).requires_grad_(True)
    gathered = gather_from_all_ranks(tensor)
    assert torch.equal(gathered, tensor) and not gathered.requires_grad


@pytest.mark.parametrize(
    "batch_norm, shape",
    [
        (nn.BatchNorm1d(3), (6, 3)),
        (nn.BatchNorm1d(3), (6, 3, 5)),
        (nn.BatchNorm2d(3), (4, 3, 5, 5)),
        (nn.BatchNorm3d(3, momentum=0.3, eps=1e-3), (4, 3, 2, 5, 5)),
    ],
)
def test_single_process_equals_torch_batch_norm(batch_norm, shape):
    reference, converted = reference_and_global(batch_norm)
    assert isinstance(converted, GlobalBatchNorm)
    assert (converted.momentum, converted.eps) == (reference.momentum, reference.eps)
    generator = torch.Generator().manual_seed(1)
    for _step in range(2):  # two steps: running statistics accumulate the same way
        x = (torch.randn(shape, generator=generator) * 3 + 1).requires_grad_(True)
        x_reference = x.detach().clone().requires_grad_(True)
        upstream = torch.randn(shape, generator=generator)
        output, output_reference = converted(x), reference(x_reference)
        torch.testing.assert_close(output, output_reference)
        (output * upstream).sum().backward()
        (output_reference * upstream).sum().backward()
        torch.testing.assert_close(x.grad, x_reference.grad)
    torch.testing.assert_close(converted.weight.grad, reference.weight.grad)
    torch.testing.assert_close(converted.bias.grad, reference.bias.grad)
    torch.testing.assert_close(converted.running_mean, reference.running_mean)
    torch.testing.assert_close(converted.running_var, reference.running_var)
    assert int(converted.num_batches_tracked) == int(reference.num_batches_tracked) == 2
    converted.eval()
    reference.eval()
    x = torch.randn(shape, generator=generator)
    torch.testing.assert_close(converted(x), reference(x))


def test_convert_replaces_nested_batch_norms_and_keeps_their_state():
    model = nn.Sequential(
        nn.Conv3d(2, 4, 1),
        nn.BatchNorm3d(4, momentum=0.01),
        nn.Sequential(nn.Flatten(1), nn.BatchNorm1d(4 * 8, eps=1e-3, affine=False)),
    )
    model[1].running_mean.fill_(0.5)
    model[1].weight.requires_grad_(False)
    model.eval()
    x = torch.randn(3, 2, 2, 2, 2)
    expected = model(x)
    converted = convert_to_global_batchnorm(model)
    assert converted is model
    assert isinstance(model[1], GlobalBatchNorm) and isinstance(model[2][1], GlobalBatchNorm)
    assert model[1].momentum == 0.01 and model[2][1].eps == 1e-3 and not model[2][1].affine
    assert model[1].running_mean.tolist() == [0.5] * 4
    assert not model[1].weight.requires_grad and not model[1].training
    torch.testing.assert_close(model(x), expected)
    assert convert_to_global_batchnorm(model[1]) is model[1]  # already converted


# ---- two real processes (gloo) -------------------------------------------------------------------

GLOBAL_BATCH = 6


def small_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(2, 3, 3, padding=1), nn.BatchNorm3d(3), nn.ReLU())
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.normal_()
    return model


def global_inputs():
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(GLOBAL_BATCH, 2, 2, 4, 4, generator=generator) * 2 + 0.5
    upstream = torch.randn(GLOBAL_BATCH, 3, 2, 4, 4, generator=generator)
    x_1d = torch.randn(GLOBAL_BATCH, 5, generator=generator)
    return x, upstream, x_1d


def _worker(process_rank: int, processes: int, port: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=process_rank, world_size=processes)
    try:
        assert world_size() == processes and rank() == process_rank
        # gather: rank order
        mine = torch.full((2, 3), float(process_rank))
        expected = torch.cat([torch.full((2, 3), float(r)) for r in range(processes)])
        assert torch.equal(gather_from_all_ranks(mine), expected)

        x, upstream, x_1d = global_inputs()
        share = GLOBAL_BATCH // processes
        local = slice(process_rank * share, (process_rank + 1) * share)

        # Reference: one process, whole batch, torch's own BatchNorm3d.
        reference = small_model()
        x_reference = x.clone().requires_grad_(True)
        output_reference = reference(x_reference)
        (output_reference * upstream).sum().backward()

        # This rank: its half of the batch through the converted model.
        model = convert_to_global_batchnorm(small_model())
        x_local = x[local].clone().requires_grad_(True)
        output = model(x_local)
        (output * upstream[local]).sum().backward()

        tolerance = dict(rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(output, output_reference[local], **tolerance)
        torch.testing.assert_close(x_local.grad, x_reference.grad[local], **tolerance)
        for parameter, parameter_reference in zip(model.parameters(), reference.parameters()):
            summed = parameter.grad.clone()
            dist.all_reduce(summed)  # what DDP does, up to its division by the world size
            torch.testing.assert_close(summed, parameter_reference.grad, **tolerance)
        torch.testing.assert_close(model[1].running_mean, reference[1].running_mean, **tolerance)
        torch.testing.assert_close(model[1].running_var, reference[1].running_var, **tolerance)

        model.eval()
        reference.eval()
        torch.testing.assert_close(model(x[local]), reference(x)[local], **tolerance)

        # (N, C) inputs and cumulative averaging (momentum None) too.
        reference_1d = nn.BatchNorm1d(5, momentum=None)
        global_1d = convert_to_global_batchnorm(nn.BatchNorm1d(5, momentum=None))
        torch.testing.assert_close(global_1d(x_1d[local]), reference_1d(x_1d)[local], **tolerance)
        torch.testing.assert_close(global_1d.running_var, reference_1d.running_var, **tolerance)
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
def test_two_ranks_with_half_batches_equal_one_process_with_the_whole_batch():
    mp.spawn(_worker, args=(2, free_port()), nprocs=2, join=True)
