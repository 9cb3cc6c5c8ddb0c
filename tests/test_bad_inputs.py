"""Bad input never stops a preparation run and never loses data: one manifest line per input,
``partial`` keeps what decoded, ``failed`` says why, and the no-audio policy is applied."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from video_factory import (
    MEDIA,
    double_or_crash,
    garble_middle,
    lie_about_duration,
    make_audio_only,
    make_video,
    moving_frames,
    run_prepare,
    tone,
    truncate,
)

from data_tools.pool import run_tasks
from tricoclr.data import schema
from tricoclr.data.store import open_store


@pytest.fixture(scope="module")
def bad_source(tmp_path_factory):
    """A folder with one file per bad-input case (plus one good control)."""
    src = tmp_path_factory.mktemp("bad_src")
    good = make_video(src / "good.mp4", seconds=2.0, audio=tone(440, 2.0, 16000))
    make_video(src / "faststart.mp4", seconds=3.0, faststart=True)
    truncate(src / "faststart.mp4", src / "truncated_half.mp4", 0.5)
    (src / "faststart.mp4").unlink()
    shutil.copy(MEDIA / "truncated.mp4", src / "truncated_real.mp4")
    make_video(src / "to_garble.mp4", seconds=3.0, codec="mpeg4", faststart=True)
    garble_middle(src / "to_garble.mp4", src / "garbled.mp4", fraction=0.4, length=4000)
    (src / "to_garble.mp4").unlink()
    (src / "text.mp4").write_text("this is not a video\n" * 50)
    (src / "notes.txt").write_text("a stray non-video file\n")
    make_audio_only(src / "audio_only.mp4")
    make_video(src / "silent.mp4", seconds=2.0, audio=np.zeros(32000, np.float32))
    make_video(src / "odd_97x61.mkv", width=97, height=61, codec="ffv1", pix_fmt="yuv444p", seconds=1.0)
    make_video(src / "portrait_61x97.mkv", width=61, height=97, codec="ffv1", pix_fmt="yuv444p", seconds=1.0)
    lie_about_duration(make_video(src / "lying_header.mkv", seconds=2.0))
    make_video(src / "broken_packet_h264.mkv", seconds=3.0, broken_packets=range(30, 40))
    make_video(src / "broken_packet_mpeg4.mkv", seconds=3.0, codec="mpeg4", broken_packets=range(30, 40))
    vfr_times = np.cumsum([0.0] + [0.02, 0.06] * 30)  # alternating 20 ms and 60 ms frame gaps
    make_video(src / "vfr.mp4", frames=moving_frames(len(vfr_times)), frame_times=list(vfr_times))
    jump_times = [i / 30 for i in range(30)] + [60 + i / 30 for i in range(30)]  # a 59 s hole
    make_video(src / "timestamp_jump.mp4", frames=moving_frames(60), frame_times=jump_times)
    make_video(src / "audio_8k.mp4", seconds=2.0, audio=tone(1000, 2.0, 8000), audio_rate=8000)
    make_video(src / "surround.mp4", seconds=2.0, audio=tone(440, 2.0, 44100), audio_rate=44100, audio_layout="5.1")
    make_video(src / "short.mp4", seconds=0.6)
    assert good.exists()
    return src


@pytest.fixture(scope="module")
def bad_out(bad_source, tmp_path_factory):
    out = tmp_path_factory.mktemp("bad_out")
    run_prepare(bad_source, out)
    return out


@pytest.fixture(scope="module")
def manifest(bad_out):
    return {e["source"]: e for e in open_store(bad_out).manifest()}


def test_every_input_has_exactly_one_line(bad_source, bad_out, manifest):
    videos = {p.name for p in bad_source.iterdir() if p.suffix != ".txt"}
    lines = (bad_out / schema.MANIFEST_FILE).read_text().splitlines()
    assert sorted(json.loads(line)["source"] for line in lines) == sorted(videos)
    for entry in manifest.values():
        for key in (
            "id",
            "source",
            "label",
            "label_index",
            "status",
            "reason",
            "frames",
            "seconds",
            "has_audio",
            "bytes",
        ):
            assert key in entry, (entry["source"], key)
        assert entry["status"] in ("ok", "partial", "failed")
        assert (entry["reason"] is None) == (entry["status"] == "ok"), entry


def test_non_video_extension_is_reported_not_dropped(bad_out, manifest):
    assert "notes.txt" not in manifest
    summary = json.loads((bad_out / schema.SUMMARY_FILE).read_text())
    assert summary["ignored_files"] == {"count": 1, "examples": ["notes.txt"]}
    assert summary["failed"] == 3 and summary["videos"] == len(manifest) - 3


def test_good_control(manifest):
    good = manifest["good.mp4"]
    assert good["status"] == "ok" and good["has_audio"] and good["frames"] == 60


def test_unreadable_files_fail_with_a_reason(manifest):
    assert manifest["truncated_real.mp4"]["status"] == "failed"
    assert manifest["text.mp4"]["status"] == "failed"
    assert "cannot open" in manifest["text.mp4"]["reason"]
    assert manifest["audio_only.mp4"]["status"] == "failed"
    assert "no video stream" in manifest["audio_only.mp4"]["reason"]


def test_truncated_download_keeps_what_decoded(manifest):
    entry = manifest["truncated_half.mp4"]
    assert entry["status"] == "partial", entry
    assert 10 < entry["frames"] < 90
    assert entry["reason"]


def test_garbled_middle_is_partial(manifest):
    entry = manifest["garbled.mp4"]
    assert entry["status"] in ("partial", "failed"), entry
    assert entry["reason"]


@pytest.mark.parametrize("name", ["broken_packet_h264.mkv", "broken_packet_mpeg4.mkv"])
def test_broken_packet_in_the_middle_is_partial(manifest, name):
    entry = manifest[name]
    assert entry["status"] == "partial", entry
    assert entry["frames"] == 90  # timestamps keep the timeline: the gap repeats a frame
    assert "packet" in entry["reason"] or "decoded with errors" in entry["reason"]


def test_lying_header(manifest):
    entry = manifest["lying_header.mkv"]
    assert entry["frames"] == 60  # decoded to its true length
    assert entry["status"] == "partial"
    assert "declares" in entry["reason"]


def test_silent_audio_policy(manifest):
    entry = manifest["silent.mp4"]
    assert entry["status"] == "ok"
    assert entry["has_audio"] is False and entry["audio_silent"] is True
    assert "silent_audio" in entry["flags"]
    assert "audio" not in entry["bytes_by_modality"]


def test_no_audio_means_no_record_and_a_clear_error(bad_out, manifest):
    record = open_store(bad_out).record(manifest["silent.mp4"]["id"])
    with pytest.raises(ValueError, match="no audio"):
        record.spectrogram()


def test_odd_sizes(manifest):
    odd = manifest["odd_97x61.mkv"]
    assert odd["status"] == "ok" and (odd["height"], odd["width"]) == (128, 204)
    portrait = manifest["portrait_61x97.mkv"]
    assert (portrait["height"], portrait["width"]) == (204, 128)
    assert portrait["flow_y_offset"] == 208


def test_variable_frame_rate(bad_out, manifest):
    entry = manifest["vfr.mp4"]
    assert entry["status"] == "ok"
    assert "variable_frame_rate" in entry["flags"]
    # 61 frames over 2.4 s, the last shown for the median interval (40 ms): 2.44 s at 30 fps
    assert entry["frames"] == 73
    # 60 ms gaps repeat a frame; its motion is spread, so no flow field is all zero
    flow = open_store(bad_out).record(entry["id"]).frames("flow", 0, entry["frames"])
    x = schema.dequantise_flow(flow[:, 0].float())
    assert (x.mean(dim=(1, 2)) > 0.2).all()


def test_broken_timeline_is_cut_not_filled(manifest):
    entry = manifest["timestamp_jump.mp4"]
    assert entry["status"] == "partial" and "timestamps jump" in entry["reason"]
    assert entry["frames"] == 30


def test_unusual_audio(manifest):
    low = manifest["audio_8k.mp4"]
    assert low["has_audio"] and low["source_info"]["audio_rate"] == 8000
    assert low["audio"]["steps"] == round(low["frames"] / 30 * 128)
    surround = manifest["surround.mp4"]
    assert surround["has_audio"] and surround["source_info"]["audio_channels"] == 6


def test_too_short_for_two_clips_is_kept_and_flagged(manifest):
    entry = manifest["short.mp4"]
    assert entry["status"] == "ok" and entry["frames"] == 18
    assert "too_short_for_two_clips" in entry["flags"]


def test_all_files_mode_records_non_video_files(bad_source, tmp_path):
    only = tmp_path / "src"
    only.mkdir()
    shutil.copy(bad_source / "notes.txt", only / "notes.txt")
    shutil.copy(bad_source / "short.mp4", only / "short.mp4")
    manifest = run_prepare(only, tmp_path / "out", "--extensions", "all")
    assert manifest["notes.txt"]["status"] == "failed"
    assert manifest["short.mp4"]["status"] == "ok"


def test_crashed_or_hung_worker_fails_only_its_task():
    tasks = [1, "crash", 2, "hang", 3]
    results = {str(t): (r, crash) for t, r, crash in run_tasks(tasks, double_or_crash, None, workers=2, timeout=3)}
    assert results["1"] == (2, None) and results["2"] == (4, None) and results["3"] == (6, None)
    assert results["crash"][0] is None and "died" in results["crash"][1]
    assert results["hang"][0] is None and "timed out" in results["hang"][1]


def test_missing_listed_file_fails(tmp_path):
    src = tmp_path / "src"
    make_video(src / "Walk" / "a.mp4", seconds=1.0)
    (tmp_path / "list.txt").write_text("Walk/a.mp4 1\nWalk/missing.mp4 1\n")
    manifest = run_prepare(src, tmp_path / "out", "--list", str(tmp_path / "list.txt"))
    assert manifest["Walk/a.mp4"]["status"] == "ok"
    assert manifest["Walk/missing.mp4"]["status"] == "failed"
    assert "not found" in manifest["Walk/missing.mp4"]["reason"]


def test_every_reason_is_a_sentence_about_the_video(manifest):
    """The message policy (tests/message_policy.py) over every bad input of this suite: no
    manifest reason is only a library's exception text."""
    from message_policy import policy_violations

    assert policy_violations(manifest) == {}
