"""Many ranks, one result: real multi-process CPU runs (gloo, through ``accelerate launch``) against a
one-process run of the same global batch and seed, on an LMDB store (sample order and augmentation
depend only on seed, epoch and video; rank r reads the r-th slice of each global batch).

Schedule for all runs: modalities [rgb, flow], 2 steps per stage (pretrain-rgb, pretrain-flow,
cycle1-rgb with flow as oracle, cycle1-flow with rgb as oracle), global batch 8, queue 12. The
queue wraps around in every stage's second step and is full after it, so oracle mining (a top-k
choice that float-level differences can flip) would start at step 3: every step compared here is
before mining, and the queues, oracle queue included, are compared in full.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading

import pytest
import scale_helpers as helpers
import torch
from conftest import REPO, tiny_overrides

STAGES = ["pretrain-rgb", "pretrain-flow", "cycle1-rgb", "cycle1-flow"]
STEPS = 2 * len(STAGES)
EXACT_KEYS = ("queue.video_ids", "queue.labels", "queue.ptr", "queue.num_filled")
# 1 rank vs 2 ranks: the same arithmetic summed in another order (BN statistics all-reduced, DDP's
# gradient average): equal up to float rounding.
RTOL, ATOL = 1e-4, 1e-6


def overrides(data, out, **extra):
    # SGD, not the default Adam: Adam divides each gradient by its own magnitude, which turns
    # rounding-level differences of (near-)zero gradient entries into differences of up to ~lr, and
    # hides a wrongly scaled gradient altogether. SGD keeps the comparison of weights tight.
    base = dict(
        modalities="[rgb,flow]",
        max_steps_per_stage=2,
        deterministic="true",
        **{"method.queue_size": 12, "optim.name": "sgd", "optim.lr": 0.05},
    )
    base.update(extra)
    return tiny_overrides(data, out, **base)


def run_in_process(dump, options, args):
    assert helpers.main(["--dump", str(dump), *options, "--", *args]) == 0
    return dump


def launch(commands, timeout=300, on_line=None):
    """Start the commands together (the ranks of one job) and wait; ``on_line(line)`` sees stdout."""
    processes = [
        subprocess.Popen(
            c, cwd=REPO, env=helpers.cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for c in commands
    ]
    logs = [[] for _ in processes]

    def read(process, log):
        for line in process.stdout:
            log.append(line)
            if on_line is not None:
                on_line(line)

    readers = [threading.Thread(target=read, args=(p, log), daemon=True) for p, log in zip(processes, logs)]
    for reader in readers:
        reader.start()
    try:
        codes = [p.wait(timeout=timeout) for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
    for reader in readers:
        reader.join(timeout=10)
    text = "".join("".join(log) for log in logs)
    return codes, text


def assert_same_losses(dump, reference, steps):
    """The global batch's loss (averaged over ranks and micro-steps) at every step."""
    ours, theirs = helpers.load_summary(dump)["losses"], helpers.load_summary(reference)["losses"]
    assert sorted(ours) == sorted(theirs) == list(steps)
    for step in steps:
        assert ours[step] == pytest.approx(theirs[step], rel=RTOL), f"loss at step {step}"


def assert_same_states(dump, reference, exact=False):
    """Encoder, momentum copy and queues at the end of every stage: the two ranks of ``dump`` hold
    bit-identical ones (the same queue, in the same order), equal to ``reference``'s."""
    for stage in STAGES:
        rank0, rank1 = helpers.load_dump(dump, 0, stage), helpers.load_dump(dump, 1, stage)
        expected = helpers.load_dump(reference, 0, stage)
        assert rank0.keys() == rank1.keys() == expected.keys()
        for name in rank0:
            assert torch.equal(rank0[name], rank1[name]), f"{stage}: {name} differs between ranks"
            if exact or name in EXACT_KEYS or "num_batches" in name:
                assert torch.equal(rank0[name], expected[name]), f"{stage}: {name}"
            else:
                assert torch.allclose(rank0[name].float(), expected[name].float(), rtol=RTOL, atol=ATOL), (
                    f"{stage}: {name} max diff {(rank0[name].float() - expected[name].float()).abs().max()}"
                )


