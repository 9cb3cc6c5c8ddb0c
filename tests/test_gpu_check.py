"""benchmarks/gpu_check.py on CPU: every part runs its CPU variant and reports its figures, a failing or
hanging part is reported as such without hiding the others, and ``--parts`` reruns merge into the report.

The full run takes ~2-3 minutes of 2 CPU cores (more on a loaded machine); it is the check's only guard
against rot between the rare runs on a GPU, so it stays in the default run.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_check  # noqa: E402

HAS_DEEPSPEED = all(importlib.util.find_spec(m) is not None for m in ("deepspeed", "transformers"))


def run_check(tmp_path, *args, timeout=900):
    report = tmp_path / "report.json"
    command = [
        sys.executable,
        "benchmarks/gpu_check.py",
        "--device",
        "cpu",
        "--json",
        str(report),
        "--work-dir",
        str(tmp_path / "work"),
        *args,
    ]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False)
    return result, (json.loads(report.read_text()) if report.exists() else None)


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("gpu_check")
    result, report = run_check(tmp_path)
    return tmp_path, result, report


@pytest.mark.slow
def test_every_part_passes_on_cpu_with_its_figures(full_run):
    tmp_path, result, report = full_run
    assert report is not None, result.stdout[-3000:] + result.stderr[-3000:]
    parts = report["parts"]
    assert list(parts) == list(gpu_check.PARTS)
    expected_failures = set() if HAS_DEEPSPEED else {"deepspeed_zero2"}
    for name, entry in parts.items():
        if name in expected_failures:
            continue
        assert entry["status"] == "ok", f"{name}: {entry['error']} (log {entry['log']})"
        assert entry["checks"] and all(entry["checks"].values()), (name, entry["checks"])
        assert 0 < entry["seconds"] <= entry["timeout_s"] + gpu_check.KILL_GRACE_S
    assert result.returncode == (0 if not expected_failures else 1)
    assert report["mode"] == "cpu" and report["schema_version"] == gpu_check.SCHEMA_VERSION
    assert report["ok"] is (not expected_failures)
    summary = (tmp_path / "report.md").read_text()
    assert all(f"| {name} | " in summary for name in gpu_check.PARTS)

    data = parts["data"]["figures"]
    assert (data["train_videos"], data["test_videos"]) == (12, 4)  # 4 classes x (3 train + 1 test)

    tests = parts["gpu_tests"]["figures"]
    assert tests["tests"] >= 1 and tests["skipped"] == tests["tests"]  # every GPU test skips without CUDA
    assert tests["failures"] == tests["errors"] == 0

    steps = 6 * gpu_check.MODES["cpu"]["steps_per_stage"]  # every stage of the schedule, 3 steps each
    for name, precision in (("train_bf16_resume", "bf16"), ("deepspeed_zero2", "no")):
        if name in expected_failures:
            continue
        figures = parts[name]["figures"]
        assert (figures["mixed_precision"], figures["steps"]) == (precision, steps)
        assert figures["stages"] == list(gpu_check.STAGES)
        assert figures["losses_equal_steps"] == steps  # every step's loss equal after the resume
        assert figures["encoders"]["tensors_compared"] > 100 and figures["encoders"]["tensors_differing"] == 0
        assert figures["encoders"]["max_abs_diff"] == 0.0
        assert parts[name]["checks"]["resumed_from_checkpoint"]
    if HAS_DEEPSPEED:
        assert any("optim_states" in f for f in parts["deepspeed_zero2"]["figures"]["engine_checkpoint_files"])

    fp16 = parts["train_fp16"]["figures"]
    assert (fp16["mixed_precision"], fp16["steps"], fp16["world_size"]) == ("fp16", steps, 1)
    assert fp16["checkpoint"] == f"step-{steps:08d}" and math.isfinite(fp16["final_loss"])

    evaluation = parts["eval"]["figures"]
    assert 0 <= evaluation["finetune"]["top1"] <= 100
    assert 0 <= evaluation["retrieval"]["R@1"] <= evaluation["retrieval"]["R@5"] <= 100
    assert 0 <= evaluation["linear"]["top1"] <= evaluation["linear"]["top5"] <= 100

    step = parts["train_step"]["figures"]
    assert step["shapes"] == "demo" and positive(step["fp32_eager_samples_per_s"])
    assert step["speedup"] == pytest.approx(step["optimized_samples_per_s"] / step["fp32_eager_samples_per_s"])
    assert positive(step["peak_rss_bytes"]) and step["peak_memory_bytes"] is None  # no CUDA memory on CPU
    # The step never waits on the host; fused Adam launches fewer kernels than the for-loop one.
    assert step["host_syncs_per_step"] == {"fp32_eager": 0, "optimized": 0}
    assert 0 < step["kernels_per_step"]["optimized"] < step["kernels_per_step"]["fp32_eager"]

    e2e = parts["train_e2e"]["figures"]
    assert e2e["steps"] == gpu_check.MODES["cpu"]["e2e"]["steps"] and e2e["workers"] == 2
    assert positive(e2e["samples_per_s"]) and positive(e2e["wall_samples_per_s"])
    assert 0.0 <= e2e["data_wait_fraction"] <= 1.0 and e2e["mined_precision_logged"]


@pytest.mark.slow
def test_rerunning_some_parts_keeps_the_other_parts_entries(full_run):
    tmp_path, _, before = full_run
    assert before is not None
    result, after = run_check(tmp_path, "--parts", "gpu_tests")
    assert after["parts_run"] == ["gpu_tests"]  # the prepared data was there: not prepared again
    assert list(after["parts"]) == list(gpu_check.PARTS)
    assert after["parts"]["gpu_tests"]["run_at"] >= before["parts"]["gpu_tests"]["run_at"]
    for name in gpu_check.PARTS:
        if name != "gpu_tests":
            assert after["parts"][name] == before["parts"][name]
    assert result.returncode == (0 if before["ok"] else 1)


@pytest.mark.slow
def test_a_failing_part_is_reported_and_the_next_part_still_runs(tmp_path):
    data = tmp_path / "work" / "data"
    data.mkdir(parents=True)
    (data / gpu_check.READY_MARKER).write_text("{}")  # "prepared", but no store: training must fail
    result, report = run_check(tmp_path, "--parts", "train_fp16,gpu_tests")
    assert result.returncode == 1
    failed, passed = report["parts"]["train_fp16"], report["parts"]["gpu_tests"]
    assert failed["status"] == "failed" and "fp16 run exited with" in failed["error"]
    assert (tmp_path / "work" / "logs" / "train_fp16.log").read_text().strip()
    assert passed["status"] == "ok" and passed["figures"]["failures"] == 0
    assert "FAILED" in (tmp_path / "report.md").read_text()


@pytest.mark.slow
def test_parts_over_their_time_cap_are_killed_and_reported(tmp_path):
    # Caps of ~1 s: gpu_tests' pytest is killed by the part itself at its deadline; train_step runs the
    # benchmark in the part's own process, which the driver kills after the grace period.
    result, report = run_check(tmp_path, "--parts", "gpu_tests,train_step", "--timeout-scale", "0.01")
    assert result.returncode == 1
    for name in ("gpu_tests", "train_step"):
        entry = report["parts"][name]
        assert entry["status"] == "timeout", (name, entry)
        assert entry["seconds"] < entry["timeout_s"] + gpu_check.KILL_GRACE_S + 15
    assert "time cap" in report["parts"]["gpu_tests"]["error"]
    assert report["parts"]["gpu_tests"]["commands"][0]["returncode"] is None


def test_parts_left_without_time_in_the_budget_are_reported_as_skipped(tmp_path):
    result, report = run_check(tmp_path, "--parts", "gpu_tests,train_step", "--budget", "1")
    assert result.returncode == 1 and report["ok"] is False
    for name in ("gpu_tests", "train_step"):
        assert report["parts"][name]["status"] == "skipped"
        assert f"--parts {name}" in report["parts"][name]["error"]
