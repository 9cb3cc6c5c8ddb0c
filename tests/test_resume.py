"""Exact resume and atomic checkpoints, on real runs: kill -9 at an arbitrary step, a crash in the
middle of a checkpoint write, non-finite losses, and the WebDataset replay.

Runs are one CPU process with deterministic settings (``deterministic: true``, one thread) on the
session's LMDB store: modalities [rgb, flow], 3 steps per stage (12 steps, mining in the cycle
stages' third steps), batch 4, so each stage is one epoch of 3 steps and a checkpoint every 2 steps
lands mid-epoch.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
import scale_helpers as helpers
import torch
from conftest import REPO, tiny_overrides
from safetensors.torch import load_file

from tricoclr.checkpoint import STAGE_TENSORS, STATE_FILE, newest_checkpoint

STAGES = ["pretrain-rgb", "pretrain-flow", "cycle1-rgb", "cycle1-flow"]
STEPS = 12


def overrides(data, out, **extra):
    base = dict(
        modalities="[rgb,flow]",
        max_steps_per_stage=3,
        deterministic="true",
        checkpoint_every_steps=2,
        keep_checkpoints=3,
    )
    base.update(extra)
    return tiny_overrides(data, out, **base)


def helper_command(dump, args, *probes):
    return [sys.executable, "tests/scale_helpers.py", "--dump", str(dump), *probes, "--", *args]


def final_encoders(out):
    """Every encoder file of a finished run: the latest of each modality and every stage snapshot."""
    files = sorted(p.relative_to(out) for p in (out / "encoders").rglob("*.safetensors"))
    assert len(files) == 2 + len(STAGES)
    return {str(f): load_file(str(out / f)) for f in files}


def assert_bit_identical(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].keys() == b[name].keys()
        for key in a[name]:
            assert torch.equal(a[name][key], b[name][key]), f"{name}: {key}"


@pytest.fixture(scope="module")
def uninterrupted(train_lmdb, tmp_path_factory):
    root = tmp_path_factory.mktemp("uninterrupted")
    assert helpers.main(["--dump", str(root / "dump"), "--", *overrides(train_lmdb, root / "out")]) == 0
    return final_encoders(root / "out")


def test_kill_9_at_an_arbitrary_step_then_the_same_command_finishes_bit_identical(train_lmdb, tmp_path, uninterrupted):
    out = tmp_path / "out"
    command = helper_command(tmp_path / "dump", overrides(train_lmdb, out), "--print-steps")
    process = subprocess.Popen(
        command, cwd=REPO, env=helpers.cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    try:
        for line in process.stdout:
            if line.startswith("STEP 5 "):  # mid-stage, after the checkpoint of step 4
                process.send_signal(signal.SIGKILL)
                break
        assert process.wait(timeout=300) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
    killed_after = newest_checkpoint(out)
    assert killed_after is not None and int(killed_after.name.split("-")[1]) < STEPS

    rerun = subprocess.run(command, cwd=REPO, env=helpers.cpu_env(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resuming from {killed_after}" in rerun.stderr
    assert helpers.load_summary(tmp_path / "dump")["global_step"] == STEPS
    assert_bit_identical(final_encoders(out), uninterrupted)


def test_a_crash_while_writing_a_checkpoint_leaves_the_previous_one_valid(train_lmdb, tmp_path, uninterrupted):
    out = tmp_path / "out"
    args = overrides(train_lmdb, out)
    crashed = subprocess.run(
        helper_command(tmp_path / "dump", args, "--crash-in-checkpoint", "6"),
        cwd=REPO,
        env=helpers.cpu_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-3000:]
    checkpoints = out / "checkpoints"
    assert (checkpoints / ".tmp-step-00000006" / STAGE_TENSORS).exists()  # half-written, never renamed
    assert not (checkpoints / "step-00000006").exists()
    previous = newest_checkpoint(out)
    assert previous == checkpoints / "step-00000004"

    # The previous checkpoint is whole, and the project's own files need no pickle.
    state = json.loads((previous / STATE_FILE).read_text())
    assert (state["global_step"], state["stage"], state["stage_step"]) == (4, "pretrain-flow", 1)
    assert (state["epoch"], state["step_in_epoch"], state["steps_per_epoch"]) == (0, 1, 3)
    tensors = load_file(str(previous / STAGE_TENSORS))
    assert {k.split(".")[0] for k in tensors} == {"encoder", "momentum", "queue"}
    assert any(k.startswith("encoder.rgb.") for k in tensors) and any(k.startswith("encoder.flow.") for k in tensors)
    json.loads((previous / "rng-rank0.json").read_text())
    optimizer = torch.load(previous / "optimizer.bin", weights_only=True)  # Accelerate's, plain tensors
    assert optimizer["state"]

    rerun = subprocess.run(
        helper_command(tmp_path / "dump", args),
        cwd=REPO,
        env=helpers.cpu_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resuming from {previous}" in rerun.stderr
    assert not list(checkpoints.glob(".tmp-*"))
    assert_bit_identical(final_encoders(out), uninterrupted)


def test_a_non_finite_loss_skips_the_step_and_leaves_no_trace(train_lmdb, tmp_path, caplog):
    """A NaN loss at step 2: the state after step 2 is the state after step 1 (weights, BN
    statistics, momentum copy, queue, optimizer moments), and the run goes on."""
    small = dict(modalities="[rgb]", checkpoint_every_steps=1, keep_checkpoints=5, max_steps_per_stage="null")
    one = tmp_path / "one"
    helpers.main(["--dump", str(one / "dump"), "--", *overrides(train_lmdb, one / "out", max_steps=1, **small)])
    skipped = tmp_path / "skipped"
    with caplog.at_level("WARNING", logger="tricoclr.train"):
        helpers.main(
            [
                "--dump",
                str(skipped / "dump"),
                "--nan-steps",
                "2",
                "--",
                *overrides(train_lmdb, skipped / "out", max_steps=3, **small),
            ]
        )
    assert "non-finite loss at step 2" in caplog.text
    assert sorted(helpers.load_summary(skipped / "dump")["losses"]) == [1, 3]  # it went on after the skip

    after_one = one / "out" / "checkpoints" / "step-00000001"
    after_skip = skipped / "out" / "checkpoints" / "step-00000002"
    a, b = load_file(str(after_one / STAGE_TENSORS)), load_file(str(after_skip / STAGE_TENSORS))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    opt_a = torch.load(after_one / "optimizer.bin", weights_only=True)["state"]
    opt_b = torch.load(after_skip / "optimizer.bin", weights_only=True)["state"]
    for index in opt_a:
        for name in opt_a[index]:
            assert torch.equal(opt_a[index][name], opt_b[index][name])
    assert json.loads((after_skip / STATE_FILE).read_text())["global_step"] == 2


def test_repeated_non_finite_losses_stop_the_run_with_the_last_good_checkpoint(train_lmdb, tmp_path):
    out = tmp_path / "out"
    args = overrides(
        train_lmdb,
        out,
        modalities="[rgb]",
        checkpoint_every_steps=1,
        keep_checkpoints=10,
        max_steps_per_stage="null",
        max_steps=20,
    )
    with pytest.raises(FloatingPointError, match="5 optimizer steps in a row had a non-finite loss"):
        helpers.main(["--dump", str(tmp_path / "dump"), "--nan-from", "3", "--", *args])
    newest = newest_checkpoint(out)
    assert (
        json.loads((newest / STATE_FILE).read_text())["global_step"] == 6
    )  # steps 3..6 skipped and saved; step 7 stopped the run
    last_good = load_file(str(out / "checkpoints" / "step-00000002" / STAGE_TENSORS))
    latest = load_file(str(newest / STAGE_TENSORS))
    for key, value in last_good.items():
        assert torch.equal(latest[key], value), key
        if value.is_floating_point():
            assert torch.isfinite(value).all(), key


def test_webdataset_resume_replays_the_stream_and_skips_what_was_consumed(train_wds, tmp_path):
    """A WebDataset run stopped mid-epoch (max_steps) and resumed continues with the same samples:
    bit-identical to an uninterrupted run."""
    common = dict(
        modalities="[rgb]", max_steps_per_stage="null", **{"schedule.pretrain_epochs": 2, "data.shuffle_buffer": 4}
    )
    whole = tmp_path / "whole"
    helpers.main(["--dump", str(whole / "dump"), "--", *overrides(train_wds, whole / "out", **common)])
    steps = helpers.load_summary(whole / "dump")["global_step"]
    assert steps >= 4
    split = tmp_path / "split"
    stop = steps // 2 + 1  # inside the second epoch when there are 2 steps per epoch or more
    helpers.main(["--dump", str(split / "first"), "--", *overrides(train_wds, split / "out", max_steps=stop, **common)])
    state = json.loads((newest_checkpoint(split / "out") / STATE_FILE).read_text())
    assert state["global_step"] == stop and state["stage_step"] == stop
    helpers.main(["--dump", str(split / "second"), "--", *overrides(train_wds, split / "out", **common)])
    assert min(helpers.load_summary(split / "second")["losses"]) == stop + 1
    whole_losses = helpers.load_summary(whole / "dump")["losses"]
    split_losses = {
        **helpers.load_summary(split / "first")["losses"],
        **helpers.load_summary(split / "second")["losses"],
    }
    assert split_losses == whole_losses
    a = load_file(str(whole / "out" / "encoders" / "rgb.safetensors"))
    b = load_file(str(split / "out" / "encoders" / "rgb.safetensors"))
    for key in a:
        assert torch.equal(a[key], b[key]), key
