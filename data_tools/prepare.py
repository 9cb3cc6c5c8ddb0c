"""``tricoclr-data prepare``: decode every video once and stream it into shards or an LMDB.

    inputs (lists.collect_inputs)                      main process
      -> this part's share, minus videos already in the manifest (resume)
      -> worker processes: process_video()             decode.VideoDecoder -> resampled RGB
                                                       flow.FlowSequencer   -> flow fields
                                                       audio.aligned_log_mel -> spectrogram
                                                       -> encoded sample (JPEG chunks, .npy)
      -> main process: CrossVideoFlow                  batched flow methods only (tvl1-torch):
                                                       pairs of many videos per device call
      -> main process: writers.PartWriter              the single writer: store + manifest
      -> summary (printed, and summary.json)

Every input ends as exactly one manifest line: ``ok``, ``partial`` (kept, with the reason) or
``failed`` (with the reason). A worker that crashes (a decoder segfault) or exceeds
``--video-timeout`` is replaced and only its video is recorded as failed.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import queue
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import wait
from pathlib import Path
from typing import Callable, Iterator

import av
import numpy as np
import torch
from torchvision.io import encode_jpeg
from tqdm import tqdm

from data_tools import lists
from data_tools.audio import AudioCollector, AudioConfig, aligned_log_mel
from data_tools.decode import MediaError, VideoDecoder, describe_notes, describe_problems, source_fps, usable_spans
from data_tools.flow import (
    TVL1_METHODS,
    FlowOptions,
    FlowSequencer,
    FlowSpreader,
    PairFlowEstimator,
    available_flow_methods,
    default_flow_method,
    encode_flow,
    flow_params_meta,
    is_batched_flow_method,
    make_flow_estimator,
    make_pair_flow_estimator,
    to_gray,
)
from data_tools.inspect_data import format_statistics, statistics_from_entries
from data_tools.writers import PartWriter, failed_entry, kept_entry
from tricoclr.durable import write_json_atomic
from tricoclr.data import schema
from tricoclr.data.sampling import ClipSpec, video_too_short
from tricoclr.data.store import read_manifest
from tricoclr.ops.tvl1 import TVL1Params

# Arguments that do not change what is stored: a resumed run may use other values. The flow
# device and batch do not either: each pair's TV-L1 flow is independent of its batch.
FREE_ARGS = frozenset({
    "workers", "progress", "video_timeout", "shard_size_mb", "shard_max_videos", "decode_threads",
    "flow_device", "flow_batch", "flow_pool_pairs", "flow_compile",
})
# Scan warnings printed before the run; the summary keeps every one.
SHOWN_WARNINGS = 20
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
    def from_args(cls, args: argparse.Namespace) -> "PrepareConfig":
        audio = None
        if not args.no_audio:
            audio = AudioConfig(sample_rate=args.audio_rate, n_mels=args.n_mels, n_fft=args.n_fft)
        tvl1_changes = {field: getattr(args, option) for option, field in TVL1_OPTIONS.items()
                        if getattr(args, option) is not None}
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


# ---- one video --------------------------------------------------------------------------------


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
        return _failed(video, str(exc)), None, None
    except av.error.FFmpegError as exc:  # FFmpeg refused the file's data past the checks
        return _failed(video, f"the file could not be decoded: FFmpeg stopped with an error ({exc})"), None, None
    except Exception as exc:  # a bug of ours or a library's: the message says so, the run goes on
        reason = internal_error_reason("preparing the video", exc)
        return _failed(video, reason, internal_error=type(exc).__name__), None, None


def internal_error_reason(doing: str, exc: BaseException) -> str:
    """The manifest reason for an unexpected error: a sentence that says it is one, with the
    exception's type and text, so that it stands out from the input's own faults."""
    return f"internal error while {doing}, please report it ({type(exc).__name__}: {exc})"


def _failed(video: lists.InputVideo, reason: str, **extra) -> dict:
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
    return _entry(meta, parts), parts, pending


def _entry(meta: dict, parts: dict[str, bytes]) -> dict:
    return kept_entry(meta, {name: len(blob) for name, blob in parts.items()})


def encode_frames(frames: Iterator[tuple[int, np.ndarray]], config: PrepareConfig):
    """Resampled frames -> (parts, frame count, flow frame count, distinct source frames,
    pending flow).

    RGB frames become JPEGs (a repeated source frame reuses its bytes); flow fields come from a
    FlowSequencer; both are packed ``chunk_frames`` per blob as they stream past. A batched flow
    method only collects the distinct greyscale frames: no flow parts, and a ``PendingFlow``
    for the main process (whose fields will cover every frame).
    """
    rgb = _ChunkPacker("rgb", config.chunk_frames)
    flow = _ChunkPacker("flow", config.chunk_frames)
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
        _add_flow(flow, fields, config.flow_quality)
    if batched:
        collected = sequencer.collected()
        pending = PendingFlow(*collected) if collected is not None else None
        return rgb.finish(), rgb.count, rgb.count, distinct, pending
    if sequencer:
        _add_flow(flow, sequencer.finish(), config.flow_quality)
    return {**rgb.finish(), **flow.finish()}, rgb.count, flow.count, distinct, None


def _add_flow(packer: "_ChunkPacker", fields, quality: int) -> None:
    for field, repeat in fields:
        jpeg = encode_flow(field, quality)
        for _ in range(repeat):
            packer.add(jpeg)


def encode_rgb(image: np.ndarray, quality: int) -> bytes:
    """(H, W, 3) uint8 RGB -> JPEG bytes."""
    tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).contiguous()
    return encode_jpeg(tensor, quality=quality).numpy().tobytes()


class _ChunkPacker:
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


def _video_meta(video, config: PrepareConfig, decoder: VideoDecoder, frames: int, flow_frames: int, distinct: int) -> dict:
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
        meta["notes"].append(f"display rotation of {decoder.display.angle:g} degrees applied as {decoder.display.rotation}")
    clip = ClipSpec(frames=max(1, round(config.clip_seconds * config.fps)))
    if video_too_short(frames, clip, meta["spans"]):
        meta["flags"].append("too_short_for_two_clips")
        usable = f" ({sum(end - start for start, end in meta['spans'])} usable between gaps)" if log.gaps else ""
        meta["notes"].append(f"{frames} frames{usable} cannot hold two {config.clip_seconds:g} s clips")
    return meta


def _add_audio_or_note_why_not(meta: dict, collector: AudioCollector, decoder: VideoDecoder,
                               config: PrepareConfig) -> bytes | None:
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


# ---- flow batched across videos (main process) -------------------------------------------------


class _FlowVideo:
    """A video waiting for its flow: its sample so far, its frames and its flow in progress."""

    def __init__(self, entry: dict, parts: dict[str, bytes], pending: PendingFlow, order: int, config: PrepareConfig):
        self.entry, self.parts = entry, parts
        self.frames, self.runs = pending.frames, pending.runs
        self.pairs = pending.pairs
        self.size = tuple(pending.frames.shape[1:])
        self.order = order  # arrival number: older videos go first
        self.quality = config.flow_quality
        self.spreader = FlowSpreader()
        self.packer = _ChunkPacker("flow", config.chunk_frames)
        self.done = 0  # fields received, always a prefix: batches are taken and run in FIFO order

    def add_field(self, pair: int, field: np.ndarray) -> None:
        if pair != self.done:  # the spreading and the packing stream in frame order
            raise RuntimeError(f"flow of {self.entry['id']}: field {pair} arrived before field {self.done}")
        _add_flow(self.packer, [self.spreader.spread(field, self.runs[pair])], self.quality)
        self.done += 1

    def finish(self) -> tuple[dict, dict[str, bytes]]:
        """The complete sample and its manifest entry (sizes now include the flow)."""
        _add_flow(self.packer, [self.spreader.last(self.runs[-1], self.size)], self.quality)
        self.parts.update(self.packer.finish())
        self.frames = None
        return _entry(schema.decode_meta(self.parts[schema.META_PART]), self.parts), self.parts


class _DeviceThread:
    """Runs a pair estimator on its own thread, one batch at a time in submission order, so that
    the main thread keeps collecting worker results and encoding finished fields meanwhile
    (the device work mostly waits on the device, outside the GIL)."""

    def __init__(self, estimate: PairFlowEstimator):
        self._estimate = estimate
        self._inbox: queue.Queue = queue.Queue()
        self._outbox: queue.Queue = queue.Queue()
        self.in_flight = 0
        self.busy_seconds = 0.0
        self._thread = threading.Thread(target=self._run, name="flow-device", daemon=True)
        self._thread.start()

    def submit(self, batch: list, frames0: np.ndarray, frames1: np.ndarray) -> None:
        self.in_flight += 1
        self._inbox.put((batch, frames0, frames1))

    def results(self, wait: float = 0.0) -> list[tuple[list, np.ndarray]]:
        """Finished (batch, fields), oldest first; waits up to ``wait`` s when none is ready."""
        done = []
        block = wait > 0 and self.in_flight > 0
        while True:
            try:
                batch, fields, seconds, error = self._outbox.get(block=block, timeout=wait if block else None)
            except queue.Empty:
                return done
            block = False
            self.in_flight -= 1
            if error is not None:
                height, width = batch[0][0].size
                raise RuntimeError(
                    f"flow failed on a batch of {len(batch)} pairs of {width}x{height} frames: "
                    f"{type(error).__name__}: {error} (out of device memory? try a smaller --flow-batch)"
                ) from error
            self.busy_seconds += seconds
            done.append((batch, fields))

    def close(self) -> None:
        self._inbox.put(None)
        if self.in_flight == 0:
            self._thread.join(timeout=5)
        # else: the daemon thread is abandoned mid-batch (the run is being interrupted)

    def _run(self) -> None:
        while (item := self._inbox.get()) is not None:
            batch, frames0, frames1 = item
            start = time.monotonic()
            try:
                fields = self._estimate(frames0, frames1)
            except BaseException as exc:  # handed to the main thread, which stops the run
                self._outbox.put((batch, None, 0.0, exc))
                return
            self._outbox.put((batch, fields, time.monotonic() - start, None))


class CrossVideoFlow:
    """The flow of a batched method (``tvl1-torch``), computed in the main process for the
    videos of all workers together.

    Each video waits in a pool with its sample; its consecutive pairs join the queue of its
    frame size (a batch needs one size). Whenever the device is idle, the size whose oldest
    pair waited longest runs (up to ``batch_size`` of its pairs, from several videos); while a
    batch runs, a second one is queued only if a full batch is ready. So batches are full
    whenever the device is the bottleneck, and smaller only when it outpaces decoding.
    A video whose last field arrives is finished (fields spread over repeated frames, encoded,
    packed as the per-video methods do) and handed to ``on_complete`` (the writer): in order of
    completion. ``full()`` is true while ``max_pairs`` or more pairs await their flow: the
    caller then gives workers no new video, which bounds the pool's memory.
    """

    def __init__(self, estimate: PairFlowEstimator, config: PrepareConfig, batch_size: int, max_pairs: int,
                 on_complete: Callable[[dict, dict[str, bytes]], None]):
        if batch_size < 1 or max_pairs < 1:
            raise ValueError("the flow batch and the pool must hold at least one pair")
        self.config = config
        self.batch_size = batch_size
        self.max_pairs = max_pairs
        self.on_complete = on_complete
        self.groups: dict[tuple[int, int], deque[tuple[_FlowVideo, int]]] = {}
        self.waiting_pairs = 0  # pairs without their flow yet (queued or on the device)
        self.videos = 0  # videos in the pool
        self.pairs_done = 0
        self.batches = 0
        self._arrivals = 0
        self._started: float | None = None
        self.device = _DeviceThread(estimate)

    def add(self, entry: dict, parts: dict[str, bytes], pending: PendingFlow) -> None:
        video = _FlowVideo(entry, parts, pending, self._arrivals, self.config)
        self._arrivals += 1
        if video.pairs == 0:  # a single distinct frame: zero flow, nothing to compute
            self.on_complete(*video.finish())
            return
        self.groups.setdefault(video.size, deque()).extend((video, i) for i in range(video.pairs))
        self.waiting_pairs += video.pairs
        self.videos += 1
        self._launch()

    def full(self) -> bool:
        return self.waiting_pairs >= self.max_pairs

    def service(self, wait: float = 0.0) -> None:
        """Take in finished batches (finishing their complete videos), then start new ones."""
        for batch, fields in self.device.results(wait):
            for (video, pair), field in zip(batch, fields):
                video.add_field(pair, field)
                if video.done == video.pairs:
                    self.videos -= 1
                    self.on_complete(*video.finish())
            self.waiting_pairs -= len(batch)
            self.pairs_done += len(batch)
        self._launch()

    def drain(self) -> None:
        """Compute everything still waiting (the input is exhausted)."""
        while self.waiting_pairs:
            self.service(wait=0.5)

    def close(self) -> None:
        self.device.close()

    def report(self) -> str | None:
        if not self.batches:
            return None
        wall = max(time.monotonic() - self._started, 1e-9)
        busy = max(self.device.busy_seconds, 1e-9)
        return (f"flow: {self.pairs_done} pairs in {self.batches} batches (mean {self.pairs_done / self.batches:.0f}), "
                f"{self.pairs_done / busy:.1f} pairs/s of device time, "
                f"{self.pairs_done / wall:.1f} pairs/s overall, device busy {100 * busy / wall:.0f} %")

    def _launch(self) -> None:
        while self.device.in_flight < 2:
            idle = self.device.in_flight == 0
            ready = [key for key, pairs in self.groups.items() if idle or len(pairs) >= self.batch_size]
            if not ready:
                return
            key = min(ready, key=lambda k: self.groups[k][0][0].order)
            pairs = self.groups[key]
            batch = [pairs.popleft() for _ in range(min(self.batch_size, len(pairs)))]
            if not pairs:
                del self.groups[key]
            frames0 = np.stack([video.frames[i] for video, i in batch])
            frames1 = np.stack([video.frames[i + 1] for video, i in batch])
            if self._started is None:
                self._started = time.monotonic()
            self.device.submit(batch, frames0, frames1)
            self.batches += 1


# ---- worker processes -------------------------------------------------------------------------


def _limit_threads() -> None:
    """One thread per worker process: the pool provides the parallelism."""
    torch.set_num_threads(1)
    try:
        import cv2

        cv2.setNumThreads(1)
    except ImportError:
        pass


_READY = "ready"


def _worker_loop(conn, job: Callable, config) -> None:
    _limit_threads()
    conn.send(_READY)  # imports done: the main process starts timing tasks from here
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):  # the main process is gone
            return
        if task is None:
            return
        result = job(task, config)
        try:
            conn.send(result)
        except (BrokenPipeError, OSError):
            return


class _Worker:
    """One worker process and its pipe; handles one task at a time."""

    def __init__(self, ctx, job: Callable, config):
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker_loop, args=(child, job, config), daemon=True)
        self.process.start()
        child.close()
        self.ready = False
        self.task = None
        self.started = 0.0

    def assign(self, task) -> None:
        self.task, self.started = task, time.monotonic()
        self.conn.send(task)

    def check_ready(self) -> None:
        """Notice the start-up message; a worker that dies before it cannot run anything."""
        if self.conn.poll():
            if self.conn.recv() == _READY:
                self.ready = True
        elif not self.process.is_alive():
            raise RuntimeError(f"a worker process failed to start (exit code {self.process.exitcode})")

    def stop(self, kill: bool = False) -> None:
        if kill or not self.process.is_alive():
            self.process.kill()
        else:
            try:
                self.conn.send(None)
            except (BrokenPipeError, OSError):
                self.process.kill()
        self.process.join(timeout=5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()


def _worker_context():
    """forkserver where available (fast worker starts, no inherited threads or handles), else spawn."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        # The server imports the heavy modules once; each worker forks from it ready to run.
        ctx.set_forkserver_preload(["data_tools.prepare"])
        return ctx
    return multiprocessing.get_context("spawn")


