"""Field-tested inputs (issue 13), kinds 1, 2 and 6: videos with a display matrix (phones),
stream-copied cuts with an MP4 edit list, and streams with frames missing in the middle.

The inputs in tests/data/field/ are tiny real files: ``rotated-phone-video`` and
``stream-copy-cut`` were built with ffmpeg by their ``make.sh``, ``display-matrix`` with PyAV by
its ``make.py`` (so CI needs no ffmpeg program); the gapped videos are written here with PyAV.
Everything goes through the real ``tricoclr-data prepare`` path and is read back from the store.
"""

from __future__ import annotations

import copy
import gc
import math
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from video_factory import make_video, moving_frames, run_prepare, tone

from data_tools.audio import AudioConfig, mel_bin_for_frequency
from data_tools.decode import DisplayTransform
from tricoclr.config import DEFAULTS
from tricoclr.data import schema
from tricoclr.data.dataset import EpochLoader
from tricoclr.data.samples import StageViews, usable_videos
from tricoclr.data.sampling import (
    ClipSpec,
    clip_frame_indices,
    clip_frame_limit,
    sample_clip_starts,
    sample_generator,
)
from tricoclr.data.store import open_store
from tricoclr.eval.features import window_starts

FIELD = Path(__file__).resolve().parent / "data" / "field"
RED, GREEN, BLUE = 0, 1, 2  # channels (ffmpeg's "green" is (0, 128, 0), PyAV's test scene (0, 255, 0))


def prepared(source: Path, out: Path, *extra: str, flow: str = "none") -> tuple[dict, object]:
    """The README's command (``--flow none --size 32``) into an LMDB: (manifest by source, store)."""
    manifest = run_prepare(source, out, "--size", "32", *extra, flow=flow)
    return manifest, open_store(out)


def frames_of(store, entry: dict, start: int = 0, count: int | None = None, modality: str = "rgb") -> torch.Tensor:
    count = entry["frames"] - start if count is None else count
    return store.record(entry["id"]).frames(modality, start, count)


def assert_colour(pixel: torch.Tensor, channel: int, where: str) -> None:
    """The pixel is pure red, green or blue: its ``channel`` bright, the other two dark."""
    others = [int(pixel[c]) for c in range(3) if c != channel]
    assert int(pixel[channel]) > 100 and max(others) < 40, (where, pixel.tolist(), "RGB"[channel])


