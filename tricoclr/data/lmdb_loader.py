"""The LMDB store's training loader: random access through ``LmdbPairDataset`` (map-style), in the
order of ``GlobalBatchSampler``.

The order of an epoch depends on (seed, epoch) only and rank r takes the r-th contiguous slice of
every global batch, so a 2-rank run sees exactly the batches of a 1-rank run with the same global
batch. A record that fails to decode is replaced by the next usable video, with a warning.
"""

from __future__ import annotations

import logging

import torch
from torch.utils.data import Dataset, Sampler

from tricoclr.data.samples import StageViews, build_sample, usable_videos, with_broken_count
from tricoclr.data.sampling import sample_generator
from tricoclr.data.store import VideoStore, open_store

log = logging.getLogger(__name__)

# LMDB: a bad record is replaced by the next one; this many failures in a row means the store
# (or the code) is broken, not a record.
MAX_CONSECUTIVE_FAILURES = 16


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
                sample = build_sample(
                    self.store.record(video_id), video_index, epoch, self.seed, self.views, self.data_cfg
                )
            except Exception as error:  # one bad record must not end the run
                last_error = error
                log.warning("skipping broken record %s: %s: %s", video_id, type(error).__name__, error)
                continue
            return with_broken_count(sample, failures)
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