def run_tasks(
    tasks: list,
    job: Callable,
    config,
    workers: int,
    timeout: float | None = None,
    *,
    hold: Callable[[], bool] | None = None,
    tick: Callable[[float], None] | None = None,
) -> Iterator[tuple[object, object, str | None]]:
    """Run ``job(task, config)`` for every task; yields (task, result, crash reason).

    ``workers == 0`` runs in this process. Otherwise each worker process handles one task at a
    time, so a worker that dies (segfault, out of memory) or runs past ``timeout`` seconds is
    replaced and only its own task is reported, with result None and the crash reason.

    For a consumer with work of its own (the cross-video flow): no new task starts while
    ``hold()`` is true, and ``tick(wait)`` is called between results at least every 50 ms; it
    may block up to ``wait`` seconds when nothing else can happen.
    """
    hold = hold or (lambda: False)
    if workers == 0:
        for task in tasks:
            while hold():
                tick(0.1)
            yield task, job(task, config), None
            if tick:
                tick(0.0)
        return
    ctx = _worker_context()
    tasks = deque(tasks)
    pool = [_Worker(ctx, job, config) for _ in range(min(workers, len(tasks)))]
    try:
        while tasks or any(w.task is not None for w in pool):
            for worker in pool:
                if worker.ready and worker.task is None and tasks and not hold():
                    worker.assign(tasks.popleft())
            wait([w.conn for w in pool] + [w.process.sentinel for w in pool], timeout=0.05 if tick else 1.0)
            if tick:
                tick(0.0)
            for i, worker in enumerate(pool):
                if not worker.ready:
                    worker.check_ready()
                    continue
                outcome = _collect(worker, timeout)
                if outcome is None:
                    continue
                task, result, crash = outcome
                if crash is not None:
                    worker.stop(kill=True)
                    pool[i] = _Worker(ctx, job, config)
                yield task, result, crash
    finally:
        for worker in pool:
            worker.stop(kill=worker.task is not None)


