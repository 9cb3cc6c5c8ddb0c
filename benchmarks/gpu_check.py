"""One run that proves the GPU path: tests, training (bf16 with an exact resume, fp16 with loss scaling,
DeepSpeed ZeRO-2), evaluation, the training-step benchmark and an end-to-end run, each part timed and
reported to one JSON file plus a readable summary.

    python benchmarks/gpu_check.py                         # every part; CUDA when present, else CPU
    python benchmarks/gpu_check.py --parts train_fp16,eval  # rerun some (merged into the same JSON)

Everything goes through the command lines a user runs (``accelerate launch ... tricoclr/train.py``,
``tricoclr eval``, ``tricoclr-data synth|prepare``, ``benchmarks/train_step.py``): the check proves those,
not a test harness. Each part runs as its own subprocess under a time cap, so one part's crash or hang
never hides the others' results; a part that fails says why (its checks, the error's last lines, its log)
and the run goes on. The exit status is 0 only when every part passed.

On a machine without CUDA the same parts run their CPU variants (tiny backbones and shapes, CPU
Accelerate settings, fp32/bf16/fp16 as the CPU supports them, DeepSpeed in fp32) in about three
minutes: tests/test_gpu_check.py runs it, so the check cannot rot. What each part runs, its figures and
the wheels a GPU machine without network needs: benchmarks/README.md, "GPU check".
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import socket
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCHEMA_VERSION = 1
PARTS = ("data", "gpu_tests", "train_bf16_resume", "train_fp16", "deepspeed_zero2", "eval", "train_step", "train_e2e")
NEEDS_DATA = frozenset({"train_bf16_resume", "train_fp16", "deepspeed_zero2", "eval", "train_e2e"})
READY_MARKER = "READY"  # written last into a prepared data folder: its presence means complete
STAGES = ("pretrain-rgb", "pretrain-flow", "pretrain-audio", "cycle1-rgb", "cycle1-flow", "cycle1-audio")
# A killed part still reports what it wrote; the parent waits this long beyond the part's own cap.
KILL_GRACE_S = 10
MIN_PART_SECONDS = 15  # under --budget, a part with less time left than this is not started

# Per mode: data sizes, training shapes, benchmark arguments and each part's cap in seconds. GPU shapes
# are "reduced" for the correctness parts (S3D / ResNet-18 at 16 x 64^2) and the paper's for the two
# throughput parts; CPU ones are the tests' tiny shapes.
MODES = {
    "gpu": {
        "data": dict(classes=4, videos_per_class=4, seconds=3, size=64),
        "flow": [
            "--flow",
            "tvl1-torch",
            "--flow-device",
            "cuda",
            "--no-flow-compile",
            "--tvl1-scales",
            "3",
            "--tvl1-warps",
            "2",
            "--tvl1-inner-iterations",
            "10",
            "--tvl1-outer-iterations",
            "2",
        ],
        "train": {
            "model.backbones": "{rgb: s3d, flow: s3d, audio: resnet18}",
            "batch_size": 8,
            "data.clip_frames": 16,
            "data.clip_stride": 1,
            "data.size": 64,
            "data.spectrogram_steps": 64,
            "method.queue_size": 16,
        },
        "steps_per_stage": 3,
        "resume_stop_step": 8,
        "e2e": dict(
            videos=256,
            seconds=2,
            size=128,
            config="configs/k400_paper.yaml",
            batch_size=32,
            steps=200,
            log_every=10,
            queue_size=2048,
            flow=["--flow", "tvl1-torch", "--flow-device", "cuda", "--no-flow-compile"],
        ),  # OpenCV's defaults
        "train_step": [
            "--shapes",
            "paper",
            "--device",
            "cuda",
            "--batch-size",
            "32",
            "--seconds",
            "4",
            "--variants",
            "fp32_eager,amp,optimized",
        ],  # optimized: + torch.compile (one compile)
        "timeouts": dict(
            data=240,
            gpu_tests=300,
            train_bf16_resume=300,
            train_fp16=180,
            deepspeed_zero2=360,
            eval=240,
            train_step=360,
            train_e2e=480,
        ),
    },
    "cpu": {
        "data": dict(classes=4, videos_per_class=4, seconds=2, size=64),  # 3 train per class: the probe holds one out
        "flow": None,  # farneback when OpenCV is installed, else a few TV-L1 iterations in PyTorch
        "train": {
            "model.backbones": "{rgb: tiny3d, flow: tiny3d, audio: tiny2d}",
            "batch_size": 4,
            "data.clip_frames": 4,
            "data.clip_stride": 2,
            "data.size": 32,
            "data.spectrogram_steps": 32,
            "method.queue_size": 8,
        },
        "steps_per_stage": 3,
        "resume_stop_step": 8,
        "e2e": dict(
            videos=None,
            seconds=None,
            size=None,
            config="configs/tiny.yaml",
            batch_size=4,
            steps=16,
            log_every=4,
            queue_size=8,
        ),
        "train_step": [
            "--shapes",
            "demo",
            "--device",
            "cpu",
            "--batch-size",
            "8",
            "--seconds",
            "1",
            "--min-steps",
            "2",
            "--warmup",
            "1",
            "--variants",
            "fp32_eager,optimized",
        ],
        "timeouts": dict(
            data=120,
            gpu_tests=120,
            train_bf16_resume=150,
            train_fp16=90,
            deepspeed_zero2=200,
            eval=150,
            train_step=120,
            train_e2e=150,
        ),
    },
}


class PartError(RuntimeError):
    """A part's command or check failed; the message says which and why."""


