"""Faults a new user met on a first run (a fresh trial of the README), each now said in words.

- A partly downloaded MP4 (cut off before its index, the ``moov`` box, which most encoders write
  at the end) is the commonest download fault; FFmpeg says only "Invalid data found when
  processing input". Its reason names the missing index.
- A training run whose store cannot serve one of its modalities (prepared with ``--flow none``)
  used to train every stage before the first that needs it, then fail; it now fails at start,
  with exit status 2 and a sentence naming the modality, before any checkpoint.
"""

from __future__ import annotations

import subprocess
import sys

from message_policy import reason_problem
from video_factory import REPO, make_video, run_prepare, subprocess_env


def test_an_mp4_cut_off_before_its_index_is_named_as_an_incomplete_download(tmp_path):
    src = tmp_path / "src" / "walk"
    make_video(tmp_path / "whole.mp4", seconds=2.0)
    whole = (tmp_path / "whole.mp4").read_bytes()
    src.mkdir(parents=True)
    (src / "cut.mp4").write_bytes(whole[: len(whole) // 2])  # the moov box is at the end: gone
    (src / "garbage.mp4").write_bytes(bytes(range(256)) * 40)  # binary, not a container at all
    manifest = run_prepare(tmp_path / "src", tmp_path / "out", flow="none", status=1)  # nothing kept
    cut, garbage = manifest["walk/cut.mp4"], manifest["walk/garbage.mp4"]
    assert cut["status"] == "failed" and "has no index (moov box): an incomplete download" in cut["reason"]
    assert garbage["status"] == "failed" and "could not be opened as a video" in garbage["reason"]
    for entry in (cut, garbage):
        assert reason_problem(entry["reason"]) is None, entry["reason"]
        assert "Invalid data" not in entry["reason"].split("(")[0]  # our words first, FFmpeg's in parentheses


def test_a_modality_the_store_cannot_serve_fails_at_start(tmp_path):
    make_video(tmp_path / "src" / "walk" / "a.mp4", seconds=2.0)
    make_video(tmp_path / "src" / "walk" / "b.mp4", seconds=2.0, dx=2)
    run_prepare(tmp_path / "src", tmp_path / "store", flow="none")
    out = tmp_path / "run"
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "tricoclr" / "train.py"),
            "--config",
            str(REPO / "configs" / "tiny.yaml"),
            f"data.path={tmp_path / 'store'}",
            f"output_dir={out}",
            "modalities=[rgb,flow]",
            "batch_size=2",
            "data.workers=0",
            "max_steps_per_stage=1",
        ],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "has usable flow" in result.stderr and "modalities=[rgb]" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (out / "checkpoints").exists()  # nothing trained before the error


def test_a_wrong_config_key_is_one_line_not_a_traceback(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "tricoclr" / "train.py"),
            "--config",
            str(REPO / "configs" / "tiny.yaml"),
            "method.topK=5",
        ],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=120,
    )
    assert result.returncode == 2
    assert "method.topK" in result.stderr and "Traceback" not in result.stderr
