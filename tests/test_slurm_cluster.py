"""The SLURM scripts under a real SLURM 22.05: a one-node cluster (``slurm_cluster.py``) started as
root, real ``sbatch``/``srun``/``scancel``/``scontrol``, real requeues. Skipped, with the reason,
where SLURM cannot start (not root, not installed: ``apt-get install slurm-wlm munge``).

Each numbered point of the cluster issue has a test here: (1) a warning signal sent to every
process of an srun step leaves the launcher alive and the step COMPLETED; (2) a warning during
start-up ends in a checkpoint and a requeue, also the real ``--signal=B:USR1@...`` warning of a
short ``--time`` limit; (3) one task of a preparation array re-submitted alone; (4) the number of
processes per node; (5) submission from outside the project; (6) a plain ``scancel`` under
``proctrack/cgroup`` checkpoints within KillWait. Requeues are capped (``MAX_REQUEUES`` in the
scripts, ``max_restarts`` in the polling); the cluster's ``cred_expire=5`` keeps their PENDING wait to seconds.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import scale_helpers as helpers
import slurm_cluster
import torch
from conftest import REPO, tiny_overrides
from safetensors.torch import load_file

from tricoclr.trainer import newest_checkpoint

pytestmark = pytest.mark.slow
# The step-wide signal is sent once the requeued run logs its resume, so the rest of the run must
# outlast the 0.5 s poll and scancel: with 3 epochs the 8 remaining steps (~0.2 s each) took ~1.5 s on an idle
# machine and a clean-clone CI run finished before the signal landed (no second requeue).
EPOCHS = 8
STEPS = EPOCHS * 3  # 12 training videos / batch 4 per epoch


@pytest.fixture(scope="module")
def slurm(request, tmp_path_factory):
    """A running one-node cluster; ``proctrack/linuxproc`` unless parametrized (indirect)."""
    proctrack = getattr(request, "param", "linuxproc")
    try:
        cluster = slurm_cluster.start_cluster(tmp_path_factory.mktemp(f"slurm-{proctrack}"), proctrack)
    except slurm_cluster.SlurmUnavailable as reason:
        print(f"SLURM tests skipped: {reason}")
        pytest.skip(f"SLURM cannot start here: {reason}")
    yield cluster
    cluster.stop()


def overrides(data, out, epochs=EPOCHS, **extra):
    settings = {
        "modalities": "[rgb]",
        "max_steps_per_stage": "null",
        "checkpoint_every_steps": 1,
        "deterministic": "true",
        "schedule.pretrain_epochs": epochs,
        **extra,
    }
    return tiny_overrides(data, out, **settings)


@pytest.fixture(scope="module")
def reference(train_lmdb, tmp_path_factory):
    """The encoders of an uninterrupted single-process run of ``overrides``."""
    folder = tmp_path_factory.mktemp("reference")
    helpers.main(["--dump", str(folder / "dump"), "--", *overrides(train_lmdb, folder / "out")])
    return folder / "out"


def assert_same_encoders(out: Path, reference: Path) -> None:
    # Tensor equality: safetensors files of identical runs differ in bytes (metadata key order).
    for name in ("rgb.safetensors", "pretrain-rgb/rgb.safetensors"):
        a, b = load_file(str(out / "encoders" / name)), load_file(str(reference / "encoders" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def job_env(cluster, **extra) -> dict:
    """The submitting shell's environment (sbatch exports it to the job): the venv first on PATH,
    CPU processes, no SLURM variables of an enclosing job."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k != "GPUS_PER_NODE"}
    env.update(
        helpers.cpu_env(),
        PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        ACCELERATE_CONFIG="accelerate_configs/cpu_2proc.yaml",
        MAIN_PORT=str(helpers.free_port()),
        MAX_REQUEUES="4",
        **cluster.env,
    )
    env.update(extra)
    return env


def small_node(tmp_path, *extra):
    """The sbatch options a 2-core node needs instead of the scripts' 8-GPU defaults."""
    return ["--gpus-per-node=1", "--cpus-per-task=1", "--time=10", f"--output={tmp_path}/job-%j.out", *extra]


