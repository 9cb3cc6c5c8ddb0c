"""Training datasets: one video -> two clips x the stage's modalities, augmented on the workers.

Two stores, one sample:
- ``LmdbPairDataset`` (map-style) with ``GlobalBatchSampler``: random access; the order of an
  epoch depends on (seed, epoch) only and rank r takes the r-th contiguous slice of every global
  batch, so a 2-rank run sees exactly the batches of a 1-rank run with the same global batch.
- ``WebDatasetPairStream`` (iterable): the epoch's samples (shards in a seeded order) are cut
  into one consecutive run per rank, and each run into one per loader worker ("slot"), sized up
  front from the manifests; a seeded shuffle buffer per slot. Workers yield chunks cut at their
  own batch boundaries and ``rebatch`` joins them into whole batches in the main process, so
  every rank yields N // (batch x ranks) batches in every epoch and at most
  N mod (batch x ranks) samples are left out (logged), however many workers there are.

Every random choice is drawn from ``sample_generator(seed, epoch, video_index, view, stream)``:
never from the rank, the worker or the batch size. A record that fails to decode is replaced by
the next usable video (LMDB) or skipped (WebDataset), with a warning; the workers report the
count with the next sample (``BROKEN_KEY``) and ``EpochLoader`` adds it to ``DataStats``.
"""

from __future__ import annotations

import itertools
import logging
import math
import multiprocessing
import os
import random
import tarfile
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, default_collate, get_worker_info

from tricoclr.data import modalities as registry
from tricoclr.data import schema
from tricoclr.data.location import shard_samples
from tricoclr.data.sampling import ClipSpec, clip_frame_limit, sample_clip_starts, sample_generator, video_too_short
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
        if spec.short_policy == "skip" and video_too_short(int(meta["frames"]), spec, meta.get("spans")):
            continue
        keep.append(index)
    return keep