# ---- one part's record ---------------------------------------------------------------------------


@dataclass
class Record:
    """What a part found so far; saved after every command, so a killed part still reports it."""

    path: Path
    figures: dict = field(default_factory=dict)
    checks: dict = field(default_factory=dict)
    commands: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    error: str | None = None

    def save(self) -> None:
        data = {
            "figures": self.figures,
            "checks": self.checks,
            "commands": self.commands,
            "notes": self.notes,
            "error": self.error,
        }
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1, default=str))
        os.replace(tmp, self.path)

    def check(self, name: str, passed: bool, detail: str = "") -> None:
        self.checks[name] = bool(passed)
        if not passed:
            self.notes.append(f"check {name} failed{': ' + detail if detail else ''}")
        self.save()


@dataclass
class Context:
    mode: str  # "gpu" | "cpu"
    work: Path
    deadline: float  # time.time() by which the part must be done
    record: Record

    @property
    def settings(self) -> dict:
        return MODES[self.mode]

    def env(self, **extra) -> dict:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
        if self.mode == "cpu":
            env["OMP_NUM_THREADS"] = "1"  # fixed threads: the same reduction order in every run
        else:
            env["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"  # cuBLAS is deterministic only with this set
        env.update(extra)
        return env

    def run(self, command: list[str], env: dict | None = None, label: str | None = None) -> str:
        """Run a command in the repository, echo its output into the part's log, return the output;
        PartError when it fails or outlives the part's deadline."""
        return run_command(command, env or self.env(), self.deadline - time.time(), self.record, label)


def kill_tree(pid: int) -> None:
    """SIGKILL a process and every descendant (torchrun starts its workers in new sessions, so a
    process-group kill would miss them)."""
    import psutil  # an Accelerate dependency

    try:
        parent = psutil.Process(pid)
        family = parent.children(recursive=True) + [parent]
    except psutil.NoSuchProcess:
        return
    for process in family:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


def run_command(command: list[str], env: dict, timeout: float, record: Record, label: str | None) -> str:
    """``command`` in the repository with ``timeout`` seconds; its output (stdout and stderr) is echoed
    and returned, and it is logged in ``record.commands``. PartError on a non-zero exit or the timeout
    (the whole process tree is killed then)."""
    start = time.time()
    entry = {"command": [str(c) for c in command], "label": label}
    record.commands.append(entry)
    print(f"$ {' '.join(entry['command'])}", flush=True)
    process = subprocess.Popen(
        entry["command"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
    )
    try:
        output, _ = process.communicate(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        kill_tree(process.pid)
        output, _ = process.communicate()
        entry.update(seconds=round(time.time() - start, 2), returncode=None)
        print(output, flush=True)
        record.save()
        raise PartError(f"{label or command[0]}: killed after {timeout:.0f} s (the part's time cap)") from None
    entry.update(seconds=round(time.time() - start, 2), returncode=process.returncode)
    print(output, flush=True)
    record.save()
    if process.returncode != 0:
        raise PartError(f"{label or command[0]} exited with {process.returncode}: {tail(output, 15)}")
    return output


def tail(text: str, lines: int) -> str:
    """The last ``lines`` non-blank lines of ``text``."""
    kept = [line for line in text.strip().splitlines() if line.strip()][-lines:]
    return "\n".join(kept)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- shared pieces ---------------------------------------------------------------------------------


def data_cli(*args) -> list[str]:
    return [sys.executable, "-m", "data_tools.cli", *[str(a) for a in args]]


def flow_arguments(ctx: Context) -> list[str]:
    if ctx.settings["flow"] is not None:
        return ctx.settings["flow"]
    from data_tools.flow import available_flow_methods

    if "farneback" in available_flow_methods():
        return ["--flow", "farneback"]
    return [
        "--flow",
        "tvl1-torch",
        "--flow-device",
        "cpu",
        "--tvl1-scales",
        "2",
        "--tvl1-warps",
        "1",
        "--tvl1-inner-iterations",
        "5",
        "--tvl1-outer-iterations",
        "1",
    ]


def small_data(work: Path) -> Path:
    return work / "data"


def require_data(ctx: Context) -> Path:
    folder = small_data(ctx.work)
    if not (folder / READY_MARKER).exists():
        raise PartError(f"{folder} holds no complete prepared data: run the 'data' part first")
    return folder


def accelerate_launch(*args) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", *[str(a) for a in args]]


def launch_variant(ctx: Context, variant: str) -> tuple[list[str], dict]:
    """The launcher arguments and environment of a training variant on this machine.

    bf16: accelerate_configs/single_gpu.yaml as is. fp16: multinode_v100_fp16.yaml (DDP, fp16 autocast,
    loss scaling) in one process. deepspeed: deepspeed_zero2.yaml in one process, bf16 on a GPU; on CPU
    DeepSpeed runs in fp32 only (tests/test_deepspeed.py)."""
    gpu = ctx.mode == "gpu"
    plain_env = ctx.env(**({} if gpu else {"ACCELERATE_USE_CPU": "1"}))
    if variant == "bf16":
        return ["--config_file", "accelerate_configs/single_gpu.yaml"], plain_env
    one_process = ["--num_machines", "1", "--num_processes", "1", "--main_process_port", str(free_port())]
    if variant == "fp16":
        return (
            ["--config_file", "accelerate_configs/multinode_v100_fp16.yaml", "--machine_rank", "0", *one_process],
            plain_env,
        )
    if variant == "deepspeed":
        launcher = ["--config_file", "accelerate_configs/deepspeed_zero2.yaml", *one_process]
        if gpu:
            return launcher, ctx.env()
        env = ctx.env(DS_ACCELERATOR="cpu")
        env.pop("ACCELERATE_USE_CPU", None)  # with it Accelerate would run plain CPU, not DeepSpeed
        return launcher + ["--mixed_precision", "no"], env
    raise ValueError(f"unknown launch variant {variant!r}")


def train_overrides(ctx: Context, data: Path, out: Path, **extra) -> list[str]:
    """Every stage of the schedule (3 pre-training stages, one cycle of 3) for a few steps each."""
    values = {
        "data.path": data / "train",
        "output_dir": out,
        "data.workers": 0,
        "log_every_steps": 1,
        "checkpoint_every_steps": 1000,
        "schedule.cycles": 1,
        "schedule.pretrain_epochs": 100,
        "schedule.stage_epochs": 100,
        "max_steps_per_stage": ctx.settings["steps_per_stage"],
        "monitor.augment_images": "false",
        **ctx.settings["train"],
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def train_command(launcher: list[str], overrides: list[str], config: str = "configs/tiny.yaml") -> list[str]:
    return accelerate_launch(*launcher, "tricoclr/train.py", "--config", config, *overrides)


def read_scalars(folder: Path, tag: str) -> dict[int, tuple[float, float]]:
    """{step: (value, wall time)} of a TensorBoard scalar over every event file under ``folder``
    (a resumed run adds a second file beside the first)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values: dict[int, tuple[float, float]] = {}
    for path in sorted(folder.rglob("events.out.tfevents*")):
        events = EventAccumulator(str(path), size_guidance={"scalars": 0})
        events.Reload()
        if tag in events.Tags()["scalars"]:
            values.update({e.step: (e.value, e.wall_time) for e in events.Scalars(tag)})
    return values


def losses_of(out: Path) -> dict[int, float]:
    return {step: value for step, (value, _) in sorted(read_scalars(out / "tb", "train/loss").items())}


def encoder_files(out: Path) -> dict[str, Path]:
    return {str(p.relative_to(out)): p for p in sorted((out / "encoders").rglob("*.safetensors"))}


def run_info(out: Path) -> dict:
    path = out / "run_info.json"
    return json.loads(path.read_text()) if path.exists() else {}


def compare_encoders(a: Path, b: Path) -> dict:
    """Tensor-by-tensor equality of two runs' encoder files (latest and per-stage snapshots)."""
    import torch
    from safetensors.torch import load_file

    files_a, files_b = encoder_files(a), encoder_files(b)
    differing, max_diff, tensors = [], 0.0, 0
    for name in sorted(set(files_a) & set(files_b)):
        ta, tb = load_file(str(files_a[name])), load_file(str(files_b[name]))
        for key in sorted(set(ta) | set(tb)):
            tensors += 1
            if key not in ta or key not in tb or ta[key].shape != tb[key].shape:
                differing.append(f"{name}:{key} (missing or reshaped)")
                max_diff = math.inf
            elif not torch.equal(ta[key], tb[key]):
                differing.append(f"{name}:{key}")
                max_diff = max(max_diff, float((ta[key].double() - tb[key].double()).abs().max()))
    return {
        "files": len(files_a),
        "files_b": len(files_b),
        "same_file_names": sorted(files_a) == sorted(files_b),
        "tensors_compared": tensors,
        "tensors_differing": len(differing),
        "first_differing": differing[:5],
        "max_abs_diff": max_diff,
    }


def stages_run(out: Path) -> list[str]:
    return [stage for stage in STAGES if (out / "encoders" / stage).is_dir()]


def newest_checkpoint_dir(out: Path) -> Path | None:
    done = sorted(p for p in (out / "checkpoints").glob("step-*") if (p / "trainer_state.json").is_file())
    return done[-1] if done else None


def finite(values) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


# ---- the parts -------------------------------------------------------------------------------------


def part_data(ctx: Context) -> None:
    """Synthesize labelled videos (PyAV: H.264 + AAC) and prepare train/test LMDB stores."""
    folder, settings, rec = small_data(ctx.work), ctx.settings["data"], ctx.record
    rec.figures["flow"] = flow_arguments(ctx)[1]
    if (folder / READY_MARKER).exists():
        rec.figures.update(json.loads((folder / READY_MARKER).read_text()), reused=True)
        rec.check("stores_ready", True)
        return
    import shutil

    shutil.rmtree(folder, ignore_errors=True)
    workers = str(min(8, os.cpu_count() or 1)) if ctx.mode == "gpu" else "1"
    ctx.run(
        data_cli(
            "synth",
            "--out",
            folder / "synth",
            "--classes",
            settings["classes"],
            "--videos-per-class",
            settings["videos_per_class"],
            "--seconds",
            settings["seconds"],
            "--size",
            settings["size"],
            "--workers",
            workers,
        ),
        label="synth",
    )
    counts = {}
    for split in ("train", "test"):
        start = time.time()
        ctx.run(
            data_cli(
                "prepare",
                folder / "synth" / "videos",
                "--out",
                folder / split,
                "--format",
                "lmdb",
                "--list",
                folder / "synth" / "splits" / f"{split}list01.txt",
                "--size",
                settings["size"],
                *flow_arguments(ctx),
                "--workers",
                workers,
                "--no-progress",
            ),
            label=f"prepare {split}",
        )
        counts[f"{split}_videos"] = count_videos(folder / split)
        counts[f"prepare_{split}_seconds"] = round(time.time() - start, 2)
    rec.figures.update(counts, reused=False)
    rec.check("stores_ready", counts["train_videos"] > 0 and counts["test_videos"] > 0, str(counts))
    (folder / READY_MARKER).write_text(json.dumps(counts))


def count_videos(store: Path) -> int:
    from tricoclr.data.store import open_store

    return len(open_store(str(store)).videos())


def part_gpu_tests(ctx: Context) -> None:
    """``pytest -m gpu``: every GPU-marked test (all skip on a machine without CUDA)."""
    import xml.etree.ElementTree as ET

    report = ctx.work / "gpu_tests.xml"
    report.unlink(missing_ok=True)
    try:
        ctx.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "-m",
                "gpu",
                "-p",
                "no:cacheprovider",
                "--junitxml",
                report,
                "tests",
            ],
            label="pytest -m gpu",
        )
    finally:
        if report.exists():
            suite = ET.parse(report).getroot()
            suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
            counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
            counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
            ctx.record.figures.update(counts)
    figures = ctx.record.figures
    ctx.record.check("none_failed", figures.get("failures") == 0 and figures.get("errors") == 0, str(figures))
    ctx.record.check("some_selected", figures.get("tests", 0) > 0, "no test is marked gpu")
    if ctx.mode == "gpu":
        ctx.record.check(
            "all_ran_on_the_gpu", figures.get("passed") == figures.get("tests"), f"{figures.get('skipped')} skipped"
        )


def resume_comparison(ctx: Context, variant: str, **extra) -> dict:
    """Three runs of every stage: uninterrupted; stopped mid-stage at ``resume_stop_step`` (its
    checkpoint); the same command again, which resumes. The resumed run must end bit-identical."""
    import shutil

    data, rec = require_data(ctx), ctx.record
    root = ctx.work / f"runs_{variant}"
    shutil.rmtree(root, ignore_errors=True)
    launcher, env = launch_variant(ctx, variant)
    whole, split, stop = root / "whole", root / "split", ctx.settings["resume_stop_step"]
    timings = {}
    for name, out, more in (("whole", whole, {}), ("first_part", split, {"max_steps": stop}), ("resumed", split, {})):
        start = time.time()
        output = ctx.run(train_command(launcher, train_overrides(ctx, data, out, **extra, **more)), env, label=name)
        timings[name] = round(time.time() - start, 2)
        rec.figures["run_seconds"] = timings
    rec.check(
        "resumed_from_checkpoint",
        f"resuming from {split / 'checkpoints'}" in output,
        "the second command did not resume",
    )
    losses_whole, losses_split = losses_of(whole), losses_of(split)
    info = run_info(whole)
    rec.figures.update(
        {
            "mixed_precision": info.get("mixed_precision"),
            "world_size": info.get("world_size"),
            "steps": max(losses_whole, default=0),
            "stop_step": stop,
            "stages": stages_run(whole),
            "first_loss": losses_whole.get(1),
            "final_loss": losses_whole.get(max(losses_whole, default=0)),
            "losses_equal_steps": sum(losses_whole.get(s) == v for s, v in losses_split.items()),
        }
    )
    comparison = compare_encoders(whole, split)
    rec.figures["encoders"] = comparison
    rec.check("every_stage_ran", stages_run(whole) == list(STAGES) == stages_run(split), str(stages_run(split)))
    rec.check("losses_finite", bool(losses_whole) and finite(losses_whole.values()))
    rec.check(
        "losses_identical_after_resume",
        losses_whole == losses_split,
        f"{rec.figures['losses_equal_steps']} of {len(losses_whole)} steps equal",
    )
    rec.check(
        "encoders_bit_identical_after_resume",
        comparison["same_file_names"] and comparison["tensors_differing"] == 0 and comparison["files"] > 0,
        f"{comparison['tensors_differing']} tensors differ, max {comparison['max_abs_diff']}",
    )
    return info


def part_train_bf16_resume(ctx: Context) -> None:
    """single_gpu.yaml (bf16), real backbones at reduced shapes, every stage, deterministic: a checkpoint
    mid-stage and a resume that continues bit-identically to the uninterrupted run."""
    info = resume_comparison(ctx, "bf16", deterministic="true")
    ctx.record.check("bf16", info.get("mixed_precision") == "bf16", str(info.get("mixed_precision")))


def part_train_fp16(ctx: Context) -> None:
    """multinode_v100_fp16.yaml in one process: DDP, fp16 autocast with loss scaling, every stage."""
    import shutil

    import torch

    data, rec = require_data(ctx), ctx.record
    out = ctx.work / "runs_fp16"
    shutil.rmtree(out, ignore_errors=True)
    launcher, env = launch_variant(ctx, "fp16")
    ctx.run(train_command(launcher, train_overrides(ctx, data, out)), env, label="fp16 run")
    losses, info = losses_of(out), run_info(out)
    checkpoint = newest_checkpoint_dir(out)
    scaler = checkpoint / "scaler.pt" if checkpoint else None
    scale = None
    if scaler is not None and scaler.exists():
        scale = float(torch.load(scaler, weights_only=True)["scale"])
    steps = max(losses, default=0)
    rec.figures.update(
        {
            "mixed_precision": info.get("mixed_precision"),
            "world_size": info.get("world_size"),
            "steps": steps,
            "stages": stages_run(out),
            "final_loss": losses.get(steps),
            "checkpoint": checkpoint.name if checkpoint else None,
            "loss_scale": scale,
        }
    )
    rec.check("fp16", info.get("mixed_precision") == "fp16", str(info.get("mixed_precision")))
    rec.check("every_stage_ran", stages_run(out) == list(STAGES), str(stages_run(out)))
    rec.check("losses_finite", bool(losses) and finite(losses.values()))
    rec.check("checkpoint_written", checkpoint is not None)
    if ctx.mode == "gpu":  # on CPU Accelerate's fp16 runs without a GradScaler
        rec.check("loss_scaler_saved", scale is not None and math.isfinite(scale) and scale > 0, f"scale {scale}")


def part_deepspeed_zero2(ctx: Context) -> None:
    """deepspeed_zero2.yaml in one process (bf16 on a GPU, fp32 on CPU): every stage, a checkpoint of the
    engine mid-stage, a resume that continues bit-identically."""
    # On CPU deterministic mode would fill ZeRO-2's 5e8-element buckets every step (seconds each).
    info = resume_comparison(ctx, "deepspeed", deterministic="true" if ctx.mode == "gpu" else "false")
    expected = "bf16" if ctx.mode == "gpu" else "no"
    ctx.record.check(f"precision_{expected}", info.get("mixed_precision") == expected, str(info.get("mixed_precision")))
    checkpoint = newest_checkpoint_dir(ctx.work / "runs_deepspeed" / "split")
    engine_files = sorted(p.name for p in (checkpoint / "pytorch_model").glob("*")) if checkpoint else []
    ctx.record.figures["engine_checkpoint_files"] = engine_files
    ctx.record.check(
        "engine_checkpoint_written", any("optim_states" in name for name in engine_files), str(engine_files)
    )


def eval_config(ctx: Context) -> Path:
    """The tiny config with this mode's backbones and clip shapes (the random encoder's architecture)."""
    from tricoclr.config import dump_config, load_config

    overrides = train_overrides(ctx, small_data(ctx.work), ctx.work / "eval" / "unused")
    config = load_config(REPO / "configs" / "tiny.yaml", overrides)
    path = ctx.work / "eval" / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    dump_config(config, path)
    return path


def part_eval(ctx: Context) -> None:
    """``tricoclr eval finetune`` (under Accelerate, a few steps), ``eval retrieval`` and ``eval linear`` of
    an S3D RGB encoder (random init: the commands, not the score, are under test)."""
    import shutil

    data, rec = require_data(ctx), ctx.record
    shutil.rmtree(ctx.work / "eval", ignore_errors=True)
    config = eval_config(ctx)
    device = "cuda" if ctx.mode == "gpu" else "cpu"
    common = [
        "--encoder",
        "random",
        "--config",
        config,
        "--modality",
        "rgb",
        "--train",
        data / "train",
        "--test",
        data / "test",
        "--workers",
        "0",
        "--no-cache",
        "--max-clips",
        "2",
        "--batch-size",
        "8",
    ]
    out = ctx.work / "eval"
    launcher, env = launch_variant(ctx, "bf16")
    wanted = {"finetune": ["top1"], "retrieval": ["R@1", "R@5"], "linear": ["top1", "top5"]}
    for task, keys in wanted.items():
        args = ["eval", task, *common, "--json", out / f"{task}.json"]
        start = time.time()
        if task == "finetune":
            ctx.run(
                accelerate_launch(
                    *launcher, "-m", "tricoclr.cli", *args, "--finetune-epochs", "2", "--finetune-batch-size", "4"
                ),
                env,
                label=task,
            )
        else:
            ctx.run([sys.executable, "-m", "tricoclr.cli", *args, "--device", device], label=task)
        metrics = json.loads((out / f"{task}.json").read_text())
        rec.figures[task] = {key: metrics.get(key) for key in keys} | {"seconds": round(time.time() - start, 2)}
        rec.check(f"{task}_metrics", finite(metrics.get(key) for key in keys), str(rec.figures[task]))
    finetune_dir = out / "finetune_finetune"  # the command's default --output-dir: <json stem>_finetune
    rec.figures["finetune"]["checkpoint_files"] = sorted(p.name for p in finetune_dir.rglob("*") if p.is_file())[:10]


def run_train_step_benchmark(argv: list[str]) -> dict[str, int]:
    """``benchmarks/train_step.py`` with ``argv``, in this process; {variant: CUDA peak bytes}.

    The benchmark reports no memory itself: when it has a ``measure(variant, ...)`` function (its one
    variant's timing), that is wrapped to read the CUDA allocator's peak around each call; without it
    (a later version), no per-variant figure."""
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("train_step_benchmark", REPO / "benchmarks" / "train_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    peaks: dict[str, int] = {}
    measure = getattr(module, "measure", None)
    if callable(measure) and torch.cuda.is_available():

        def measure_with_peak(variant, *args, **kwargs):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            result = measure(variant, *args, **kwargs)
            peaks[str(variant)] = torch.cuda.max_memory_allocated()
            return result

        module.measure = measure_with_peak
    sys.argv = argv
    code = module.main()
    if code not in (0, None):
        raise PartError(f"benchmarks/train_step.py exited with {code}")
    return peaks


def part_train_step(ctx: Context) -> None:
    """benchmarks/train_step.py as its command line runs it (fp32 eager vs the optimized path in one
    run), in this process so the device's peak memory can be read for each variant."""
    import resource

    import torch

    out = ctx.work / "train_step.json"
    out.unlink(missing_ok=True)
    argv = ["benchmarks/train_step.py", *ctx.settings["train_step"], "--json", str(out)]
    ctx.record.commands.append({"command": [sys.executable, *argv], "label": "train_step (in process)"})
    ctx.record.save()
    print("$", " ".join(argv), flush=True)
    os.chdir(REPO)
    peaks = run_train_step_benchmark(argv)
    result = json.loads(out.read_text())
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    figures = {
        "shapes": result.get("shapes"),
        "batch_size": result.get("batch_size"),
        "gpu": result.get("machine", {}).get("gpu"),
        "optimized_path": result.get("optimized_path"),
        "speedup": result.get("speedup"),
    }
    for variant in ("fp32_eager", "optimized"):
        figures[f"{variant}_samples_per_s"] = result.get(variant, {}).get("samples_per_s")
        figures[f"{variant}_peak_memory_bytes"] = result.get(variant, {}).get("peak_memory_bytes", peaks.get(variant))
    timed = {v: r for v, r in result.items() if isinstance(r, dict) and "samples_per_s" in r}
    figures["speedups"] = result.get("speedups")  # every timed variant / fp32 eager
    for key in ("kernels_per_step", "host_syncs_per_step"):
        figures[key] = {v: r.get(key) for v, r in timed.items()}
    figures["peak_memory_bytes"] = torch.cuda.max_memory_allocated() if cuda else None  # whole process
    figures["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if ctx.mode == "gpu":
        figures["target_2x_met"] = bool(figures["speedup"] and figures["speedup"] >= 2.0)
        figures["target_500_per_s_met"] = bool((figures["optimized_samples_per_s"] or 0) >= 500)
    ctx.record.figures.update(figures)
    ctx.record.check(
        "throughputs_measured",
        finite([figures["fp32_eager_samples_per_s"], figures["optimized_samples_per_s"], figures["speedup"]]),
    )
    if ctx.mode == "gpu":
        ctx.record.check(
            "peak_memory_measured",
            positive_number(figures["optimized_peak_memory_bytes"]) or positive_number(figures["peak_memory_bytes"]),
        )


def positive_number(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def e2e_data(ctx: Context) -> Path:
    """GPU: its own unlabelled store at the paper's frame size (TV-L1 on the GPU with OpenCV's defaults),
    kept in the work folder for reruns; CPU: the small training store."""
    import shutil

    settings = ctx.settings["e2e"]
    if settings["videos"] is None:
        return require_data(ctx) / "train"
    folder = ctx.work / "e2e_data"
    if (folder / READY_MARKER).exists():
        ctx.record.figures["data"] = json.loads((folder / READY_MARKER).read_text()) | {"reused": True}
        return folder / "train"
    shutil.rmtree(folder, ignore_errors=True)
    start, workers = time.time(), str(os.cpu_count() or 1)
    classes = 8
    ctx.run(
        data_cli(
            "synth",
            "--out",
            folder / "synth",
            "--classes",
            classes,
            "--videos-per-class",
            settings["videos"] // classes,
            "--seconds",
            settings["seconds"],
            "--size",
            settings["size"],
            "--workers",
            workers,
        ),
        label="synth e2e",
    )
    ctx.run(
        data_cli(
            "prepare",
            folder / "synth" / "videos",
            "--out",
            folder / "train",
            "--format",
            "lmdb",
            "--size",
            settings["size"],
            *settings["flow"],
            "--workers",
            workers,
            "--no-progress",
        ),
        label="prepare e2e",
    )
    figures = {"videos": count_videos(folder / "train"), "prepare_seconds": round(time.time() - start, 2)}
    ctx.record.figures["data"] = figures | {"reused": False}
    (folder / READY_MARKER).write_text(json.dumps(figures))
    return folder / "train"


def part_train_e2e(ctx: Context) -> None:
    """``accelerate launch ... tricoclr/train.py`` at the paper's shapes (GPU) for ~200 steps of a
    cooperative stage with the loader's workers on this machine's CPUs: the trainer's own samples/s
    and data_wait_fraction (TensorBoard ``train/*``; the first two windows, the workers' start-up, left
    out of the means)."""
    import shutil

    settings, rec = ctx.settings["e2e"], ctx.record
    store = e2e_data(ctx)
    out = ctx.work / "runs_e2e"
    shutil.rmtree(out, ignore_errors=True)
    workers = max(1, min(12, (os.cpu_count() or 2) - 2)) if ctx.mode == "gpu" else 2
    overrides = {
        "data.path": store,
        "output_dir": out,
        "data.workers": workers,
        "data.val_path": "null",
        "batch_size": settings["batch_size"],
        "method.queue_size": settings["queue_size"],
        "schedule.start_stage": "cycle1-rgb",
        "schedule.cycles": 1,
        "schedule.stage_epochs": 10000,
        "max_steps": settings["steps"],
        "log_every_steps": settings["log_every"],
        "checkpoint_every_steps": 100000,
        "keep_checkpoints": 1,
        "monitor.augment_images": "false",
    }
    if ctx.mode == "cpu":
        shapes = {k: v for k, v in ctx.settings["train"].items() if k not in ("batch_size", "method.queue_size")}
        overrides.update(shapes)
    launcher, env = launch_variant(ctx, "bf16")
    start = time.time()
    ctx.run(
        train_command(launcher, [f"{k}={v}" for k, v in overrides.items()], settings["config"]),
        env,
        label="end-to-end run",
    )
    rec.figures.update(e2e_figures(out, settings, workers, time.time() - start))
    figures = rec.figures
    rec.check("all_steps_ran", figures["steps"] == settings["steps"], f"{figures['steps']} steps")
    rec.check(
        "throughput_logged",
        finite([figures["samples_per_s"], figures["data_wait_fraction"]])
        and 0.0 <= figures["data_wait_fraction"] <= 1.0,
        str(figures),
    )


def e2e_figures(out: Path, settings: dict, workers: int, seconds: float) -> dict:
    """Throughput of the end-to-end run from its TensorBoard scalars (samples/s over all ranks)."""
    rates = read_scalars(out / "tb", "train/samples_per_s")
    waits = read_scalars(out / "tb", "train/data_wait_fraction")
    steps = sorted(rates)
    steady = steps[2:] or steps

    def mean(xs):
        return sum(xs) / len(xs) if xs else None

    wall = None
    if len(steady) >= 2:  # wall clock between logged steps: also counts checkpoints and epoch ends
        first, last = steady[0], steady[-1]
        wall = (last - first) * settings["batch_size"] / (rates[last][1] - rates[first][1])
    return {
        "steps": max(losses_of(out), default=0),
        "batch_size": settings["batch_size"],
        "workers": workers,
        "mixed_precision": run_info(out).get("mixed_precision"),
        "logged_windows": len(steps),
        "samples_per_s": mean([rates[s][0] for s in steady]),
        "data_wait_fraction": mean([waits[s][0] for s in steady if s in waits]),
        "data_wait_fraction_first_window": waits[steps[0]][0] if steps and steps[0] in waits else None,
        "wall_samples_per_s": wall,
        "mined_precision_logged": bool(read_scalars(out / "tb", "train/mined_precision")),
        "run_seconds": round(seconds, 2),
        "cpu_count": os.cpu_count(),
    }


PART_FUNCTIONS = {
    "data": part_data,
    "gpu_tests": part_gpu_tests,
    "train_bf16_resume": part_train_bf16_resume,
    "train_fp16": part_train_fp16,
    "deepspeed_zero2": part_deepspeed_zero2,
    "eval": part_eval,
    "train_step": part_train_step,
    "train_e2e": part_train_e2e,
}


def run_part_here(name: str, mode: str, work: Path, result: Path, deadline: float) -> int:
    """The child process of one part: run it, always leave its record at ``result``."""
    record = Record(result)
    record.save()
    try:
        PART_FUNCTIONS[name](Context(mode, work, deadline, record))
    except PartError as error:
        record.error = str(error)
    except Exception:  # noqa: BLE001 - any crash of the part is its result, reported in full
        record.error = tail(traceback.format_exc(), 25)
    record.save()
    if record.error:
        print(f"part {name} failed: {record.error}", file=sys.stderr, flush=True)
    return 1 if record.error or not all(record.checks.values()) else 0


# ---- the driver ----------------------------------------------------------------------------------


def run_part(name: str, mode: str, work: Path, timeout: float) -> dict:
    """One part in its own process under a time cap; its entry of the report."""
    logs, results = work / "logs", work / "results"
    logs.mkdir(parents=True, exist_ok=True)
    results.mkdir(parents=True, exist_ok=True)
    result, log = results / f"{name}.json", logs / f"{name}.log"
    result.unlink(missing_ok=True)
    start = time.time()
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--run-part",
        name,
        "--device",
        mode,
        "--work-dir",
        str(work),
        "--result",
        str(result),
        "--deadline",
        str(start + timeout),
    ]
    with open(log, "w") as handle:
        process = subprocess.Popen(command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT)
        try:
            returncode = process.wait(timeout=timeout + KILL_GRACE_S)
        except subprocess.TimeoutExpired:
            kill_tree(process.pid)
            process.wait()
            returncode = None
    entry = {
        "status": "ok",
        "seconds": round(time.time() - start, 2),
        "timeout_s": timeout,
        "returncode": returncode,
        "figures": {},
        "checks": {},
        "error": None,
        "notes": [],
        "commands": [],
        "log": str(log),
    }
    if result.exists():
        entry.update(json.loads(result.read_text()))
    # A part that finished inside the grace period still ran past its cap: its figures stay, but
    # it is reported as over time (a cap that only counted kills would depend on machine speed).
    over_cap = entry["seconds"] > timeout
    if returncode is None or over_cap or "time cap" in (entry["error"] or ""):
        entry["status"] = "timeout"
        entry["error"] = entry["error"] or (
            f"killed after {timeout + KILL_GRACE_S:.0f} s"
            if returncode is None
            else f"ran {entry['seconds']:.0f} s, past its time cap of {timeout:.0f} s"
        )
    elif returncode != 0 or entry["error"] or not all(entry["checks"].values()):
        entry["status"] = "failed"
        if not entry["error"]:
            last_lines = tail(log.read_text(errors="replace"), 15)
            entry["error"] = "; ".join(entry["notes"]) or f"exit status {returncode}: {last_lines}"
    return entry


def machine_info(mode: str) -> dict:
    """Where the figures come from: interpreter, CPUs and their load, GPU, package versions, commit."""
    import importlib.metadata

    import torch

    versions = {}
    for package in (
        "torch",
        "torchvision",
        "torchaudio",
        "accelerate",
        "deepspeed",
        "transformers",
        "av",
        "lmdb",
        "webdataset",
        "tensorboard",
        "pytest",
    ):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    gpu = torch.cuda.get_device_name(0) if mode == "gpu" else None
    try:  # a copied working tree (a device machine) may have no .git, or no git at all
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        commit = ""
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0],
        "gpu": gpu,
        "cuda": torch.version.cuda if mode == "gpu" else None,
        "packages": versions,
        "git_commit": commit or None,
    }


def summary_markdown(report: dict) -> str:
    machine = report["machine"]
    lines = [
        f"# GPU check ({report['mode']}): {'all parts passed' if report['ok'] else 'FAILED'}",
        "",
        (
            f"Machine: {machine.get('gpu') or 'no GPU'}, {machine['cpu_count']} CPUs, Python {machine['python']}, "
            f"torch {machine['packages'].get('torch')}; {report['seconds']:.0f} s in this run."
        ),
        "",
        "| part | status | seconds | figures |",
        "| --- | --- | ---: | --- |",
    ]
    for name, entry in report["parts"].items():
        figures = ", ".join(f"{k}={format_value(v)}" for k, v in flat_figures(entry["figures"]).items())
        lines.append(f"| {name} | {entry['status']} | {entry['seconds']:.1f} | {figures} |")
    for name, entry in report["parts"].items():
        if entry["status"] != "ok":
            lines += ["", f"**{name}** ({entry['status']}): {entry['error']}", f"log: {entry['log']}"]
    return "\n".join(lines) + "\n"


def flat_figures(figures: dict) -> dict:
    """Scalars, and one level of nested scalars as ``outer.inner`` (lists are left to the JSON)."""
    flat = {}
    for key, value in figures.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items() if not isinstance(v, (dict, list))})
        elif not isinstance(value, list):
            flat[key] = value
    return flat


