"""``tricoclr-data prepare``: decode every video once and stream it into shards or an LMDB.

    inputs (lists.collect_inputs)                      main process
      -> this part's share, minus videos already in the manifest (resume)
      -> worker processes (pool.run_tasks):            one video per worker at a time
         encode_video.process_video()                  decode.VideoDecoder -> resampled RGB
                                                       flow.FlowSequencer   -> flow fields
                                                       audio.aligned_log_mel -> spectrogram
                                                       -> encoded sample (JPEG chunks, .npy)
      -> main process: flow_batching.CrossVideoFlow    batched flow methods only (tvl1-torch):
                                                       pairs of many videos per device call
      -> main process: writers.PartWriter              the single writer: store + manifest
      -> summary (printed, and summary.json)

Every input ends as exactly one manifest line: ``ok``, ``partial`` (kept, with the reason) or
``failed`` (with the reason). A worker that crashes (a decoder segfault) or exceeds
``--video-timeout`` is replaced and only its video is recorded as failed.

This module holds the command line and the run; per-video encoding is in data_tools/encode_video.py,
the cross-video device flow in data_tools/flow_batching.py, the worker pool in data_tools/pool.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from data_tools import lists
from data_tools.encode_video import (
    TVL1_OPTIONS,
    PrepareConfig,
    failed_video_entry,
    process_video,
)
from data_tools.flow import (
    TVL1_METHODS,
    FlowOptions,
    available_flow_methods,
    default_flow_method,
    is_batched_flow_method,
    make_pair_flow_estimator,
)
from data_tools.flow_batching import CrossVideoFlow
from data_tools.inspect_data import format_statistics, statistics_from_entries
from data_tools.pool import run_tasks
from data_tools.writers import PartWriter
from tricoclr.data import schema
from tricoclr.data.store import read_manifest
from tricoclr.distributed import usable_cpus
from tricoclr.durable import write_json_atomic

# Arguments that do not change what is stored: a resumed run may use other values. The flow
# device and batch do not either: each pair's TV-L1 flow is independent of its batch.
FREE_ARGS = frozenset(
    {
        "workers",
        "progress",
        "video_timeout",
        "shard_size_mb",
        "shard_max_videos",
        "decode_threads",
        "flow_device",
        "flow_batch",
        "flow_pool_pairs",
        "flow_compile",
    }
)
# Scan warnings printed before the run; the summary keeps every one.
SHOWN_WARNINGS = 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``tricoclr-data prepare``."""
    parser.add_argument(
        "source", metavar="SOURCE", help="folder of videos, read recursively (class subfolders = labels)"
    )
    parser.add_argument("--out", required=True, help="output folder (a dataset, or its part folders)")
    parser.add_argument(
        "--format",
        choices=["webdataset", "lmdb"],
        default="webdataset",
        help="webdataset tar shards (sequential streaming) or LMDB (random access)",
    )
    _add_input_arguments(parser.add_argument_group("inputs and labels"))
    _add_video_arguments(parser.add_argument_group("video"))
    _add_flow_arguments(parser)
    _add_audio_and_run_arguments(parser)


def _add_input_arguments(inputs) -> None:
    inputs.add_argument(
        "--list",
        action="append",
        metavar="FILE",
        help="restrict to and label from a list: UCF101 split file, HMDB51 split files "
        "(a folder or glob), Kinetics CSV; repeatable",
    )
    inputs.add_argument("--list-format", choices=lists.LIST_FORMATS, help="default: guessed from the list's name")
    inputs.add_argument(
        "--list-subset",
        choices=sorted(lists.HMDB_SUBSET_CODES),
        default="all",
        help="HMDB51: which videos of the split (default: train and test)",
    )
    inputs.add_argument("--list-split", type=int, default=1, help="HMDB51: split number when --list is a folder")
    inputs.add_argument(
        "--class-index",
        metavar="FILE",
        help="classInd.txt fixing label indices (default: one beside the list, else sorted names)",
    )
    inputs.add_argument(
        "--extensions",
        default=None,
        help="comma-separated file extensions to read in a folder scan, or 'all' (default: common video extensions)",
    )


