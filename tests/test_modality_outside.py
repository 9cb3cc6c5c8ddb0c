"""A fifth modality added from outside the package, with one registry call (plus its backbone),
trains in an M = 5 schedule and is evaluated by ``tricoclr eval retrieval``: the proof that the
registry is sealed (no file of ``tricoclr/`` knows this modality). The worked example of
docs/adding_a_modality.md.

The toy modality, ``brightness``: the clip's mean brightness per frame, a (1, 1, T) curve read from
the stored RGB, jittered by a random gain on the workers, encoded by a tiny MLP.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import eval_retrieval, tiny_overrides
from torch import nn

from tricoclr.config import load_config
from tricoclr.data import modalities as registry
from tricoclr.data.sampling import clip_frame_indices
from tricoclr.method import build_schedule
from tricoclr.models.backbones import BACKBONES, register_backbone
from tricoclr.trainer import Trainer

CURVE_POINTS = 8  # the MLP's input: the curve resampled to a fixed length


def read_brightness(record, clip: registry.ClipRequest, data_cfg: dict) -> torch.Tensor:
    """(T,) float: each frame's mean brightness in [0, 1], from the stored RGB frames."""
    indices = clip_frame_indices(clip.start_frame, clip.spec, clip.num_frames)
    frames = record.frames_at("rgb", indices.tolist())  # (T, 3, H, W) uint8
    return frames.float().mean(dim=(1, 2, 3)) / 255


def augment_brightness(curve: torch.Tensor, generator: torch.Generator, data_cfg: dict) -> torch.Tensor:
    """A random gain in [0.8, 1.2] (deterministic from the worker's generator) -> (1, 1, T)."""
    gain = 0.8 + 0.4 * torch.rand((), generator=generator)
    return (curve * gain).view(1, 1, -1)


def present_brightness(curve: torch.Tensor, data_cfg: dict) -> torch.Tensor:
    return curve.view(1, 1, -1)


def build_curve_mlp(in_channels: int, **options) -> tuple[nn.Module, int]:
    """(B, C, 1, T) -> (B, 16): the curve resampled to CURVE_POINTS, then a two-layer MLP."""
    return nn.Sequential(
        nn.Flatten(1, 2),
        nn.AdaptiveAvgPool1d(CURVE_POINTS),
        nn.Flatten(),
        nn.Linear(in_channels * CURVE_POINTS, 16),
        nn.ReLU(),
    ), 16


@pytest.fixture
def brightness():
    """The toy modality registered for one test (and removed after, so other tests see four)."""
    if "curve_mlp" not in BACKBONES:
        register_backbone("curve_mlp")(build_curve_mlp)
    registry.register(
        registry.Modality(
            name="brightness",
            layout="spectrogram",
            in_channels=1,
            default_backbone="curve_mlp",
            stored_parts=("rgb",),
            read=read_brightness,
            augment=augment_brightness,
            present=present_brightness,
            draw=registry.draw_spectrogram,
        )
    )
    yield "brightness"
    registry.unregister("brightness")


def test_a_fifth_modality_from_outside_the_package_trains_and_is_evaluated(brightness, train_lmdb, test_lmdb, tmp_path):
    out = tmp_path / "run"
    config = load_config(
        "configs/tiny.yaml",
        tiny_overrides(
            train_lmdb,
            out,
            modalities="[rgb,flow,audio,rgbdiff,brightness]",
            max_steps_per_stage=1,
            **{"model.backbones.rgbdiff": "tiny3d"},
        ),
    )
    schedule = build_schedule(config)
    assert len(schedule) == 10 and all(len(plan.samplers) == 4 for plan in schedule[5:])
    summary = Trainer(config).run()
    assert summary["global_step"] == 10
    assert all(torch.isfinite(torch.tensor([h["loss"] for h in summary["history"] if "loss" in h])))
    encoder_file = out / "encoders" / "cycle1-brightness" / "brightness.safetensors"
    assert encoder_file.exists()
    result = tmp_path / "brightness.json"
    assert eval_retrieval(encoder_file, train_lmdb, test_lmdb, result, "--png", str(tmp_path / "brightness.png")) == 0
    metrics = json.loads(result.read_text())
    assert metrics["modality"] == "brightness" and metrics["num_test"] == 4 and 0 <= metrics["R@1"] <= 100
    assert metrics["trained_with"] == ["rgb", "flow", "audio", "rgbdiff", "brightness"]
    assert "| ✓ | ✓ | ✓ | ✓ | ✓ |" in result.with_suffix(".md").read_text()
    assert (tmp_path / "brightness.png").exists()
