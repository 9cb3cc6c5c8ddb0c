"""Training datasets: one video -> two clips x the stage's modalities, augmented on the workers.

Two stores, one sample:
- ``LmdbPairDataset`` (map-style) with ``GlobalBatchSampler``: random access; the order of an
  epoch depends on (seed, epoch) only and rank r takes the r-th contiguous slice of every global
  batch, so a 2-rank run sees exactly the batches of a 1-rank run with the same global batch.
- ``WebDatasetPairStream`` (iterable): shards split across ranks x workers (or, when there are
  fewer shards than slots, samples split by index), a seeded shuffle buffer, and the same number
  of batches on every rank (computed up front from the manifests; the remainder is dropped and
  logged) so no rank waits forever at the end of an epoch.

Every random choice is drawn from ``sample_generator(seed, epoch, video_index, view, stream)``:
never from the rank, the worker or the batch size. A record that fails to decode is replaced by
the next usable video (LMDB) or skipped (WebDataset), with a warning and a counter; never a crash.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, get_worker_info

from tricoclr import modalities as registry
from tricoclr.data.sampling import ClipSpec, VideoTooShort, sample_clip_starts, sample_generator, video_too_short
from tricoclr.data.store import VideoStore, open_store, record_from_sample

log = logging.getLogger(__name__)

CLIP_STREAM = "clips"


@dataclass(frozen=True)
class StageViews:
    """Which modalities a stage reads, and which views of each.

    The trained modality needs both views (query and key); a frozen sampler only view 2 (the
    oracle looks at the key's clip), so its view 1 is never decoded.
    """

    both_views: tuple[str, ...]
    view2_only: tuple[str, ...] = ()

    @property
    def all(self) -> tuple[str, ...]:
        return self.both_views + self.view2_only

    def views_of(self, name: str) -> tuple[int, ...]:
        return (1, 2) if name in self.both_views else (2,)


def clip_spec(data_cfg: dict) -> ClipSpec:
    return ClipSpec(
        frames=data_cfg["clip_frames"],
        stride=data_cfg["clip_stride"],
        min_gap_frames=data_cfg["min_gap_frames"],
        short_policy=data_cfg["short_policy"],
    )


def usable_videos(metas: list[dict], views: StageViews, data_cfg: dict) -> list[int]:
    """Indices (into the sorted video list) of videos this stage can use.

    Policy (documented in docs/schema.md): videos whose record lacks a needed modality (no audible
    audio) are left out of stages that use it; with ``short_policy: skip`` so are videos too short
    for two clips. The choice depends on the metadata only, so every rank agrees.
    """
    spec = clip_spec(data_cfg)
    keep = []
    for index, meta in enumerate(metas):
        if not all(registry.get(name).available(meta) for name in views.all):
            continue
        if spec.short_policy == "skip" and video_too_short(int(meta["frames"]), spec):
            continue
        keep.append(index)
    return keep


def build_sample(record, video_index: int, epoch: int, seed: int, views: StageViews, data_cfg: dict) -> dict:
    """One training sample: for each modality and view, the worker-side augmented clip."""
    meta = record.meta
    spec = clip_spec(data_cfg)
    num_frames = int(meta["frames"])
    starts = sample_clip_starts(num_frames, spec, sample_generator(seed, epoch, video_index, 0, CLIP_STREAM))
    label = meta.get("label_index")
    sample = {
        "video_index": torch.tensor(video_index, dtype=torch.long),
        "label": torch.tensor(-1 if label is None else int(label), dtype=torch.long),
    }
    for name in views.all:
        modality = registry.get(name)
        for view in views.views_of(name):
            clip = registry.ClipRequest(starts[view - 1], spec, float(meta["fps"]), num_frames)
            raw = modality.read(record, clip, data_cfg)
            sample[f"{name}.view{view}"] = modality.augment(raw, sample_generator(seed, epoch, video_index, view, name), data_cfg)
            if modality.sample_device_params is not None:
                device_generator = sample_generator(seed, epoch, video_index, view, f"{name}/device")
                sample[f"{name}.view{view}.params"] = modality.sample_device_params(device_generator)
    return sample


def finish_batch(batch: dict, views: StageViews, device: torch.device | str) -> dict:
    """Move a collated batch to the device and run each modality's device-side part there."""
    out = {"video_index": batch["video_index"].to(device), "label": batch["label"].to(device)}
    for name in views.all:
        modality = registry.get(name)
        for view in views.views_of(name):
            key = f"{name}.view{view}"
            tensor = batch[key].to(device, non_blocking=True)
            # Per-clip parameters stay on the CPU: the device-side part reads its per-clip
            # decisions there without waiting on the device.
            out[key] = modality.finish_on_device(tensor, batch.get(f"{key}.params"))
    return out


class DataStats:
    """Per-process counters of records that could not be used (logged by the trainer)."""

    broken_records = 0


# ---- LMDB: random access ------------------------------------------------------------------------


class LmdbPairDataset(Dataset):
    """Map-style dataset over an LMDB store; index = position in the store's sorted video list."""

    def __init__(self, store: VideoStore | str, views: StageViews, data_cfg: dict, seed: int):
        self.store = open_store(store) if not isinstance(store, VideoStore) else store
        if self.store.format != "lmdb":
            raise ValueError(f"{self.store.root} is a {self.store.format} store; LmdbPairDataset needs lmdb")
        self.metas = self.store.videos()
        self.views, self.data_cfg, self.seed = views, data_cfg, seed
        self.indices = usable_videos(self.metas, views, data_cfg)
        if not self.indices:
            raise ValueError(f"no usable videos in {self.store.root} for modalities {views.all}")

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: tuple[int, int]) -> dict:
        # The epoch travels with the index: persistent workers hold their own copy of the dataset,
        # so an attribute set in the main process would never reach them.
        epoch, position = item
        # A broken record is replaced by the next usable one, so batch shapes stay equal on all
        # ranks (a short batch would desynchronise the queue gathers).
        for attempt in range(len(self.indices)):
            video_index = self.indices[(position + attempt) % len(self.indices)]
            try:
                record = self.store.record(self.metas[video_index]["id"])
                return build_sample(record, video_index, epoch, self.seed, self.views, self.data_cfg)
            except (VideoTooShort, KeyError, ValueError, RuntimeError, OSError) as error:
                DataStats.broken_records += 1
                log.warning("skipping broken record %s: %s", self.metas[video_index]["id"], error)
        raise RuntimeError("every record of the store failed to load")


