"""Loader throughput: the worker side of the training data pipeline, against a naive loader.

One sample = 2 clips x (RGB + flow + audio) of a video, 30 frames x 128^2 by default: decode of
the sampled frames only and the geometric augmentation (crop, flip, time slice, warp), through
``EpochLoader`` with N workers. The naive loader, like CoCLR's, reads and decodes every RGB and
flow frame of the whole video for each sample (from the same store), then cuts the same two
clips and applies the same augmentation, through a DataLoader with the same workers. Both are
also timed in one process in CPU time (steadier on a shared machine).
``device_aug_samples_per_s`` times the batched photometric part (``transforms.apply_photometric``
on both RGB views) on the device this runs on.

    python benchmarks/loader.py --make-data /tmp/loader_data            # synth + prepare, 10 s videos
    python benchmarks/loader.py --data /tmp/loader_data --store lmdb --workers 2 --seconds 20 --json out.json

``--data DIR`` is a prepared store, or a folder holding ``prepared-lmdb/`` and
``prepared-webdataset/`` (what ``--make-data`` writes).
"""

from __future__ import annotations

import argparse
import copy
import gc
import itertools
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tricoclr.config import DEFAULTS  # noqa: E402
from tricoclr.data import modalities as registry  # noqa: E402
from tricoclr.data import transforms  # noqa: E402
from tricoclr.data.dataset import EpochLoader  # noqa: E402
from tricoclr.data.samples import StageViews, build_sample  # noqa: E402
from tricoclr.data.sampling import clip_spec_of, sample_clip_starts, sample_generator, spectrogram_span  # noqa: E402
from tricoclr.data.store import VideoStore, iter_shard_samples, open_store, record_from_sample  # noqa: E402

ALL_VIEWS = StageViews(both_views=("rgb", "flow", "audio"))
STORES = ("lmdb", "webdataset")


# ---- data -----------------------------------------------------------------------------------------


def make_data(out: Path, videos_per_class: int, seconds: float, size: int) -> None:
    """Synthesize 4 classes of ``seconds``-long videos and prepare them into both stores."""
    from data_tools.cli import main as data_cli

    synth = out / "synth"
    steps = [
        [
            "synth",
            "--out",
            synth,
            "--classes",
            4,
            "--videos-per-class",
            videos_per_class,
            "--seconds",
            seconds,
            "--size",
            size,
        ]
    ]
    for store in STORES:
        steps.append(
            [
                "prepare",
                synth / "videos",
                "--out",
                out / f"prepared-{store}",
                "--format",
                store,
                "--flow",
                "farneback",
                "--size",
                size,
                "--shard-max-videos",
                max(1, videos_per_class),
                "--no-progress",
            ]
        )
    for argv in steps:
        if data_cli([str(a) for a in argv]) != 0:
            raise SystemExit(f"failed: tricoclr-data {' '.join(map(str, argv))}")


def find_store(data: Path, store: str) -> Path:
    return data / f"prepared-{store}" if (data / f"prepared-{store}").is_dir() else data


def data_config(workers: int, frames: int, size: int) -> dict:
    cfg = copy.deepcopy(DEFAULTS["data"])
    cfg.update(
        workers=workers,
        clip_frames=frames,
        clip_stride=1,
        size=size,
        spectrogram_steps=128,
        shuffle_buffer=16,
        pin_memory=False,
    )
    return cfg


# ---- timing ---------------------------------------------------------------------------------------


def children_cpu_seconds() -> float:
    """User + system CPU seconds of this process's live child processes (the loader workers),
    from /proc (Linux); 0 where /proc is missing."""
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    total = 0
    for children in Path(f"/proc/{os.getpid()}/task").glob("*/children"):
        for pid in children.read_text().split():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # exited meanwhile
                continue
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / ticks


def time_batches(batches, seconds: float) -> dict:
    """Samples per second of an endless batch iterator, after the first batch (worker start-up),
    and the CPU milliseconds per sample spent meanwhile by the workers and by this process (on a
    shared machine the steadier numbers: what dedicated cores would need)."""
    next(batches)
    samples, started = 0, time.perf_counter()
    workers_cpu, main_cpu = children_cpu_seconds(), time.process_time()
    while time.perf_counter() - started < seconds:
        samples += len(next(batches)["video_index"])
    elapsed = time.perf_counter() - started
    return {
        "samples_per_s": samples / elapsed,
        "worker_cpu_ms_per_sample": 1000.0 * (children_cpu_seconds() - workers_cpu) / samples,
        "main_cpu_ms_per_sample": 1000.0 * (time.process_time() - main_cpu) / samples,
    }