def assert_same_run(dump, reference, exact=False):
    assert_same_losses(dump, reference, range(1, STEPS + 1))
    assert_same_states(dump, reference, exact)
    for stage in STAGES:
        state = helpers.load_dump(dump, 0, stage)
        assert int(state["queue.num_filled"]) == 12 and (state["queue.video_ids"] >= 0).all()
        if stage.startswith("cycle"):
            assert state["queue.oracle"].abs().sum() > 0  # gathered oracle vectors, not the initial zeros


@pytest.fixture(scope="module")
def one_rank(train_lmdb, tmp_path_factory):
    """The reference: one process, batch 8."""
    root = tmp_path_factory.mktemp("one_rank")
    return run_in_process(root / "dump", ["--record-grads"], overrides(train_lmdb, root / "out", batch_size=8))


@pytest.fixture(scope="module")
def two_ranks(train_lmdb, tmp_path_factory):
    """Two CPU processes through accelerate launch, batch 4 each."""
    root = tmp_path_factory.mktemp("two_ranks")
    args = ["--dump", str(root / "dump"), "--record-grads", "--", *overrides(train_lmdb, root / "out", batch_size=4)]
    codes, text = launch([helpers.accelerate_command(2, helpers.free_port(), args)])
    assert codes == [0], text[-4000:]
    assert helpers.load_summary(root / "dump")["world_size"] == 2
    return root / "dump"


@pytest.mark.slow
def test_two_ranks_match_one_rank(one_rank, two_ranks):
    assert_same_run(two_ranks, one_rank)
    assert_same_gradients(two_ranks, one_rank, steps=range(1, STEPS + 1))


def assert_same_gradients(dump, reference, steps):
    """The gradient the optimizer stepped with, at every step: after DDP's all-reduce the same on
    both ranks, and equal to the one-process gradient of the whole global batch."""
    from safetensors.torch import load_file

    expected = load_file(str(reference / "rank0" / "grads.safetensors"))
    ranks = [load_file(str(dump / f"rank{r}" / "grads.safetensors")) for r in (0, 1)]
    names = {f"step{s}" for s in steps}
    assert set(expected) == set(ranks[0]) == set(ranks[1]) == names
    for name in sorted(names):
        assert torch.equal(ranks[0][name], ranks[1][name]), f"{name}: gradients differ between ranks"
        scale = float(expected[name].abs().max())
        assert scale > 0
        # Rounding noise is relative to the per-sample terms summed into a gradient entry, not to
        # the (partly cancelling) sum: measured ~2e-7 absolute here, ~1e-6 of the gradient's norm.
        # A wrong gradient (a micro-step lost, a wrong scale) is off by the gradient's own size.
        atol = 1e-6 + 1e-5 * scale
        assert torch.allclose(ranks[0][name], expected[name], rtol=RTOL, atol=atol), (
            f"{name}: max diff {(ranks[0][name] - expected[name]).abs().max()} (largest entry {scale})"
        )


