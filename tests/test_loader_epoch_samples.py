"""Samples per epoch: a WebDataset epoch leaves out at most N mod (batch x ranks) of its N usable
videos, however many loader workers there are (workers yield chunks cut at their own batch
boundaries; the main process joins the ends into whole batches), with every rank yielding the
same number of batches, each sample at most once, exact mid-epoch resume, and a real two-process
run through ``accelerate launch``. The LMDB loader obeys the same bound (``GlobalBatchSampler``).

The 60-video store is the train WebDataset store's videos cloned under new ids by the real writer
(7 videos per shard: shards that split unevenly over ranks and workers)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from scale_helpers import accelerate_command, cpu_env, free_port
from test_loader import RGB_ONLY, assert_batches_equal, data_cfg, epoch_batches, indices_of

from data_tools.writers import PartWriter
from tricoclr.data import schema
from tricoclr.data.dataset import EpochLoader
from tricoclr.data.store import iter_shard_samples, open_store
from tricoclr.data.stream_loader import WebDatasetPairStream, _WorkerTally, usable_sample_offset

REPO = Path(__file__).resolve().parents[1]
VIDEOS = 60


@pytest.fixture(scope="module")
def store60(train_wds, tmp_path_factory) -> Path:
    """60 usable videos in shards of 7 (the last one holds 4), written by the real writer."""
    out = tmp_path_factory.mktemp("wds60") / "store"
    entries = {e["id"]: e for e in open_store(train_wds).manifest()}
    samples = list(iter_shard_samples(open_store(train_wds).shard_paths()))
    writer = PartWriter(out, "webdataset", shard_max_videos=7)
    for n in range(VIDEOS):
        sample = samples[n % len(samples)]
        new_id = f"{sample['__key__']}-copy{n}"
        entry = {k: v for k, v in entries[sample["__key__"]].items() if k not in ("shard", "part")}
        entry["id"] = new_id
        parts = {schema.part_from_member(k): v for k, v in sample.items() if not k.startswith("__")}
        parts[schema.META_PART] = schema.encode_meta({**schema.decode_meta(parts[schema.META_PART]), "id": new_id})
        writer.add(entry, parts)
    writer.close()
    assert len(open_store(out).shard_paths()) == 9
    return out


def one_epoch_of_every_rank(path, workers, batch_size, world_size, epoch=0) -> list[list[int]]:
    return [
        indices_of(
            epoch_batches(
                path, views=RGB_ONLY, workers=workers, batch_size=batch_size, epoch=epoch, rank=r, world_size=world_size
            )
        )
        for r in range(world_size)
    ]


@pytest.mark.parametrize("workers", [1, 2, 4])
@pytest.mark.parametrize("world_size, batch_size", [(1, 16), (2, 8)])
def test_an_epoch_drops_at_most_n_mod_global_batch(store60, workers, world_size, batch_size):
    ranks = one_epoch_of_every_rank(store60, workers, batch_size, world_size)
    global_batch = batch_size * world_size
    for seen in ranks:  # 60 // 16 = 3 batches on every rank (the old per-worker quotas gave 2)
        assert len(seen) == VIDEOS // global_batch * batch_size
    everything = [i for seen in ranks for i in seen]
    assert len(everything) == len(set(everything)) == VIDEOS - VIDEOS % global_batch  # 48 of 60


def test_each_epoch_leaves_out_other_videos(store60):
    left_out = [set(range(VIDEOS)) - set(one_epoch_of_every_rank(store60, 2, 16, 1, epoch)[0]) for epoch in (0, 1)]
    assert len(left_out[0]) == len(left_out[1]) == 12 and left_out[0] != left_out[1]


def test_a_piece_inside_a_local_shard_starts_at_its_first_sample(store60):
    """A worker whose piece starts inside a shard seeks there (member headers only), and reads
    the same samples as a read from the shard's start."""
    stream = WebDatasetPairStream(str(store60), RGB_ONLY, data_cfg(), 0, 16, 0, 1, 1)
    shard = stream.shards[0]
    keys = [raw["__key__"] for raw in stream._read([(shard, 0, 7)], _WorkerTally())]
    assert len(keys) == 7
    assert usable_sample_offset(shard, stream.usable_ids, 0) == 0
    assert usable_sample_offset(shard, stream.usable_ids, 3) > 0  # the seek is taken
    assert usable_sample_offset(shard, stream.usable_ids, 7) is None  # past its end: read from the start
    assert [raw["__key__"] for raw in stream._read([(shard, 3, 6)], _WorkerTally())] == keys[3:6]


@pytest.mark.parametrize("workers, starts", [(2, (1, 2)), (4, (1, 2))])
def test_resume_inside_a_joined_batch_yields_exactly_the_remaining_batches(store60, workers, starts):
    """Quotas of 24 (2 workers) or 12 (4 workers) samples: the batches join chunks of several
    workers, and a resume can start inside a worker's chunk."""
    full = epoch_batches(store60, views=RGB_ONLY, workers=workers, batch_size=16, epoch=3)
    for start in starts:
        resumed = epoch_batches(store60, views=RGB_ONLY, workers=workers, batch_size=16, epoch=3, start_batch=start)
        assert_batches_equal(resumed, full[start:])


def test_two_processes_through_accelerate_launch(store60, tmp_path):
    cfg = data_cfg(workers=2)
    args = [str(store60), str(tmp_path), "8", "2", json.dumps(cfg)]
    command = accelerate_command(2, free_port(), args, script="tests/loader_ranks_helper.py")
    result = subprocess.run(command, cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in reports] == [2, 2] and [r["batches_per_epoch"] for r in reports] == [3, 3]
    for epoch in ("0", "1"):
        ranks = [[i for batch in r["batches"][epoch] for i in batch] for r in reports]
        assert [len(batches) for batches in (r["batches"][epoch] for r in reports)] == [3, 3]
        everything = ranks[0] + ranks[1]
        assert len(everything) == len(set(everything)) == VIDEOS - VIDEOS % 16
        # The same batches as this process computes for each rank: a function of seed and epoch only.
        assert ranks == one_epoch_of_every_rank(store60, 2, 8, 2, int(epoch))


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("world_size", [1, 2])
def test_lmdb_obeys_the_same_bound(train_lmdb, workers, world_size):
    usable = EpochLoader(str(train_lmdb), RGB_ONLY, data_cfg(), 0, 1).num_videos
    ranks = one_epoch_of_every_rank(train_lmdb, workers, 3, world_size)
    everything = [i for seen in ranks for i in seen]
    assert len(everything) == len(set(everything)) == usable - usable % (3 * world_size)