def _add_video_arguments(video) -> None:
    video.add_argument("--fps", type=float, default=30.0, help="output frame rate (default 30)")
    video.add_argument("--size", type=int, default=128, help="shorter side in pixels (default 128)")
    video.add_argument(
        "--resize",
        choices=["short", "square"],
        default="short",
        help="short: keep aspect; square: squash to size x size as the paper",
    )
    video.add_argument(
        "--flow",
        choices=available_flow_methods(),
        default=default_flow_method(),
        help="optical flow method (default: tvl1 when OpenCV contrib is installed); "
        "tvl1-torch: the same TV-L1 in PyTorch, batched across videos on --flow-device",
    )
    video.add_argument("--rgb-quality", type=int, default=90, help="JPEG quality of RGB frames")
    video.add_argument("--flow-quality", type=int, default=90, help="JPEG quality of flow frames")
    video.add_argument(
        "--chunk-frames",
        type=int,
        default=schema.DEFAULT_CHUNK_FRAMES,
        help="frames per stored chunk (a clip reads only its chunks)",
    )
    video.add_argument(
        "--clip-seconds", type=float, default=1.0, help="training clip length, to flag videos too short for two clips"
    )


def _add_flow_arguments(parser: argparse.ArgumentParser) -> None:
    flow = parser.add_argument_group(
        "flow on a device (--flow tvl1-torch)",
        "workers decode; the main process batches pairs of frames from many videos through the device",
    )
    flow.add_argument("--flow-device", help="torch device for the flow (default: cuda when available, else cpu)")
    flow.add_argument(
        "--flow-batch",
        type=int,
        help=f"pairs per device call, from many videos (default: {FLOW_BATCH_DEFAULTS['cuda']} on "
        f"cuda, {FLOW_BATCH_DEFAULTS['cpu']} on cpu); lower it if the device runs out of memory",
    )
    flow.add_argument(
        "--flow-pool-pairs",
        type=int,
        help="pause decoding new videos while this many pairs await their flow (bounds memory; "
        f"default: {FLOW_POOL_BATCHES} batches)",
    )
    flow.add_argument(
        "--no-flow-compile",
        dest="flow_compile",
        action="store_false",
        default=None,
        help="run TV-L1 eagerly (default: torch.compile on cuda, ~8x faster after a ~1.5 min compile)",
    )
    tvl1 = parser.add_argument_group(
        "TV-L1 parameters (--flow tvl1 and tvl1-torch; default: OpenCV's, as CoCLR)",
        "changing them changes the flow; they are recorded in each video's meta (flow_params)",
    )
    tvl1.add_argument("--tvl1-scales", type=int, help="pyramid levels (OpenCV: 5)")
    tvl1.add_argument("--tvl1-warps", type=int, help="warps per level (OpenCV: 5)")
    tvl1.add_argument("--tvl1-inner-iterations", type=int, help="iterations between median filters (OpenCV: 30)")
    tvl1.add_argument("--tvl1-outer-iterations", type=int, help="median filter rounds per warp (OpenCV: 10)")
    tvl1.add_argument("--tvl1-epsilon", type=float, help="stopping threshold (OpenCV: 0.01)")