class GlobalBatchSampler(Sampler):
    """Yields this rank's slice of each global batch of a (seed, epoch)-seeded permutation.

    The permutation is cut into global batches of ``batch_size * world_size``; the incomplete
    last one is dropped (every rank gets the same number of batches). ``start_batch`` skips batches
    already consumed, for a resume in the middle of an epoch.
    """

    def __init__(self, num_samples: int, batch_size: int, rank: int, world_size: int, seed: int):
        self.num_samples, self.batch_size = num_samples, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.epoch, self.start_batch = 0, 0
        if self.batches_per_epoch() == 0:
            raise ValueError(
                f"{num_samples} usable videos cannot fill one global batch of "
                f"{batch_size} x {world_size} ranks; lower batch_size"
            )

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def batches_per_epoch(self) -> int:
        return self.num_samples // (self.batch_size * self.world_size)

    def __len__(self) -> int:
        return self.batches_per_epoch() - self.start_batch

    def __iter__(self):
        generator = sample_generator(self.seed, self.epoch, -1, 0, "order")
        order = torch.randperm(self.num_samples, generator=generator).tolist()
        global_batch = self.batch_size * self.world_size
        for b in range(self.start_batch, self.batches_per_epoch()):
            first = b * global_batch + self.rank * self.batch_size
            yield [(self.epoch, position) for position in order[first : first + self.batch_size]]


# ---- WebDataset: sequential streaming ----------------------------------------------------------


def _slot_assignment(num_shards: int, num_slots: int) -> str:
    return "shards" if num_shards >= num_slots else "samples"


