"""The training loaders on real LMDB and WebDataset stores: batch layout, modality selection,
determinism, the split over ranks x workers, broken records and mid-epoch resume."""

from __future__ import annotations

import copy
import gc
import logging
import shutil
import tarfile
from pathlib import Path

import lmdb
import pytest
import torch

from data_tools.writers import PartWriter
from tricoclr.config import DEFAULTS
from tricoclr.data import schema
from tricoclr.data.dataset import DataStats, EpochLoader
from tricoclr.data.samples import BROKEN_KEY, StageViews, finish_batch, usable_videos
from tricoclr.data.sampling import clip_frame_indices, clip_spec_of, sample_clip_starts, sample_generator
from tricoclr.data.schema import chunks_for_span
from tricoclr.data.store import iter_shard_samples, open_store
from tricoclr.data.stream_plan import cut_circle, make_plan, rebatch, resume_point

COOPERATIVE = StageViews(both_views=("rgb",), view2_only=("flow", "audio"))
RGB_ONLY = StageViews(both_views=("rgb",))
FRAMES, STRIDE, SIZE, STEPS = 4, 2, 32, 32


def data_cfg(workers: int = 0, **extra) -> dict:
    cfg = copy.deepcopy(DEFAULTS["data"])
    cfg.update(
        workers=workers,
        clip_frames=FRAMES,
        clip_stride=STRIDE,
        size=SIZE,
        spectrogram_steps=STEPS,
        shuffle_buffer=4,
        prefetch_factor=2,
        **extra,
    )
    return cfg


def epoch_batches(
    path, views=COOPERATIVE, workers=0, batch_size=2, epoch=0, start_batch=0, seed=0, rank=0, world_size=1
) -> list[dict]:
    """One epoch of one rank; the loader (and its LMDB environment) is closed before returning."""
    loader = EpochLoader(str(path), views, data_cfg(workers), seed, batch_size, rank=rank, world_size=world_size)
    loader.set_epoch(epoch, start_batch)
    batches = list(loader)
    assert len(batches) == len(loader) == loader.batches_per_epoch() - start_batch
    del loader
    gc.collect()
    return batches


def indices_of(batches: list[dict]) -> list[int]:
    return [i for batch in batches for i in batch["video_index"].tolist()]


def assert_batches_equal(first: list[dict], second: list[dict]) -> None:
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert a.keys() == b.keys()
        for key in a:
            if key == BROKEN_KEY:
                continue
            if isinstance(a[key], dict):
                assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
            elif torch.is_tensor(a[key]):
                assert torch.equal(a[key], b[key]), key
            else:
                assert a[key] == b[key], key


def concat(batches: list[dict], key: str) -> torch.Tensor:
    return torch.cat([batch[key] for batch in batches])


@pytest.fixture(scope="module")
def wds_small_shards(train_wds, tmp_path_factory) -> Path:
    """The train WebDataset store rewritten by the real writer with 2 videos per shard."""
    out = tmp_path_factory.mktemp("wds_small") / "store"
    entries = {e["id"]: e for e in open_store(train_wds).manifest()}
    writer = PartWriter(out, "webdataset", shard_max_videos=2)
    for sample in iter_shard_samples(open_store(train_wds).shard_paths()):
        entry = {k: v for k, v in entries[sample["__key__"]].items() if k not in ("shard", "part")}
        writer.add(entry, {schema.part_from_member(k): v for k, v in sample.items() if not k.startswith("__")})
    writer.close()
    return out


def usable_count(path, views=COOPERATIVE) -> int:
    return len(usable_videos(open_store(path).videos(), views, data_cfg()))


# ---- the batch --------------------------------------------------------------------------------