def _scancel(cluster, job_id, *options) -> bool:
    """``scancel --signal=USR1 OPTIONS JOB``; False when SLURM did not find what to signal."""
    result = subprocess.run(
        ["scancel", "--signal=USR1", *options, str(job_id)],
        capture_output=True,
        text=True,
        env=dict(os.environ, **cluster.env),
        timeout=30,
        check=False,
    )
    return result.returncode == 0 and not result.stderr.strip()


def test_warnings_at_start_up_and_to_every_process_of_the_step_requeue_and_resume_exactly(
    slurm, train_lmdb, reference, tmp_path
):
    """Points 1 and 2 through srun (the multi-node script on one node): a warning to the batch
    shell the moment the job starts, then one to every process of the running step (the launcher
    included, as srun forwards it under proctrack/linuxproc); both end in a checkpoint and a requeue,
    and the third run finishes exactly like an uninterrupted one."""
    out = tmp_path / "out"
    job = slurm.sbatch(
        *small_node(tmp_path, "--nodes=1"),
        str(REPO / "slurm" / "train_multi_node.sbatch"),
        "configs/tiny.yaml",
        *overrides(train_lmdb, out),
        cwd=REPO,
        env=job_env(slurm),
    )
    output = tmp_path / f"job-{job}.out"
    slurm.wait_for_state(job, "RUNNING", timeout=60)
    # A signal sent before slurmd has started the batch shell is dropped by SLURM (scancel still
    # succeeds): wait for the shell (slurmstepd opens its output file just before), then give
    # bash a moment to reach its first command, the trap; python has not started yet.
    deadline = time.monotonic() + 60
    while not output.exists():
        assert time.monotonic() < deadline, "the batch shell did not start"
        time.sleep(0.02)
    time.sleep(0.2)
    assert _scancel(slurm, job, "--batch")
    signalled_step = []

    def signal_the_running_step(info):
        text = output.read_text() if output.exists() else ""
        if not signalled_step and info.get("Restarts") == "1" and text.count("resuming from") == 1:
            signalled_step.append(_scancel(slurm, job))  # every process of every step: no --batch

    info = slurm.wait_for_end(job, timeout=400, on_poll=signal_the_running_step)
    text = output.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, text[-3000:])
    assert signalled_step == [True], text[-3000:]
    assert info["Restarts"] == "2" and text.count("requeueing job") == 2, text[-3000:]
    assert text.count("launcher exited with status 0") == 3, text[-3000:]
    assert "exit code" not in text and "138" not in text  # srun reports a failed task this way
    assert len(re.findall(r"resuming from \S+step-(\d{8})", text)) == 2
    assert newest_checkpoint(out).name == f"step-{STEPS:08d}"
    assert_same_encoders(out, reference)


def test_the_real_warning_of_a_short_time_limit_checkpoints_requeues_and_the_rerun_resumes(slurm, train_lmdb, tmp_path):
    """``--time=2 --signal=B:USR1@115``: the warning is due 5 s after the start and comes at
    slurmctld's next time-limit pass (every 30 s), during start-up or training. The schedule is
    far longer than that, so the warning always finds the job running: it checkpoints, requeues,
    and the rerun (its time limit lifted, so not warned again) resumes from that checkpoint; the
    test then cancels it (the exact continuation is the first test's)."""
    out = tmp_path / "out"
    job = slurm.sbatch(
        *small_node(tmp_path, "--time=2", "--signal=B:USR1@115"),
        str(REPO / "slurm" / "train_single_node.sbatch"),
        "configs/tiny.yaml",
        *overrides(train_lmdb, out, epochs=2000, checkpoint_every_steps=1000),
        cwd=REPO,
        env=job_env(slurm),
    )
    output = tmp_path / f"job-{job}.out"
    deadline = time.monotonic() + 300
    while "resuming from" not in (text := output.read_text() if output.exists() else ""):
        info = slurm.job(job)
        assert time.monotonic() < deadline and int(info["Restarts"]) <= 1, (info, text[-3000:])
        if info["JobState"] == "PENDING" and info["Restarts"] == "1" and info["TimeLimit"] != "00:10:00":
            slurm.command("scontrol", "update", f"jobid={job}", "TimeLimit=10")
        time.sleep(0.5)
    slurm.command("scancel", str(job))  # checkpoints too, and is not requeued (the cgroup test's point)
    info = slurm.wait_for_end(job, timeout=120, max_restarts=1)
    text = output.read_text()
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "1", (info, text[-3000:])
    warned_at = re.findall(r"checkpoint written at step (\d+)", text)[0]
    assert "requeueing job" in text
    assert re.search(rf"resuming from \S+/step-0*{warned_at} ", text), text[-3000:]


