"""Very short streams with audio (issue 13, kind 5): audio trouble never costs the video.

Any length, one frame included, is kept with a valid spectrogram of exactly
``schema.audio_step_for_frame(frames, fps)`` steps, or with its audio recorded as unusable in
plain words; never ``failed`` with a numerical library's message (one frame at 30 fps used to
fail with torch's "Padding size should be less than the corresponding input dimension").
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from message_policy import policy_violations
from video_factory import make_video, moving_frames, run_prepare, tone

from data_tools.audio import AudioConfig, mel_bin_for_frequency
from tricoclr.data import modalities, schema
from tricoclr.data.sampling import ClipSpec, sample_clip_starts, sample_generator
from tricoclr.data.store import open_store

FIELD = Path(__file__).parent / "data" / "field"
SWEEP_FPS = (24, 25, 30, 60)
SWEEP_FRAMES = (1, 2, 3)


# ---- the field input: one-frame-video-with-sound (README expectations) ---------------------------


@pytest.fixture(scope="module")
def stills(tmp_path_factory):
    out = tmp_path_factory.mktemp("stills_out")
    manifest = run_prepare(FIELD / "one-frame-video-with-sound" / "src", out, "--size", "32", flow="farneback")
    return out, manifest


def test_one_frame_video_with_sound_keeps_its_frame_and_its_audio(stills):
    out, manifest = stills
    assert sorted(manifest) == [
        "stills/still_no_sound.mp4",
        "stills/still_with_sound.mp4",
        "stills/two_frames_sound.mp4",
    ]
    assert all(e["status"] in schema.KEPT_STATUSES for e in manifest.values()), manifest
    entry = manifest["stills/still_with_sound.mp4"]
    assert entry["status"] == "ok" and entry["frames"] == 1
    record = open_store(out).record(entry["id"])
    frame = record.frames("rgb", 0, 1)
    assert frame.shape == (1, 3, 32, 43)  # 64x48 at --size 32
    assert entry["has_audio"] and entry["audio"]["steps"] == schema.audio_step_for_frame(1, 30) == 4
    spectrogram = record.spectrogram()
    assert spectrogram.shape == (128, 4) and torch.isfinite(spectrogram).all()
    # the 500 Hz tone of the file is the loudest of its four steps (within a bin: 33 ms of an
    # AAC stream's start, seen through a 64 ms window)
    assert abs(int(spectrogram.mean(dim=1).argmax()) - mel_bin_for_frequency(500, AudioConfig())) <= 1


def test_one_frame_controls(stills):
    _, manifest = stills
    no_sound = manifest["stills/still_no_sound.mp4"]
    assert no_sound["status"] == "ok" and no_sound["frames"] == 1 and "no_audio_stream" in no_sound["flags"]
    two = manifest["stills/two_frames_sound.mp4"]
    assert two["status"] == "ok" and two["frames"] == 2 and two["audio"]["steps"] == 9
    assert policy_violations(manifest) == {}


# ---- the sweep: 1, 2, 3 frames at 24/25/30/60 fps, each with a second of sound -----------------


@pytest.fixture(scope="module")
def sweep_source(tmp_path_factory):
    """Sources built with PyAV: f<fps>/n<frames>.mp4, each with 1 s of a 500 Hz tone."""
    src = tmp_path_factory.mktemp("sweep_src")
    for fps in SWEEP_FPS:
        for frames in SWEEP_FRAMES:
            make_video(
                src / f"f{fps}" / f"n{frames}.mp4",
                fps=fps,
                frames=moving_frames(frames, 48, 64),
                audio=tone(500, 1.0, 16000),
            )
    return src


def frames_at(out_fps: int, frames: int, source_fps: int) -> int:
    """Output frames of a ``frames``-frame source: the slots (k + 1/2) / out_fps before its end,
    at least one (a video never loses its only frame)."""
    end = Fraction(frames, source_fps)
    return max(1, sum(1 for k in range(4 * frames) if (k + Fraction(1, 2)) / out_fps < end))


def _check_video(store, entry, fps: float, expected_frames: int) -> None:
    assert entry["status"] == "ok", entry
    assert entry["frames"] == expected_frames, entry["source"]
    steps = schema.audio_step_for_frame(expected_frames, fps)
    assert entry["has_audio"] and entry["audio"]["steps"] == steps, entry["source"]
    record = store.record(entry["id"])
    stored = record.spectrogram()
    assert stored.shape == (128, steps) and torch.isfinite(stored).all()
    _check_reader_slices(record, entry, fps)


def _check_reader_slices(record, entry, fps: float) -> None:
    """Each clip the sampler draws from this video reads a full-length, finite audio slice."""
    read = modalities.get("audio").read
    augment = modalities.get("audio").augment
    for spec in (ClipSpec(frames=30), ClipSpec(frames=8, stride=2), ClipSpec(frames=1)):
        starts = sample_clip_starts(entry["frames"], spec, sample_generator(0, 0, 0, 0))
        for start in starts:
            clip = modalities.ClipRequest(start, spec, fps, entry["frames"])
            raw = read(record, clip, {})
            assert raw.shape == (128, schema.audio_step_for_frame(spec.span, fps)), (entry["source"], spec)
            assert torch.isfinite(raw).all()
            view = augment(raw, sample_generator(0, 0, 0, 1, "audio"), {"spectrogram_steps": 32})
            assert view.shape == (1, 128, 32) and torch.isfinite(view).all()


def test_sweep_at_the_default_rate(sweep_source, tmp_path):
    manifest = run_prepare(sweep_source, tmp_path / "out", "--size", "32")
    store = open_store(tmp_path / "out")
    assert len(manifest) == len(SWEEP_FPS) * len(SWEEP_FRAMES)
    for fps in SWEEP_FPS:
        for frames in SWEEP_FRAMES:
            _check_video(store, manifest[f"f{fps}/n{frames}.mp4"], 30, frames_at(30, frames, fps))
    # one frame of a 60 fps source ends before the first 30 fps slot's middle: still kept
    assert manifest["f60/n1.mp4"]["frames"] == 1
    assert policy_violations(manifest) == {}


@pytest.mark.parametrize("fps", SWEEP_FPS)
def test_sweep_at_the_source_rate(sweep_source, tmp_path, fps):
    manifest = run_prepare(sweep_source / f"f{fps}", tmp_path / "out", "--size", "32", "--fps", str(fps))
    store = open_store(tmp_path / "out")
    for frames in SWEEP_FRAMES:
        _check_video(store, manifest[f"n{frames}.mp4"], fps, frames)


def test_audio_shorter_than_half_a_step_is_recorded_unusable_in_plain_words(tmp_path):
    # one frame at 300 fps lasts 1/300 s, less than half of a 1/128 s spectrogram step
    make_video(tmp_path / "src" / "blink.mp4", fps=300, frames=moving_frames(1, 48, 64), audio=tone(500, 1.0, 16000))
    manifest = run_prepare(tmp_path / "src", tmp_path / "out", "--size", "32", "--fps", "300")
    entry = manifest["blink.mp4"]
    assert entry["status"] == "ok" and entry["frames"] == 1
    assert entry["has_audio"] is False and entry["audio"] is None
    assert "audio_unusable" in entry["flags"]
    assert any(
        note.startswith("audio not kept: the video's 1 frame(s) at 300 fps span less than half")
        for note in entry["notes"]
    )
    with pytest.raises(ValueError, match="no audio"):
        open_store(tmp_path / "out").record(entry["id"]).spectrogram()


def test_log_mel_of_a_waveform_shorter_than_half_a_window():
    """The transform itself: 500 samples (one frame at 30 fps) give len / hop + 1 = 5 finite
    steps that hold the tone (torch's reflect padding alone refuses fewer than 513)."""
    from data_tools.audio import log_mel

    config = AudioConfig()
    wave = torch.from_numpy(tone(500, 500 / 16000, 16000))
    out = log_mel(wave, config)
    assert out.shape == (128, 5) and torch.isfinite(out).all()
    # within a bin: 31 ms of tone in a 64 ms window widens its peak
    assert abs(int(out[:, :4].mean(dim=1).argmax()) - mel_bin_for_frequency(500, config)) <= 1
    longer = log_mel(torch.from_numpy(tone(500, 1.0, 16000)), config)
    assert longer.shape == (128, 129) and np.isfinite(longer.numpy()).all()
