"""Decode a video once with PyAV: resample to a fixed frame rate by timestamps, resize, and
hand audio frames to a collector on the way.

The data flow for one file::

    container --demux--> packets --decode--> frames (presentation order)
        video: FrameRateResampler (pts -> output slots) -> resize -> (source index, RGB array)
        audio: an ``on_audio`` callback (data_tools.audio.AudioCollector)

Nothing here raises for a damaged stream once it is open: packet errors, a demuxer that stops
early, frames flagged corrupt and broken timestamps are counted in a ``DecodeLog`` so that the
caller can keep what decoded and record why it is ``partial``. Packets the container itself
marks as not to be shown (an MP4 edit list hiding the pre-roll of a stream-copied cut) are
dropped by FFmpeg by design and are not damage. A display matrix (phone videos) is applied, so
frames come out the way a player shows them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction

import av
import numpy as np

# Stop reading a file whose packets keep failing: it is garbage, not a video with a glitch.
MAX_CONSECUTIVE_PACKET_ERRORS = 50
# A longer jump between two frames' timestamps is a broken timeline, not a still scene:
# filling it with repeats could mean hours of copies, so decoding stops there.
MAX_TIMESTAMP_GAP_SECONDS = 10.0
# A shorter jump is frames missing in the middle of the stream (a damaged or partly downloaded
# file): kept, reported, and no clip may be drawn across it. "More than a few frame intervals":
# more than 4 typical intervals and more than 0.2 s, so that variable-frame-rate hiccups (a
# phone dropping to 10 fps in the dark, 3 intervals) and high-frame-rate jitter are not gaps.
GAP_MIN_INTERVALS = 4
GAP_MIN_SECONDS = 0.2
MAX_GAPS_DESCRIBED = 3  # a reason names this many gaps, then counts the rest


class MediaError(Exception):
    """A file that cannot be used at all (cannot be opened, no video stream, no frame)."""


@dataclass
class MediaInfo:
    """What the container declares, before decoding."""

    container_format: str
    width: int
    height: int
    sample_aspect: Fraction
    declared_fps: float | None
    declared_seconds: float | None
    has_audio_stream: bool
    audio_channels: int | None
    audio_rate: int | None
    video_stream_index: int = 0  # the stream decoded as the video (main_video_stream)
    audio_stream_index: int | None = None  # the audio stream decoded, None: none usable
    audio_problem: str | None = None  # why an audio stream present is not used, in plain words


@dataclass
class DecodeLog:
    """Everything that went wrong (or was unusual) while decoding one file."""

    packet_errors: int = 0
    first_packet_error: str | None = None
    stopped_early: str | None = None  # why the rest of the file could not be used
    corrupt_frames: int = 0
    non_increasing_timestamps: int = 0  # frames dropped because time went backwards
    missing_timestamps: int = 0  # frames whose time had to be inferred from the frame rate
    audio_errors: int = 0
    first_audio_error: str | None = None
    video_packets: int = 0  # demuxed video packets (each should give one frame)
    discarded_packets: int = 0  # packets the container marks as not to be shown (edit lists)
    source_frames: int = 0  # decoded video frames
    source_intervals: list[float] = field(default_factory=list)  # seconds between frames
    # output index of each source frame's first appearance (source frame 0 first)
    source_first_outputs: list[int] = field(default_factory=list)
    gaps: list[TimestampGap] = field(default_factory=list)  # frames missing mid-stream
    first_time: float | None = None
    end_time: float | None = None

    @property
    def decoded_seconds(self) -> float:
        if self.first_time is None or self.end_time is None:
            return 0.0
        return self.end_time - self.first_time

    def variable_frame_rate(self) -> bool:
        """True when frame intervals differ by more than 10% of their median (and a frame)."""
        if len(self.source_intervals) < 2:
            return False
        intervals = np.asarray(self.source_intervals)
        median = float(np.median(intervals))
        return bool(np.any(np.abs(intervals - median) > 0.1 * median + 1e-3))


def output_size(
    width: int, height: int, size: int, mode: str, sample_aspect: Fraction = Fraction(1)
) -> tuple[int, int]:
    """(height, width) of the stored frames.

    ``mode="short"`` scales the shorter *display* side to ``size`` (anamorphic pixels are made
    square using the sample aspect ratio); ``mode="square"`` squashes to size x size as the
    paper did.
    """
    if mode == "square":
        return size, size
    if mode != "short":
        raise ValueError(f"unknown resize mode {mode!r} (expected 'short' or 'square')")
    display_width = width * float(sample_aspect or 1)
    scale = size / min(display_width, height)
    return max(1, int(height * scale + 0.5)), max(1, int(display_width * scale + 0.5))


# ---- display matrix (rotation and mirror) -------------------------------------------------------


@dataclass(frozen=True)
class DisplayTransform:
    """How a player turns a stored frame into the picture it shows: rotate clockwise by
    ``rotation`` degrees (0, 90, 180 or 270), then mirror left-right when ``mirror``.

    ``angle`` is the exact clockwise angle the matrix asks for; it differs from ``rotation`` only
    for the rare matrix that is not a multiple of 90 degrees (then rounded to the nearest one).
    """

    rotation: int = 0
    mirror: bool = False
    angle: float = 0.0

    @property
    def swaps_sides(self) -> bool:
        return self.rotation in (90, 270)

    def apply(self, image: np.ndarray) -> np.ndarray:
        """(H, W, C) stored -> (H', W', C) shown ((W, H, C) when the sides swap), contiguous."""
        shown = np.rot90(image, k=-(self.rotation // 90))  # numpy's positive k is counter-clockwise
        if self.mirror:
            shown = shown[:, ::-1]
        return np.ascontiguousarray(shown)

    @classmethod
    def from_matrix(cls, matrix) -> DisplayTransform:
        """From FFmpeg's 3x3 display matrix (``AV_PKT_DATA_DISPLAYMATRIX``: 9 int32, row-major).

        libavutil/display.h: a stored pixel (x, y) (y downwards) is shown at
        ``(a*x + c*y, b*x + d*y)`` with ``a, b, c, d = m[0], m[1], m[3], m[4]``. A clockwise
        rotation by t is ``a = d = cos t, b = -c = sin t``; a mirror after it negates a and c,
        which makes the determinant negative.
        """
        a, b, c, d = (float(matrix[i]) for i in (0, 1, 3, 4))
        mirror = a * d - b * c < 0
        if mirror:
            a, c = -a, -c
        if a == 0 and b == 0:
            return cls()
        angle = math.degrees(math.atan2(b, a)) % 360.0
        return cls(rotation=round(angle / 90.0) % 4 * 90, mirror=mirror, angle=round(angle, 3))

    @classmethod
    def from_counterclockwise(cls, degrees: float) -> DisplayTransform:
        """From the counter-clockwise angle FFmpeg's ``av_display_rotation_get`` returns (what
        ``VideoFrame.rotation`` and older PyAV's ``stream.side_data["DISPLAYMATRIX"]`` give);
        a mirror cannot be told from it."""
        angle = (-float(degrees)) % 360.0
        return cls(rotation=round(angle / 90.0) % 4 * 90, angle=round(angle, 3))


def stream_display_transform(stream) -> DisplayTransform:
    """The rotation older PyAV (12 has it, 18 does not) exposes on the stream; identity if none."""
    side_data = getattr(stream, "side_data", None)
    degrees = side_data.get("DISPLAYMATRIX") if isinstance(side_data, dict) else None
    return DisplayTransform.from_counterclockwise(degrees) if degrees is not None else DisplayTransform()


def frame_display_transform(frame: av.VideoFrame) -> DisplayTransform | None:
    """The display matrix FFmpeg attaches to each decoded frame; None when it has none.

    The raw matrix (which also says whether to mirror) is read from the frame's side data;
    Checked with PyAV 12.0 (FFmpeg 6.1) and 18.1 (FFmpeg 8). ``frame.rotation`` (newer PyAV,
    the angle only) is the fallback.
    """
    for side_data in getattr(frame, "side_data", None) or ():
        kind = getattr(side_data, "type", None)
        if getattr(kind, "name", str(kind)).endswith("DISPLAYMATRIX"):
            raw = bytes(side_data)
            if len(raw) >= 36:
                return DisplayTransform.from_matrix(np.frombuffer(raw[:36], dtype=np.int32))
    degrees = getattr(frame, "rotation", None)
    return DisplayTransform.from_counterclockwise(degrees) if degrees else None


def open_media(path: str) -> tuple[av.container.InputContainer, MediaInfo]:
    """Open ``path`` and describe it; raises MediaError for a file that holds no usable video."""
    try:
        container = av.open(path, metadata_errors="ignore")
    except (av.error.FFmpegError, OSError, UnicodeDecodeError) as exc:
        raise MediaError(f"cannot open as media: {describe_unopenable(path, exc)}") from exc
    try:
        video = main_video_stream(container)
        ctx = video.codec_context
        if not ctx.width or not ctx.height:
            raise MediaError(f"video stream has no frame size ({ctx.name}); the file is damaged")
        audio = container.streams.audio[0] if container.streams.audio else None
        audio_problem = None
        if audio is not None and audio.codec_context is None:
            audio, audio_problem = (
                None,
                f"audio not kept: its codec has no decoder in this FFmpeg build (PyAV {av.__version__})",
            )
        info = MediaInfo(
            container_format=container.format.name,
            width=ctx.width,
            height=ctx.height,
            sample_aspect=_sample_aspect(video),
            declared_fps=float(video.average_rate) if video.average_rate else None,
            declared_seconds=_declared_seconds(container, video),
            has_audio_stream=bool(container.streams.audio),
            audio_channels=len(audio.codec_context.layout.channels) if audio is not None else None,
            audio_rate=audio.codec_context.sample_rate if audio is not None else None,
            video_stream_index=video.index,
            audio_stream_index=audio.index if audio is not None else None,
            audio_problem=audio_problem,
        )
    except BaseException:
        container.close()
        raise
    return container, info


# Leading bytes of what downloaders save instead of a video (an error page, an API answer).
_TEXT_PLACEHOLDERS = (
    (b"<!doctype html", "a web page (HTML)"),
    (b"<html", "a web page (HTML)"),
    (b"<?xml", "an XML document"),
    (b"{", "JSON text"),
)


def describe_unopenable(path: str, exc: Exception) -> str:
    """Why FFmpeg cannot open ``path``, in words about the file: empty, a saved web page, or
    FFmpeg's own message. Sniffed by hand: FFmpeg only says 'Invalid data found' for all."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as handle:
            head = handle.read(512).lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    except OSError:
        return str(exc)
    if size == 0:
        return "the file is empty (0 bytes), as an interrupted or failed download leaves it"
    for start, kind in _TEXT_PLACEHOLDERS:
        if head.startswith(start):
            return f"the file is {kind} of {size} bytes, not a video: a download saved a server's answer instead"
    if _is_text(head):
        return f"the file holds text ({size} bytes), not a video"
    if b"ftyp" in head[:16] and not _has_box(path, b"moov"):
        return (
            f"the MP4 file ({size} bytes) has no index (moov box): an incomplete download or an "
            f"interrupted recording ({exc})"
        )
    return f"the file ({size} bytes) could not be opened as a video: its container is unreadable ({exc})"


