"""One video -> one sample: the per-video half of ``tricoclr-data prepare``, run in the worker
processes (data_tools/pool.py).

    decode.VideoDecoder -> resampled RGB   -> JPEG chunks (rgb_00000, ...)
    flow.FlowSequencer  -> flow fields     -> JPEG chunks (flow_00000, ...), or a PendingFlow
                                              for a batched method (data_tools/flow_batching.py)
    audio.aligned_log_mel -> spectrogram   -> .npy part
    -> the video's meta (flags, notes, problems) and its manifest entry
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from dataclasses import dataclass

import av
import numpy as np
import torch
from torchvision.io import encode_jpeg

from data_tools import lists
from data_tools.audio import AudioCollector, AudioConfig, aligned_log_mel
from data_tools.decode import MediaError, VideoDecoder, describe_notes, describe_problems, source_fps, usable_spans
from data_tools.flow import (
    FlowOptions,
    FlowSequencer,
    encode_flow,
    flow_params_meta,
    is_batched_flow_method,
    make_flow_estimator,
    to_gray,
)
from data_tools.writers import failed_entry, kept_entry
from tricoclr.data import schema
from tricoclr.data.sampling import ClipSpec, video_too_short
from tricoclr.ops.tvl1 import TVL1Params

# --tvl1-* options -> TVL1Params fields.
TVL1_OPTIONS = {
    "tvl1_scales": "nscales",
    "tvl1_warps": "warps",
    "tvl1_inner_iterations": "inner_iterations",
    "tvl1_outer_iterations": "outer_iterations",
    "tvl1_epsilon": "epsilon",
}


@dataclass(frozen=True)
class PrepareConfig:
    """Everything a worker needs to turn one file into one sample."""

    fps: float = 30.0
    size: int = 128
    resize: str = "short"
    flow: str = "tvl1"
    rgb_quality: int = 90
    flow_quality: int = 90
    chunk_frames: int = schema.DEFAULT_CHUNK_FRAMES
    clip_seconds: float = 1.0
    audio: AudioConfig | None = AudioConfig()
    decode_threads: int = 1
    tvl1: TVL1Params | None = None  # TV-L1 methods; None: OpenCV's defaults

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> PrepareConfig:
        audio = None
        if not args.no_audio:
            audio = AudioConfig(sample_rate=args.audio_rate, n_mels=args.n_mels, n_fft=args.n_fft)
        tvl1_changes = {
            field: getattr(args, option) for option, field in TVL1_OPTIONS.items() if getattr(args, option) is not None
        }
        return cls(
            fps=args.fps,
            size=args.size,
            resize=args.resize,
            flow=args.flow,
            rgb_quality=args.rgb_quality,
            flow_quality=args.flow_quality,
            chunk_frames=args.chunk_frames,
            clip_seconds=args.clip_seconds,
            audio=audio,
            decode_threads=args.decode_threads,
            tvl1=TVL1Params(**tvl1_changes) if tvl1_changes else None,
        )


@dataclass
class PendingFlow:
    """What a worker hands over when a batched method computes the flow in the main process:
    the video's distinct source frames in order (greyscale (D, H, W) uint8) and how many output
    frames each covers (``runs``, summing to the frame count)."""

    frames: np.ndarray
    runs: list[int]

    @property
    def pairs(self) -> int:
        return len(self.runs) - 1


def process_video(
    video: lists.InputVideo, config: PrepareConfig
) -> tuple[dict, dict[str, bytes] | None, PendingFlow | None]:
    """(manifest entry, sample parts, pending flow) for one input; parts is None when it failed.

    With a batched flow method the sample lacks its flow parts and ``pending`` carries what the
    main process needs to compute them (``CrossVideoFlow``); otherwise ``pending`` is None.
    Never raises for a bad input: the failure becomes the entry's ``reason``.
    """
    try:
        return _prepare_video(video, config)
    except MediaError as exc:
        return failed_video_entry(video, str(exc)), None, None
    except av.error.FFmpegError as exc:  # FFmpeg refused the file's data past the checks
        return (
            failed_video_entry(video, f"the file could not be decoded: FFmpeg stopped with an error ({exc})"),
            None,
            None,
        )
    except Exception as exc:  # a bug of ours or a library's: the message says so, the run goes on
        reason = internal_error_reason("preparing the video", exc)
        return failed_video_entry(video, reason, internal_error=type(exc).__name__), None, None


def internal_error_reason(doing: str, exc: BaseException) -> str:
    """The manifest reason for an unexpected error: a sentence that says it is one, with the
    exception's type and text, so that it stands out from the input's own faults."""
    return f"internal error while {doing}, please report it ({type(exc).__name__}: {exc})"


def failed_video_entry(video: lists.InputVideo, reason: str, **extra) -> dict:
    """The manifest entry of an input that yields no sample, ``reason`` saying why in plain words."""
    return failed_entry(video.id, video.source, video.label, video.label_index, reason, **extra)


def _prepare_video(video: lists.InputVideo, config: PrepareConfig) -> tuple[dict, dict[str, bytes], PendingFlow | None]:
    if not os.path.isfile(video.path):
        raise MediaError(f"file not found: {video.path}")
    collector = AudioCollector() if config.audio else None
    with VideoDecoder(
        video.path, config.fps, config.size, config.resize, config.decode_threads, collector.add if collector else None
    ) as decoder:
        parts, frames, flow_frames, distinct, pending = encode_frames(decoder.frames(), config)
    if frames == 0:
        problems = describe_problems(decoder.log, decoder.info)
        raise MediaError("no video frame could be decoded" + (f" ({'; '.join(problems)})" if problems else ""))

    meta = _video_meta(video, config, decoder, frames, flow_frames, distinct)
    if collector is not None:
        audio_blob = _add_audio_or_note_why_not(meta, collector, decoder, config)
        if audio_blob is not None:
            parts[schema.AUDIO_PART] = audio_blob
    _set_status(meta)
    parts[schema.META_PART] = schema.encode_meta(meta)
    return sample_entry(meta, parts), parts, pending


def sample_entry(meta: dict, parts: dict[str, bytes]) -> dict:
    """The manifest entry of a kept sample: its meta and the byte size of each part."""
    return kept_entry(meta, {name: len(blob) for name, blob in parts.items()})


def encode_frames(frames: Iterator[tuple[int, np.ndarray]], config: PrepareConfig):
    """Resampled frames -> (parts, frame count, flow frame count, distinct source frames,
    pending flow).

    RGB frames become JPEGs (a repeated source frame reuses its bytes); flow fields come from a
    FlowSequencer; both are packed ``chunk_frames`` per blob as they stream past. A batched flow
    method only collects the distinct greyscale frames: no flow parts, and a ``PendingFlow``
    for the main process (whose fields will cover every frame).
    """
    rgb = ChunkPacker("rgb", config.chunk_frames)
    flow = ChunkPacker("flow", config.chunk_frames)
    batched = is_batched_flow_method(config.flow)
    estimator = None if batched else _flow_estimator(config)
    sequencer = FlowSequencer(estimator) if estimator is not None or batched else None
    last_source, last_jpeg, distinct = None, b"", 0
    for source_index, image in frames:
        if source_index != last_source:
            last_source, last_jpeg = source_index, encode_rgb(image, config.rgb_quality)
            distinct += 1
            fields = sequencer.push(source_index, to_gray(image)) if sequencer else []
        else:
            fields = sequencer.push(source_index, None) if sequencer else []
        rgb.add(last_jpeg)
        add_flow_fields(flow, fields, config.flow_quality)
    if batched:
        collected = sequencer.collected()
        pending = PendingFlow(*collected) if collected is not None else None
        return rgb.finish(), rgb.count, rgb.count, distinct, pending
    if sequencer:
        add_flow_fields(flow, sequencer.finish(), config.flow_quality)
    return {**rgb.finish(), **flow.finish()}, rgb.count, flow.count, distinct, None


def add_flow_fields(packer: ChunkPacker, fields, quality: int) -> None:
    """Encode each (flow field (H, W, 2) float32 in pixels, repeat) as one JPEG added ``repeat`` times."""
    for field, repeat in fields:
        jpeg = encode_flow(field, quality)
        for _ in range(repeat):
            packer.add(jpeg)


def encode_rgb(image: np.ndarray, quality: int) -> bytes:
    """(H, W, 3) uint8 RGB -> JPEG bytes."""
    tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).contiguous()
    return encode_jpeg(tensor, quality=quality).numpy().tobytes()


class ChunkPacker:
    """Groups per-frame blobs into schema.pack_frames chunks named rgb_00000, rgb_00001, ..."""

    def __init__(self, modality: str, chunk_frames: int):
        self.modality = modality
        self.chunk_frames = chunk_frames
        self.pending: list[bytes] = []
        self.parts: dict[str, bytes] = {}
        self.count = 0

    def add(self, blob: bytes) -> None:
        self.pending.append(blob)
        self.count += 1
        if len(self.pending) == self.chunk_frames:
            self._pack()

    def finish(self) -> dict[str, bytes]:
        if self.pending:
            self._pack()
        return self.parts

    def _pack(self) -> None:
        self.parts[schema.chunk_key(self.modality, len(self.parts))] = schema.pack_frames(self.pending)
        self.pending = []


_ESTIMATORS: dict[tuple, object] = {}


def _flow_estimator(config: PrepareConfig):
    """One estimator per process, method and parameters (TV-L1 objects are reusable)."""
    key = (config.flow, config.tvl1)
    if key not in _ESTIMATORS:
        _ESTIMATORS[key] = make_flow_estimator(config.flow, FlowOptions(tvl1=config.tvl1))
    return _ESTIMATORS[key]


def _video_meta(
    video, config: PrepareConfig, decoder: VideoDecoder, frames: int, flow_frames: int, distinct: int
) -> dict:
    info, log = decoder.info, decoder.log
    meta = {
        "schema_version": schema.SCHEMA_VERSION,
        "id": video.id,
        "source": video.source,
        "label": video.label,
        "label_index": video.label_index,
        "fps": config.fps,
        "frames": frames,
        "seconds": round(frames / config.fps, 6),
        "height": decoder.height,
        "width": decoder.width,
        "chunk_frames": config.chunk_frames,
        "rgb_codec": "jpeg",
        "rgb_quality": config.rgb_quality,
        "flow_method": config.flow,
        "flow_frames": flow_frames,
        "has_audio": False,
        "audio_silent": False,
        "audio": None,
        "t0": decoder.t0,
        "display_rotation": decoder.display.rotation,
        "display_mirror": decoder.display.mirror,
        "spans": usable_spans(log.gaps, frames),
        "source_info": {
            "container": info.container_format,
            "width": info.width,
            "height": info.height,
            "fps": source_fps(log),
            "packets": log.video_packets,
            "frames_decoded": log.source_frames,
            "distinct_frames_used": distinct,
            "declared_seconds": info.declared_seconds,
            "decoded_seconds": round(log.decoded_seconds, 6),
            "audio_channels": info.audio_channels,
            "audio_rate": info.audio_rate,
        },
        "problems": describe_problems(log, info),
        "notes": describe_notes(log),
        "flags": [],
    }
    if config.flow != "none":
        meta.update(
            flow_encoding=schema.FLOW_ENCODING,
            flow_quality=config.flow_quality,
            flow_bound=schema.FLOW_BOUND,
            flow_y_offset=schema.flow_y_offset(decoder.height),
        )
        flow_params = flow_params_meta(config.flow, config.tvl1)
        if flow_params is not None:
            meta["flow_params"] = flow_params
    if distinct < frames:
        meta["flags"].append("repeated_frames")
        meta["notes"].append(f"{frames - distinct} output frame(s) repeat a source frame; their flow is spread")
    if log.variable_frame_rate():
        meta["flags"].append("variable_frame_rate")
    if log.gaps:
        meta["flags"].append("frame_gaps")
    if decoder.display.angle != decoder.display.rotation:
        meta["notes"].append(
            f"display rotation of {decoder.display.angle:g} degrees applied as {decoder.display.rotation}"
        )
    clip = ClipSpec(frames=max(1, round(config.clip_seconds * config.fps)))
    if video_too_short(frames, clip, meta["spans"]):
        meta["flags"].append("too_short_for_two_clips")
        usable = f" ({sum(end - start for start, end in meta['spans'])} usable between gaps)" if log.gaps else ""
        meta["notes"].append(f"{frames} frames{usable} cannot hold two {config.clip_seconds:g} s clips")
    return meta


def _add_audio_or_note_why_not(
    meta: dict, collector: AudioCollector, decoder: VideoDecoder, config: PrepareConfig
) -> bytes | None:
    """``_add_audio``, except that an unexpected error costs only the audio: the video is kept
    without it, ``partial``, with the error recorded as an internal one."""
    try:
        return _add_audio(meta, collector, decoder, config)
    except Exception as exc:
        meta.update(has_audio=False, audio=None, internal_error=type(exc).__name__)
        meta["flags"].append("audio_unusable")
        meta["problems"].append("audio dropped: " + internal_error_reason("computing its spectrogram", exc))
        return None


def _add_audio(meta: dict, collector: AudioCollector, decoder: VideoDecoder, config: PrepareConfig) -> bytes | None:
    """Fill the audio fields of ``meta``; return the encoded spectrogram or None (policy:
    no audio stream, undecodable or silent audio -> has_audio false, no audio record)."""
    log = decoder.log
    if not decoder.info.has_audio_stream:
        meta["flags"].append("no_audio_stream")
        return None
    if decoder.info.audio_problem:
        meta["flags"].append("audio_unusable")
        meta["notes"].append(decoder.info.audio_problem)
        return None
    if log.audio_errors:
        meta["problems"].append(f"{log.audio_errors} audio packet(s) failed to decode (first: {log.first_audio_error})")
    result = aligned_log_mel(collector, decoder.t0, meta["frames"], config.fps, config.audio)
    meta["notes"].extend(result.notes)
    meta["problems"].extend(result.problems)
    if result.silent:
        meta.update(audio_silent=True)
        meta["flags"].append("silent_audio")
        return None
    if result.unusable:
        meta["flags"].append("audio_unusable")
        meta["notes"].append(result.unusable)
        return None
    if result.log_mel is None:
        meta["flags"].append("audio_undecodable")
        meta["problems"].append("the audio stream yielded no samples")
        return None
    meta.update(has_audio=True, audio=config.audio.as_meta(result.steps))
    meta["audio"]["covered_seconds"] = round(result.covered_seconds, 6)
    return schema.encode_array(result.log_mel)


def _set_status(meta: dict) -> None:
    problems = meta["problems"]
    meta["status"] = schema.STATUS_PARTIAL if problems else schema.STATUS_OK
    meta["reason"] = "; ".join(problems) if problems else None