def build_sample(record, video_index: int, epoch: int, seed: int, views: StageViews, data_cfg: dict) -> dict:
    """One training sample: for each modality and view, the worker-side augmented clip.

    Reads only the stage's modalities and views, and of those only the chunks the clips touch.
    Clips never cross a gap in the video's frames (meta ``spans``).
    """
    meta = record.meta
    spec = clip_spec(data_cfg)
    num_frames, spans = int(meta["frames"]), meta.get("spans")
    starts = sample_clip_starts(num_frames, spec, sample_generator(seed, epoch, video_index, 0, CLIP_STREAM), spans)
    label = meta.get("label_index")
    sample = {
        "video_index": torch.tensor(video_index, dtype=torch.long),
        "video_id": meta["id"],
        "label": torch.tensor(-1 if label is None else int(label), dtype=torch.long),
    }
    worker_clips = {}  # (clip source, view) -> augmented clip: a derived modality reuses its source's
    for name in views.all:
        modality = registry.get(name)
        for view in views.views_of(name):
            start = starts[view - 1]
            clip = registry.ClipRequest(start, spec, float(meta["fps"]), clip_frame_limit(start, num_frames, spans))
            if (modality.clip_source, view) not in worker_clips:
                source = registry.get(modality.clip_source)
                raw = source.read(record, clip, data_cfg)
                generator = sample_generator(seed, epoch, video_index, view, source.name)
                worker_clips[source.name, view] = source.augment(raw, generator, data_cfg)
            augmented = worker_clips[modality.clip_source, view]
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
    # non_blocking: a blocking host-to-device copy waits for the device's queued work (a sync per step)
    out = {k: batch[k].to(device, non_blocking=True) for k in ("video_index", "label")}
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
    """How every epoch of a WebDataset store is cut; the same in every epoch and on every rank.

    The epoch's ``total`` usable samples lie on a circle (see ``cut_circle``). Rank r reads the
    r-th run of ``batches_per_rank * batch_size`` samples along it, its worker w the w-th sub-run
    of ``worker_quotas[w]`` samples; the ``dropped`` samples after the ranks' runs
    (N mod (batch_size x world_size)) are split among the slots as spares that stand in for
    broken records.
    """

    total: int
    batch_size: int
    world_size: int
    worker_quotas: tuple[int, ...]
    batches_per_rank: int

    @property
    def dropped(self) -> int:
        return self.total - self.world_size * self.batches_per_rank * self.batch_size

    def piece_sizes(self) -> list[int]:
        """Samples per piece of the circle: every slot's run (slot = rank * workers + worker),
        then every slot's spares."""
        slots = self.world_size * len(self.worker_quotas)
        spares = [self.dropped // slots + (1 if s < self.dropped % slots else 0) for s in range(slots)]
        return list(self.worker_quotas) * self.world_size + spares


def make_plan(total: int, batch_size: int, world_size: int, workers: int) -> StreamPlan:
    """The plan for ``total`` usable samples: N // (batch x ranks) batches per rank, their samples
    spread over the workers as evenly as possible (the first ones take one more)."""
    batches = total // (batch_size * world_size)
    per_rank = batches * batch_size
    quotas = tuple(per_rank // workers + (1 if w < per_rank % workers else 0) for w in range(workers))
    return StreamPlan(total, batch_size, world_size, quotas, batches)


def cut_circle(counts: list[tuple[str, int]], offset: int, sizes: list[int]) -> list[list[tuple[str, int, int]]]:
    """Consecutive pieces of ``sizes`` samples along a circle of shards, from sample ``offset``.

    ``counts``: (shard, usable samples) in the epoch's shard order; the circle is every shard's
    usable samples in file order, the last shard followed by the first again. A piece is a list
    of (shard, first, end): the usable samples at positions first..end-1 within that shard.
    ``sum(sizes)`` must not exceed the samples on the circle (each sample in one piece at most).
    """
    shard, within = 0, offset
    while within >= counts[shard][1]:
        within -= counts[shard][1]
        shard += 1
    pieces = []
    for size in sizes:
        piece = []
        while size > 0:
            path, count = counts[shard]
            take = min(size, count - within)
            if take > 0:
                piece.append((path, within, within + take))
                size, within = size - take, within + take
            if within >= count:
                shard, within = (shard + 1) % len(counts), 0
        pieces.append(piece)
    return pieces


def resume_point(quotas: list[int], chunk_size: int, consumed: int) -> tuple[list[int], int]:
    """Where a DataLoader over workers with these sample quotas stands after ``consumed`` samples:
    the samples taken from each worker, and the worker whose chunk comes next.

    Each worker yields its quota in chunks cut at its own multiples of ``chunk_size``; the
    DataLoader takes one chunk from each worker in turn, cyclically, skipping exhausted workers,
    so the order is fixed by the quotas. A chunk can be consumed in part (a batch boundary
    inside it): then its worker comes next. A resumed loader restarts its cycle at its worker 0,
    so that worker must play the next one's part (see ``WebDatasetPairStream``).
    """
    taken = [0] * len(quotas)
    remaining = min(consumed, sum(quotas))
    worker = 0
    while remaining > 0:
        chunk = min(chunk_size - taken[worker] % chunk_size, quotas[worker] - taken[worker])
        if chunk > remaining:
            taken[worker] += remaining
            return taken, worker
        taken[worker] += chunk  # 0 for an exhausted worker
        remaining -= chunk
        worker = (worker + 1) % len(quotas)
    if sum(taken) < sum(quotas):
        while taken[worker] >= quotas[worker]:  # exhausted workers are skipped
            worker = (worker + 1) % len(quotas)
    return taken, worker


def unbatch(batch: dict) -> list[dict]:
    """The samples of a collated batch (tensors become views of the batch's rows)."""
    def row(value, i):
        return {k: row(v, i) for k, v in value.items()} if isinstance(value, dict) else value[i]

    return [row(batch, i) for i in range(len(batch["video_index"]))]


def rebatch(chunks: Iterable[dict], batch_size: int) -> Iterator[dict]:
    """Whole batches of ``batch_size`` from collated chunks of any size, in order.

    A chunk that is a whole batch and starts one passes unchanged (no copy); smaller chunks (the
    ends of the workers' quotas) are joined across workers here, in the main process.
    WebDataset's ``unbatched``/``batched`` filters take tuples, not these dicts, hence this.
    Raises RuntimeError if samples are left over that do not fill a batch (a bug).
    """
    pending: list[dict] = []
    for chunk in chunks:
        if not pending and len(chunk["video_index"]) == batch_size:
            yield chunk
            continue
        pending.extend(unbatch(chunk))
        while len(pending) >= batch_size:
            yield default_collate(pending[:batch_size])
            del pending[:batch_size]
    if pending:
        raise RuntimeError(f"{len(pending)} samples left over that do not fill a batch of {batch_size}")


def usable_sample_offset(path: str, usable_ids: set[str], number: int) -> int | None:
    """Byte offset of the first member of the ``number``-th (0-based) usable sample of a local
    tar, found from the member headers alone (tarfile seeks past member data), or None: not a
    local file, fewer usable samples, or a damaged tar (then the caller reads from the start,
    and the streaming read reports the damage)."""
    from webdataset.tariterators import base_plus_ext

    if not os.path.isfile(path):
        return None
    count, current = -1, None
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                key = base_plus_ext(member.name)[0]
                if key != current and key in usable_ids:
                    count += 1
                    if count == number:
                        return member.offset
                current = key
    except (tarfile.TarError, OSError):
        return None
    return None


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
    """One worker's epoch counter: broken records not yet reported."""

    def __init__(self) -> None:
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

    The split is a ``StreamPlan``: every epoch the shards are put in a (seed, epoch)-shuffled
    order and read as a circle from a (seed, epoch)-random sample, so that the samples left out
    differ from epoch to epoch; each slot (rank x worker) reads its consecutive piece of it
    (``cut_circle``) through a shuffle buffer seeded by (seed, epoch, slot) and yields exactly its
    quota, in chunks cut at its own multiples of ``batch_size`` (``rebatch`` joins them).
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
        self.wanted_modalities = {schema.META_PART, *registry.stored_parts_of(views.all)}
        self.plan = make_plan(sum(self.shard_counts.values()), batch_size, world_size, self.num_workers)
        # (epoch, start_batch), shared with the DataLoader workers: they persist across epochs
        # and keep their own copy of this object, so a plain attribute would never reach them.
        self._position = multiprocessing.RawArray("q", 2)
        if self.plan.batches_per_rank == 0:
            raise ValueError(
                f"{self.plan.total} usable videos in {self.store.root} cannot give every rank one batch of "
                f"{batch_size} ({world_size} ranks); lower batch_size"
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
        """Usable samples left out of each epoch by all ranks together: N mod (batch x ranks)."""
        return self.plan.dropped

    # -- the plan (from the manifests, identical on every rank) --

    def _usable_per_shard(self, metas: list[dict]) -> dict[str, int]:
        """Usable videos per shard path (or URL); the manifest names a shard inside its part's folder."""
        counts = dict.fromkeys(self.shards, 0)
        lost = []
        for meta in metas:
            if meta["id"] not in self.usable_ids:
                continue
            path = self.store.shard_address(meta["part"], meta.get("shard", "?"))
            if path in counts:
                counts[path] += 1
            else:
                lost.append(meta["id"])
        if lost:  # e.g. a shard deleted after preparation: leave its videos out, loudly
            log.warning("%d videos of %s are left out: their manifest entry names no complete shard (e.g. %s)",
                        len(lost), self.store.root, lost[0])
            self.usable_ids.difference_update(lost)
        return counts

    def _epoch_pieces(self, slot: int, epoch: int) -> tuple[list, list]:
        """This slot's piece of the epoch's circle, and its spares."""
        rng = random.Random(f"{self.seed}/{epoch}/shards")
        order = sorted(self.shards)
        rng.shuffle(order)
        pieces = cut_circle([(p, self.shard_counts[p]) for p in order], rng.randrange(self.plan.total),
                            self.plan.piece_sizes())
        return pieces[slot], pieces[self.num_slots + slot]

    # -- one worker's epoch --

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if workers != self.num_workers:
            raise RuntimeError(f"stream built for {self.num_workers} workers but runs in {workers}")
        epoch, start_batch = self.epoch, self.start_batch
        quotas = list(self.plan.worker_quotas)
        taken, next_worker = resume_point(quotas, self.batch_size, start_batch * self.batch_size)
        # After a resume this process's worker 0 yields first: it takes the part of the worker
        # whose chunk is next, so the remaining samples come in the uninterrupted order.
        part = (worker + next_worker) % self.num_workers
        slot = self.rank * self.num_workers + part
        tally = _WorkerTally()
        piece, spares = self._epoch_pieces(slot, epoch)
        raws = shuffle_buffer(self._read(piece, tally), int(self.data_cfg["shuffle_buffer"]),
                              random.Random(f"{self.seed}/{epoch}/{slot}"))
        # Spares come after the shuffled piece: read only when a broken record needs replacing.
        raws = itertools.chain(raws, self._read(spares, tally))
        samples = self._samples(raws, quotas[part], taken[part], epoch, slot, tally)
        yield from self._chunks(samples, taken[part], quotas[part])

    def _read(self, piece: list[tuple[str, int, int]], tally: _WorkerTally) -> Iterator[dict]:
        """The usable raw samples of a piece, in order; members of modalities the stage does not
        use are never kept. Samples missing from a truncated or unreadable shard count as broken."""
        for path, first, end in piece:
            got = 0
            offset = usable_sample_offset(path, self.usable_ids, first) if first > 0 else None
            if offset is None:
                position = -1
                # paths or URLs: streamed by tricoclr.data.location
                stream = shard_samples([path], handler=tally.tar_error, select_files=self._wanted_member)
            else:  # a local shard: start at the piece's first sample instead of reading up to it
                position = first - 1
                stream = self._samples_from(path, offset, tally)
            for raw in stream:
                if raw.get("__key__") not in self.usable_ids:
                    continue
                position += 1
                if position < first:
                    continue
                got += 1
                yield raw
                if position + 1 >= end:
                    break
            stream.close()
            if got < end - first:
                tally.broken += end - first - got
                log.warning("%s: %d records missing (unreadable or truncated shard)", path, end - first - got)

    def _samples_from(self, path: str, offset: int, tally: _WorkerTally) -> Iterator[dict]:
        """The samples of a local tar from byte ``offset`` (a member header) on."""
        from webdataset import tariterators

        with open(path, "rb") as handle:
            handle.seek(offset)
            files = tariterators.tar_file_expander([{"stream": handle, "url": path}], handler=tally.tar_error,
                                                   select_files=self._wanted_member)
            yield from tariterators.group_by_keys(files, handler=tally.tar_error)

    def _wanted_member(self, member: str) -> bool:
        return _member_modality(member) in self.wanted_modalities

    def _samples(self, raws: Iterator[dict], quota: int, skip: int, epoch: int, slot: int,
                 tally: _WorkerTally) -> Iterator[dict]:
        """Exactly ``quota - skip`` samples (the first ``skip`` consumed without decoding, on resume).

        A broken record is replaced by the next sample (the slot's spares); if those run dry, the
        last good sample is repeated: a duplicate beats a rank that waits forever. Skipped samples
        are not decoded, so a broken record among them shifts a resumed epoch by one sample
        against the interrupted one. Nothing is read past the last sample needed.
        """
        produced, last_good = 0, None
        raws = iter(raws)
        while produced < quota:
            raw = next(raws, None)
            if raw is None:
                break
            if produced < skip:
                produced += 1
                continue
            sample = self._build(raw, epoch, tally)
            if sample is not None:
                produced, last_good = produced + 1, raw
                yield sample
        if produced >= quota:
            return
        if last_good is None:
            raise RuntimeError(f"epoch {epoch} slot {slot}: no readable sample to fill {quota - produced} places")
        log.warning("epoch %d slot %d: repeating %s %d times to keep ranks in step", epoch, slot,
                    last_good["__key__"], quota - produced)
        for _ in range(quota - produced):
            yield self._build(last_good, epoch, tally)

    def _chunks(self, samples: Iterator[dict], first: int, quota: int) -> Iterator[dict]:
        """Collated chunks of the samples numbered ``first``..``quota - 1`` of this slot, cut after
        every multiple of ``batch_size`` and at the quota (so a resumed worker cuts where the
        interrupted one did)."""
        chunk = []
        for number, sample in enumerate(samples, first):
            chunk.append(sample)
            if (number + 1) % self.batch_size == 0 or number + 1 == quota:
                yield default_collate(chunk)
                chunk = []

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
            # The workers yield collated chunks of up to one batch; rebatch() makes whole batches.
            self.loader = DataLoader(self.dataset, batch_size=None, **common)
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
        batches = self.loader
        if self.format == "webdataset":
            batches = rebatch(self.loader, self.dataset.batch_size)
            dropped = self.dataset.dropped_samples()
            if dropped and self._start_batch == 0 and self.rank == 0:
                log.info("epoch %d drops %d of %d samples: N mod (batch %d x %d ranks), other ones every epoch",
                         self._epoch, dropped, self.dataset.plan.total, self.dataset.batch_size,
                         self.dataset.world_size)
        expected, produced = len(self), 0
        for batch in batches:
            DataStats.broken_records += int(batch[BROKEN_KEY].sum())
            produced += 1
            yield batch
        if produced != expected:  # a guard: quotas make this impossible short of a bug
            raise RuntimeError(f"epoch {self._epoch}: {produced} batches instead of {expected}")


def steps_per_epoch(batches_per_epoch: int, grad_accum_steps: int) -> int:
    return max(1, math.floor(batches_per_epoch / grad_accum_steps))
