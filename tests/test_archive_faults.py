"""Faults of a real archive that tests/test_bad_inputs.py does not cover (issue 13, "Also"),
found in public issue trackers of video tools, each built here with PyAV (no ffmpeg program):

1. **Download placeholders**: a zero-byte file, or a web page saved under a video's name.
   FFmpeg says "Invalid data found when processing input" for both; the manifest says what
   the file is. Reports: pupil-labs/pupil#2083 (zero-byte video files, PyAV opens them with
   ``format`` None), stupied4ever/ruby-tapas-downloader#31 ("All videos are actually HTML
   files"), Yesterday17/bili-archive#4 (downloaded videos that are HTML).
2. **A picture stream that is not the video**: a cover image or still thumbnail stored as the
   first video stream (the video is decoded from the wrong stream, one picture held for the
   whole length), and an audio file whose only "video" is its cover art (prepared as a one-frame
   video). The video is now FFmpeg's best stream among those that are not an attached picture.
   Reports: UltraStar-Deluxe/USDX#948 ("always selects the first video stream ... If the first
   video stream is cover art ... fail to play"), xbmc/xbmc#4362 (mjpeg stream #0 before the
   wmv3 video), omeryusufyagci/fast-music-remover#91 ("audio file with cover image treated as
   video file").
3. **A codec this FFmpeg build cannot decode** (AV1 in builds without dav1d, or a codec the
   build does not know): PyAV gives the stream no codec context, and preparation used to fail
   with "AttributeError: 'NoneType' object has no attribute 'width'". A video codec now fails
   in words; an audio codec costs only the audio. Reports: pytorch/vision#3788 ("a video stream
   has a null codec_context ... encoded with AV1, and my ffmpeg installation doesn't support
   it"), dmlc/decord#319 (AV1 video cannot be read), PyAV-Org/PyAV#2346 (streams without a
   codec context when avcodec_find_decoder finds none).
4. **Damaged float audio**: PCM float samples that are NaN, infinite or absurd (1e30) went
   into a stored spectrogram that was not finite, with the video ``ok``. They now become silence
   and the video is ``partial``. Reports: Plachtaa/seed-vc#108 (a sample above 1e29 gave NaN
   losses), flashlight/wav2letter#386 ("Sample has NaN values").

Every reason follows the message policy (tests/message_policy.py), and an unexpected error is
recorded as an internal one and counted in the summary.
"""

from __future__ import annotations

import av
import numpy as np
import pytest
import torch
from message_policy import policy_violations, reason_problem
from video_factory import _write_audio, make_video, moving_frames, run_prepare, tone

from data_tools import lists
from data_tools.audio import AudioConfig, mel_bin_for_frequency
from data_tools.encode_video import PrepareConfig, process_video
from data_tools.inspect_data import format_statistics, statistics_from_entries
from tricoclr.data.store import open_store

RED = (255, 0, 0)
ERROR_PAGE = (
    b"<!DOCTYPE html>\n<html><head><title>Video unavailable</title></head>"
    b"<body>This video is no longer available.</body></html>\n"
)


def _still(height: int = 48, width: int = 64) -> np.ndarray:
    image = np.zeros((height, width, 3), np.uint8)
    image[...] = RED
    return image


def make_with_picture_stream(path, fmt: str, video: bool, attached: bool) -> None:
    """A file whose first stream is a one-picture MJPEG (red), then (``video``) 50 frames of a
    moving texture at 25 fps, then 2 s of a 440 Hz tone. ``attached`` flags the picture as cover
    art (MP4 'covr'); without it (Matroska) the picture is a plain one-frame video track."""
    with av.open(str(path), "w", format=fmt) as out:
        picture = out.add_stream("mjpeg", rate=1)
        picture.width, picture.height, picture.pix_fmt = 64, 48, "yuvj420p"
        if attached:
            picture.disposition = av.stream.Disposition.attached_pic
        moving = out.add_stream("libx264", rate=25) if video else None
        if moving is not None:
            moving.width, moving.height, moving.pix_fmt = 64, 64, "yuv420p"
        sound = out.add_stream("aac", rate=16000, layout="mono")
        for packet in [*picture.encode(av.VideoFrame.from_ndarray(_still(), format="rgb24")), *picture.encode()]:
            out.mux(packet)
        if moving is not None:
            for image in moving_frames(50):
                for packet in moving.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                    out.mux(packet)
            for packet in moving.encode():
                out.mux(packet)
        _write_audio(out, sound, tone(440, 2.0, 16000), 16000, "mono")