def assert_upright(frame: torch.Tensor, name: str) -> None:
    """(3, H, W): the player's view, green square top-left, red above, blue below."""
    _, height, width = frame.shape
    assert_colour(frame[:, 2, 2], GREEN, f"{name} top-left")
    assert_colour(frame[:, 2, width - 3], RED, f"{name} top-right")
    assert_colour(frame[:, height // 4, width - 3], RED, f"{name} upper half")
    assert_colour(frame[:, height - 3, 2], BLUE, f"{name} bottom-left")
    assert_colour(frame[:, height - 3, width - 3], BLUE, f"{name} bottom-right")


# ---- kind 1: display rotation and mirrors ----------------------------------------------------


@pytest.fixture(scope="module")
def phone(tmp_path_factory):
    return prepared(FIELD / "rotated-phone-video" / "src", tmp_path_factory.mktemp("phone"))


def test_phone_videos_are_stored_as_a_player_shows_them(phone):
    manifest, store = phone
    portrait, upside = manifest["walk/phone_portrait.mp4"], manifest["walk/phone_upside.mp4"]
    assert portrait["status"] == upside["status"] == "ok"
    assert (portrait["width"], portrait["height"]) == (32, 43)  # portrait, as the player shows it
    assert (upside["width"], upside["height"]) == (43, 32)
    assert (portrait["display_rotation"], portrait["display_mirror"]) == (90, False)
    assert (upside["display_rotation"], upside["display_mirror"]) == (180, False)
    assert portrait["source_info"]["width"] == 64 and portrait["source_info"]["height"] == 48  # as stored
    for entry in (portrait, upside):
        assert entry["frames"] == 60
        for index in (0, 59):
            assert_upright(frames_of(store, entry, index, 1)[0], f"{entry['source']} frame {index}")


@pytest.fixture(scope="module")
def matrices(tmp_path_factory):
    return prepared(FIELD / "display-matrix" / "src", tmp_path_factory.mktemp("matrices"), flow="farneback")


@pytest.mark.parametrize(
    "name, rotation, mirror",
    [("phone_270.mp4", 270, False), ("phone_mirror.mp4", 0, True), ("phone_90_mirror.mp4", 90, True)],
)
def test_rotation_270_and_mirrored_matrices(matrices, name, rotation, mirror):
    manifest, store = matrices
    entry = manifest[f"walk/{name}"]
    assert entry["status"] == "ok"
    assert (entry["display_rotation"], entry["display_mirror"]) == (rotation, mirror)
    assert (entry["width"], entry["height"]) == (32, 43)
    assert_upright(frames_of(store, entry, 0, 1)[0], name)


def test_flow_is_computed_on_upright_frames(matrices):
    """Stored, the texture moves right (+x); the player shows it moving down: +y flow."""
    manifest, store = matrices
    entry = manifest["motion/moving_down.mp4"]
    assert entry["display_rotation"] == 90 and (entry["width"], entry["height"]) == (32, 43)
    flow = schema.dequantise_flow(frames_of(store, entry, modality="flow").float())
    # 1 px a frame on the 48 px wide picture is 2/3 px at 32 px
    assert 0.45 < float(flow[:, 1].mean()) < 0.85, float(flow[:, 1].mean())
    assert abs(float(flow[:, 0].mean())) < 0.15, float(flow[:, 0].mean())


def ffmpeg_display_matrix(clockwise: float, hflip: bool = False, vflip: bool = False) -> list[int]:
    """libavutil's av_display_rotation_set (a clockwise rotation) followed by
    av_display_matrix_flip (display.c)."""
    radians = -math.radians(clockwise)
    c, s = math.cos(radians), math.sin(radians)
    matrix = [round(c * 65536), round(-s * 65536), 0, round(s * 65536), round(c * 65536), 0, 0, 0, 1 << 30]
    flip = (-1 if hflip else 1, -1 if vflip else 1, 1)
    return [value * flip[i % 3] for i, value in enumerate(matrix)]


@pytest.mark.parametrize(
    "clockwise, hflip, vflip, rotation, mirror",
    [
        (0, False, False, 0, False),
        (90, False, False, 90, False),
        (180, False, False, 180, False),
        (-90, False, False, 270, False),
        (0, True, False, 0, True),
        (0, False, True, 180, True),
        (90, True, False, 90, True),
        (-90, True, False, 270, True),
        (80, False, False, 90, False),
    ],
)
def test_display_matrix_decomposition(clockwise, hflip, vflip, rotation, mirror):
    """Every matrix FFmpeg can write (rotation and flips) is read back as the rotation and mirror
    that give the same picture: checked on an asymmetric 2 x 3 image against the matrix itself."""
    matrix = ffmpeg_display_matrix(clockwise, hflip, vflip)
    transform = DisplayTransform.from_matrix(matrix)
    assert (transform.rotation, transform.mirror) == (rotation, mirror)
    if clockwise % 90:
        assert transform.angle == pytest.approx(clockwise % 360, abs=0.01)
        return
    stored = np.arange(6).reshape(2, 3, 1)
    shown = transform.apply(stored)
    a, b, c, d = (round(matrix[i] / 65536) for i in (0, 1, 3, 4))
    for y in range(2):
        for x in range(3):  # the matrix maps (x, y) to (a x + c y, b x + d y), up to a shift
            u, v = a * x + c * y, b * x + d * y
            u -= min(a * i + c * j for i in range(3) for j in range(2))
            v -= min(b * i + d * j for i in range(3) for j in range(2))
            assert shown[v, u, 0] == stored[y, x, 0]


# ---- kind 2: edit lists of stream-copied cuts ---------------------------------------------------


@pytest.fixture(scope="module")
def cut(tmp_path_factory):
    return prepared(FIELD / "stream-copy-cut" / "src", tmp_path_factory.mktemp("cut"))


def source_frame_numbers(frames: torch.Tensor) -> list[int]:
    """Source frame N has luma 2N (limited range); RGB grey g = (Y - 16) * 255 / 219."""
    grey = frames.float().mean(dim=(1, 2, 3))
    return ((grey * 219 / 255 + 16) / 2).round().int().tolist()


@pytest.mark.parametrize("name", ["cut_copy.mp4", "cut_reencoded.mp4"])
def test_stream_copied_cut_starts_at_the_cut_and_is_not_damage(cut, name):
    manifest, store = cut
    entry = manifest[f"clips/{name}"]
    assert entry["status"] == "ok" and entry["reason"] is None and entry["problems"] == [], entry
    assert entry["t0"] == 0.0
    numbers = source_frame_numbers(frames_of(store, entry))
    assert numbers[0] == 39  # grey level 78: the cut point, 1.3 s
    assert numbers[:60] == list(range(39, 99))  # every frame of the 2 s, in order, none hidden
    # about 60 frames: the stream copy also keeps one frame 0.1 s past the 2 s (its B-frames are
    # cut), which the edit list shows until 2.13 s
    assert 60 <= entry["frames"] <= 64


def test_stream_copied_cut_counts_its_hidden_packets(cut):
    manifest, _ = cut
    info = manifest["clips/cut_copy.mp4"]["source_info"]
    assert info["packets"] == 71 and info["frames_decoded"] == 62  # 9 pre-roll packets hidden


@pytest.mark.parametrize("name", ["cut_copy.mp4", "cut_reencoded.mp4"])
def test_stream_copied_cut_keeps_audio_aligned(cut, name):
    """The source's beep at 2.0-2.1 s falls 0.7-0.8 s into a clip cut at 1.3 s."""
    manifest, store = cut
    entry = manifest[f"clips/{name}"]
    assert entry["has_audio"]
    spectrogram = store.record(entry["id"]).spectrogram()
    beep = spectrogram[mel_bin_for_frequency(1000.0, AudioConfig())]
    loud = (beep > beep.max() - 3.0).nonzero().flatten().float() / schema.AUDIO_STEPS_PER_SECOND  # within 3 nepers
    assert 0.65 <= float(loud.min()) and float(loud.max()) <= 0.85, loud.tolist()
    assert 0.7 <= float(beep.argmax()) / schema.AUDIO_STEPS_PER_SECOND <= 0.8


def stream_copy_cut(source: Path, target: Path, start: float, seconds: float) -> Path:
    """Cut ``source`` without re-encoding, as ``ffmpeg -ss start -t seconds -c copy`` does: the
    packets from the keyframe before ``start``, timestamps shifted so ``start`` is 0. The MP4
    muxer hides the negative-time pre-roll with an edit list."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(source)) as inp, av.open(str(target), "w") as out:
        video_in = inp.streams.video[0]
        if hasattr(out, "add_stream_from_template"):
            video_out = out.add_stream_from_template(video_in)
        else:  # PyAV 12 has no add_stream_from_template
            video_out = out.add_stream(template=video_in)
        shift = round(start / video_in.time_base)
        packets = [packet for packet in inp.demux(video_in) if packet.size]
        keyframe = max(p.pts for p in packets if p.is_keyframe and p.pts <= shift)
        first = next(i for i, packet in enumerate(packets) if packet.pts == keyframe)
        for packet in packets[first:]:
            if (packet.pts - shift) * video_in.time_base < seconds:
                packet.pts, packet.dts, packet.stream = packet.pts - shift, packet.dts - shift, video_out
                out.mux(packet)
    return target


def test_cut_in_the_middle_of_a_long_group_of_pictures(tmp_path):
    """The same kind built with PyAV: 45 hidden frames before the cut (one keyframe at 0)."""
    grey = [np.full((48, 64, 3), 2 * i, np.uint8) for i in range(120)]
    long = make_video(tmp_path / "long.mp4", frames=grey, fps=30)
    stream_copy_cut(long, tmp_path / "src" / "cut.mp4", start=1.5, seconds=2.0)
    manifest, store = prepared(tmp_path / "src", tmp_path / "out")
    entry = manifest["cut.mp4"]
    assert entry["status"] == "ok" and entry["frames"] == 60, entry
    assert entry["source_info"]["packets"] == 105 and entry["source_info"]["frames_decoded"] == 60
    grey = frames_of(store, entry).float().mean(dim=(1, 2, 3))  # frame N was drawn at grey 2N
    assert torch.allclose(grey, 2 * torch.arange(45, 105).float(), atol=1.0)  # colour conversions: +-1, grey.tolist()


# ---- kind 6: frames missing in the middle ---------------------------------------------------


def gapped_times(*segments: tuple[int, int], fps: int = 30) -> list[float]:
    """Frame times of frames ``[a, b)`` of each segment at ``fps``: the frames between are missing."""
    return [i / fps for a, b in segments for i in range(a, b)]


@pytest.fixture(scope="module")
def gaps(tmp_path_factory):
    src = tmp_path_factory.mktemp("gap_src")
    one = gapped_times((0, 60), (90, 150))  # 2 s, 1 s missing, 2 s
    beep = np.zeros(5 * 16000, np.float32)
    beep[56000:57600] = tone(1000.0, 0.1, 16000)  # 3.5-3.6 s, after the gap
    make_video(src / "one_gap.mp4", frames=moving_frames(len(one)), frame_times=one, fps=30, audio=beep)
    two = gapped_times((0, 45), (60, 105), (165, 210))  # 0.5 s and 2 s missing
    make_video(src / "two_gaps.mp4", frames=moving_frames(len(two)), frame_times=two, fps=30)
    steady = gapped_times((0, 60))
    make_video(src / "steady.mp4", frames=moving_frames(60), frame_times=steady, fps=30)
    # one frame per chunk: the loader test sees exactly which frames a clip reads
    return prepared(src, tmp_path_factory.mktemp("gap_out"), "--chunk-frames", "1", flow="farneback")


def test_gap_is_partial_with_its_position_and_length(gaps):
    manifest, _ = gaps
    entry = manifest["one_gap.mp4"]
    assert entry["status"] == "partial" and "frame_gaps" in entry["flags"]
    assert "no video frames for 1.00 s, from 2.00 s to 3.00 s" in entry["reason"], entry["reason"]
    assert entry["frames"] == 150  # the timeline is kept (audio stays aligned)
    # the frame before the gap (59) holds over it and is left out too: its flow spans the gap
    assert entry["spans"] == [[0, 59], [90, 150]]
    two = manifest["two_gaps.mp4"]
    assert two["status"] == "partial"
    assert "no video frames for 0.50 s, from 1.50 s to 2.00 s" in two["reason"], two["reason"]
    assert "no video frames for 2.00 s, from 3.50 s to 5.50 s" in two["reason"], two["reason"]
    assert two["spans"] == [[0, 44], [60, 104], [165, 210]]
    steady = manifest["steady.mp4"]
    assert steady["status"] == "ok" and steady["spans"] == [[0, 60]] and "frame_gaps" not in steady["flags"]


def test_gap_keeps_the_timeline_so_audio_stays_aligned(gaps):
    manifest, store = gaps
    entry = manifest["one_gap.mp4"]
    assert entry["has_audio"] and entry["t0"] == 0.0
    beep = store.record(entry["id"]).spectrogram()[mel_bin_for_frequency(1000.0, AudioConfig())]
    peak = float(beep.argmax()) / schema.AUDIO_STEPS_PER_SECOND
    assert 3.5 <= peak <= 3.6, peak
    # and output frame 105 (3.5 s) shows the frame timed 3.5 s, the 76th written (index 75)
    stored = frames_of(store, entry, 105, 1)[0].permute(1, 2, 0).float()
    written = [torch.from_numpy(f).float().reshape(32, 2, 32, 2, 3).mean(dim=(1, 3)) for f in moving_frames(120)]
    errors = {i: float((stored - written[i]).pow(2).mean()) for i in (73, 74, 75, 76, 77)}
    assert min(errors, key=errors.get) == 75, errors


def inside_one_span(indices: torch.Tensor, spans: list[list[int]]) -> bool:
    return any(a <= int(indices.min()) and int(indices.max()) < b for a, b in spans)


@pytest.mark.parametrize("spec", [ClipSpec(frames=30), ClipSpec(frames=8, stride=2, min_gap_frames=4)])
def test_sampled_clips_never_cross_a_gap(gaps, spec):
    manifest, _ = gaps
    for name in ("one_gap.mp4", "two_gaps.mp4"):
        entry = manifest[name]
        frames, spans = entry["frames"], entry["spans"]
        seen = set()
        for index in range(300):
            starts = sample_clip_starts(frames, spec, sample_generator(0, 0, index, 0), spans)
            assert abs(starts[0] - starts[1]) >= spec.min_separation
            for start in starts:
                indices = clip_frame_indices(start, spec, clip_frame_limit(start, frames, spans))
                assert inside_one_span(indices, spans), (name, start, spans)
                seen.add(next(i for i, (a, b) in enumerate(spans) if a <= start < b))
        assert seen == {i for i, (a, b) in enumerate(spans) if b - a >= spec.span}  # every usable span drawn


def test_training_loader_reads_no_frame_across_a_gap(gaps):
    """The real loader over the LMDB store, five epochs: every RGB frame it reads lies in a span,
    and each clip's frames lie in one span."""
    manifest, store = gaps
    cfg = copy.deepcopy(DEFAULTS["data"])
    cfg.update(workers=0, clip_frames=30, clip_stride=1, size=32, min_gap_frames=0, short_policy="overlap")
    loader = EpochLoader(str(store.root), StageViews(both_views=("rgb",)), cfg, seed=0, batch_size=1)
    reads: dict[str, list[int]] = {}
    loader.dataset.store.on_read = lambda video_id, part, nbytes: (
        reads.setdefault(video_id, []).append(int(part.split("_")[1])) if part.startswith("rgb") else None
    )
    for epoch in range(5):
        loader.set_epoch(epoch)
        list(loader)
    del loader
    gc.collect()
    for name in ("one_gap.mp4", "two_gaps.mp4"):
        entry = manifest[name]
        frames = reads[entry["id"]]
        assert len(frames) == 5 * 2 * 30  # five epochs, two clips of 30 distinct frames
        for clip in (frames[i : i + 30] for i in range(0, len(frames), 30)):
            assert inside_one_span(torch.tensor(clip), entry["spans"]), (name, clip)


def test_gaps_shape_what_the_loader_and_evaluation_use(gaps):
    manifest, _ = gaps
    one = manifest["one_gap.mp4"]
    # spans of 59 and 60 frames: two 1 s clips fit, one in each
    data_cfg = {"clip_frames": 30, "clip_stride": 1, "min_gap_frames": 0, "short_policy": "skip"}
    assert usable_videos([one], StageViews(both_views=("rgb",)), data_cfg) == [0]
    # 150 frames would hold two 2 s clips, but only the 60-frame span holds one: too short
    data_cfg["clip_frames"] = 60
    assert usable_videos([one], StageViews(both_views=("rgb",)), data_cfg) == []
    assert usable_videos([{**one, "spans": [[0, 150]]}], StageViews(both_views=("rgb",)), data_cfg) == [0]
    assert window_starts(one["frames"], ClipSpec(frames=30), spans=one["spans"]) == [0, 90, 120]
    assert window_starts(150, ClipSpec(frames=30)) == [0, 30, 60, 90, 120]


def test_every_reason_here_follows_the_message_policy(phone, matrices, cut, gaps):
    """The message policy (tests/message_policy.py) over the rotated, cut and gapped inputs: a
    partial video's reason is a sentence about the video, never a library's bare text."""
    from message_policy import policy_violations

    for manifest, _ in (phone, matrices, cut, gaps):
        assert policy_violations(manifest) == {}