def _has_box(path: str, box: bytes, chunk: int = 1 << 20) -> bool:
    """Whether the 4-byte MP4 box type ``box`` occurs anywhere in the file (read in chunks)."""
    tail = b""
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            if box in tail + block:
                return True
            tail = block[-3:]
    return False


def _is_text(head: bytes) -> bool:
    try:
        decoded = head.decode("utf-8")
    except UnicodeDecodeError:  # also a multi-byte letter cut at 512 bytes: then FFmpeg's words
        return False
    return all(char.isprintable() or char in "\t\r\n" for char in decoded)


def main_video_stream(container: av.container.InputContainer):
    """The stream to decode as the video: FFmpeg's choice (av_find_best_stream, as ffmpeg and
    players use) among the video streams that are not a cover picture (attached_pic), so a
    thumbnail or cover stored as the first stream is never taken for the video.

    Raises MediaError when there is no such stream or FFmpeg has no decoder for it."""
    streams = container.streams
    moving = [s for s in streams.video if not s.disposition & av.stream.Disposition.attached_pic]
    if not moving:
        kinds = sorted({s.type for s in streams}) or ["none"]
        cover = "; its only picture is a cover image (attached picture)" if streams.video else ""
        raise MediaError(f"no video stream (streams: {', '.join(kinds)}){cover}")
    best = streams.best("video")
    video = next((s for s in moving if best is not None and s.index == best.index), moving[0])
    if video.codec_context is None:
        raise MediaError(
            f"the video stream's codec has no decoder in this FFmpeg build (PyAV {av.__version__}): a codec too "
            "new or too rare for it (AV1 needs one built with dav1d); re-encode the file, e.g. to H.264"
        )
    return video