def pipeline_batches(path: Path, cfg: dict, batch_size: int):
    """Endless batches of the real pipeline: EpochLoader, epoch after epoch."""
    loader = EpochLoader(str(path), ALL_VIEWS, cfg, seed=0, batch_size=batch_size)
    for epoch in itertools.count():
        loader.set_epoch(epoch)
        yield from loader


def naive_batches(path: Path, cfg: dict, batch_size: int):
    """Endless batches of the naive loader, with the same DataLoader settings and workers."""
    workers = cfg["workers"]
    yield from DataLoader(
        NaiveSamples(path, cfg),
        batch_size=batch_size,
        num_workers=workers,
        prefetch_factor=cfg["prefetch_factor"] if workers else None,
    )


def measure_in_process(path: Path, make_sample, seconds: float) -> float:
    """CPU milliseconds per sample of ``make_sample(record, video_index)`` in this process:
    on a shared machine the steadier number (what one dedicated core would do)."""
    records = whole_video_records(open_store(path))
    make_sample(*next(records))  # warm-up: first open, allocator
    samples, started, cpu_started = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - started < seconds:
        make_sample(*next(records))
        samples += 1
    return 1000.0 * (time.process_time() - cpu_started) / samples


# ---- the naive loader -----------------------------------------------------------------------------


def whole_video_records(store: VideoStore, worker: int = 0, workers: int = 1):
    """(record, video index) in an endless loop, this worker's share: every workers-th video
    (LMDB, random access) or every workers-th shard (WebDataset), over and over."""
    if store.format == "lmdb":
        metas = store.videos()
        for index in itertools.count(worker, workers):
            yield store.record(metas[index % len(metas)]["id"]), index % len(metas)
    else:
        index_of = {meta["id"]: i for i, meta in enumerate(store.videos())}
        while True:
            for raw in iter_shard_samples(store.shard_paths()[worker::workers]):
                yield record_from_sample(raw), index_of[raw["__key__"]]


def naive_sample(record, video_index: int, cfg: dict) -> dict:
    """CoCLR-style: decode every RGB and flow frame and the whole spectrogram, then slice two
    clips and apply the same worker-side augmentation as the real pipeline."""
    meta, spec = record.meta, clip_spec_of(cfg)
    video = {
        name: record.frames(name, 0, meta[f"{name}_frames" if name == "flow" else "frames"]) for name in ("rgb", "flow")
    }
    spectrogram = record.spectrogram()
    starts = sample_clip_starts(int(meta["frames"]), spec, sample_generator(0, 0, video_index, 0, "clips"))
    sample = {"video_index": torch.tensor(video_index)}
    for view, start in zip((1, 2), starts):
        for name in ("rgb", "flow"):
            raw = video[name][start : start + spec.span : spec.stride]
            augmented = registry.get(name).augment(raw, sample_generator(0, 0, video_index, view, name), cfg)
            if isinstance(augmented, tuple):  # clip + its device-side parameters (flow)
                sample[f"{name}.view{view}"], sample[f"{name}.view{view}.params"] = augmented
            else:
                sample[f"{name}.view{view}"] = augmented
        first, steps = spectrogram_span(start, spec, float(meta["fps"]))
        sample[f"audio.view{view}"] = registry.get("audio").augment(
            spectrogram[:, first : first + steps], sample_generator(0, 0, video_index, view, "audio"), cfg
        )
    return sample


class NaiveSamples(IterableDataset):
    """The naive loader as an endless dataset, the store split over the DataLoader's workers."""

    def __init__(self, path: Path, cfg: dict):
        self.path, self.cfg = path, cfg

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for record, video_index in whole_video_records(open_store(self.path), worker, workers):
            yield naive_sample(record, video_index, self.cfg)


# ---- the device side ------------------------------------------------------------------------------


def measure_device_aug(device: torch.device, batch_size: int, frames: int, size: int, seconds: float) -> float:
    """Samples per second of the batched photometric part: both RGB views of each sample."""
    clips = torch.randint(0, 256, (batch_size, 3, frames, size, size), dtype=torch.uint8, device=device)
    params = [
        transforms.sample_photometric_params(sample_generator(0, 0, i, 1, "rgb/device")) for i in range(batch_size)
    ]
    batched = {key: torch.stack([p[key] for p in params]) for key in params[0]}

    def step():
        transforms.apply_photometric(clips, batched)
        if device.type == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up
    views, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        step()
        views += batch_size
    return views / 2 / (time.perf_counter() - started)  # two RGB views per sample