class WebDatasetPairStream(IterableDataset):
    """Streams a webdataset store, split over ranks x workers with no duplicates and no gaps.

    Shard order is shuffled per epoch (seeded), shard i goes to slot i % slots, where slot =
    rank * workers + worker. With fewer shards than slots every slot reads every shard and keeps
    the samples whose position is its slot modulo slots: more reading, still each sample once.
    """

    def __init__(self, store: VideoStore | str, views: StageViews, data_cfg: dict, seed: int,
                 batch_size: int, rank: int, world_size: int, num_workers: int):
        self.store = open_store(store) if not isinstance(store, VideoStore) else store
        if self.store.format != "webdataset":
            raise ValueError(f"{self.store.root} is a {self.store.format} store; needs webdataset")
        self.views, self.data_cfg, self.seed = views, data_cfg, seed
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.num_workers = max(1, num_workers)
        metas = self.store.videos()
        self.index_of = {meta["id"]: i for i, meta in enumerate(metas)}
        usable = set(usable_videos(metas, views, data_cfg))
        self.usable_ids = {metas[i]["id"] for i in usable}
        self.shards = self.store.shard_paths()
        if not self.shards:
            raise ValueError(f"no complete shards in {self.store.root}")
        self.shard_of = {meta["id"]: meta.get("shard") for meta in metas}
        self.epoch, self.skip_batches = 0, 0
        self._batches = self._batches_per_epoch()
        if self._batches == 0:
            raise ValueError(
                f"{len(self.usable_ids)} usable videos over {len(self.shards)} shards cannot give every "
                f"rank one batch of {batch_size}; lower batch_size or use fewer ranks/workers"
            )

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.skip_batches = epoch, start_batch

    @property
    def num_slots(self) -> int:
        return self.world_size * self.num_workers

    def _shard_order(self, epoch: int) -> list[str]:
        order = list(self.shards)
        random.Random(f"{self.seed}/{epoch}/shards").shuffle(order)
        return order

    def _slot_counts(self) -> list[int]:
        """Usable samples per slot, from the manifests (the same on every rank)."""
        counts = [0] * self.num_slots
        if _slot_assignment(len(self.shards), self.num_slots) == "shards":
            per_shard: dict[str, int] = {}
            for vid in self.usable_ids:
                name = self.shard_of.get(vid)
                per_shard[name] = per_shard.get(name, 0) + 1
            # The assignment depends on the epoch's shard order; counts are computed per epoch.
            for i, path in enumerate(self._shard_order(self.epoch)):
                counts[i % self.num_slots] += per_shard.get(_shard_name(path), 0)
        else:
            total = len(self.usable_ids)
            counts = [total // self.num_slots + (1 if s < total % self.num_slots else 0) for s in range(self.num_slots)]
        return counts

    def _batches_per_epoch(self) -> int:
        counts = self._slot_counts()
        per_rank = [
            sum(counts[r * self.num_workers + w] // self.batch_size for w in range(self.num_workers))
            for r in range(self.world_size)
        ]
        return min(per_rank)

    def batches_per_epoch(self) -> int:
        return self._batches_per_epoch()

    def __iter__(self):
        import webdataset as wds

        info = get_worker_info()
        worker = info.id if info is not None else 0
        workers = info.num_workers if info is not None else 1
        if workers != self.num_workers:
            raise RuntimeError(f"stream built for {self.num_workers} workers but runs in {workers}")
        slot = self.rank * self.num_workers + worker
        order = self._shard_order(self.epoch)
        by_shards = _slot_assignment(len(order), self.num_slots) == "shards"
        urls = order[slot :: self.num_slots] if by_shards else order
        if not urls:
            return
        stream = wds.WebDataset(
            urls, shardshuffle=False, nodesplitter=None, workersplitter=None,
            empty_check=False, handler=_warn_and_count,
        )
        stream = stream.shuffle(self.data_cfg["shuffle_buffer"], rng=random.Random(f"{self.seed}/{self.epoch}/{slot}"))
        position = -1
        for raw in stream:
            video_id = raw.get("__key__", "").split("/")[-1]
            if video_id not in self.usable_ids:
                continue
            position += 1
            if not by_shards and position % self.num_slots != slot:
                continue
            try:
                record = record_from_sample(raw)
                yield build_sample(record, self.index_of[video_id], self.epoch, self.seed, self.views, self.data_cfg)
            except (VideoTooShort, KeyError, ValueError, RuntimeError, OSError) as error:
                DataStats.broken_records += 1
                log.warning("skipping broken record %s: %s", video_id, error)


def _shard_name(path: str) -> str:
    from pathlib import Path

    return Path(path).name


def _warn_and_count(exn: Exception) -> bool:
    DataStats.broken_records += 1
    log.warning("skipping unreadable webdataset member: %s", exn)
    return True


class _BatchLimiter:
    """Wraps a webdataset DataLoader: stops every rank after the same number of batches."""

    def __init__(self, loader: DataLoader, stream: WebDatasetPairStream):
        self.loader, self.stream = loader, stream

    def __len__(self) -> int:
        return self.stream.batches_per_epoch() - self.stream.skip_batches

    def __iter__(self):
        total = self.stream.batches_per_epoch()
        skip = self.stream.skip_batches
        produced = 0
        for batch in self.loader:
            if produced >= total:
                break
            produced += 1
            if produced <= skip:
                continue  # a resume replays the epoch's stream and skips what was consumed
            yield batch
        if produced < total:
            raise RuntimeError(f"webdataset stream ended after {produced} of {total} batches")
        dropped = sum(self.stream._slot_counts()[self.stream.rank * self.stream.num_workers + w]
                      for w in range(self.stream.num_workers)) - total * self.stream.batch_size
        if dropped:
            log.info("epoch %d: %d samples on rank %d dropped to keep ranks in step", self.stream.epoch, dropped, self.stream.rank)


class EpochLoader:
    """One object per stage: ``set_epoch(e, start_batch)``, ``len()``, iteration of collated batches."""

    def __init__(self, store_path: str, views: StageViews, data_cfg: dict, seed: int, batch_size: int,
                 rank: int = 0, world_size: int = 1):
        store = open_store(store_path)
        workers = int(data_cfg["workers"])
        common = dict(
            num_workers=workers,
            pin_memory=bool(data_cfg["pin_memory"]) and torch.cuda.is_available(),
            persistent_workers=workers > 0,
            prefetch_factor=data_cfg["prefetch_factor"] if workers > 0 else None,
        )
        self.format = store.format
        if store.format == "lmdb":
            self.dataset = LmdbPairDataset(store, views, data_cfg, seed)
            self.sampler = GlobalBatchSampler(len(self.dataset), batch_size, rank, world_size, seed)
            self.loader = DataLoader(self.dataset, batch_sampler=self.sampler, **common)
            self._iterable = self.loader
        else:
            self.dataset = WebDatasetPairStream(store, views, data_cfg, seed, batch_size, rank, world_size, workers)
            # Persistent workers would keep the previous epoch's stream; rebuild each epoch instead.
            common["persistent_workers"] = False
            self.loader = DataLoader(self.dataset, batch_size=batch_size, **common)
            self._iterable = _BatchLimiter(self.loader, self.dataset)
        self.num_videos = len(self.dataset) if store.format == "lmdb" else len(self.dataset.usable_ids)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        if self.format == "lmdb":
            self.sampler.set_epoch(epoch, start_batch)
        else:
            self.dataset.set_epoch(epoch, start_batch)

    def batches_per_epoch(self) -> int:
        return self.sampler.batches_per_epoch() if self.format == "lmdb" else self.dataset.batches_per_epoch()

    def __len__(self) -> int:
        return len(self._iterable)

    def __iter__(self):
        return iter(self._iterable)


def steps_per_epoch(batches_per_epoch: int, grad_accum_steps: int) -> int:
    return max(1, math.floor(batches_per_epoch / grad_accum_steps))