def _sample_aspect(video) -> Fraction:
    sar = getattr(video, "sample_aspect_ratio", None) or video.codec_context.sample_aspect_ratio
    return Fraction(sar) if sar and sar > 0 else Fraction(1)


def _declared_seconds(container, video) -> float | None:
    """Duration the header claims: the stream's if known, else the container's."""
    if video.duration and video.time_base:
        return float(video.duration * video.time_base)
    if container.duration and container.duration > 0:
        return container.duration / av.time_base
    return None


# ---- frame-rate resampling --------------------------------------------------------------------


class FrameRateResampler:
    """Map timestamped source frames to output frames at a fixed rate.

    Output frame ``i`` is the source frame on screen at ``t0 + (i + 1/2) / fps`` (``t0``: the
    first frame's time). Sampling mid-slot is the rounding of FFmpeg's ``fps`` filter: a source
    at the output rate maps one to one even when its timestamps are rounded to milliseconds.
    Faster sources drop frames, slower ones repeat them (the caller sees the repeated source
    index), and variable frame rate needs nothing special.
    """

    def __init__(self, fps: float):
        self.fps = Fraction(fps).limit_denominator(1_000_000)
        self.t0: Fraction | None = None
        self.next_output = 0
        self.current = None  # (source index, frame) on screen now
        self.current_time: Fraction | None = None
        self.source_index = -1

    def _slot_time(self, i: int) -> Fraction:
        return self.t0 + (Fraction(i) + Fraction(1, 2)) / self.fps

    def push(self, time: Fraction, frame) -> Iterator[tuple[int, object]]:
        """Feed one source frame (times must increase); yields the (source index, frame) pairs
        of the output slots that end up showing the *previous* frame."""
        self.source_index += 1
        if self.t0 is None:
            self.t0 = time
        else:
            yield from self._emit_until(time)
        self.current = (self.source_index, frame)
        self.current_time = time

    def finish(self, end_time: Fraction) -> Iterator[tuple[int, object]]:
        """Flush the last frame, which stays on screen until ``end_time``. A video shorter than
        half an output interval (one frame at 60 fps read at 30) still gives its one frame."""
        if self.current is not None:
            yield from self._emit_until(end_time)
            if self.next_output == 0:
                self.next_output = 1
                yield self.current

    def _emit_until(self, time: Fraction) -> Iterator[tuple[int, object]]:
        while self._slot_time(self.next_output) < time:
            self.next_output += 1
            yield self.current


