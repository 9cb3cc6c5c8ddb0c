"""Training datasets: one video -> two clips x the stage's modalities, augmented on the workers.

Two stores, one sample:
- ``LmdbPairDataset`` (map-style) with ``GlobalBatchSampler``: random access; the order of an
  epoch depends on (seed, epoch) only and rank r takes the r-th contiguous slice of every global
  batch, so a 2-rank run sees exactly the batches of a 1-rank run with the same global batch.
- ``WebDatasetPairStream`` (iterable): shards split across ranks x workers ("slots"; with fewer
  shards than slots, samples split by position), a seeded shuffle buffer, and a fixed number of
  batches per worker, computed up front from the manifests, so every rank yields the same number
  of batches in every epoch (the remainder is dropped and logged) and no rank waits forever.

Every random choice is drawn from ``sample_generator(seed, epoch, video_index, view, stream)``:
never from the rank, the worker or the batch size. A record that fails to decode is replaced by
the next usable video (LMDB) or skipped (WebDataset), with a warning; the workers report the
count with the next sample (``BROKEN_KEY``) and ``EpochLoader`` adds it to ``DataStats``.
"""

from __future__ import annotations

import heapq
import logging
import math
import multiprocessing
import random
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, get_worker_info

from tricoclr.data import modalities as registry
from tricoclr.data import schema
from tricoclr.data.sampling import ClipSpec, sample_clip_starts, sample_generator, video_too_short
from tricoclr.data.store import VideoStore, open_store, record_from_sample

log = logging.getLogger(__name__)

CLIP_STREAM = "clips"
# Per sample: records skipped (broken) in that worker since its previous sample.
BROKEN_KEY = "broken_records"
# LMDB: a bad record is replaced by the next one; this many failures in a row means the store
# (or the code) is broken, not a record.
MAX_CONSECUTIVE_FAILURES = 16


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
    """One training sample: for each modality and view, the worker-side augmented clip.

    Reads only the stage's modalities and views, and of those only the chunks the clips touch.
    """
    meta = record.meta
    spec = clip_spec(data_cfg)
    num_frames = int(meta["frames"])
    starts = sample_clip_starts(num_frames, spec, sample_generator(seed, epoch, video_index, 0, CLIP_STREAM))
    label = meta.get("label_index")
    sample = {
        "video_index": torch.tensor(video_index, dtype=torch.long),
        "video_id": meta["id"],
        "label": torch.tensor(-1 if label is None else int(label), dtype=torch.long),
    }
    for name in views.all:
        modality = registry.get(name)
        for view in views.views_of(name):
            clip = registry.ClipRequest(starts[view - 1], spec, float(meta["fps"]), num_frames)
            raw = modality.read(record, clip, data_cfg)
            generator = sample_generator(seed, epoch, video_index, view, name)
            augmented = modality.augment(raw, generator, data_cfg)
            if isinstance(augmented, tuple):  # the worker's geometry decided the device-side parameters
                sample[f"{name}.view{view}"], sample[f"{name}.view{view}.params"] = augmented
            else:
                sample[f"{name}.view{view}"] = augmented
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
    """Records that could not be used, counted in the main process (logged by the trainer).

    Workers cannot update this class (each has its own copy): they report with every sample
    (``BROKEN_KEY``) and ``EpochLoader`` sums the reports here.
    """

    broken_records = 0


def _with_broken_count(sample: dict, broken: int) -> dict:
    sample[BROKEN_KEY] = torch.tensor(broken, dtype=torch.long)
    return sample


# ---- LMDB: random access ------------------------------------------------------------------------


class LmdbPairDataset(Dataset):
    """Map-style dataset over an LMDB store; index = (epoch, position in the usable video list)."""

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
        last_error: Exception | None = None
        attempts = min(len(self.indices), MAX_CONSECUTIVE_FAILURES)
        for failures in range(attempts):
            video_index = self.indices[(position + failures) % len(self.indices)]
            video_id = self.metas[video_index]["id"]
            try:
                sample = build_sample(self.store.record(video_id), video_index, epoch, self.seed, self.views,
                                      self.data_cfg)
            except Exception as error:  # one bad record must not end the run
                last_error = error
                log.warning("skipping broken record %s: %s: %s", video_id, type(error).__name__, error)
                continue
            return _with_broken_count(sample, failures)
        raise RuntimeError(f"{attempts} records in a row failed to load from {self.store.root}") from last_error


