"""The DeepSpeed path through ``accelerate launch --config_file accelerate_configs/deepspeed_zero{1,2}.yaml``.

On CPU DeepSpeed runs as a single process only, in fp32 (``--num_processes 1 --mixed_precision
no`` override the files' 8 GPUs and bf16). What this checks: only the trained encoder goes through
the engine (one per stage, four stages), the batch size, accumulation steps and clipping of the
run's config reach DeepSpeed (grad_accum_steps=2: DeepSpeed scales the loss by 1/2 and steps at
Accelerate's boundaries), and a run stopped mid-stage resumes from the engine's checkpoint. The
result is compared with the same run without DeepSpeed. Multi-GPU ZeRO sharding and bf16 are not
exercised here.
"""

from __future__ import annotations

import importlib.util
import subprocess

import pytest
import scale_helpers as helpers
import torch
from conftest import REPO, tiny_overrides
from safetensors.torch import load_file

from tricoclr.checkpoint import newest_checkpoint

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None or importlib.util.find_spec("transformers") is None,
    reason="DeepSpeed path needs `pip install -e .[deepspeed]` (deepspeed and transformers)",
)

STAGES = ["pretrain-rgb", "pretrain-flow", "cycle1-rgb", "cycle1-flow"]


def overrides(data, out, **extra):
    # deterministic=false: torch's deterministic mode fills every new tensor, and ZeRO-2 allocates
    # gradient buckets of 5e8 elements per micro-step (seconds each on CPU). SGD: see test_scale.py.
    base = dict(
        modalities="[rgb,flow]",
        max_steps_per_stage=2,
        batch_size=2,
        grad_accum_steps=2,
        deterministic="false",
        **{"optim.grad_clip": 0.5, "optim.name": "sgd", "optim.lr": 0.05},
    )
    base.update(extra)
    return tiny_overrides(data, out, **base)


def deepspeed_launch(zero_stage, dump, args):
    command = helpers.accelerate_command(1, helpers.free_port(), ["--dump", str(dump), "--", *args])
    # The DeepSpeed config file instead of --multi_gpu; one CPU process, fp32.
    command[2:3] = ["--config_file", f"accelerate_configs/deepspeed_zero{zero_stage}.yaml"]
    env = helpers.cpu_env(DS_ACCELERATOR="cpu")
    env.pop("ACCELERATE_USE_CPU")  # with it Accelerate would run plain CPU, not DeepSpeed
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result


@pytest.fixture(scope="module")
def without_deepspeed(train_lmdb, tmp_path_factory):
    root = tmp_path_factory.mktemp("plain")
    assert (
        helpers.main(["--dump", str(root / "dump"), "--record-grads", "--", *overrides(train_lmdb, root / "out")]) == 0
    )
    # Clipping is active in these runs (so matching them shows DeepSpeed clips as configured).
    norms = [float(g.norm()) for g in load_file(str(root / "dump" / "rank0" / "grads.safetensors")).values()]
    assert max(norms) == pytest.approx(0.5, rel=1e-4)
    return root / "dump"


def assert_matches(dump, reference):
    assert helpers.load_summary(dump)["distributed_type"] == "DEEPSPEED"
    for stage in STAGES:
        ours, theirs = helpers.load_dump(dump, 0, stage), helpers.load_dump(reference, 0, stage)
        assert ours.keys() == theirs.keys()
        for name in ours:
            assert ours[name].dtype == theirs[name].dtype, name
            assert torch.allclose(ours[name].float(), theirs[name].float(), rtol=1e-5, atol=1e-6), (
                f"{stage}: {name} max diff {(ours[name].float() - theirs[name].float()).abs().max()}"
            )


@pytest.mark.slow
def test_zero1_matches_the_run_without_deepspeed(train_lmdb, tmp_path, without_deepspeed):
    deepspeed_launch(1, tmp_path / "dump", overrides(train_lmdb, tmp_path / "out"))
    losses, expected = (
        helpers.load_summary(tmp_path / "dump")["losses"],
        helpers.load_summary(without_deepspeed)["losses"],
    )
    assert losses.keys() == expected.keys()
    assert all(losses[s] == pytest.approx(expected[s], rel=1e-5) for s in losses)
    assert_matches(tmp_path / "dump", without_deepspeed)


@pytest.mark.slow
def test_zero2_checkpoint_and_resume_mid_stage(train_lmdb, tmp_path, without_deepspeed):
    out = tmp_path / "out"
    deepspeed_launch(2, tmp_path / "first", overrides(train_lmdb, out, max_steps=3))
    checkpoint = newest_checkpoint(out)
    assert checkpoint.name == "step-00000003"  # pretrain-flow, 1 of 2 steps done
    # The engine's own files (written by this run) beside the project's.
    assert (checkpoint / "pytorch_model" / "mp_rank_00_model_states.pt").exists()
    assert list((checkpoint / "pytorch_model").glob("*optim_states.pt"))
    assert (checkpoint / "stage.safetensors").exists()

    result = deepspeed_launch(2, tmp_path / "second", overrides(train_lmdb, out))
    assert f"resuming from {checkpoint}" in result.stderr
    assert min(helpers.load_summary(tmp_path / "second")["losses"]) == 4
    merged = tmp_path / "merged" / "rank0"
    merged.mkdir(parents=True)
    for stage in STAGES:
        source = tmp_path / ("first" if stage == "pretrain-rgb" else "second") / "rank0" / f"{stage}.safetensors"
        (merged / f"{stage}.safetensors").write_bytes(source.read_bytes())
    (merged / "summary.json").write_bytes((tmp_path / "second" / "rank0" / "summary.json").read_bytes())
    assert_matches(merged.parent, without_deepspeed)
    # The encoders leave the engine as plain fp32 modules.
    for name in ("rgb", "flow"):
        weights = load_file(str(out / "encoders" / f"{name}.safetensors"))
        assert all(v.dtype in (torch.float32, torch.int64) for v in weights.values())