# ---- decoding -------------------------------------------------------------------------------


class VideoDecoder:
    """Decode one file into resized RGB frames at ``fps``.

    Iterate ``frames()`` once; it yields ``(source_index, rgb)`` per output frame, where ``rgb``
    is an (H, W, 3) uint8 array and repeated source frames share the same array object. Audio
    frames met on the way go to ``on_audio`` (errors there never stop the video). After the
    iteration, ``log`` says what went wrong and ``t0`` is the time of output frame 0.

    Frames are turned the way a player shows them (``display``: the container's display matrix,
    read from the first frame, else from the stream); ``height`` and ``width`` are the shown
    picture's, so the flow is computed on upright frames.
    """

    def __init__(
        self,
        path: str,
        fps: float,
        size: int,
        resize: str = "short",
        threads: int = 1,
        on_audio: Callable[[av.AudioFrame], None] | None = None,
    ):
        self.path = path
        self.fps = fps
        self.container, self.info = open_media(path)
        self.size, self.resize = size, resize
        self.display = DisplayTransform()
        self._set_display(stream_display_transform(self.container.streams.video[0]))
        self.threads = threads
        self.on_audio = on_audio
        self.log = DecodeLog()
        self.t0: float | None = None

    def close(self) -> None:
        self.container.close()

    def __enter__(self) -> VideoDecoder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _set_display(self, display: DisplayTransform) -> None:
        """Apply ``display`` from now on; the output size follows the shown picture's sides."""
        self.display = display
        height, width = output_size(self.info.width, self.info.height, self.size, self.resize, self.info.sample_aspect)
        # Resizing the stored frame to the rotated size and then turning it gives the picture
        # of turning first and resizing after, at the cost of turning the small frame.
        self._resize_to = (height, width)
        self.height, self.width = (width, height) if display.swaps_sides else (height, width)

    def frames(self) -> Iterator[tuple[int, np.ndarray]]:
        resampler = FrameRateResampler(self.fps)
        resized: dict[int, np.ndarray] = {}  # only the frame on screen is kept
        last_time: Fraction | None = None
        last_duration: Fraction | None = None
        for time, duration, frame in self._timed_video_frames():
            if last_time is None:
                self._set_display(frame_display_transform(frame) or self.display)
            if last_time is not None and time <= last_time:
                self.log.non_increasing_timestamps += 1
                continue
            if last_time is not None and time - last_time > MAX_TIMESTAMP_GAP_SECONDS:
                self.log.stopped_early = f"timestamps jump by {float(time - last_time):.1f} s"
                last_duration = None  # the container stretches the last frame over the hole
                break
            if last_time is not None:
                self.log.source_intervals.append(float(time - last_time))
            yield from self._resize_each(resampler.push(time, frame), resized)
            self.log.source_first_outputs.append(resampler.next_output)  # this frame's first slot
            last_time, last_duration = time, duration
        if last_time is None:
            return
        end_time = last_time + self._last_frame_duration(last_duration)
        yield from self._resize_each(resampler.finish(end_time), resized)
        self.t0 = float(resampler.t0)
        self.log.first_time, self.log.end_time = float(resampler.t0), float(end_time)
        self.log.gaps = find_gaps(self.log.source_intervals, self.log.source_first_outputs)

    def _resize_each(self, pairs, cache: dict[int, np.ndarray]) -> Iterator[tuple[int, np.ndarray]]:
        """Resize each distinct source frame once; repeats reuse the same array."""
        for source_index, frame in pairs:
            if source_index not in cache:
                cache.clear()
                cache[source_index] = self._to_rgb(frame)
            yield source_index, cache[source_index]

    def _to_rgb(self, frame: av.VideoFrame) -> np.ndarray:
        # AREA averages when shrinking (no aliasing of fine texture into false motion).
        height, width = self._resize_to
        rgb = frame.reformat(width=width, height=height, format="rgb24", interpolation="AREA").to_ndarray()
        return self.display.apply(rgb) if self.display != DisplayTransform() else rgb

    def _last_frame_duration(self, declared: Fraction | None) -> Fraction:
        """How long the last frame stays on screen: its own duration, else a typical interval."""
        if declared and declared <= MAX_TIMESTAMP_GAP_SECONDS:
            return declared
        if self.log.source_intervals:
            return Fraction(float(np.median(self.log.source_intervals))).limit_denominator(1_000_000)
        if self.info.declared_fps:
            return 1 / Fraction(self.info.declared_fps).limit_denominator(1_000_000)
        return 1 / Fraction(self.fps).limit_denominator(1_000_000)

    def _timed_video_frames(self) -> Iterator[tuple[Fraction, Fraction | None, av.VideoFrame]]:
        """Decoded video frames with their presentation time and duration in seconds."""
        fallback_rate = Fraction(self.info.declared_fps or self.fps).limit_denominator(1_000_000)
        stream_time_base = self.container.streams[self.info.video_stream_index].time_base
        for frame in self._decoded_video_frames():
            self.log.source_frames += 1
            # Frames drained at the end of the stream may come without a time base.
            time_base = frame.time_base or stream_time_base
            if frame.pts is None or time_base is None:
                # No timestamp: place the frame one nominal interval after the previous one.
                self.log.missing_timestamps += 1
                time = Fraction(self.log.source_frames - 1) / fallback_rate
            else:
                time = frame.pts * time_base
            # Frame.duration exists from PyAV 13 on; older versions fall back to intervals.
            frame_duration = getattr(frame, "duration", None)
            duration = frame_duration * time_base if frame_duration and time_base else None
            yield time, duration, frame

    def _decoded_video_frames(self) -> Iterator[av.VideoFrame]:
        video = self.container.streams[self.info.video_stream_index]
        video.codec_context.thread_count = self.threads
        if self.threads > 1:
            video.codec_context.thread_type = "AUTO"
        audio_index = self.info.audio_stream_index
        audio = self.container.streams[audio_index] if (self.on_audio and audio_index is not None) else None
        streams = [s for s in (video, audio) if s is not None]
        consecutive_errors = 0
        for packet in self._packets(streams):
            is_video = packet.stream.index == video.index
            if is_video and not isinstance(packet, _FlushPacket):
                self.log.video_packets += 1
                # Edit-list pre-roll: decoded (later frames need it) but never shown, by design.
                self.log.discarded_packets += bool(getattr(packet, "is_discard", False))
            try:
                decoded = packet.decode()
            except av.error.FFmpegError as exc:
                if is_video:
                    self._packet_error(exc)
                    consecutive_errors += 1
                    if consecutive_errors >= MAX_CONSECUTIVE_PACKET_ERRORS:
                        self.log.stopped_early = f"gave up after {consecutive_errors} consecutive undecodable packets"
                        return
                else:
                    self._audio_error(exc)
                continue
            if is_video:
                consecutive_errors = 0
                for frame in decoded:
                    self.log.corrupt_frames += bool(getattr(frame, "is_corrupt", False))
                    yield frame
            else:
                self._deliver_audio(decoded)

    def _packets(self, streams) -> Iterator[av.Packet]:
        """Demuxed packets, then a flush packet per stream; a demuxer error ends the file."""
        try:
            for packet in self.container.demux(streams):
                if packet.size == 0:  # the demuxer's own end-of-stream marker
                    continue
                yield packet
        except av.error.FFmpegError as exc:
            self.log.stopped_early = f"reading stopped: {exc}"
        except av.error.EOFError:  # some PyAV versions raise this at the end of a damaged file
            pass
        for stream in streams:
            yield _FlushPacket(stream)

    def _deliver_audio(self, frames) -> None:
        for frame in frames:
            try:
                self.on_audio(frame)
            except Exception as exc:  # a bad audio frame must never cost the video
                self._audio_error(exc)

    def _packet_error(self, exc: Exception) -> None:
        self.log.packet_errors += 1
        if self.log.first_packet_error is None:
            self.log.first_packet_error = str(exc)

    def _audio_error(self, exc: Exception) -> None:
        self.log.audio_errors += 1
        if self.log.first_audio_error is None:
            self.log.first_audio_error = f"{type(exc).__name__}: {exc}"


