"""The WebDataset store's training loader: ``WebDatasetPairStream``, an iterable dataset that
streams each slot's (rank x worker) piece of the epoch (``tricoclr.data.stream_plan``) through a
seeded shuffle buffer, each sample at most once per epoch.

A record that fails to decode, or is missing from an unreadable or truncated shard, is skipped
with a warning and counted (``BROKEN_KEY``); the slot's spares take its place.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import os
import random
import tarfile
from collections.abc import Iterable, Iterator

from torch.utils.data import IterableDataset, default_collate, get_worker_info

from tricoclr.data import modalities as registry
from tricoclr.data import schema
from tricoclr.data.location import shard_samples
from tricoclr.data.samples import StageViews, build_sample, usable_videos, with_broken_count
from tricoclr.data.store import VideoStore, open_store, record_from_sample
from tricoclr.data.stream_plan import cut_circle, make_plan, resume_point

log = logging.getLogger(__name__)


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

    def __init__(
        self,
        store: VideoStore | str,
        views: StageViews,
        data_cfg: dict,
        seed: int,
        batch_size: int,
        rank: int,
        world_size: int,
        num_workers: int,
    ):
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
            log.warning(
                "%d videos of %s are left out: their manifest entry names no complete shard (e.g. %s)",
                len(lost),
                self.store.root,
                lost[0],
            )
            self.usable_ids.difference_update(lost)
        return counts

    def _epoch_pieces(self, slot: int, epoch: int) -> tuple[list, list]:
        """This slot's piece of the epoch's circle, and its spares."""
        rng = random.Random(f"{self.seed}/{epoch}/shards")
        order = sorted(self.shards)
        rng.shuffle(order)
        pieces = cut_circle(
            [(p, self.shard_counts[p]) for p in order], rng.randrange(self.plan.total), self.plan.piece_sizes()
        )
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
        raws = shuffle_buffer(
            self._read(piece, tally), int(self.data_cfg["shuffle_buffer"]), random.Random(f"{self.seed}/{epoch}/{slot}")
        )
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
            files = tariterators.tar_file_expander(
                [{"stream": handle, "url": path}], handler=tally.tar_error, select_files=self._wanted_member
            )
            yield from tariterators.group_by_keys(files, handler=tally.tar_error)

    def _wanted_member(self, member: str) -> bool:
        return _member_modality(member) in self.wanted_modalities

    def _samples(
        self, raws: Iterator[dict], quota: int, skip: int, epoch: int, slot: int, tally: _WorkerTally
    ) -> Iterator[dict]:
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
        log.warning(
            "epoch %d slot %d: repeating %s %d times to keep ranks in step",
            epoch,
            slot,
            last_good["__key__"],
            quota - produced,
        )
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
            sample = build_sample(
                record_from_sample(raw), self.index_of[video_id], epoch, self.seed, self.views, self.data_cfg
            )
        except Exception as error:  # one bad record must not end the run
            tally.broken += 1
            log.warning("skipping broken record %s: %s: %s", video_id, type(error).__name__, error)
            return None
        return with_broken_count(sample, tally.take_broken())