def _collect(worker: _Worker, timeout: float | None):
    """(task, result, crash reason) if the worker's task is over, else None."""
    if worker.task is None:
        return None
    task = worker.task
    if worker.conn.poll():
        try:
            result = worker.conn.recv()
        except (EOFError, OSError):
            worker.task = None
            return task, None, f"worker process died (exit code {worker.process.exitcode}) while preparing this video"
        worker.task = None
        return task, result, None
    if not worker.process.is_alive():
        worker.task = None
        return task, None, f"worker process died (exit code {worker.process.exitcode}) while preparing this video"
    if timeout and time.monotonic() - worker.started > timeout:
        worker.task = None
        return task, None, f"timed out after {timeout:g} s (--video-timeout)"
    return None


# ---- the run ----------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``tricoclr-data prepare``."""
    parser.add_argument("source", metavar="SOURCE", help="folder of videos, read recursively (class subfolders = labels)")
    parser.add_argument("--out", required=True, help="output folder (a dataset, or its part folders)")
    parser.add_argument("--format", choices=["webdataset", "lmdb"], default="webdataset",
                        help="webdataset tar shards (sequential streaming) or LMDB (random access)")
    inputs = parser.add_argument_group("inputs and labels")
    inputs.add_argument("--list", action="append", metavar="FILE",
                        help="restrict to and label from a list: UCF101 split file, HMDB51 split files "
                             "(a folder or glob), Kinetics CSV; repeatable")
    inputs.add_argument("--list-format", choices=lists.LIST_FORMATS, help="default: guessed from the list's name")
    inputs.add_argument("--list-subset", choices=sorted(lists.HMDB_SUBSET_CODES), default="all",
                        help="HMDB51: which videos of the split (default: train and test)")
    inputs.add_argument("--list-split", type=int, default=1, help="HMDB51: split number when --list is a folder")
    inputs.add_argument("--class-index", metavar="FILE",
                        help="classInd.txt fixing label indices (default: one beside the list, else sorted names)")
    inputs.add_argument("--extensions", default=None,
                        help="comma-separated file extensions to read in a folder scan, or 'all' "
                             "(default: common video extensions)")
    video = parser.add_argument_group("video")
    video.add_argument("--fps", type=float, default=30.0, help="output frame rate (default 30)")
    video.add_argument("--size", type=int, default=128, help="shorter side in pixels (default 128)")
    video.add_argument("--resize", choices=["short", "square"], default="short",
                       help="short: keep aspect; square: squash to size x size as the paper")
    video.add_argument("--flow", choices=available_flow_methods(), default=default_flow_method(),
                       help="optical flow method (default: tvl1 when OpenCV contrib is installed); "
                            "tvl1-torch: the same TV-L1 in PyTorch, batched across videos on --flow-device")
    video.add_argument("--rgb-quality", type=int, default=90, help="JPEG quality of RGB frames")
    video.add_argument("--flow-quality", type=int, default=90, help="JPEG quality of flow frames")
    video.add_argument("--chunk-frames", type=int, default=schema.DEFAULT_CHUNK_FRAMES,
                       help="frames per stored chunk (a clip reads only its chunks)")
    video.add_argument("--clip-seconds", type=float, default=1.0,
                       help="training clip length, to flag videos too short for two clips")
    flow = parser.add_argument_group(
        "flow on a device (--flow tvl1-torch)",
        "workers decode; the main process batches pairs of frames from many videos through the device",
    )
    flow.add_argument("--flow-device", help="torch device for the flow (default: cuda when available, else cpu)")
    flow.add_argument("--flow-batch", type=int,
                      help=f"pairs per device call, from many videos (default: {FLOW_BATCH_DEFAULTS['cuda']} on "
                           f"cuda, {FLOW_BATCH_DEFAULTS['cpu']} on cpu); lower it if the device runs out of memory")
    flow.add_argument("--flow-pool-pairs", type=int,
                      help="pause decoding new videos while this many pairs await their flow (bounds memory; "
                           f"default: {FLOW_POOL_BATCHES} batches)")
    flow.add_argument("--no-flow-compile", dest="flow_compile", action="store_false", default=None,
                      help="run TV-L1 eagerly (default: torch.compile on cuda, ~8x faster after a ~1.5 min compile)")
    tvl1 = parser.add_argument_group(
        "TV-L1 parameters (--flow tvl1 and tvl1-torch; default: OpenCV's, as CoCLR)",
        "changing them changes the flow; they are recorded in each video's meta (flow_params)",
    )
    tvl1.add_argument("--tvl1-scales", type=int, help="pyramid levels (OpenCV: 5)")
    tvl1.add_argument("--tvl1-warps", type=int, help="warps per level (OpenCV: 5)")
    tvl1.add_argument("--tvl1-inner-iterations", type=int, help="iterations between median filters (OpenCV: 30)")
    tvl1.add_argument("--tvl1-outer-iterations", type=int, help="median filter rounds per warp (OpenCV: 10)")
    tvl1.add_argument("--tvl1-epsilon", type=float, help="stopping threshold (OpenCV: 0.01)")
    audio = parser.add_argument_group("audio")
    audio.add_argument("--no-audio", action="store_true", help="do not extract audio")
    audio.add_argument("--audio-rate", type=int, default=schema.AUDIO_SAMPLE_RATE, help="resample to this rate (Hz)")
    audio.add_argument("--n-mels", type=int, default=schema.AUDIO_N_MELS)
    audio.add_argument("--n-fft", type=int, default=schema.AUDIO_N_FFT)
    run = parser.add_argument_group("running")
    run.add_argument("--workers", type=int, default=_cpu_count(),
                     help="worker processes (default: all CPUs; 0 = in this process)")
    run.add_argument("--video-timeout", type=float, default=0, help="seconds before a video is abandoned (0: none)")
    run.add_argument("--decode-threads", type=int, default=1, help="decoder threads per worker")
    run.add_argument("--shard-size-mb", type=float, default=256, help="webdataset: target shard size")
    run.add_argument("--shard-max-videos", type=int, default=0, help="webdataset: at most this many videos per shard")
    run.add_argument("--shard-index", type=int, help="prepare only part I of --num-shards (array jobs)")
    run.add_argument("--num-shards", type=int, help="split the input into N deterministic parts")
    run.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