@pytest.mark.parametrize("store", ["train_lmdb", "train_wds"])
def test_cooperative_batch_layout(store, request):
    path = request.getfixturevalue(store)
    metas = open_store(path).videos()
    batch = epoch_batches(path)[0]
    assert set(batch) == {
        "video_index",
        "video_id",
        "label",
        BROKEN_KEY,
        "rgb.view1",
        "rgb.view2",
        "rgb.view1.params",
        "rgb.view2.params",
        "flow.view2",
        "flow.view2.params",
        "audio.view2",
    }
    assert batch["rgb.view1"].shape == batch["rgb.view2"].shape == (2, 3, FRAMES, SIZE, SIZE)
    assert batch["rgb.view1"].dtype == torch.uint8  # photometric part on the device
    # flow travels quantised; the device applies its per-clip affine (dequantise, gain, flip, normalise)
    assert batch["flow.view2"].shape == (2, 2, FRAMES, SIZE, SIZE) and batch["flow.view2"].dtype == torch.uint8
    assert batch["flow.view2.params"]["scale"].shape == batch["flow.view2.params"]["shift"].shape == (2, 2)
    assert batch["audio.view2"].shape == (2, 1, schema.AUDIO_N_MELS, STEPS)
    assert batch["audio.view2"].dtype == torch.float32
    for i, video_id, label in zip(batch["video_index"].tolist(), batch["video_id"], batch["label"].tolist()):
        assert metas[i]["id"] == video_id and metas[i]["label_index"] == label
    assert batch[BROKEN_KEY].tolist() == [0, 0]

    finished = finish_batch(batch, COOPERATIVE, "cpu")
    assert set(finished) == {"video_index", "label", "rgb.view1", "rgb.view2", "flow.view2", "audio.view2"}
    assert finished["rgb.view1"].shape == (2, 3, FRAMES, SIZE, SIZE) and finished["rgb.view1"].dtype == torch.float32
    assert -2.2 < float(finished["rgb.view1"].min()) and float(finished["rgb.view1"].max()) < 2.7  # ImageNet-normalised
    assert finished["flow.view2"].dtype == torch.float32 and finished["flow.view2"].shape == (2, 2, FRAMES, SIZE, SIZE)


def epoch_reads(path, views: StageViews, seed: int, epoch: int) -> tuple[list[dict], dict[str, set[str]]]:
    """One epoch in this process, and the parts of each video it read from the LMDB store."""
    loader = EpochLoader(str(path), views, data_cfg(), seed, batch_size=2)
    reads: dict[str, set[str]] = {}
    loader.dataset.store.on_read = lambda video_id, part, nbytes: reads.setdefault(video_id, set()).add(part)
    loader.set_epoch(epoch)
    batches = list(loader)
    del loader
    gc.collect()
    return batches, reads


def clip_chunks(meta: dict, modality: str, start: int) -> set[str]:
    """The chunks of ``modality`` that hold the frames of the clip starting at ``start``."""
    frames = clip_frame_indices(start, clip_spec_of(data_cfg()), meta["frames"])
    span = chunks_for_span(int(frames[0]), int(frames[-1] - frames[0]) + 1, meta["chunk_frames"])
    return {schema.chunk_key(modality, c) for c in span}


def sampled_starts(meta: dict, seed: int, epoch: int, video_index: int) -> tuple[int, int]:
    generator = sample_generator(seed, epoch, video_index, 0, "clips")
    return sample_clip_starts(meta["frames"], clip_spec_of(data_cfg()), generator)


def test_rgb_only_stage_reads_only_the_sampled_rgb_chunks(train_lmdb):
    batches, reads = epoch_reads(train_lmdb, RGB_ONLY, seed=3, epoch=1)
    assert all(not any(k.startswith(("flow", "audio")) for k in batch) for batch in batches)
    metas = open_store(train_lmdb).videos()
    expected = {}
    for i in indices_of(batches):
        starts = sampled_starts(metas[i], 3, 1, i)
        # record() reads the meta from the store; then the chunks of the two clips, nothing else.
        expected[metas[i]["id"]] = (
            {schema.META_PART} | clip_chunks(metas[i], "rgb", starts[0]) | clip_chunks(metas[i], "rgb", starts[1])
        )
    assert reads == expected


