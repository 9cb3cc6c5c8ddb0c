"""How an epoch of a WebDataset store is split over ranks x loader workers, and joined back into
whole batches: arithmetic on sample counts, no I/O (``tricoclr.data.stream_loader`` reads).

The epoch's samples (shards in a seeded order) are cut into one consecutive run per rank, and each
run into one per loader worker ("slot"), sized up front from the manifests. Workers yield chunks
cut at their own batch boundaries and ``rebatch`` joins them into whole batches in the main
process, so every rank yields N // (batch x ranks) batches in every epoch and at most
N mod (batch x ranks) samples are left out, however many workers there are.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from torch.utils.data import default_collate


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