def _add_audio_and_run_arguments(parser: argparse.ArgumentParser) -> None:
    audio = parser.add_argument_group("audio")
    audio.add_argument("--no-audio", action="store_true", help="do not extract audio")
    audio.add_argument("--audio-rate", type=int, default=schema.AUDIO_SAMPLE_RATE, help="resample to this rate (Hz)")
    audio.add_argument("--n-mels", type=int, default=schema.AUDIO_N_MELS)
    audio.add_argument("--n-fft", type=int, default=schema.AUDIO_N_FFT)
    run = parser.add_argument_group("running")
    run.add_argument(
        "--workers", type=int, default=usable_cpus(), help="worker processes (default: all CPUs; 0 = in this process)"
    )
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
    device_options = [
        name
        for name in ("flow_device", "flow_batch", "flow_pool_pairs", "flow_compile")
        if getattr(args, name) is not None
    ]
    tvl1_options = [name for name in TVL1_OPTIONS if getattr(args, name) is not None]
    if tvl1_options and args.flow not in TVL1_METHODS:
        raise ValueError(
            f"--{tvl1_options[0].replace('_', '-')} needs a TV-L1 --flow ({', '.join(sorted(TVL1_METHODS))})"
        )
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
        print(
            f"tricoclr-data prepare: warning: and {len(inputs.warnings) - SHOWN_WARNINGS} more skipped paths "
            f"(all in {schema.SUMMARY_FILE}'s scan_warnings)",
            file=sys.stderr,
        )
    try:
        _check_or_record_args(part_dir, args)
        writer = PartWriter(part_dir, args.format, int(args.shard_size_mb * (1 << 20)), args.shard_max_videos)
    except (ValueError, RuntimeError) as exc:
        print(f"tricoclr-data prepare: error: {exc}", file=sys.stderr)
        return 2
    write_json_atomic(part_dir / schema.CLASSES_FILE, {"names": inputs.class_names, "from": inputs.class_names_from})

    mine = [
        v for v in inputs.videos if args.num_shards is None or lists.part_of(v.id, args.num_shards) == args.shard_index
    ]
    todo = sorted((v for v in mine if v.id not in writer.done), key=lambda v: lists.processing_order(v.id))
    try:
        _process_all(todo, config, writer, args, already=len(mine) - len(todo), flow_device=flow_device)
    finally:
        writer.close()
    return _finish(part_dir, inputs, args, mine)


def _collect_inputs(args) -> lists.InputList:
    extensions = lists.VIDEO_EXTENSIONS
    if args.extensions:
        extensions = (
            None
            if args.extensions == "all"
            else frozenset("." + e.strip().lstrip(".").lower() for e in args.extensions.split(",") if e.strip())
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


def _process_all(
    todo: list,
    config: PrepareConfig,
    writer: PartWriter,
    args,
    already: int,
    flow_device: tuple[str, int, int] | None = None,
) -> None:
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
                todo,
                process_video,
                config,
                args.workers,
                args.video_timeout or None,
                hold=flow.full if flow else None,
                tick=flow.service if flow else None,
            ):
                entry, parts, pending = result if crash is None else (failed_video_entry(video, crash), None, None)
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


def _finish(part_dir: Path, inputs: lists.InputList, args, mine: list) -> int:
    """Print and save the part's summary (all its videos, from every run); the exit status: 1 when
    this part had videos to prepare and none was kept (a script must not go on to train on an
    empty store), else 0."""
    stats = statistics_from_entries(read_manifest(part_dir / schema.MANIFEST_FILE))
    stats["ignored_files"] = {"count": len(inputs.ignored), "examples": inputs.ignored[:20]}
    stats["scan_warnings"] = inputs.warnings  # link loops, broken links, unreadable folders: each named
    stats["duplicate_list_entries"] = {"count": len(inputs.duplicates), "examples": inputs.duplicates[:20]}
    write_json_atomic(part_dir / schema.SUMMARY_FILE, stats)
    print(format_statistics(stats, title=f"prepared {part_dir}"))
    if inputs.ignored:
        print(
            f"ignored {len(inputs.ignored)} file(s) that are hidden, lack a video extension or are link loops "
            f"or broken links (e.g. {', '.join(inputs.ignored[:3])}); see --extensions and the warnings above"
        )
    if inputs.duplicates:
        print(f"{len(inputs.duplicates)} duplicate list entries were prepared once")
    if stats["videos"] == 0 and (stats.get("failed") or mine):
        print(
            "tricoclr-data prepare: error: no video was kept; if the reasons say 'not found', SOURCE may not "
            "be the folder the list's paths are relative to (failed videos count as done: prepare them again "
            "into another --out)",
            file=sys.stderr,
        )
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tricoclr-data prepare", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
