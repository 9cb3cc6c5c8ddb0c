"""The reader API (tricoclr.data.store) over real LMDB environments and WebDataset shards."""

from __future__ import annotations

import multiprocessing
import pickle
import shutil

import numpy as np
import pytest
import torch
from video_factory import make_video, moving_frames, run_prepare, tone

from tricoclr.data import schema
from tricoclr.data.store import iter_shard_samples, open_store, record_from_sample

CHUNK = 8


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    src = tmp_path_factory.mktemp("store_src")
    make_video(src / "Move" / "a.mp4", seconds=2.0, width=48, height=48, audio=tone(800, 2.0, 16000))
    make_video(src / "Move" / "a-b.mp4", seconds=1.0, width=48, height=48, dx=2, seed=1)
    make_video(src / "Move" / "a_b.mp4", seconds=1.0, width=48, height=48, seed=2)
    # portrait, 84 rows: the flow y field starts at row 88 of the stacked JPEG
    make_video(src / "Fall" / "tall.mp4", frames=moving_frames(30, 84, 48, dx=0, dy=1, seed=4), fps=30)
    return src


@pytest.fixture(scope="module")
def lmdb_out(source, tmp_path_factory):
    out = tmp_path_factory.mktemp("store_lmdb")
    run_prepare(source, out, "--size", "48", "--chunk-frames", str(CHUNK), fmt="lmdb")
    return out


@pytest.fixture(scope="module")
def wds_out(source, tmp_path_factory):
    out = tmp_path_factory.mktemp("store_wds")
    run_prepare(source, out, "--size", "48", "--chunk-frames", str(CHUNK), "--shard-max-videos", "2", fmt="webdataset")
    return out


def _by_source(store, name):
    return next(v for v in store.videos() if v["source"] == name)


def test_videos_and_classes(lmdb_out):
    store = open_store(lmdb_out)
    assert store.format == "lmdb" and store.root == lmdb_out
    videos = store.videos()
    assert [v["id"] for v in videos] == sorted(v["id"] for v in videos) and len(videos) == 4
    for v in videos:
        assert {"id", "label", "label_index", "frames", "fps", "has_audio", "part"} <= set(v)
    assert store.class_names() == ["Fall", "Move"]
    assert _by_source(store, "Move/a.mp4")["label_index"] == 1


def test_clip_reads_only_its_chunks(lmdb_out):
    store = open_store(lmdb_out)
    meta = _by_source(store, "Move/a.mp4")
    record = store.record(meta["id"])
    reads = []
    store.on_read = lambda video_id, part, nbytes: reads.append(part)
    clip = record.frames("rgb", 10, 12)  # frames 10..21 live in chunks 1 and 2
    assert clip.shape == (12, 3, 48, 48) and clip.dtype == torch.uint8
    assert reads == ["rgb_00001", "rgb_00002"]
    assert store.stats["rgb_00001"] == 1 and store.stats["rgb_00000"] == 0
    assert store.stats["meta"] == 1  # record() read the meta once, frames() only chunks
    reads.clear()
    record.frames("flow", 16, 8)
    assert reads == ["flow_00002"]


def test_any_span_equals_the_same_slice_of_the_whole(lmdb_out):
    store = open_store(lmdb_out)
    meta = _by_source(store, "Move/a.mp4")
    record = store.record(meta["id"])
    for modality in ("rgb", "flow"):
        whole = record.frames(modality, 0, meta["frames"])
        for start, count in [(0, 1), (7, 2), (5, 30), (meta["frames"] - 3, 3), (9, 0)]:
            assert torch.equal(record.frames(modality, start, count), whole[start : start + count])


def test_out_of_range_and_unknown_requests(lmdb_out):
    store = open_store(lmdb_out)
    meta = _by_source(store, "Move/a.mp4")
    record = store.record(meta["id"])
    with pytest.raises(IndexError):
        record.frames("rgb", meta["frames"] - 2, 3)
    with pytest.raises(KeyError):
        record.frames("depth", 0, 1)
    with pytest.raises(KeyError):
        store.record("no-such-video")


def test_flow_fields_come_apart_at_the_recorded_offset(lmdb_out):
    store = open_store(lmdb_out)
    meta = _by_source(store, "Fall/tall.mp4")
    assert (meta["height"], meta["width"], meta["flow_y_offset"]) == (84, 48, 88)
    flow = store.record(meta["id"]).frames("flow", 0, meta["frames"])
    assert flow.shape == (30, 2, 84, 48)
    pixels = schema.dequantise_flow(flow[:, :, 8:-8, 8:-8].float())
    assert abs(pixels[:, 1].mean() - 1.0) < 0.15 and pixels[:, 0].abs().mean() < 0.15


def test_spectrogram_slices(lmdb_out):
    store = open_store(lmdb_out)
    meta = _by_source(store, "Move/a.mp4")
    record = store.record(meta["id"])
    whole = record.spectrogram()
    steps = meta["audio"]["steps"]
    assert whole.shape == (128, steps) == (128, 256) and whole.dtype == torch.float32
    assert torch.equal(record.spectrogram(100, 28), whole[:, 100:128])
    tail = record.spectrogram(steps - 2, 5)  # rounding at the end: padded with silence
    assert torch.equal(tail[:, :2], whole[:, -2:]) and torch.allclose(
        tail[:, 2:], torch.tensor(np.log(1e-6), dtype=torch.float32), atol=0.01
    )
    with pytest.raises(IndexError):
        record.spectrogram(steps, 1)
    assert schema.audio_step_for_frame(30, meta["fps"]) == 128
    no_audio = store.record(_by_source(store, "Move/a_b.mp4")["id"])
    with pytest.raises(ValueError, match="no audio"):
        no_audio.spectrogram()


