"""Small real test videos, written with PyAV (no fixtures checked in, no mocks).

Every helper writes a genuine container file that the preparation code then decodes through
PyAV exactly as it would a downloaded dataset. Videos are tiny (64 px, a few seconds) so that
tests stay fast on two shared CPU cores.
"""

from __future__ import annotations

import math
import os
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

MEDIA = Path("/work/shared/media")


def texture(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth random RGB texture (uint8) that optical flow can track.

    Smoothing white noise with a small box blur gives gradients at every pixel without the
    aliasing of pure noise; the texture wraps around, so shifting it with ``np.roll`` is a true
    translation with no new content entering at the border.
    """
    rng = np.random.default_rng(seed)
    img = rng.random((height, width, 3))
    for axis in (0, 1):  # circular 5-tap box blur, twice
        for _ in range(2):
            img = sum(np.roll(img, k, axis=axis) for k in range(-2, 3)) / 5.0
    img = (img - img.min()) / (img.max() - img.min() + 1e-9)
    return (img * 255).astype(np.uint8)


def moving_frames(num: int, height: int = 64, width: int = 64, dx: int = 1, dy: int = 0, seed: int = 0):
    """``num`` frames of a texture translated by (dx, dy) pixels per frame (wrapping)."""
    base = texture(height, width, seed)
    return [np.roll(base, (i * dy, i * dx), axis=(0, 1)) for i in range(num)]


def tone(freq: float, seconds: float, rate: int, amplitude: float = 0.5) -> np.ndarray:
    """A pure sine tone, float32 mono."""
    t = np.arange(int(round(seconds * rate))) / rate
    return (amplitude * np.sin(2 * math.pi * freq * t)).astype(np.float32)


def make_video(
    path: str | Path,
    *,
    seconds: float = 2.0,
    fps: int = 25,
    width: int = 64,
    height: int = 64,
    codec: str = "libx264",
    pix_fmt: str = "yuv420p",
    dx: int = 1,
    frames: list[np.ndarray] | None = None,
    frame_times: list[float] | None = None,
    audio: np.ndarray | None = None,
    audio_rate: int = 16000,
    audio_layout: str = "mono",
    audio_codec: str = "aac",
    faststart: bool = False,
    broken_packets: range | None = None,
    seed: int = 0,
) -> Path:
    """Write a video (and optionally audio) file with PyAV and return its path.

    ``frames`` defaults to a texture moving ``dx`` px per frame. ``frame_times`` (seconds)
    gives each frame an explicit presentation time, for variable frame rate files. ``audio``
    is a mono float32 waveform copied to every channel of ``audio_layout``. ``broken_packets``
    (packet numbers) get their payload garbled (same size and timestamps).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if frames is None:
        frames = moving_frames(int(round(seconds * fps)), height, width, dx=dx, seed=seed)
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", options=options) as out:
        vstream = out.add_stream(codec, rate=fps)
        vstream.width, vstream.height = frames[0].shape[1], frames[0].shape[0]
        vstream.pix_fmt = pix_fmt
        if codec == "libx264":
            vstream.options = {"preset": "ultrafast", "crf": "18"}
        if frame_times is not None:
            vstream.codec_context.time_base = Fraction(1, 1000)
        astream = None
        if audio is not None:
            astream = out.add_stream(audio_codec, rate=audio_rate, layout=audio_layout)
        written = 0
        for i, img in enumerate(frames + [None]):
            if img is None:
                packets = vstream.encode()  # flush the encoder
            else:
                frame = av.VideoFrame.from_ndarray(img, format="rgb24")
                if frame_times is not None:
                    frame.pts = int(round(frame_times[i] * 1000))
                    frame.time_base = Fraction(1, 1000)
                packets = vstream.encode(frame)
            for packet in packets:
                out.mux(_garbled(packet) if broken_packets and written in broken_packets else packet)
                written += 1
        if astream is not None:
            _write_audio(out, astream, audio, audio_rate, audio_layout)
    return path


def _garbled(packet: av.Packet) -> av.Packet:
    """``packet`` with its payload after the first 8 bytes replaced by noise (bit rot in the
    slice data; the NAL length prefix and header survive, so the demuxer still delivers it)."""
    data = bytes(packet)
    noise = np.random.default_rng(7).integers(0, 256, len(data) - 8, dtype=np.uint8).tobytes()
    bad = av.Packet(data[:8] + noise)
    bad.pts, bad.dts, bad.time_base, bad.stream = packet.pts, packet.dts, packet.time_base, packet.stream
    return bad


def _write_audio(out, astream, audio: np.ndarray, rate: int, layout: str) -> None:
    """Encode a mono waveform into ``astream`` in encoder-sized frames (every channel the same)."""
    channels = len(av.AudioLayout(layout).channels)
    samples = np.repeat(audio[None, :], channels, axis=0).astype(np.float32)
    frame_size = astream.codec_context.frame_size or 1024
    for start in range(0, samples.shape[1], frame_size):
        block = np.ascontiguousarray(samples[:, start : start + frame_size])
        frame = av.AudioFrame.from_ndarray(block, format="fltp", layout=layout)
        frame.sample_rate = rate
        frame.pts = start
        frame.time_base = Fraction(1, rate)
        for packet in astream.encode(frame):
            out.mux(packet)
    for packet in astream.encode():
        out.mux(packet)


def make_audio_only(path: str | Path, seconds: float = 1.0, rate: int = 16000) -> Path:
    """An .m4a-style file with an audio stream and no video stream."""
    path = Path(path)
    with av.open(str(path), "w", format="mp4") as out:
        astream = out.add_stream("aac", rate=rate, layout="mono")
        _write_audio(out, astream, tone(440, seconds, rate), rate, "mono")
    return path


def garble_middle(src: Path, dst: Path, fraction: float = 0.5, length: int = 2000) -> Path:
    """Copy ``src`` with ``length`` bytes at ``fraction`` of the file overwritten by noise."""
    data = bytearray(Path(src).read_bytes())
    at = int(len(data) * fraction)
    noise = np.random.default_rng(1).integers(0, 256, size=length, dtype=np.uint8).tobytes()
    data[at : at + length] = noise[: len(data) - at]
    dst.write_bytes(bytes(data))
    return dst


def truncate(src: Path, dst: Path, fraction: float) -> Path:
    """Copy the first ``fraction`` of ``src``'s bytes (a download cut short)."""
    data = Path(src).read_bytes()
    dst.write_bytes(data[: int(len(data) * fraction)])
    return dst


def lie_about_duration(path: Path, factor: float = 10.0) -> Path:
    """Multiply the duration a Matroska header declares (Segment Info ``Duration``) in place.

    The media data is untouched, so the file decodes to its true length while its header
    claims ``factor`` times more (FFmpeg trusts this element; for MP4 it recomputes durations
    from the sample tables, so an edited MP4 header would not lie convincingly).
    """
    import struct

    data = bytearray(path.read_bytes())
    at = data.find(b"\x44\x89")  # EBML id of Duration, followed by a 1-byte size (0x84 or 0x88)
    if at == -1:
        raise ValueError(f"{path}: no Matroska Duration element")
    size = data[at + 2] & 0x7F
    fmt = {4: ">f", 8: ">d"}[size]
    (value,) = struct.unpack_from(fmt, data, at + 3)
    struct.pack_into(fmt, data, at + 3, value * factor)
    path.write_bytes(bytes(data))
    return path


# ---- running the preparation ------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]


def prepare_argv(source, out, *extra: str, fmt: str = "lmdb", flow: str = "farneback") -> list[str]:
    """Command-line arguments of a quick in-process preparation run."""
    return [str(source), "--out", str(out), "--format", fmt, "--flow", flow, "--workers", "0", "--no-progress", *extra]


def run_prepare(
    source, out, *extra: str, fmt: str = "lmdb", flow: str = "farneback", status: int = 0
) -> dict[str, dict]:
    """Prepare ``source`` into ``out`` in this process; returns the manifest keyed by source.
    ``status``: the expected exit status (1 when no video is kept)."""
    from data_tools import prepare
    from tricoclr.data.store import open_store

    assert prepare.main(prepare_argv(source, out, *extra, fmt=fmt, flow=flow)) == status
    return {e["source"]: e for e in open_store(out).manifest()}


def subprocess_env() -> dict[str, str]:
    """Environment for running the project's code in a child Python."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


# ---- jobs for the worker-pool tests (module level: worker processes import them) --------------


def double_or_crash(task, config):
    """Doubles ``task``; aborts the whole process for "crash" and hangs for "hang"."""
    if task == "crash":
        os.abort()
    if task == "hang":
        time.sleep(60)
    return task * 2