def test_one_task_of_a_preparation_array_resubmitted_alone_resumes(slurm, synth_dataset, tmp_path):
    """Point 3: the number of parts comes from the first submission (OUT's part folders), or from
    NUM_PARTS; a lone task on a fresh OUT says what it needs."""
    from tricoclr.data.store import open_store

    listed = [line for line in (synth_dataset / "splits" / "testlist01.txt").read_text().split("\n") if line][:2]
    video_list = tmp_path / "two_videos.txt"
    video_list.write_text("\n".join(listed) + "\n")
    script = str(REPO / "slurm" / "prepare_array.sbatch")

    def submit(array, out, **env):
        return slurm.sbatch(
            f"--array={array}",
            "--cpus-per-task=1",
            f"--output={tmp_path}/prep-%A_%a.out",
            script,
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
            cwd=tmp_path,
            env=job_env(slurm, **env),
        )

    def ended(job, task):
        info = slurm.wait_for_end(f"{job}_{task}", timeout=300)
        return info, (tmp_path / f"prep-{job}_{task}.out").read_text()

    out = tmp_path / "prepared"
    first = submit("0-1", out)
    for task in (0, 1):
        info, text = ended(first, task)
        assert info["JobState"] == "COMPLETED", text[-2000:]
    again = submit("1", out)  # the re-submission of one task: 2 parts, from OUT
    info, text = ended(again, 1)
    assert info["JobState"] == "COMPLETED" and "task 1 of 2 parts" in text, text[-2000:]
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("part-")) == [
        "part-00000-of-00002",
        "part-00001-of-00002",
    ]
    assert len(open_store(out).videos()) == 2

    fresh = tmp_path / "fresh"
    lone = submit("1", fresh)
    info, text = ended(lone, 1)
    assert info["JobState"] == "FAILED" and "set NUM_PARTS=N" in text, text[-2000:]
    explicit = submit("1", fresh, NUM_PARTS="2")
    info, text = ended(explicit, 1)
    assert info["JobState"] == "COMPLETED", text[-2000:]
    assert [p.name for p in fresh.iterdir() if p.name.startswith("part-")] == ["part-00001-of-00002"]