# ---- main -----------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run(args) -> dict:
    path = find_store(Path(args.data), args.store)
    store = open_store(path)
    if store.format != args.store:
        raise SystemExit(f"{path} is a {store.format} store, not {args.store}")
    metas = store.videos()
    cfg = data_config(args.workers, args.clip_frames, args.size)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    torch.set_num_threads(1)  # one core per worker, like the DataLoader's workers
    baseline_seconds = args.seconds if args.baseline_seconds is None else args.baseline_seconds
    pipeline = time_batches(pipeline_batches(path, cfg, args.batch_size), args.seconds)
    per_s = pipeline["samples_per_s"]
    gc.collect()  # stop each loader's workers before the next measurement
    baseline = 0.0
    if baseline_seconds > 0:
        baseline = time_batches(naive_batches(path, cfg, args.batch_size), baseline_seconds)["samples_per_s"]
        gc.collect()
    naive_cpu_ms = None
    if baseline_seconds > 0:
        naive_cpu_ms = measure_in_process(path, lambda record, i: naive_sample(record, i, cfg), baseline_seconds)
    cpu_ms = measure_in_process(path, lambda record, i: build_sample(record, i, 0, 0, ALL_VIEWS, cfg), args.seconds)
    torch.set_num_threads(os.cpu_count() or 1)  # the device side gets the whole machine
    device_aug = None
    if args.device_seconds > 0:
        device_aug = measure_device_aug(device, args.batch_size, args.clip_frames, args.size, args.device_seconds)

    workers = max(1, args.workers)  # 0 workers: the main process is the one worker
    return {
        "store": args.store,
        "workers": args.workers,
        "samples_per_s": per_s,
        "samples_per_s_per_worker": per_s / workers,
        "mean_ms_per_sample": 1000.0 * workers / per_s,  # worker time per sample
        # CPU time of the loader's workers and of the main process during the timed window:
        # what one dedicated core per worker would deliver, whatever else the machine runs.
        "worker_cpu_ms_per_sample": pipeline["worker_cpu_ms_per_sample"] if args.workers else None,
        "worker_cpu_samples_per_s": (
            1000.0 / pipeline["worker_cpu_ms_per_sample"]
            if args.workers and pipeline["worker_cpu_ms_per_sample"] > 0
            else None
        ),
        "main_cpu_ms_per_sample": pipeline["main_cpu_ms_per_sample"],
        "baseline_samples_per_s_per_worker": baseline / workers,
        "speedup_per_worker": per_s / baseline if baseline else None,
        # In one process, CPU time: what one dedicated core does, whatever else the machine runs.
        "cpu_ms_per_sample": cpu_ms,
        "baseline_cpu_ms_per_sample": naive_cpu_ms,
        "cpu_speedup": naive_cpu_ms / cpu_ms if naive_cpu_ms else None,
        "device_aug_samples_per_s": device_aug,
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "clip_frames": args.clip_frames,
        "size": args.size,
        "batch_size": args.batch_size,
        "videos": len(metas),
        "video_seconds": sum(m["seconds"] for m in metas) / len(metas),
        "measured_s": {"loader": args.seconds, "baseline": baseline_seconds},
        "machine": {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "load_average_1m": os.getloadavg()[0],
            "torch": torch.__version__,
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", help="a prepared store, or a folder with prepared-lmdb/ and prepared-webdataset/")
    parser.add_argument("--make-data", metavar="DIR", help="synthesize and prepare the benchmark data into DIR")
    parser.add_argument("--videos-per-class", type=int, default=5, help="--make-data: 4 classes of these")
    parser.add_argument("--video-seconds", type=float, default=10.0, help="--make-data: length of each video")
    parser.add_argument("--store", choices=STORES, default="lmdb")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=20.0, help="how long to time the loader")
    parser.add_argument(
        "--baseline-seconds", type=float, help="how long to time the naive loader (default --seconds; 0: skip it)"
    )
    parser.add_argument(
        "--device-seconds", type=float, default=5.0, help="how long to time the device side (0: skip it)"
    )
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--clip-frames", type=int, default=30)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--device", help="for the photometric part (default: cuda if available)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.make_data:
        make_data(Path(args.make_data), args.videos_per_class, args.video_seconds, args.size)
        args.data = args.data or args.make_data
        if not args.json:
            return 0
    if not args.data:
        parser.error("--data (or --make-data) is required")
    result = run(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