@pytest.mark.slow
def test_two_machines_on_localhost_preempted_on_one_resume_exactly(train_lmdb, tmp_path, one_rank, two_ranks):
    """Two 'machines' (one accelerate launch each, one process each). SIGUSR1 reaches only machine 1's
    trainer: every rank checkpoints at the same step (an all-reduced flag) and exits 0 with the
    PREEMPTED marker; the same commands again resume, and the finished run equals the one-process
    run, and bit for bit the uninterrupted two-process run."""
    out = tmp_path / "out"
    port = helpers.free_port()

    def commands(dump):
        args = ["--dump", str(dump), "--print-steps", "--", *overrides(train_lmdb, out, batch_size=4)]
        return [helpers.accelerate_command(2, port, args, num_machines=2, machine_rank=r) for r in (0, 1)]

    signalled = []

    def preempt_rank1(line):
        # "STEP n rank r pid p": signal rank 1 alone once it has done step 2.
        parts = line.split()
        if parts[:1] == ["STEP"] and parts[1] == "2" and parts[3] == "1" and not signalled:
            os.kill(int(parts[5]), signal.SIGUSR1)
            signalled.append(int(parts[5]))

    codes, text = launch(commands(tmp_path / "first"), on_line=preempt_rank1)
    assert signalled and codes == [0, 0], text[-4000:]
    marker = out / "PREEMPTED"
    assert marker.exists(), text[-4000:]
    stopped_at = int(marker.read_text())
    assert 2 < stopped_at < STEPS
    # Both ranks stopped at the same step, right after the checkpoint of that step.
    assert helpers.load_summary(tmp_path / "first", 0)["global_step"] == stopped_at
    assert helpers.load_summary(tmp_path / "first", 1)["global_step"] == stopped_at
    assert (out / "checkpoints" / f"step-{stopped_at:08d}" / "trainer_state.json").exists()

    port = helpers.free_port()
    codes, text = launch(commands(tmp_path / "second"))
    assert codes == [0, 0], text[-4000:]
    assert "resuming from" in text and not marker.exists()
    # One dump of the whole run: the stages finished before the preemption, then the rest.
    merged = tmp_path / "merged"
    for rank in (0, 1):
        (merged / f"rank{rank}").mkdir(parents=True)
        first, second = helpers.load_summary(tmp_path / "first", rank), helpers.load_summary(tmp_path / "second", rank)
        assert min(second["losses"]) == stopped_at + 1
        summary = {"losses": {**first["losses"], **second["losses"]}, "global_step": second["global_step"]}
        (merged / f"rank{rank}" / "summary.json").write_text(json.dumps(summary))
        for stage in STAGES:
            source = tmp_path / (
                "second" if (tmp_path / "second" / f"rank{rank}" / f"{stage}.safetensors").exists() else "first"
            )
            (merged / f"rank{rank}" / f"{stage}.safetensors").write_bytes(
                (source / f"rank{rank}" / f"{stage}.safetensors").read_bytes()
            )
    assert_same_run(merged, one_rank)
    assert_same_run(merged, two_ranks, exact=True)


@pytest.mark.slow
def test_accumulation_equals_a_larger_batch_without_all_reduce_between_boundaries(train_lmdb, tmp_path_factory):
    """2 ranks x 2 micro-steps of batch 2 against 1 rank x 1 step of batch 8, with every BN layer in
    eval mode (otherwise a micro-batch's statistics differ from the big batch's): the same gradient
    at every optimizer step, the same negatives (queues, in the same order), the same weights. A DDP
    comm hook logs every gradient all-reduce: none on a non-boundary micro-step. A NaN loss on rank 1
    alone at step 3 is skipped by both ranks (and by the reference at the same step)."""
    root = tmp_path_factory.mktemp("accumulation")
    probes = ["--bn-eval", "--record-grads", "--nan-steps", "3"]
    common = dict(**{"method.batchnorm": "local"})
    reference = run_in_process(root / "one", probes, overrides(train_lmdb, root / "one_out", batch_size=8, **common))
    args = [
        "--dump",
        str(root / "two"),
        *probes,
        "--nan-rank",
        "1",
        "--count-allreduce",
        "--",
        *overrides(train_lmdb, root / "two_out", batch_size=2, grad_accum_steps=2, **common),
    ]
    codes, text = launch([helpers.accelerate_command(2, helpers.free_port(), args)])
    assert codes == [0], text[-4000:]
    assert "non-finite loss at step 3" in text

    two = root / "two"
    # Step 3 was skipped everywhere: no optimizer step (no gradient recorded), no loss logged.
    steps = [s for s in range(1, STEPS + 1) if s != 3]
    assert_same_gradients(two, reference, steps)
    assert_same_losses(two, reference, steps)
    # Weights, momentum copies (updated once per optimizer step, as the LR schedule steps) and the
    # queues, in the same order.
    assert_same_states(two, reference)

    calls = helpers.load_summary(two)["comm_calls"]
    assert calls, "the comm hook saw no all-reduce"
    assert all(call["sync_gradients"] for call in calls), "a gradient all-reduce on a non-boundary micro-step"
    # Every optimizer step all-reduces (the skipped one too: its zero stand-in loss completes DDP's
    # cycle), and the micro-steps between boundaries none.
    assert {call["step"] for call in calls} == set(range(1, STEPS + 1))