def test_processes_per_node_and_submission_from_outside_the_project(slurm, train_lmdb, tmp_path):
    """Points 4 and 5, submitted from a folder that is not the project (the script given by a
    relative path, the config relative to the project): two GPUs allocated -> 2 processes; the
    user's GPUS_PER_NODE=1 wins over them; no GPUs -> 1 process (not 8); a script read from stdin
    (no recorded path) fails with what to set, and runs with TRICOCLR_ROOT."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    script = os.path.relpath(REPO / "slurm" / "train_single_node.sbatch", elsewhere)
    runs = {
        "two_gpus": ("--gpus-per-node=2", {}),
        "user_says_one": ("--gpus-per-node=2", {"GPUS_PER_NODE": "1"}),
        "no_gpus": ("--gpus-per-node=0", {}),
    }
    jobs = {}
    for name, (gpus, extra) in runs.items():
        args = overrides(train_lmdb, tmp_path / name, epochs=1, max_steps=1)
        jobs[name] = slurm.sbatch(
            *small_node(tmp_path, gpus),
            script,
            "configs/tiny.yaml",
            *args,
            cwd=elsewhere,
            env=job_env(slurm, MAIN_PORT=str(helpers.free_port()), **extra),
        )
    stdin_args = ["configs/tiny.yaml", *overrides(train_lmdb, tmp_path / "stdin", epochs=1, max_steps=1)]
    from_stdin = _sbatch_stdin(slurm, tmp_path, elsewhere, stdin_args, {})
    from_stdin_with_root = _sbatch_stdin(slurm, tmp_path, elsewhere, stdin_args, {"TRICOCLR_ROOT": str(REPO)})

    expected = {"two_gpus": 2, "user_says_one": 1, "no_gpus": 1}
    for name, job in jobs.items():
        info = slurm.wait_for_end(job, timeout=300)
        text = (tmp_path / f"job-{job}.out").read_text()
        assert info["JobState"] == "COMPLETED", (name, text[-3000:])
        world = json.loads((tmp_path / name / "run_info.json").read_text())["world_size"]
        assert world == expected[name], (name, text[-2000:])
    info = slurm.wait_for_end(from_stdin, timeout=120)
    text = (tmp_path / f"job-{from_stdin}.out").read_text()
    assert info["JobState"] == "FAILED" and "set TRICOCLR_ROOT" in text, text[-2000:]
    info = slurm.wait_for_end(from_stdin_with_root, timeout=300)
    assert info["JobState"] == "COMPLETED", (tmp_path / f"job-{from_stdin_with_root}.out").read_text()[-3000:]


def _sbatch_stdin(slurm, tmp_path, cwd, args, extra) -> int:
    """sbatch reading the script from stdin: the job records no script path."""
    env = dict(job_env(slurm, MAIN_PORT=str(helpers.free_port()), **extra))
    result = subprocess.run(
        ["sbatch", "--parsable", *small_node(tmp_path), "/dev/stdin", *args],
        cwd=cwd,
        env=env,
        input=(REPO / "slurm" / "train_single_node.sbatch").read_text(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return int(result.stdout.strip())


@pytest.mark.parametrize("slurm", ["cgroup"], indirect=True)
def test_a_plain_scancel_under_cgroup_tracking_checkpoints_within_kill_wait(slurm, train_lmdb, tmp_path):
    """Point 6: ``scancel`` (SIGTERM to every process of the job, SIGKILL after KillWait) used to
    kill the trainer 2 ms after the batch shell died under proctrack/cgroup. Now every process
    survives the SIGTERM until the trainers have written their checkpoint."""
    out = tmp_path / "out"
    job = slurm.sbatch(
        *small_node(tmp_path),
        str(REPO / "slurm" / "train_single_node.sbatch"),
        "configs/tiny.yaml",
        *overrides(train_lmdb, out, epochs=8, checkpoint_every_steps=1000),
        cwd=REPO,
        env=job_env(slurm),
    )
    output = tmp_path / f"job-{job}.out"
    deadline = time.monotonic() + 300
    while "global batch" not in (output.read_text() if output.exists() else ""):  # training has begun
        assert time.monotonic() < deadline and slurm.job(job)["JobState"] in ("PENDING", "RUNNING"), (
            output.read_text()[-3000:] if output.exists() else slurm.job(job)
        )
        time.sleep(0.2)
    slurm.command("scancel", str(job))
    info = slurm.wait_for_end(job, timeout=120, max_restarts=0)
    text = output.read_text()
    assert info["JobState"] == "CANCELLED", (info, text[-3000:])
    written = re.findall(r"checkpoint written at step (\d+)", text)
    assert written and (out / "checkpoints" / f"step-{int(written[0]):08d}").is_dir(), text[-3000:]
    assert "checkpoint written after a SIGTERM" in text and "submit the same command to resume" in text
    assert "Received 15 death signal" not in text  # torchrun's agent left its worker alone