FLOW_BATCH_DEFAULTS = {"cuda": 2048, "cpu": 16}  # a GPU needs >= 2048 pairs at 128 px to be fast
FLOW_POOL_BATCHES = 4


def _flow_device_settings(args) -> tuple[str, int, int] | None:
    """(device, batch, pool pairs) of a batched flow method; None for the others.

    Raises ValueError for device options without a batched method, TV-L1 parameters without a
    TV-L1 method, or a device that is not there."""
    device_options = [name for name in ("flow_device", "flow_batch", "flow_pool_pairs", "flow_compile")
                      if getattr(args, name) is not None]
    tvl1_options = [name for name in TVL1_OPTIONS if getattr(args, name) is not None]
    if tvl1_options and args.flow not in TVL1_METHODS:
        raise ValueError(f"--{tvl1_options[0].replace('_', '-')} needs a TV-L1 --flow ({', '.join(sorted(TVL1_METHODS))})")
    if not is_batched_flow_method(args.flow):
        if device_options:
            raise ValueError(f"--{device_options[0].replace('_', '-')} applies to a batched --flow (tvl1-torch) only")
        return None
    device = args.flow_device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        kind = torch.device(device).type
    except RuntimeError as exc:
        raise ValueError(f"--flow-device {device!r}: {exc}") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--flow-device {device}: CUDA is not available here")
    batch = FLOW_BATCH_DEFAULTS.get(kind, FLOW_BATCH_DEFAULTS["cuda"]) if args.flow_batch is None else args.flow_batch
    pool = FLOW_POOL_BATCHES * batch if args.flow_pool_pairs is None else args.flow_pool_pairs
    if batch < 1 or pool < 1:
        raise ValueError("--flow-batch and --flow-pool-pairs must be at least 1")
    return device, batch, pool


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def run(args: argparse.Namespace) -> int:
    """Prepare (or resume preparing) one part of a dataset; 0 on completion, 2 on bad usage."""
    try:
        part_dir = _part_dir(args)
        config = PrepareConfig.from_args(args)
        flow_device = _flow_device_settings(args)
        inputs = _collect_inputs(args)
    except (ValueError, FileNotFoundError, NotADirectoryError) as exc:
        print(f"tricoclr-data prepare: error: {exc}", file=sys.stderr)
        return 2
    for warning in inputs.warnings[:SHOWN_WARNINGS]:  # what the scan skipped on purpose; all in the summary
        print(f"tricoclr-data prepare: warning: {warning}", file=sys.stderr)
    if len(inputs.warnings) > SHOWN_WARNINGS:
        print(f"tricoclr-data prepare: warning: and {len(inputs.warnings) - SHOWN_WARNINGS} more skipped paths "
              f"(all in {schema.SUMMARY_FILE}'s scan_warnings)", file=sys.stderr)
    try:
        _check_or_record_args(part_dir, args)
        writer = PartWriter(part_dir, args.format, int(args.shard_size_mb * (1 << 20)), args.shard_max_videos)
    except (ValueError, RuntimeError) as exc:
        print(f"tricoclr-data prepare: error: {exc}", file=sys.stderr)
        return 2
    write_json_atomic(part_dir / schema.CLASSES_FILE, {"names": inputs.class_names, "from": inputs.class_names_from})

    mine = [v for v in inputs.videos if args.num_shards is None or lists.part_of(v.id, args.num_shards) == args.shard_index]
    todo = sorted((v for v in mine if v.id not in writer.done), key=lambda v: lists.processing_order(v.id))
    try:
        _process_all(todo, config, writer, args, already=len(mine) - len(todo), flow_device=flow_device)
    finally:
        writer.close()
    _finish(part_dir, inputs, args)
    return 0