def test_lmdb_is_read_only_and_reopened_per_process(lmdb_out):
    store = open_store(lmdb_out)
    meta = _by_source(store, "Move/a.mp4")
    expected = store.record(meta["id"]).frames("rgb", 0, 4)  # opens the environment here
    reader = next(iter(store._lmdb.values()))
    assert reader.env().flags()["readonly"]
    clone = pickle.loads(pickle.dumps(store))  # what a spawned DataLoader worker receives
    assert torch.equal(clone.record(meta["id"]).frames("rgb", 0, 4), expected)
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    child = ctx.Process(target=_read_in_child, args=(store, meta["id"], results))
    child.start()
    child.join(timeout=60)
    assert child.exitcode == 0
    assert torch.equal(torch.from_numpy(results.get(timeout=5)), expected)


def _read_in_child(store, video_id, results):
    # The environment inherited from the parent belongs to another pid: the store reopens it.
    results.put(store.record(video_id).frames("rgb", 0, 4).numpy())


def test_lmdb_store_without_its_manifest(lmdb_out, tmp_path):
    shutil.copytree(lmdb_out / schema.LMDB_DIR, tmp_path / schema.LMDB_DIR)
    alone, full = open_store(tmp_path), open_store(lmdb_out)
    assert [v["id"] for v in alone.videos()] == [v["id"] for v in full.videos()]
    video_id = full.videos()[0]["id"]
    assert torch.equal(alone.record(video_id).frames("rgb", 0, 3), full.record(video_id).frames("rgb", 0, 3))
    assert sorted(r.id for r in alone.iter_records()) == sorted(v["id"] for v in full.videos())


def test_webdataset_store(wds_out, lmdb_out):
    store = open_store(wds_out)
    assert store.format == "webdataset"
    with pytest.raises(NotImplementedError, match="sequential"):
        store.record(store.videos()[0]["id"])
    shards = store.shard_paths()
    assert len(shards) == 2 and all(p.endswith(".tar") for p in shards)
    lmdb_store = open_store(lmdb_out)
    samples = list(iter_shard_samples(shards))
    assert sorted(s["__key__"] for s in samples) == [v["id"] for v in store.videos()]
    for sample in samples:
        record = record_from_sample(sample)
        assert record.id == sample["__key__"]
        frames = record.meta["frames"]
        assert torch.equal(record.frames("rgb", 3, 9), lmdb_store.record(record.id).frames("rgb", 3, 9))
        assert record.frames("flow", 0, frames).shape[1] == 2


def _reference_frames(record, modality: str, indices: list[int]) -> torch.Tensor:
    """Frames decoded one by one and stacked contiguously, flow fields cut at the recorded
    offset: the straightforward reading that ``frames_at``'s layout tricks must equal."""
    from torchvision.io import decode_jpeg

    meta, chunk = record.meta, record.meta["chunk_frames"]
    images = []
    for index in indices:
        (blob,) = record._fetch([schema.chunk_key(modality, index // chunk)])
        jpeg = schema.unpack_frames(blob)[index % chunk]
        image = decode_jpeg(torch.frombuffer(bytearray(jpeg), dtype=torch.uint8))
        if modality == "flow":
            h, y = meta["height"], meta["flow_y_offset"]
            image = torch.cat([image[:, :h], image[:, y : y + h]])
        images.append(image.contiguous())
    return torch.stack(images)


@pytest.mark.parametrize("source_name", ["Fall/tall.mp4", "Move/a.mp4"])
def test_frames_at_equals_frame_by_frame_decoding(lmdb_out, source_name):
    """Channels-last RGB and flow viewed inside the stacked images (84 rows: y field at row 88)
    hold exactly the values of decoding frame by frame; strided, unsorted and repeated indices
    and clips across chunks included."""
    store = open_store(lmdb_out)
    record = store.record(_by_source(store, source_name)["id"])
    frames = record.meta["frames"]
    for indices in ([0, 2, 4, 6, 8, 10, 12], [frames - 1, 3, 3, 9, 17], list(range(5, 21)), [7]):
        for modality in ("rgb", "flow"):
            clip = record.frames_at(modality, indices)
            assert clip.dtype == torch.uint8 and clip.shape[:2] == (len(indices), 3 if modality == "rgb" else 2)
            assert torch.equal(clip, _reference_frames(record, modality, indices)), (modality, indices)
    assert record.frames_at("rgb", []).shape == (0, 3, record.meta["height"], record.meta["width"])


def test_a_frame_of_the_wrong_size_is_named(lmdb_out, tmp_path):
    """A chunk whose JPEGs do not have the meta's size: a ValueError naming video, frame and sizes."""
    from torchvision.io import encode_jpeg

    from tricoclr.data.store import VideoRecord

    store = open_store(lmdb_out)
    meta = dict(_by_source(store, "Move/a.mp4"))
    small = bytes(encode_jpeg(torch.zeros((3, 16, 16), dtype=torch.uint8)).numpy())
    blob = schema.pack_frames([small] * meta["chunk_frames"])
    record = VideoRecord(meta, lambda parts: [blob for _ in parts])
    with pytest.raises(ValueError, match=r"rgb frame 2 decodes to \(3, 16, 16\), the meta says \(3, 48, 48\)"):
        record.frames_at("rgb", [2, 3])