@dataclass(frozen=True)
class TimestampGap:
    """Frames missing in the middle of the stream: the decoded timestamps jump.

    Times are seconds of the stored video (0 = output frame 0): the next frame was due at
    ``start`` (one typical interval after the last frame before the gap) and came at ``end``.
    Output frames ``[last_before, first_after)`` show the frame before the gap (held over it)
    and are not usable: the last frame before the gap is excluded too, since its flow field
    would be the motion across the gap.
    """

    start: float
    end: float
    last_before: int  # first output index of the frame before the gap
    first_after: int  # first output index of the frame after it

    @property
    def seconds(self) -> float:
        return self.end - self.start

    def describe(self) -> str:
        return f"no video frames for {self.seconds:.2f} s, from {self.start:.2f} s to {self.end:.2f} s"


def find_gaps(intervals: list[float], first_outputs: list[int]) -> list[TimestampGap]:
    """Jumps between consecutive frames of more than ``GAP_MIN_INTERVALS`` typical (median)
    intervals and ``GAP_MIN_SECONDS``. ``intervals[k]`` separates source frames k and k + 1;
    ``first_outputs[k]`` is source frame k's first output index."""
    if len(intervals) < 2:
        return []
    typical = float(np.median(intervals))
    threshold = max(GAP_MIN_INTERVALS * typical, GAP_MIN_SECONDS)
    times = np.concatenate([[0.0], np.cumsum(intervals)])
    return [
        TimestampGap(
            round(float(times[k]) + typical, 6), round(float(times[k + 1]), 6), first_outputs[k], first_outputs[k + 1]
        )
        for k, interval in enumerate(intervals)
        if interval > threshold
    ]