def test_samplers_read_the_frames_of_the_key_clip(train_lmdb):
    """Flow, a frozen sampler in this stage, is read for view 2 only, at view 2's frames of RGB."""
    batches, reads = epoch_reads(train_lmdb, COOPERATIVE, seed=5, epoch=0)
    metas = open_store(train_lmdb).videos()
    for i in indices_of(batches):
        starts = sampled_starts(metas[i], 5, 0, i)
        parts = reads[metas[i]["id"]]
        assert {p for p in parts if p.startswith("flow")} == clip_chunks(metas[i], "flow", starts[1])
        assert {p for p in parts if p.startswith("rgb")} == clip_chunks(metas[i], "rgb", starts[0]) | clip_chunks(
            metas[i], "rgb", starts[1]
        )
        assert schema.AUDIO_PART in parts


@pytest.mark.parametrize("store", ["train_lmdb", "train_wds"])
def test_rgb_only_stage_has_no_flow_or_audio(store, request):
    batch = epoch_batches(request.getfixturevalue(store), views=RGB_ONLY)[0]
    assert {k for k in batch if k.startswith(("rgb", "flow", "audio"))} == {
        "rgb.view1",
        "rgb.view2",
        "rgb.view1.params",
        "rgb.view2.params",
    }


# ---- determinism ------------------------------------------------------------------------------


@pytest.mark.parametrize("store", ["train_lmdb", "train_wds"])
def test_same_seed_and_epoch_give_identical_batches(store, request):
    path = request.getfixturevalue(store)
    first, again = epoch_batches(path, epoch=2), epoch_batches(path, epoch=2)
    assert_batches_equal(first, again)
    other = epoch_batches(path, epoch=3)
    assert not torch.equal(concat(first, "rgb.view1"), concat(other, "rgb.view1"))


def test_persistent_wds_workers_follow_set_epoch(wds_small_shards):
    loader = EpochLoader(str(wds_small_shards), RGB_ONLY, data_cfg(workers=2), seed=0, batch_size=2)
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        batches = list(loader)
    del loader
    assert_batches_equal(batches, epoch_batches(wds_small_shards, views=RGB_ONLY, workers=2, epoch=1))


def test_lmdb_batches_do_not_depend_on_worker_count(train_lmdb):
    in_process = epoch_batches(train_lmdb, epoch=1)
    with_workers = epoch_batches(train_lmdb, workers=2, epoch=1)
    assert_batches_equal(in_process, with_workers)


# ---- the split over ranks x workers -------------------------------------------------------------


def test_lmdb_two_ranks_take_contiguous_slices_of_the_global_batch(train_lmdb):
    b = 2
    ranks = [epoch_batches(train_lmdb, workers=2, batch_size=b, epoch=1, rank=r, world_size=2) for r in range(2)]
    single = epoch_batches(train_lmdb, batch_size=2 * b, epoch=1)
    assert len(ranks[0]) == len(ranks[1]) == len(single) == usable_count(train_lmdb) // (2 * b)
    for step, global_batch in enumerate(single):
        for key in ("video_index", "rgb.view1", "rgb.view2", "flow.view2", "audio.view2"):
            assert torch.equal(torch.cat([ranks[0][step][key], ranks[1][step][key]]), global_batch[key])
    seen = indices_of(ranks[0]) + indices_of(ranks[1])
    assert len(seen) == len(set(seen)) == len(single) * 2 * b


