"""Training loaders: one video -> two clips x the stage's modalities, augmented on the workers;
``EpochLoader`` gives a stage its batches over either store.

Two stores, one sample (``tricoclr.data.samples``):
- LMDB (``tricoclr.data.lmdb_loader``): ``LmdbPairDataset`` (map-style) with
  ``GlobalBatchSampler``: random access; the order of an epoch depends on (seed, epoch) only and
  rank r takes the r-th contiguous slice of every global batch, so a 2-rank run sees exactly the
  batches of a 1-rank run with the same global batch.
- WebDataset (``tricoclr.data.stream_loader``, planned by ``tricoclr.data.stream_plan``):
  ``WebDatasetPairStream`` (iterable): the epoch's samples (shards in a seeded order) are cut
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

import logging
import math
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader

from tricoclr.data.lmdb_loader import GlobalBatchSampler, LmdbPairDataset
from tricoclr.data.samples import BROKEN_KEY, StageViews, finish_batch
from tricoclr.data.store import open_store
from tricoclr.data.stream_loader import WebDatasetPairStream
from tricoclr.data.stream_plan import rebatch

# The names the trainer and evaluation import from here; finish_batch and StageViews live in
# tricoclr.data.samples.
__all__ = ["DataStats", "EpochLoader", "StageViews", "finish_batch", "steps_per_epoch"]

log = logging.getLogger(__name__)


class DataStats:
    """Records that could not be used, counted in the main process (logged by the trainer).

    Workers cannot update this class (each has its own copy): they report with every sample
    (``BROKEN_KEY``) and ``EpochLoader`` sums the reports here.
    """

    broken_records = 0


class EpochLoader:
    """One object per stage: ``set_epoch(e, start_batch)``, ``len()``, iteration of collated batches.

    Persistent workers, pinned memory (with CUDA) and prefetch for both stores; every rank
    yields ``batches_per_epoch()`` batches in every epoch (fewer after a mid-epoch resume).
    """

    def __init__(
        self,
        store_path: str,
        views: StageViews,
        data_cfg: dict,
        seed: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
    ):
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
                log.info(
                    "epoch %d drops %d of %d samples: N mod (batch %d x %d ranks), other ones every epoch",
                    self._epoch,
                    dropped,
                    self.dataset.plan.total,
                    self.dataset.batch_size,
                    self.dataset.world_size,
                )
        expected, produced = len(self), 0
        for batch in batches:
            DataStats.broken_records += int(batch[BROKEN_KEY].sum())
            produced += 1
            yield batch
        if produced != expected:  # a guard: quotas make this impossible short of a bug
            raise RuntimeError(f"epoch {self._epoch}: {produced} batches instead of {expected}")


def steps_per_epoch(batches_per_epoch: int, grad_accum_steps: int) -> int:
    """Optimizer steps in an epoch of ``batches_per_epoch`` batches with ``grad_accum_steps``
    batches per step (a partial last group is not a step); at least 1."""
    return max(1, math.floor(batches_per_epoch / grad_accum_steps))