def _collect_inputs(args) -> lists.InputList:
    extensions = lists.VIDEO_EXTENSIONS
    if args.extensions:
        extensions = None if args.extensions == "all" else frozenset(
            "." + e.strip().lstrip(".").lower() for e in args.extensions.split(",") if e.strip()
        )
    return lists.collect_inputs(
        args.source, args.list, args.list_format, args.class_index, args.list_subset, args.list_split, extensions
    )


def _part_dir(args) -> Path:
    """OUT itself, or OUT/part-IIIII-of-NNNNN when the input is split across jobs."""
    out = Path(args.out)
    if (args.shard_index is None) != (args.num_shards is None):
        raise ValueError("--shard-index and --num-shards go together")
    if args.num_shards is None:
        if any(out.glob(schema.PART_GLOB)):
            raise ValueError(f"{out} holds part-* folders from a split run: pass the same --num-shards")
        return out
    if args.num_shards < 1 or not 0 <= args.shard_index < args.num_shards:
        raise ValueError(f"--shard-index must be in [0, {args.num_shards})")
    if (out / schema.MANIFEST_FILE).exists():
        raise ValueError(f"{out} was prepared without --num-shards; use another --out")
    return out / schema.part_dir_name(args.shard_index, args.num_shards)


def _argument_names() -> set[str]:
    parser = argparse.ArgumentParser(add_help=False)
    add_arguments(parser)
    return {action.dest for action in parser._actions}