@pytest.mark.parametrize("shards", ["small", "one"])
def test_wds_two_ranks_two_workers_no_duplicates_equal_batches(shards, train_wds, wds_small_shards, caplog):
    path = wds_small_shards if shards == "small" else train_wds
    num_shards = len(open_store(path).shard_paths())
    assert (num_shards >= 4) == (shards == "small")  # 'one': fewer shards than the 4 slots
    with caplog.at_level(logging.INFO, logger="tricoclr.data.dataset"):
        ranks = [epoch_batches(path, workers=2, batch_size=2, epoch=1, rank=r, world_size=2) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) > 0
    seen = indices_of(ranks[0]) + indices_of(ranks[1])
    assert len(seen) == len(set(seen))
    usable = usable_count(path)
    assert set(seen) <= set(usable_videos(open_store(path).videos(), COOPERATIVE, data_cfg()))
    dropped = usable - len(seen)
    assert dropped == usable % (2 * 2)  # N mod (batch x ranks), with one shard or many
    assert (dropped > 0) == any("drops" in r.message for r in caplog.records)


def test_the_circle_is_cut_into_consecutive_pieces_each_sample_once():
    counts = [("s0", 5), ("s1", 0), ("s2", 3), ("s3", 4)]  # 12 samples; s1 has none usable
    pieces = cut_circle(counts, offset=7, sizes=[4, 4, 3, 1])
    assert pieces == [
        [("s2", 2, 3), ("s3", 0, 3)],
        [("s3", 3, 4), ("s0", 0, 3)],
        [("s0", 3, 5), ("s2", 0, 1)],
        [("s2", 1, 2)],
    ]
    covered = [(shard, p) for piece in pieces for shard, first, end in piece for p in range(first, end)]
    assert sorted(covered) == sorted((shard, p) for shard, n in counts for p in range(n))


@pytest.mark.parametrize("total, batch, ranks, workers", [(60, 16, 1, 2), (60, 16, 2, 4), (7, 2, 2, 4), (33, 5, 1, 1)])
def test_plan_drops_at_most_n_mod_global_batch(total, batch, ranks, workers):
    plan = make_plan(total, batch, ranks, workers)
    assert plan.batches_per_rank == total // (batch * ranks) and plan.dropped == total % (batch * ranks)
    assert sum(plan.worker_quotas) == plan.batches_per_rank * batch
    assert max(plan.worker_quotas) - min(plan.worker_quotas) <= 1
    assert sum(plan.piece_sizes()) == total and len(plan.piece_sizes()) == 2 * ranks * workers


def test_resume_point_follows_the_loaders_chunk_cycle():
    # Quotas 5, 3, 2 in chunks of 2: the loader takes w0:2 w1:2 w2:2 | w0:2 w1:1 | w0:1.
    assert resume_point([5, 3, 2], 2, 0) == ([0, 0, 0], 0)
    assert resume_point([5, 3, 2], 2, 4) == ([2, 2, 0], 2)
    assert resume_point([5, 3, 2], 2, 6) == ([2, 2, 2], 0)
    assert resume_point([5, 3, 2], 2, 7) == ([3, 2, 2], 0)  # inside w0's second chunk: w0 is next
    assert resume_point([5, 3, 2], 2, 8) == ([4, 2, 2], 1)
    assert resume_point([5, 3, 2], 2, 9) == ([4, 3, 2], 0)  # w2 exhausted is skipped
    assert resume_point([5, 3, 2], 2, 10)[0] == [5, 3, 2]  # the epoch is over


def test_rebatch_joins_chunks_into_whole_batches_in_order():
    def chunk(first, n):
        return {
            "video_index": torch.arange(first, first + n),
            "video_id": [f"v{i}" for i in range(first, first + n)],
            "x.params": {"scale": torch.arange(first, first + n).float()},
        }

    whole = chunk(0, 3)
    batches = list(rebatch([whole, chunk(3, 2), chunk(5, 3), chunk(8, 1)], 3))
    assert batches[0] is whole  # a whole batch at a batch boundary passes unchanged
    assert [b["video_index"].tolist() for b in batches] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert batches[2]["video_id"] == ["v6", "v7", "v8"] and batches[2]["x.params"]["scale"].tolist() == [6, 7, 8]
    with pytest.raises(RuntimeError, match="1 samples left over"):
        list(rebatch([chunk(0, 4)], 3))


# ---- broken records ---------------------------------------------------------------------------


