"""``tricoclr-data prepare``: decode every video once and stream it into shards or an LMDB.

    inputs (lists.collect_inputs)                      main process
      -> this part's share, minus videos already in the manifest (resume)
      -> worker processes: process_video()             decode.VideoDecoder -> resampled RGB
                                                       flow.FlowSequencer   -> flow fields
                                                       audio.aligned_log_mel -> spectrogram
                                                       -> encoded sample (JPEG chunks, .npy)
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
import sys
import time
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import wait
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torchvision.io import encode_jpeg
from tqdm import tqdm

from data_tools import lists
from data_tools.audio import AudioCollector, AudioConfig, aligned_log_mel
from data_tools.decode import MediaError, VideoDecoder, describe_notes, describe_problems, source_fps
from data_tools.flow import FlowSequencer, available_flow_methods, default_flow_method, encode_flow, make_flow_estimator, to_gray
from data_tools.inspect_data import format_statistics, statistics_from_entries
from data_tools.writers import PartWriter, failed_entry, kept_entry, write_json_atomic
from tricoclr.data import schema
from tricoclr.data.store import read_manifest

# Arguments that do not change what is stored: a resumed run may use other values.
FREE_ARGS = frozenset({"workers", "progress", "video_timeout", "shard_size_mb", "shard_max_videos", "decode_threads"})


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

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "PrepareConfig":
        audio = None
        if not args.no_audio:
            audio = AudioConfig(sample_rate=args.audio_rate, n_mels=args.n_mels, n_fft=args.n_fft)
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
        )


# ---- one video --------------------------------------------------------------------------------


def process_video(video: lists.InputVideo, config: PrepareConfig) -> tuple[dict, dict[str, bytes] | None]:
    """(manifest entry, sample parts) for one input; parts is None when it failed.

    Never raises for a bad input: the failure becomes the entry's ``reason``.
    """
    try:
        return _prepare_video(video, config)
    except MediaError as exc:
        return _failed(video, str(exc)), None
    except Exception as exc:  # anything a damaged file can provoke in a decoder or codec
        return _failed(video, f"{type(exc).__name__}: {exc}"), None


def _failed(video: lists.InputVideo, reason: str) -> dict:
    return failed_entry(video.id, video.source, video.label, video.label_index, reason)


def _prepare_video(video: lists.InputVideo, config: PrepareConfig) -> tuple[dict, dict[str, bytes]]:
    if not os.path.isfile(video.path):
        raise MediaError(f"file not found: {video.path}")
    collector = AudioCollector() if config.audio else None
    with VideoDecoder(
        video.path, config.fps, config.size, config.resize, config.decode_threads, collector.add if collector else None
    ) as decoder:
        parts, frames, flow_frames, distinct = encode_frames(decoder.frames(), config)
    if frames == 0:
        problems = describe_problems(decoder.log, decoder.info)
        raise MediaError("no video frame could be decoded" + (f" ({'; '.join(problems)})" if problems else ""))

    meta = _video_meta(video, config, decoder, frames, flow_frames, distinct)
    if collector is not None:
        audio_blob = _add_audio(meta, collector, decoder, config)
        if audio_blob is not None:
            parts[schema.AUDIO_PART] = audio_blob
    _set_status(meta)
    parts[schema.META_PART] = schema.encode_meta(meta)
    sizes = {name: len(blob) for name, blob in parts.items()}
    return kept_entry(meta, sizes), parts


def encode_frames(frames: Iterator[tuple[int, np.ndarray]], config: PrepareConfig):
    """Resampled frames -> (parts, frame count, flow frame count, distinct source frames).

    RGB frames become JPEGs (a repeated source frame reuses its bytes); flow fields come from a
    FlowSequencer; both are packed ``chunk_frames`` per blob as they stream past.
    """
    rgb = _ChunkPacker("rgb", config.chunk_frames)
    flow = _ChunkPacker("flow", config.chunk_frames)
    estimator = _flow_estimator(config.flow)
    sequencer = FlowSequencer(estimator) if estimator is not None else None
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
    if sequencer:
        _add_flow(flow, sequencer.finish(), config.flow_quality)
    return {**rgb.finish(), **flow.finish()}, rgb.count, flow.count, distinct


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


_ESTIMATORS: dict[str, object] = {}


def _flow_estimator(name: str):
    """One estimator per process and method (TV-L1 objects are reusable)."""
    if name not in _ESTIMATORS:
        _ESTIMATORS[name] = make_flow_estimator(name)
    return _ESTIMATORS[name]


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
    if distinct < frames:
        meta["flags"].append("repeated_frames")
        meta["notes"].append(f"{frames - distinct} output frame(s) repeat a source frame; their flow is spread")
    if log.variable_frame_rate():
        meta["flags"].append("variable_frame_rate")
    if frames < 2 * round(config.clip_seconds * config.fps):
        meta["flags"].append("too_short_for_two_clips")
        meta["notes"].append(f"{frames} frames is less than two {config.clip_seconds:g} s clips")
    return meta


def _add_audio(meta: dict, collector: AudioCollector, decoder: VideoDecoder, config: PrepareConfig) -> bytes | None:
    """Fill the audio fields of ``meta``; return the encoded spectrogram or None (policy:
    no audio stream, undecodable or silent audio -> has_audio false, no audio record)."""
    log = decoder.log
    if not decoder.info.has_audio_stream:
        meta["flags"].append("no_audio_stream")
        return None
    if log.audio_errors:
        meta["problems"].append(f"{log.audio_errors} audio packet(s) failed to decode (first: {log.first_audio_error})")
    result = aligned_log_mel(collector, decoder.t0, meta["frames"], config.fps, config.audio)
    meta["notes"].extend(result.notes)
    if result.silent:
        meta.update(audio_silent=True)
        meta["flags"].append("silent_audio")
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
    tasks: list, job: Callable, config, workers: int, timeout: float | None = None
) -> Iterator[tuple[object, object, str | None]]:
    """Run ``job(task, config)`` for every task; yields (task, result, crash reason).

    ``workers == 0`` runs in this process. Otherwise each worker process handles one task at a
    time, so a worker that dies (segfault, out of memory) or runs past ``timeout`` seconds is
    replaced and only its own task is reported, with result None and the crash reason.
    """
    if workers == 0:
        for task in tasks:
            yield task, job(task, config), None
        return
    ctx = _worker_context()
    queue = deque(tasks)
    pool = [_Worker(ctx, job, config) for _ in range(min(workers, len(tasks)))]
    try:
        while queue or any(w.task is not None for w in pool):
            for worker in pool:
                if worker.ready and worker.task is None and queue:
                    worker.assign(queue.popleft())
            wait([w.conn for w in pool] + [w.process.sentinel for w in pool], timeout=1.0)
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
                       help="optical flow method (default: tvl1 when OpenCV contrib is installed)")
    video.add_argument("--rgb-quality", type=int, default=90, help="JPEG quality of RGB frames")
    video.add_argument("--flow-quality", type=int, default=90, help="JPEG quality of flow frames")
    video.add_argument("--chunk-frames", type=int, default=schema.DEFAULT_CHUNK_FRAMES,
                       help="frames per stored chunk (a clip reads only its chunks)")
    video.add_argument("--clip-seconds", type=float, default=1.0,
                       help="training clip length, to flag videos too short for two clips")
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


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def run(args: argparse.Namespace) -> int:
    """Prepare (or resume preparing) one part of a dataset; 0 on completion, 2 on bad usage."""
    try:
        part_dir = _part_dir(args)
        config = PrepareConfig.from_args(args)
        inputs = _collect_inputs(args)
    except (ValueError, FileNotFoundError, NotADirectoryError) as exc:
        print(f"tricoclr-data prepare: error: {exc}", file=sys.stderr)
        return 2
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
        _process_all(todo, config, writer, args, already=len(mine) - len(todo))
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


def _process_all(todo: list, config: PrepareConfig, writer: PartWriter, args, already: int) -> None:
    counts = {"ok": 0, "partial": 0, "failed": 0}
    bar = tqdm(total=len(todo) + already, initial=already, unit="video", disable=not args.progress, dynamic_ncols=True)
    with bar:
        for video, result, crash in run_tasks(todo, process_video, config, args.workers, args.video_timeout or None):
            entry, parts = result if crash is None else (_failed(video, crash), None)
            writer.add(entry, parts)
            counts[entry["status"]] += 1
            bar.set_postfix(counts, refresh=False)
            bar.update()


def _finish(part_dir: Path, inputs: lists.InputList, args) -> None:
    """Print and save the part's summary (all its videos, from every run)."""
    stats = statistics_from_entries(read_manifest(part_dir / schema.MANIFEST_FILE))
    stats["ignored_files"] = {"count": len(inputs.ignored), "examples": inputs.ignored[:20]}
    stats["duplicate_list_entries"] = {"count": len(inputs.duplicates), "examples": inputs.duplicates[:20]}
    write_json_atomic(part_dir / schema.SUMMARY_FILE, stats)
    print(format_statistics(stats, title=f"prepared {part_dir}"))
    if inputs.ignored:
        print(f"ignored {len(inputs.ignored)} file(s) that are hidden or lack a video extension "
              f"(e.g. {', '.join(inputs.ignored[:3])}); see --extensions")
    if inputs.duplicates:
        print(f"{len(inputs.duplicates)} duplicate list entries were prepared once")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tricoclr-data prepare", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