class GlobalBatchSampler(Sampler):
    """Yields this rank's slice of each global batch of a (seed, epoch)-seeded permutation.

    The permutation is cut into global batches of ``batch_size * world_size``; the incomplete
    last one is dropped (every rank gets the same number of batches). ``start_batch`` skips batches
    already consumed, for a resume in the middle of an epoch. Items are ``(epoch, position)``.
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
        return max(0, self.batches_per_epoch() - self.start_batch)

    def __iter__(self):
        generator = sample_generator(self.seed, self.epoch, -1, 0, "order")
        order = torch.randperm(self.num_samples, generator=generator).tolist()
        global_batch = self.batch_size * self.world_size
        for b in range(self.start_batch, self.batches_per_epoch()):
            first = b * global_batch + self.rank * self.batch_size
            yield [(self.epoch, position) for position in order[first : first + self.batch_size]]


# ---- WebDataset: the split of an epoch over ranks x workers ---------------------------------------


@dataclass(frozen=True)
class StreamPlan:
    """How an epoch of a WebDataset store is split; the same in every epoch and on every rank.

    by_shards: whole shards per slot (slot = rank * workers + worker); False when there are
        fewer shards than slots: every slot reads every shard and keeps every num_slots-th sample.
    slot_counts: usable samples each slot reads per epoch.
    quotas: batches each slot yields per epoch (whole batches only, trimmed so that every rank
        yields ``batches_per_rank``).
    """

    by_shards: bool
    slot_counts: tuple[int, ...]
    quotas: tuple[int, ...]
    batches_per_rank: int


def assign_shards(shard_counts: dict[str, int], num_slots: int, rng: random.Random) -> list[list[str]]:
    """Shards per slot: largest first, each to the least-loaded slot.

    Ties between equal-sized shards are broken by ``rng``'s shuffle, ties between equally loaded
    slots by slot index. The loads therefore depend on the counts only, never on ``rng``: a
    per-epoch ``rng`` reshuffles which shard goes where but keeps every slot's sample count,
    hence the number of batches, fixed across epochs.
    """
    order = sorted(shard_counts)
    rng.shuffle(order)
    order.sort(key=lambda path: -shard_counts[path])  # stable: keeps the shuffle among equals
    slots: list[list[str]] = [[] for _ in range(num_slots)]
    least_loaded = [(0, slot) for slot in range(num_slots)]  # (load, slot): a valid heap
    for path in order:
        load, slot = heapq.heappop(least_loaded)
        slots[slot].append(path)
        heapq.heappush(least_loaded, (load + shard_counts[path], slot))
    return slots


def rank_quotas(slot_counts: list[int], world_size: int, workers: int, batch_size: int) -> tuple[list[int], int]:
    """Batches per slot such that every rank yields the same number (the smallest rank's).

    A worker yields only whole batches of its own samples (the DataLoader batches inside each
    worker); a rank with more is trimmed from its fullest workers.
    """
    quotas = [count // batch_size for count in slot_counts]
    per_rank = [sum(quotas[r * workers : (r + 1) * workers]) for r in range(world_size)]
    target = min(per_rank)
    for rank in range(world_size):
        mine = range(rank * workers, (rank + 1) * workers)
        for _ in range(per_rank[rank] - target):
            fullest = max(mine, key=lambda s: (quotas[s], s))
            quotas[fullest] -= 1
    return quotas, target


def resume_point(quotas: list[int], num_batches: int) -> tuple[list[int], int]:
    """Where a DataLoader over workers with these batch quotas stands after ``num_batches``:
    the batches taken from each worker, and the worker that yields the next one.

    The DataLoader takes one batch from each worker in turn, cyclically, skipping exhausted
    workers, so the order is fixed by the quotas. A resumed loader restarts its cycle at its
    worker 0, so that worker must play the next one's part (see ``WebDatasetPairStream``).
    """
    taken = [0] * len(quotas)
    remaining = min(num_batches, sum(quotas))
    worker = 0
    while remaining > 0:
        if taken[worker] < quotas[worker]:
            taken[worker] += 1
            remaining -= 1
        worker = (worker + 1) % len(quotas)
    if sum(taken) < sum(quotas):
        while taken[worker] >= quotas[worker]:  # exhausted workers are skipped
            worker = (worker + 1) % len(quotas)
    return taken, worker


def shuffle_buffer(items: Iterable, size: int, rng: random.Random) -> Iterator:
    """A seeded shuffle buffer: fills ``size`` items, then yields a random one per new item."""
    if size < 1:
        yield from items
        return
    buffer: list = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        pick = rng.randrange(size)
        buffer[pick], item = item, buffer[pick]
        yield item
    rng.shuffle(buffer)
    yield from buffer


class _WorkerTally:
    """One worker's epoch counters: usable samples read, and broken records not yet reported."""

    def __init__(self) -> None:
        self.seen = 0
        self.broken = 0

    def take_broken(self) -> int:
        broken, self.broken = self.broken, 0
        return broken

    def tar_error(self, error: Exception) -> bool:
        """webdataset's handler: count, warn, continue with the next member or shard."""
        self.broken += 1
        log.warning("skipping unreadable webdataset data: %s: %s", type(error).__name__, error)
        return True


def _member_modality(member: str) -> str:
    """'vid.rgb_00003.tcf' -> 'rgb'; 'vid.meta.json' -> 'meta' (the writers' part naming)."""
    after_key = member.rsplit("/", 1)[-1].split(".", 1)[-1]
    return schema.part_from_member(after_key).split("_", 1)[0]


class WebDatasetPairStream(IterableDataset):
    """Streams a webdataset store, split over ranks x workers: each sample at most once per epoch.

    The split is a ``StreamPlan``: shards are assigned to slots per epoch (``assign_shards``),
    each worker yields exactly its quota of whole batches, and every rank the same number of
    batches. Within a slot the samples pass a shuffle buffer seeded by (seed, epoch, slot).
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
        self.usable_ids = {metas[i]["id"] for i in usable_videos(metas, views, data_cfg)}
        self.shards = self.store.shard_paths()
        if not self.shards:
            raise ValueError(f"no complete shards in {self.store.root}")
        self.shard_counts = self._usable_per_shard(metas)
        self.wanted_modalities = {schema.META_PART, *views.all}
        self.plan = self._make_plan()
        # (epoch, start_batch), shared with the DataLoader workers: they persist across epochs
        # and keep their own copy of this object, so a plain attribute would never reach them.
        self._position = multiprocessing.RawArray("q", 2)
        if self.plan.batches_per_rank == 0:
            raise ValueError(
                f"{len(self.usable_ids)} usable videos over {len(self.shards)} shards and {self.num_slots} "
                f"slots ({world_size} ranks x {self.num_workers} workers) cannot give every rank one batch "
                f"of {batch_size}; lower batch_size or workers, or write more, smaller shards"
            )

    @property
    def num_slots(self) -> int:
        return self.world_size * self.num_workers

    @property
    def epoch(self) -> int:
        return self._position[0]

    @property
    def start_batch(self) -> int:
        return self._position[1]

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self._position[0], self._position[1] = epoch, start_batch

    def batches_per_epoch(self) -> int:
        return self.plan.batches_per_rank

    def dropped_samples(self) -> int:
        """Usable samples this rank reads but drops each epoch to stay in step with the others."""
        mine = slice(self.rank * self.num_workers, (self.rank + 1) * self.num_workers)
        return sum(self.plan.slot_counts[mine]) - self.plan.batches_per_rank * self.batch_size

    # -- the plan (from the manifests, identical on every rank) --

    def _usable_per_shard(self, metas: list[dict]) -> dict[str, int]:
        """Usable videos per shard path; the manifest names a shard inside its part's folder."""
        part_dirs = {part.name: part for part in self.store.parts}
        counts = dict.fromkeys(self.shards, 0)
        lost = []
        for meta in metas:
            if meta["id"] not in self.usable_ids:
                continue
            path = str(part_dirs[meta["part"]] / schema.SHARDS_DIR / meta.get("shard", "?"))
            if path in counts:
                counts[path] += 1
            else:
                lost.append(meta["id"])
        if lost:  # e.g. a shard deleted after preparation: leave its videos out, loudly
            log.warning("%d videos of %s are left out: their manifest entry names no complete shard (e.g. %s)",
                        len(lost), self.store.root, lost[0])
            self.usable_ids.difference_update(lost)
        return counts

    def _make_plan(self) -> StreamPlan:
        by_shards = len(self.shards) >= self.num_slots
        if by_shards:
            slots = assign_shards(self.shard_counts, self.num_slots, random.Random(0))
            slot_counts = [sum(self.shard_counts[p] for p in paths) for paths in slots]
        else:
            log.warning("%d shards for %d slots (%d ranks x %d workers): every worker reads every shard and "
                        "keeps 1/%d of the samples; write more shards (prepare --shard-max-videos) to avoid "
                        "the extra reading", len(self.shards), self.num_slots, self.world_size, self.num_workers,
                        self.num_slots)
            total, slots_n = len(self.usable_ids), self.num_slots
            slot_counts = [total // slots_n + (1 if s < total % slots_n else 0) for s in range(slots_n)]
        quotas, per_rank = rank_quotas(slot_counts, self.world_size, self.num_workers, self.batch_size)
        return StreamPlan(by_shards, tuple(slot_counts), tuple(quotas), per_rank)

    def _epoch_shards(self, slot: int, epoch: int) -> list[str]:
        rng = random.Random(f"{self.seed}/{epoch}/shards")
        if self.plan.by_shards:
            return assign_shards(self.shard_counts, self.num_slots, rng)[slot]
        order = sorted(self.shards)
        rng.shuffle(order)  # the same order in every slot: positions then split the samples
        return order

    # -- one worker's epoch --

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if workers != self.num_workers:
            raise RuntimeError(f"stream built for {self.num_workers} workers but runs in {workers}")
        epoch, start_batch = self.epoch, self.start_batch
        rank_slots = slice(self.rank * self.num_workers, (self.rank + 1) * self.num_workers)
        taken, next_worker = resume_point(list(self.plan.quotas[rank_slots]), start_batch)
        # After a resume this process's worker 0 yields first: it takes the part of the worker
        # whose batch is next, so the remaining batches come in the uninterrupted order.
        part = (worker + next_worker) % self.num_workers
        slot = self.rank * self.num_workers + part
        skipped = taken[part]
        tally = _WorkerTally()
        raws = self._slot_samples(slot, epoch, tally)
        raws = shuffle_buffer(raws, int(self.data_cfg["shuffle_buffer"]), random.Random(f"{self.seed}/{epoch}/{slot}"))
        quota = self.plan.quotas[slot] * self.batch_size
        yield from self._samples(raws, quota, skipped * self.batch_size, epoch, slot, tally)

    def _slot_samples(self, slot: int, epoch: int, tally: _WorkerTally) -> Iterator[dict]:
        """This slot's usable raw samples for the epoch, in shard order; members of modalities
        the stage does not use are never kept."""
        import webdataset as wds

        sources = ({"url": url} for url in self._epoch_shards(slot, epoch))
        position = -1
        for raw in wds.tarfile_samples(sources, handler=tally.tar_error, select_files=self._wanted_member):
            if raw.get("__key__") not in self.usable_ids:
                continue
            position += 1  # counted before the shuffle: the same in every slot that reads this shard
            if not self.plan.by_shards and position % self.num_slots != slot:
                continue
            tally.seen += 1
            yield raw

    def _wanted_member(self, member: str) -> bool:
        return _member_modality(member) in self.wanted_modalities

    def _samples(self, raws: Iterator[dict], quota: int, skip: int, epoch: int, slot: int,
                 tally: _WorkerTally) -> Iterator[dict]:
        """Exactly ``quota`` samples (the first ``skip`` consumed without decoding, on resume).

        A broken record is replaced by the next sample (the slot's surplus); if the shards run
        dry, the last good sample is repeated: a duplicate beats a rank that waits forever.
        Skipped samples are not decoded, so a broken record among them shifts a resumed epoch
        by one sample against the interrupted one.
        """
        produced, last_good = 0, None
        for raw in raws:
            if produced >= quota:
                return
            if produced < skip:
                produced += 1
                continue
            sample = self._build(raw, epoch, tally)
            if sample is not None:
                produced, last_good = produced + 1, raw
                yield sample
        if produced >= quota:
            return
        missing = self.plan.slot_counts[slot] - tally.seen
        if missing > 0:
            tally.broken += missing
            log.warning("epoch %d slot %d: %d records missing from unreadable shards", epoch, slot, missing)
        if last_good is None:
            raise RuntimeError(f"epoch {epoch} slot {slot}: no readable sample to fill {quota - produced} places")
        log.warning("epoch %d slot %d: repeating %s %d times to keep ranks in step", epoch, slot,
                    last_good["__key__"], quota - produced)
        for _ in range(quota - produced):
            yield self._build(last_good, epoch, tally)

    def _build(self, raw: dict, epoch: int, tally: _WorkerTally) -> dict | None:
        video_id = raw["__key__"]
        try:
            sample = build_sample(record_from_sample(raw), self.index_of[video_id], epoch, self.seed, self.views,
                                  self.data_cfg)
        except Exception as error:  # one bad record must not end the run
            tally.broken += 1
            log.warning("skipping broken record %s: %s: %s", video_id, type(error).__name__, error)
            return None
        return _with_broken_count(sample, tally.take_broken())


# ---- both stores ----------------------------------------------------------------------------------


class EpochLoader:
    """One object per stage: ``set_epoch(e, start_batch)``, ``len()``, iteration of collated batches.

    Persistent workers, pinned memory (with CUDA) and prefetch for both stores; every rank
    yields ``batches_per_epoch()`` batches in every epoch (fewer after a mid-epoch resume).
    """

    def __init__(self, store_path: str, views: StageViews, data_cfg: dict, seed: int, batch_size: int,
                 rank: int = 0, world_size: int = 1):
        store = open_store(store_path)
        workers = int(data_cfg["workers"])
        common = dict(
            num_workers=workers,
            pin_memory=bool(data_cfg["pin_memory"]) and torch.cuda.is_available(),
            persistent_workers=workers > 0,
            prefetch_factor=int(data_cfg["prefetch_factor"]) if workers > 0 else None,
        )
        self.format = store.format
        self.rank = rank
        if store.format == "lmdb":
            self.dataset = LmdbPairDataset(store, views, data_cfg, seed)
            self.sampler = GlobalBatchSampler(len(self.dataset), batch_size, rank, world_size, seed)
            self.loader = DataLoader(self.dataset, batch_sampler=self.sampler, **common)
            self.num_videos = len(self.dataset)
        else:
            self.dataset = WebDatasetPairStream(store, views, data_cfg, seed, batch_size, rank, world_size, workers)
            # drop_last applies per worker; quotas are whole batches, so it only guards the shapes.
            self.loader = DataLoader(self.dataset, batch_size=batch_size, drop_last=True, **common)
            self.num_videos = len(self.dataset.usable_ids)
        self._epoch, self._start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self._epoch, self._start_batch = epoch, start_batch
        (self.sampler if self.format == "lmdb" else self.dataset).set_epoch(epoch, start_batch)

    def batches_per_epoch(self) -> int:
        return self.sampler.batches_per_epoch() if self.format == "lmdb" else self.dataset.batches_per_epoch()

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch() - self._start_batch)

    def __iter__(self) -> Iterator[dict]:
        if self.format == "webdataset" and self._start_batch == 0:
            dropped = self.dataset.dropped_samples()
            if dropped:
                log.info("epoch %d: rank %d drops %d samples to yield %d batches like every rank", self._epoch,
                         self.rank, dropped, self.batches_per_epoch())
        expected, produced = len(self), 0
        for batch in self.loader:
            DataStats.broken_records += int(batch[BROKEN_KEY].sum())
            produced += 1
            yield batch
        if produced != expected:  # a guard: quotas make this impossible short of a bug
            raise RuntimeError(f"epoch {self._epoch}: {produced} batches instead of {expected}")


def steps_per_epoch(batches_per_epoch: int, grad_accum_steps: int) -> int:
    return max(1, math.floor(batches_per_epoch / grad_accum_steps))