def _recorded_args(args) -> dict:
    """The arguments that shape the stored data (only this command's own options)."""
    names = _argument_names() - FREE_ARGS
    recorded = {k: v for k, v in vars(args).items() if k in names}
    recorded["source"] = str(Path(args.source).resolve())
    recorded["out"] = None  # the folder may move; its content is what matters
    recorded["list"] = [str(Path(p).resolve()) for p in args.list] if args.list else None
    recorded["schema_version"] = schema.SCHEMA_VERSION
    return json.loads(json.dumps(recorded))


def _check_or_record_args(part_dir: Path, args) -> None:
    """Refuse to resume into a part prepared with different content-affecting arguments."""
    path = part_dir / schema.ARGS_FILE
    wanted = _recorded_args(args)
    if path.exists():
        recorded = json.loads(path.read_text())
        changed = sorted(k for k in set(recorded) | set(wanted) if recorded.get(k) != wanted.get(k))
        if changed:
            details = ", ".join(f"{k}: {recorded.get(k)!r} -> {wanted.get(k)!r}" for k in changed)
            raise ValueError(f"{part_dir} was prepared with other arguments ({details}); use another --out")
        return
    part_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, wanted)


def _process_all(todo: list, config: PrepareConfig, writer: PartWriter, args, already: int,
                 flow_device: tuple[str, int, int] | None = None) -> None:
    """Run the workers and write every video; with a batched flow method, ``flow_device``
    (device, batch, pool pairs) sets up the cross-video flow between the two."""
    counts = {"ok": 0, "partial": 0, "failed": 0}
    bar = tqdm(total=len(todo) + already, initial=already, unit="video", disable=not args.progress, dynamic_ncols=True)
    flow = None

    def record(entry: dict, parts: dict[str, bytes] | None) -> None:
        writer.add(entry, parts)
        counts[entry["status"]] += 1
        bar.set_postfix({**counts, "awaiting_flow": flow.videos} if flow else counts, refresh=False)
        bar.update()

    if flow_device is not None and todo:
        device, batch, pool_pairs = flow_device
        options = FlowOptions(tvl1=config.tvl1, device=device, compile=args.flow_compile)
        flow = CrossVideoFlow(make_pair_flow_estimator(config.flow, options), config, batch, pool_pairs, record)
    try:
        with bar:
            for video, result, crash in run_tasks(
                todo, process_video, config, args.workers, args.video_timeout or None,
                hold=flow.full if flow else None, tick=flow.service if flow else None,
            ):
                entry, parts, pending = result if crash is None else (_failed(video, crash), None, None)
                if pending is not None:
                    flow.add(entry, parts, pending)  # recorded when its flow is complete
                else:
                    record(entry, parts)
            if flow is not None:
                flow.drain()
    finally:
        if flow is not None:
            flow.close()  # videos still awaiting their flow are lost: a rerun redoes them
    report = flow.report() if flow is not None else None
    if report:
        print(f"{report} on {flow_device[0]}")


def _finish(part_dir: Path, inputs: lists.InputList, args) -> None:
    """Print and save the part's summary (all its videos, from every run)."""
    stats = statistics_from_entries(read_manifest(part_dir / schema.MANIFEST_FILE))
    stats["ignored_files"] = {"count": len(inputs.ignored), "examples": inputs.ignored[:20]}
    stats["scan_warnings"] = inputs.warnings  # link loops, broken links, unreadable folders: each named
    stats["duplicate_list_entries"] = {"count": len(inputs.duplicates), "examples": inputs.duplicates[:20]}
    write_json_atomic(part_dir / schema.SUMMARY_FILE, stats)
    print(format_statistics(stats, title=f"prepared {part_dir}"))
    if inputs.ignored:
        print(f"ignored {len(inputs.ignored)} file(s) that are hidden, lack a video extension or are link loops "
              f"or broken links (e.g. {', '.join(inputs.ignored[:3])}); see --extensions and the warnings above")
    if inputs.duplicates:
        print(f"{len(inputs.duplicates)} duplicate list entries were prepared once")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tricoclr-data prepare", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
