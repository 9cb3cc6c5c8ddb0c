"""The SLURM scripts, run without SLURM: syntax and lint, the preemption path of the single-node
batch script (SIGUSR1 to the batch shell -> its trap touches TRICOCLR_PREEMPT_FILE -> the trainer
checkpoints and writes PREEMPTED -> requeue_or_finish.sh calls ``scontrol requeue``; the same
command then resumes and finishes exactly like an uninterrupted run), and the data-preparation
array job. The same scripts under a real SLURM: ``test_slurm_cluster.py``.

``scontrol`` is a stand-in on PATH that logs its arguments; everything else is the real thing
(``accelerate launch`` on one CPU process).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import scale_helpers as helpers
import torch
from conftest import REPO, tiny_overrides
from safetensors.torch import load_file

from tricoclr.trainer import newest_checkpoint

SCRIPTS = sorted((REPO / "slurm").glob("*.sh")) + sorted((REPO / "slurm").glob("*.sbatch"))


def test_scripts_parse_and_pass_shellcheck():
    assert len(SCRIPTS) == 6
    for script in SCRIPTS:
        result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert result.returncode == 0, f"{script.name}: {result.stderr}"
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    if shellcheck is None:
        pytest.skip("shellcheck not installed")
    result = subprocess.run([shellcheck, "--shell=bash", *map(str, SCRIPTS)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def fake_scontrol(bin_dir: Path, log: Path) -> None:
    bin_dir.mkdir()
    script = bin_dir / "scontrol"
    script.write_text(f'#!/usr/bin/env bash\necho "$*" >> "{log}"\n')
    script.chmod(0o755)


EPOCHS = 4  # 12 steps: enough that the signal lands before the end however fast the steps are


def overrides(data, out):
    return tiny_overrides(
        data,
        out,
        modalities="[rgb]",
        max_steps_per_stage="null",
        checkpoint_every_steps=1,
        deterministic="true",
        **{"schedule.pretrain_epochs": EPOCHS},
    )


def _checkpoint_at_or_after(out: Path, step: int) -> bool:
    newest = newest_checkpoint(out)
    return newest is not None and int(newest.name.split("-")[1]) >= step


@pytest.mark.slow
def test_sigusr1_to_the_batch_script_checkpoints_requeues_and_the_requeued_job_resumes(train_lmdb, tmp_path):
    out = tmp_path / "out"
    log = tmp_path / "scontrol.log"
    fake_scontrol(tmp_path / "bin", log)
    env = helpers.cpu_env(
        PATH=f"{tmp_path / 'bin'}:{Path(sys.executable).parent}:{os.environ['PATH']}",
        SLURM_JOB_ID="4242",
        SLURM_GPUS_ON_NODE="1",
        SLURM_SUBMIT_DIR=str(REPO),
        ACCELERATE_CONFIG="accelerate_configs/cpu_2proc.yaml",
        MAIN_PORT=str(helpers.free_port()),
    )
    command = ["bash", "slurm/train_single_node.sbatch", "configs/tiny.yaml", *overrides(train_lmdb, out)]

    job = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        # Training is under way: a checkpoint at step 2 or later (only the newest two are kept, so
        # step 2's may already be gone on a fast machine).
        while not _checkpoint_at_or_after(out, 2):
            assert job.poll() is None and time.monotonic() < deadline, job.stdout.read()[-3000:]
            time.sleep(0.02)
        job.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@300 does
        output, _ = job.communicate(timeout=240)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, output[-3000:]
    assert "preemption requested" in output and "requeueing job 4242" in output
    assert "launcher exited with status 0" in output
    assert log.read_text().split("\n")[0] == "requeue 4242"
    assert not (out / "PREEMPTED").exists()  # consumed by requeue_or_finish.sh
    preempted_at = newest_checkpoint(out)
    steps = EPOCHS * 3  # 12 videos / batch 4 per epoch
    assert 2 < int(preempted_at.name.split("-")[1]) < steps

    # The requeued job: the same command resumes, finishes, and does not requeue again.
    env["MAIN_PORT"] = str(helpers.free_port())
    rerun = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resuming from {preempted_at}" in rerun.stderr
    assert log.read_text().strip().split("\n") == ["requeue 4242"]
    assert newest_checkpoint(out).name == f"step-{steps:08d}"

    # Bit-identical to a run that was never interrupted (same single process, same settings).
    reference = tmp_path / "reference"
    helpers.main(["--dump", str(reference / "dump"), "--", *overrides(train_lmdb, reference / "out")])
    for name in ("rgb.safetensors", "pretrain-rgb/rgb.safetensors"):
        a, b = load_file(str(out / "encoders" / name)), load_file(str(reference / "out" / "encoders" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.slow
def test_the_array_job_prepares_disjoint_parts_that_read_as_one_store(synth_dataset, tmp_path):
    from tricoclr.data.store import open_store

    out = tmp_path / "prepared"
    listed = [line for line in (synth_dataset / "splits" / "testlist01.txt").read_text().split("\n") if line][:2]
    video_list = tmp_path / "two_videos.txt"
    video_list.write_text("\n".join(listed) + "\n")
    tasks = []
    for task in (0, 1):  # the two array tasks run side by side, as SLURM would
        env = dict(
            os.environ,
            SLURM_ARRAY_TASK_ID=str(task),
            SLURM_ARRAY_TASK_COUNT="2",
            SLURM_ARRAY_TASK_MIN="0",
            SLURM_ARRAY_TASK_MAX="1",
            SLURM_CPUS_PER_TASK="1",
            SLURM_SUBMIT_DIR=str(REPO),
            PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        )
        tasks.append(
            subprocess.Popen(
                [
                    "bash",
                    "slurm/prepare_array.sbatch",
                    str(synth_dataset / "videos"),
                    str(out),
                    "--format",
                    "lmdb",
                    "--list",
                    str(video_list),
                    "--flow",
                    "farneback",
                    "--size",
                    "64",
                ],
                cwd=REPO,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    for task in tasks:
        _, errors = task.communicate(timeout=300)
        assert task.returncode == 0, errors[-3000:]
    parts = sorted(p.name for p in out.iterdir() if p.name.startswith("part-"))
    assert len(parts) == 2
    for part in parts:  # one video each: the split is disjoint
        assert len(open_store(out / part).videos()) == 1
    ids = [meta["id"] for meta in open_store(out).videos()]
    assert len(ids) == len(set(ids)) == 2
