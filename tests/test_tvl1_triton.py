"""The fused Triton TV-L1 iteration (tricoclr.ops.tvl1_triton) against the torch iteration.

On a GPU the tests run the real kernel. Without one the kernel runs under Triton's CPU
interpreter, which must be switched on (TRITON_INTERPRET=1) before Triton decorates the kernel
and which other libraries imported in the same process can break (DeepSpeed's import patches
Triton): so on a CPU-only machine ``test_under_the_interpreter`` runs this file again in a fresh
process with TRITON_INTERPRET=1, and the kernel tests themselves run there.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from test_tvl1 import three_pairs  # noqa: E402

from tricoclr.ops import tvl1  # noqa: E402
from tricoclr.ops.tvl1 import TVL1Params, tvl1_flow  # noqa: E402
from tricoclr.ops.tvl1_triton import primal_dual_steps_triton  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
kernel_test = pytest.mark.skipif(
    not (torch.cuda.is_available() or INTERPRETED),
    reason="runs on CUDA, or in the interpreter process of test_under_the_interpreter",
)


@pytest.mark.skipif(torch.cuda.is_available() or INTERPRETED, reason="the kernel tests run directly here")
def test_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
        cwd=Path(__file__).resolve().parents[1],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "failed" not in result.stdout


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CONSTANTS = dict(l_t=0.15 * 0.3, theta=0.3, taut=0.25 / 0.3)
# Few iterations: the interpreter runs a kernel launch in ~0.1 s.
TINY = TVL1Params(nscales=2, warps=1, inner_iterations=4, outer_iterations=2)


def random_state(batch: int, height: int, width: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, 2, height, width, generator=generator) * 2
    p = torch.randn(batch, 2, 2, height, width, generator=generator) * 0.3
    grad = torch.randn(batch, 2, height, width, generator=generator) * 5
    grad[0, :, 0, :4] = 0  # pixels without image gradient take the other branch
    grad_sq = (grad * grad).sum(1, keepdim=True)
    rho_c = torch.randn(batch, 1, height, width, generator=generator) * 3
    return [t.to(DEVICE) for t in (u, p, grad, grad_sq, rho_c)]


@kernel_test
@pytest.mark.parametrize("block", [64, 1024])  # several blocks per sample, and one partial block
@pytest.mark.parametrize("count", [1, 3])
def test_kernel_matches_torch_iteration(block, count):
    u, p, grad, grad_sq, rho_c = random_state(3, 13, 17)
    active = torch.tensor([True, False, True], device=DEVICE)
    before = [t.clone() for t in (u, p)]
    expected = tvl1.primal_dual_steps(count, u, p, grad, grad_sq, rho_c, active, scaled_epsilon=0.0, **CONSTANTS)
    got = primal_dual_steps_triton(
        count, u, p, grad, grad_sq, rho_c, active, scaled_epsilon=0.0, block=block, **CONSTANTS
    )
    torch.testing.assert_close(got[0], expected[0], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], expected[1], atol=2e-5, rtol=1e-5)
    assert got[2].tolist() == expected[2].tolist() == [True, False, True]
    # The inactive sample is left exactly as it was; the caller's tensors are not written.
    assert torch.equal(got[0][1], u[1]) and torch.equal(got[1][1], p[1])
    assert torch.equal(before[0], u) and torch.equal(before[1], p)


@kernel_test
def test_kernel_convergence_flag_is_per_sample():
    u, p, grad, grad_sq, rho_c = random_state(2, 9, 11, seed=1)
    active = torch.tensor([True, True], device=DEVICE)
    change = tvl1.primal_dual_steps(1, u, p, grad, grad_sq, rho_c, active, scaled_epsilon=-1.0, **CONSTANTS)[0] - u
    per_sample = change.square().flatten(1).sum(1)
    threshold = float(per_sample.mean())  # between the two samples' squared changes
    assert per_sample.min() < threshold < per_sample.max()
    flags = primal_dual_steps_triton(1, u, p, grad, grad_sq, rho_c, active, scaled_epsilon=threshold, **CONSTANTS)[2]
    assert flags.tolist() == (per_sample > threshold).tolist()


@kernel_test
def test_flow_matches_torch_iteration():
    frames0, frames1 = (f.to(DEVICE) for f in three_pairs(24))
    torch_flow = tvl1_flow(frames0, frames1, TINY, compile=False, iteration="torch")
    triton_flow = tvl1_flow(frames0, frames1, TINY, compile=False, iteration="triton")
    assert (triton_flow - torch_flow).norm(dim=1).max() < 1e-3
    assert torch_flow.abs().mean() > 0.1  # it found motion


@kernel_test
def test_batch_equals_one_by_one():
    frames0, frames1 = (f.to(DEVICE) for f in three_pairs(24))
    params = TINY.replace(epsilon=0.2, check_every=2)
    batched = tvl1_flow(frames0, frames1, params, compile=False, iteration="triton")
    single = torch.cat(
        [tvl1_flow(frames0[i : i + 1], frames1[i : i + 1], params, compile=False, iteration="triton") for i in range(3)]
    )
    torch.testing.assert_close(batched, single, atol=1e-6, rtol=0)


def test_choice_and_errors():
    frames0, frames1 = three_pairs(16)
    with pytest.raises(ValueError, match="gamma"):
        tvl1_flow(frames0, frames1, TINY.replace(gamma=0.1), iteration="triton")
    with pytest.raises(ValueError, match="iteration"):
        tvl1_flow(frames0, frames1, TINY, iteration="cuda")
    # The default picks Triton on CUDA only (and never for gamma != 0).
    assert tvl1._choose_iteration(None, torch.device("cpu"), TINY) == "torch"
    assert tvl1._choose_iteration(None, torch.device("cuda"), TINY.replace(gamma=0.1)) == "torch"
    u, p, _, grad_sq, rho_c = random_state(1, 4, 4)
    with_illumination = torch.zeros(1, 3, 4, 4, device=DEVICE)
    with pytest.raises(ValueError, match="two flow components"):
        primal_dual_steps_triton(
            1,
            u,
            p,
            with_illumination,
            grad_sq,
            rho_c,
            torch.ones(1, dtype=torch.bool, device=DEVICE),
            scaled_epsilon=0.0,
            **CONSTANTS,
        )