def test_lmdb_broken_chunk_is_replaced_and_counted(train_lmdb, tmp_path):
    path = Path(shutil.copytree(train_lmdb, tmp_path / "lmdb"))
    metas = open_store(path).videos()
    broken = metas[usable_videos(metas, RGB_ONLY, data_cfg())[0]]
    env = lmdb.open(str(path / schema.LMDB_DIR), subdir=True)
    with env.begin(write=True) as txn:
        for chunk in range(-(-broken["frames"] // broken["chunk_frames"])):
            key = schema.lmdb_key(broken["id"], schema.chunk_key("rgb", chunk))
            txn.put(key, b"garbage" + txn.get(key)[7:])
    env.close()

    before = DataStats.broken_records
    # Every usable video in one batch: the broken one is met exactly once.
    n = usable_count(path, RGB_ONLY)
    (batch,) = epoch_batches(path, views=RGB_ONLY, workers=2, batch_size=n)
    assert DataStats.broken_records - before == int(batch[BROKEN_KEY].sum()) == 1
    assert metas.index(broken) not in batch["video_index"].tolist()
    assert batch["rgb.view1"].shape[0] == n


def _garble_member(shard: Path, suffix: str) -> str:
    """Overwrite one member's bytes in place (the tar stays well-formed); returns its key."""
    with tarfile.open(shard) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(suffix))
    with open(shard, "r+b") as f:
        f.seek(member.offset_data)
        f.write(b"\xff" * member.size)
    return member.name.split(".", 1)[0]


@pytest.mark.parametrize("spare", [True, False])
def test_wds_garbled_member_is_skipped_and_counted(spare, wds_small_shards, tmp_path):
    path = Path(shutil.copytree(wds_small_shards, tmp_path / "wds"))
    key = _garble_member(Path(open_store(path).shard_paths()[0]), ".rgb_00000.tcf")
    usable = usable_count(path, RGB_ONLY)
    # One slot. With a spare sample (a batch size that leaves a remainder) the broken record
    # is replaced by it; without one the last good sample is repeated to fill the epoch.
    batch_size = next(b for b in range(2, usable) if usable % b) if spare else 1
    expected = len(epoch_batches(wds_small_shards, views=RGB_ONLY, batch_size=batch_size))
    before = DataStats.broken_records
    batches = epoch_batches(path, views=RGB_ONLY, batch_size=batch_size)
    assert len(batches) == expected
    assert DataStats.broken_records - before == 1
    ids = [video_id for batch in batches for video_id in batch["video_id"]]
    assert key not in ids
    assert (len(set(ids)) == len(ids)) == spare


def test_wds_truncated_shard_keeps_ranks_in_step(wds_small_shards, tmp_path):
    path = Path(shutil.copytree(wds_small_shards, tmp_path / "wds"))
    shard = Path(open_store(path).shard_paths()[1])
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])
    before = DataStats.broken_records
    ranks = [epoch_batches(path, views=RGB_ONLY, workers=2, batch_size=1, rank=r, world_size=2) for r in range(2)]
    clean = [
        epoch_batches(wds_small_shards, views=RGB_ONLY, workers=2, batch_size=1, rank=r, world_size=2) for r in range(2)
    ]
    assert [len(r) for r in ranks] == [len(r) for r in clean]
    assert DataStats.broken_records - before >= 1


# ---- mid-epoch resume ---------------------------------------------------------------------------


def test_lmdb_resume_yields_exactly_the_remaining_batches(train_lmdb):
    full = epoch_batches(train_lmdb, epoch=4)
    assert_batches_equal(epoch_batches(train_lmdb, epoch=4, start_batch=2), full[2:])


def test_wds_resume_with_workers_yields_exactly_the_remaining_batches(wds_small_shards):
    full = epoch_batches(wds_small_shards, workers=2, batch_size=1, epoch=4)
    for start in (1, 3):
        assert_batches_equal(
            epoch_batches(wds_small_shards, workers=2, batch_size=1, epoch=4, start_batch=start), full[start:]
        )