def format_value(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def selected_parts(text: str | None) -> list[str]:
    if not text:
        return list(PARTS)
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in PARTS]
    if unknown:
        raise SystemExit(f"gpu_check: unknown part(s) {unknown}; parts: {', '.join(PARTS)}")
    return [n for n in PARTS if n in names]


def previous_parts(path: Path, mode: str) -> dict:
    """The other parts' entries of an earlier report of the same mode (a --parts rerun keeps them)."""
    if not path.exists():
        return {}
    try:
        old = json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}
    return old.get("parts", {}) if old.get("mode") == mode and old.get("schema_version") == SCHEMA_VERSION else {}


def write_report(report: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ordered = {name: report["parts"][name] for name in PARTS if name in report["parts"]}
    report["parts"] = ordered
    report["ok"] = bool(ordered) and all(e["status"] == "ok" for e in ordered.values())
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1, default=str))
    os.replace(tmp, path)
    path.with_suffix(".md").write_text(summary_markdown(report))


def skipped_entry(reason: str) -> dict:
    return {
        "status": "skipped",
        "seconds": 0.0,
        "timeout_s": 0.0,
        "returncode": None,
        "figures": {},
        "checks": {},
        "error": reason,
        "notes": [],
        "commands": [],
        "log": None,
    }


def drive(args) -> int:
    """Run the selected parts one after the other, rewriting the report after each; 0 if all passed."""
    import torch

    mode = args.device if args.device != "auto" else ("gpu" if torch.cuda.is_available() else "cpu")
    if mode == "gpu" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: --device gpu but torch sees no CUDA device")
    work, out = Path(args.work_dir).resolve(), Path(args.json).resolve()
    parts = selected_parts(args.parts)
    if any(p in NEEDS_DATA for p in parts) and "data" not in parts and not (small_data(work) / READY_MARKER).exists():
        parts.insert(0, "data")  # the stores the other parts read are not there yet
    started = time.time()
    report = {
        "schema_version": SCHEMA_VERSION,
        "mode": mode,
        "machine": machine_info(mode),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "seconds": 0.0,
        "parts_run": parts,
        "parts": previous_parts(out, mode) if args.parts else {},
        "ok": False,
    }
    for name in parts:
        timeout = MODES[mode]["timeouts"][name] * args.timeout_scale
        if args.budget is not None:  # what is left of the whole run's budget caps this part too
            timeout = min(timeout, args.budget - (time.time() - started) - KILL_GRACE_S - 5)
        if name in NEEDS_DATA and report["parts"].get("data", {}).get("status") not in ("ok", None) and "data" in parts:
            entry = skipped_entry("the data part did not complete, so there is no data to run on")
        elif args.budget is not None and timeout < MIN_PART_SECONDS:
            entry = skipped_entry(f"not started: {args.budget:.0f} s --budget used up; rerun with --parts {name}")
        else:
            print(f"[gpu_check] {name} (cap {timeout:.0f} s) ...", flush=True)
            entry = run_part(name, mode, work, timeout)
        entry["run_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        report["parts"][name] = entry
        report["seconds"] = round(time.time() - started, 2)
        write_report(report, out)  # after every part: a later crash of the driver keeps these
        print(
            f"[gpu_check] {name}: {entry['status'].upper()} in {entry['seconds']:.1f} s"
            + (f" -- {entry['error']}" if entry["error"] else ""),
            flush=True,
        )
    write_report(report, out)
    print(summary_markdown(report), end="")
    print(f"[gpu_check] report: {out} and {out.with_suffix('.md')}")
    return 0 if report["ok"] else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", help=f"comma-separated subset of: {', '.join(PARTS)} (default: all)")
    parser.add_argument(
        "--device",
        choices=["auto", "gpu", "cpu"],
        default="auto",
        help="gpu: CUDA variants; cpu: tiny CPU variants (default: gpu when CUDA is available)",
    )
    parser.add_argument("--json", default="out/gpu_check.json", help="the report (a .md summary is written beside it)")
    parser.add_argument(
        "--work-dir",
        default="out/gpu_check_work",
        help="data, runs and logs; prepared data here is reused (carry it to skip preparing)",
    )
    parser.add_argument("--timeout-scale", type=float, default=1.0, help="multiply every part's time cap")
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds for the whole run: parts are capped by what is left, and parts with "
        "nothing left are reported as skipped (rerun them with --parts)",
    )
    parser.add_argument("--run-part", choices=PARTS, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run_part:
        sys.path.insert(0, str(REPO))
        return run_part_here(args.run_part, args.device, Path(args.work_dir), Path(args.result), args.deadline)
    os.chdir(REPO)
    return drive(args)


if __name__ == "__main__":
    sys.exit(main())