def rename_codec(path, old: bytes, new: bytes) -> None:
    """Rewrite a Matroska track's CodecID in place (same length) to one FFmpeg does not know:
    the file is intact, only no decoder exists for that track."""
    data = path.read_bytes()
    assert len(old) == len(new) and data.count(old) == 1
    path.write_bytes(data.replace(old, new))


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    src = tmp_path_factory.mktemp("archive_src")
    (src / "empty.mp4").write_bytes(b"")
    (src / "error_page.mp4").write_bytes(ERROR_PAGE)
    make_with_picture_stream(src / "thumbnail_first.mkv", "matroska", video=True, attached=False)
    make_with_picture_stream(src / "song_with_cover.m4a.mp4", "mp4", video=False, attached=True)
    make_with_picture_stream(src / "video_with_cover.mp4", "mp4", video=True, attached=True)
    make_video(src / "unknown_video_codec.mkv", seconds=1.0)
    rename_codec(src / "unknown_video_codec.mkv", b"V_MPEG4/ISO/AVC", b"V_MPEG4/ISO/AVX")
    make_video(src / "unknown_audio_codec.mkv", seconds=1.0, audio=tone(440, 1.0, 16000))
    rename_codec(src / "unknown_audio_codec.mkv", b"A_AAC", b"A_AAX")
    wave = tone(500, 2.0, 16000)
    wave[8000:8100], wave[16000:16050], wave[20000:20010] = np.nan, np.inf, 1e30
    make_video(src / "damaged_float_audio.mkv", seconds=2.0, audio=wave, audio_codec="pcm_f32le")
    out = tmp_path_factory.mktemp("archive_out")
    return out, run_prepare(src, out, "--size", "32", flow="none")


def test_download_placeholders_say_what_the_file_is(archive):
    _, manifest = archive
    empty, page = manifest["empty.mp4"], manifest["error_page.mp4"]
    assert empty["status"] == page["status"] == "failed"
    assert (
        empty["reason"]
        == "cannot open as media: the file is empty (0 bytes), as an interrupted or failed download leaves it"
    )
    assert page["reason"] == (
        f"cannot open as media: the file is a web page (HTML) of {len(ERROR_PAGE)} bytes, "
        "not a video: a download saved a server's answer instead"
    )


def test_a_picture_stream_before_the_video_is_not_taken_for_it(archive):
    out, manifest = archive
    entry = manifest["thumbnail_first.mkv"]
    assert entry["status"] == "ok", entry  # was partial: the red picture held for 1 s
    assert entry["frames"] == 60 and entry["has_audio"]  # 50 frames at 25 fps, read at 30
    assert entry["source_info"]["frames_decoded"] == 50
    frames = open_store(out).record(entry["id"]).frames("rgb", 0, 60).float()
    assert frames[:, 1].mean() > 60  # the texture's green, not the red picture's 0
    covered = manifest["video_with_cover.mp4"]
    assert covered["status"] == "ok" and covered["frames"] == 60


def test_an_audio_file_with_cover_art_is_not_a_video(archive):
    _, manifest = archive
    entry = manifest["song_with_cover.m4a.mp4"]  # was prepared as a one-frame video
    assert entry["status"] == "failed"
    assert (
        entry["reason"]
        == "no video stream (streams: audio, video); its only picture is a cover image (attached picture)"
    )


