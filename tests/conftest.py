"""Shared fixtures: one small synthesized dataset, prepared once per test session into both stores."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Two cores: keep each test process to one intra-op thread so parallel work (loader workers,
# two-rank runs) does not oversubscribe the machine.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
MEDIA = (REPO.parent / "shared" / "media").resolve()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _data_cli(argv):
    from data_tools.cli import main

    assert main([str(a) for a in argv]) == 0


@pytest.fixture(scope="session")
def synth_dataset(tmp_path_factory) -> Path:
    """4 classes x 4 videos x 3 s at 64^2, 30 fps (train 2-3 / test 1-2 per class).

    The first generator's data (per-video static backdrops, class colours): the suite's numerical
    comparisons (1 rank = 2 ranks within 1e-4, DeepSpeed = plain, resume) were calibrated on it; the
    current default data is tested in test_synth.py."""
    out = tmp_path_factory.mktemp("synth")
    first_generator = ["--scenes", 0, "--static-camera", "--object-colour", "class"]
    _data_cli(
        ["synth", "--out", out, "--classes", 4, "--videos-per-class", 4, "--seconds", 3, "--size", 64, *first_generator]
    )
    return out


def _prepare(synth: Path, out: Path, fmt: str, split: str) -> Path:
    _data_cli(
        [
            "prepare",
            synth / "videos",
            "--out",
            out,
            "--format",
            fmt,
            "--list",
            synth / "splits" / f"{split}list01.txt",
            "--flow",
            "farneback",
            "--size",
            64,
            "--workers",
            1,
        ]
    )
    return out


@pytest.fixture(scope="session")
def train_lmdb(synth_dataset, tmp_path_factory) -> Path:
    return _prepare(synth_dataset, tmp_path_factory.mktemp("prep") / "train_lmdb", "lmdb", "train")


@pytest.fixture(scope="session")
def test_lmdb(synth_dataset, tmp_path_factory) -> Path:
    return _prepare(synth_dataset, tmp_path_factory.mktemp("prep") / "test_lmdb", "lmdb", "test")


@pytest.fixture(scope="session")
def train_wds(synth_dataset, tmp_path_factory) -> Path:
    return _prepare(synth_dataset, tmp_path_factory.mktemp("prep") / "train_wds", "webdataset", "train")


def tiny_overrides(data_path: Path, output_dir: Path, **extra) -> list[str]:
    """The tiny config shrunk further for tests: small clips and queue, few steps."""
    overrides = {
        "data.path": str(data_path),
        "output_dir": str(output_dir),
        "data.workers": 0,
        "batch_size": 4,
        "data.clip_frames": 4,
        "data.clip_stride": 2,
        "data.size": 32,
        "data.spectrogram_steps": 32,
        "method.queue_size": 16,
        "checkpoint_every_steps": 1000,
        "log_every_steps": 1,
    }
    overrides.update(extra)
    return [f"{k}={v}" for k, v in overrides.items()]


def eval_retrieval(encoder, train, test, json_out, *extra: str) -> int:
    """``tricoclr eval retrieval`` in this process (no loader workers, no feature cache); its exit code."""
    from tricoclr.cli import main

    argv = ["eval", "retrieval", "--encoder", str(encoder), "--train", str(train), "--test", str(test)]
    return main([*argv, "--json", str(json_out), "--workers", "0", "--no-cache", *extra])