def usable_spans(gaps: list[TimestampGap], frames: int) -> list[list[int]]:
    """``[[start, end), ...]`` output frames a clip may be drawn from: the video minus its gaps
    (empty spans left out). ``[[0, frames]]`` for a video without gaps."""
    spans, start = [], 0
    for gap in gaps:
        spans.append([start, min(gap.last_before, frames)])
        start = gap.first_after
    spans.append([start, frames])
    return [span for span in spans if span[1] > span[0]]


class _FlushPacket:
    """Stands for the empty packet that drains a decoder at the end of its stream."""

    def __init__(self, stream):
        self.stream = stream

    def decode(self):
        return self.stream.decode(None)


def describe_problems(log: DecodeLog, info: MediaInfo) -> list[str]:
    """Human-readable reasons a decode is ``partial``; empty when everything decoded."""
    problems = []
    if log.non_increasing_timestamps > max(2, 0.01 * log.source_frames):
        problems.append(f"{log.non_increasing_timestamps} frame(s) dropped: their timestamps went backwards")
    if log.stopped_early:
        problems.append(f"{log.stopped_early} after {log.decoded_seconds:.2f} s")
    if log.packet_errors:
        problems.append(f"{log.packet_errors} video packet(s) failed to decode (first: {log.first_packet_error})")
    if log.corrupt_frames:
        problems.append(f"{log.corrupt_frames} video frame(s) decoded with errors")
    for gap in log.gaps[:MAX_GAPS_DESCRIBED]:
        problems.append(f"{gap.describe()} (frames missing; no clip is drawn across the gap)")
    if len(log.gaps) > MAX_GAPS_DESCRIBED:
        missing = sum(gap.seconds for gap in log.gaps[MAX_GAPS_DESCRIBED:])
        problems.append(
            f"{len(log.gaps) - MAX_GAPS_DESCRIBED} more gap(s) without video frames ({missing:.2f} s in all)"
        )
    lost = log.video_packets - log.discarded_packets - log.packet_errors - log.source_frames
    if lost > 0 and not log.stopped_early:
        # A damaged packet the decoder silently skipped: a frame is missing (its predecessor
        # is shown longer).
        problems.append(f"{lost} video packet(s) decoded to no frame")
    declared = info.declared_seconds
    if declared and log.decoded_seconds < declared - max(1.0, 0.1 * declared):
        problems.append(f"decoded {log.decoded_seconds:.2f} s of the {declared:.2f} s the header declares")
    return problems


def describe_notes(log: DecodeLog) -> list[str]:
    """Unusual but harmless facts worth keeping in the manifest."""
    notes = []
    if 0 < log.non_increasing_timestamps <= max(2, 0.01 * log.source_frames):
        notes.append(f"{log.non_increasing_timestamps} frame(s) with non-increasing timestamps skipped")
    if log.missing_timestamps:
        notes.append(f"{log.missing_timestamps} frame(s) without timestamps placed at the nominal rate")
    return notes


def source_fps(log: DecodeLog) -> float | None:
    """The source's measured frame rate (median interval), for the record."""
    if not log.source_intervals:
        return None
    median = float(np.median(log.source_intervals))
    return round(1.0 / median, 3) if median > 0 and math.isfinite(median) else None