def test_a_codec_without_a_decoder(archive):
    out, manifest = archive
    video = manifest["unknown_video_codec.mkv"]
    assert video["status"] == "failed"
    assert video["reason"].startswith("the video stream's codec has no decoder in this FFmpeg build")
    audio = manifest["unknown_audio_codec.mkv"]  # the video is fine: only its audio is lost
    assert audio["status"] == "ok" and audio["frames"] == 30
    assert audio["has_audio"] is False and "audio_unusable" in audio["flags"]
    assert any(n.startswith("audio not kept: its codec has no decoder") for n in audio["notes"])
    assert open_store(out).record(audio["id"]).frames("rgb", 0, 30).shape[0] == 30


def test_damaged_float_audio_becomes_silence_and_the_video_partial(archive):
    out, manifest = archive
    entry = manifest["damaged_float_audio.mkv"]
    assert entry["status"] == "partial" and entry["frames"] == 60 and entry["has_audio"]
    assert entry["reason"] == (
        "160 audio sample(s) were not numbers or far beyond full scale (a damaged float stream) and became silence"
    )
    spectrogram = open_store(out).record(entry["id"]).spectrogram()
    assert spectrogram.shape == (128, 256) and torch.isfinite(spectrogram).all()
    assert int(spectrogram.mean(dim=1).argmax()) == mel_bin_for_frequency(500, AudioConfig())


def test_every_reason_here_follows_the_message_policy(archive):
    _, manifest = archive
    assert policy_violations(manifest) == {}


# ---- the message policy itself ------------------------------------------------------------------


def _library_messages(tmp_path) -> list[str]:
    """Real messages of the libraries preparation uses, provoked the way bad input did."""
    messages = []
    attempts = [
        lambda: torch.nn.functional.pad(torch.zeros(1, 1, 500), (512, 512), mode="reflect"),
        lambda: np.zeros(5).reshape(2, 3),
        lambda: "abc".index("z"),
        lambda: 1 / 0,
        lambda: None.width,
    ]
    (tmp_path / "text.mp4").write_text("not a video\n")
    attempts.append(lambda: av.open(str(tmp_path / "text.mp4")))
    for attempt in attempts:
        with pytest.raises(Exception) as caught:
            attempt()
        messages += [str(caught.value), f"{type(caught.value).__name__}: {caught.value}"]
    return messages


def test_the_policy_rejects_bare_library_messages(tmp_path):
    for message in _library_messages(tmp_path):
        assert reason_problem(message) is not None, message
        assert reason_problem(f"{message}; decoded 1.00 s of the 2.00 s the header declares") is not None


def test_the_policy_accepts_sentences_that_quote_a_library():
    for reason in (
        "cannot open as media: [Errno 1094995529] Invalid data found when processing input: 'x.mp4'",
        "1 video packet(s) failed to decode (first: [Errno 1094995529] Invalid data; more)",
        "timed out after 3 s (--video-timeout)",
        "the file could not be decoded: FFmpeg stopped with an error ([Errno 22] Invalid argument)",
        "internal error while preparing the video, please report it (IndexError: list index out of range)",
    ):
        assert reason_problem(reason) is None, reason


def test_an_unexpected_error_is_caught_per_video_and_counted_as_internal(tmp_path):
    # A resize mode the command line never lets through: a bug in a caller, not bad input.
    make_video(tmp_path / "fine.mp4", seconds=0.5)
    video = lists.InputVideo(
        id="fine", source="fine.mp4", path=str(tmp_path / "fine.mp4"), label=None, label_index=None
    )
    entry, parts, pending = process_video(video, PrepareConfig(resize="diagonal", flow="none"))
    assert parts is None and pending is None
    assert entry["status"] == "failed" and entry["internal_error"] == "ValueError"
    assert entry["reason"].startswith("internal error while preparing the video, please report it (ValueError: ")
    assert reason_problem(entry["reason"]) is None
    good = {"id": "ok", "source": "ok.mp4", "status": "ok", "label": None}
    stats = statistics_from_entries([entry, good])
    assert stats["internal_errors"] == {"count": 1, "examples": ["fine.mp4: ValueError"]}
    assert "internal error: 1 video(s) hit an unexpected error" in format_statistics(stats)
