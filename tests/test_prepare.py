"""``tricoclr-data prepare`` end to end: real clips, flow and audio correctness, list formats,
both stores, parts for array jobs, and kill -9 / resume."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from video_factory import (
    MEDIA,
    REPO,
    make_video,
    moving_frames,
    prepare_argv,
    run_prepare,
    subprocess_env,
    tone,
)

from data_tools import lists, prepare
from data_tools.audio import AudioConfig, mel_bin_for_frequency
from data_tools.decode import VideoDecoder
from tricoclr.data import schema
from tricoclr.data.store import open_store, read_manifest

# ---- real clips -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def media_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("media_lmdb")
    run_prepare(MEDIA, out)
    return out


def test_real_media_outcomes(media_out):
    by_source = {e["source"]: e for e in open_store(media_out).manifest()}
    assert set(by_source) == {"bigbuckbunny.mp4", "bikes.mp4", "cityCC0.mpg", "sample.oggtheora", "truncated.mp4"}
    bunny = by_source["bigbuckbunny.mp4"]
    assert bunny["status"] == "ok" and bunny["frames"] == 158  # 5.28 s at 30 fps
    assert bunny["has_audio"] and bunny["source_info"]["audio_channels"] == 6
    assert bunny["audio"]["steps"] == round(158 / 30 * 128)
    assert (bunny["height"], bunny["width"]) == (128, 228)
    bikes = by_source["bikes.mp4"]
    assert bikes["status"] == "ok" and not bikes["has_audio"] and "no_audio_stream" in bikes["flags"]
    assert by_source["cityCC0.mpg"]["frames"] == 228 and by_source["cityCC0.mpg"]["status"] == "ok"
    assert by_source["sample.oggtheora"]["frames"] == 168  # 10 fps source, repeated x3
    assert by_source["truncated.mp4"]["status"] == "failed" and by_source["truncated.mp4"]["reason"]
    summary = json.loads((media_out / schema.SUMMARY_FILE).read_text())
    assert summary["videos"] == 4 and summary["failed"] == 1
    assert summary["ignored_files"]["examples"] == ["SOURCES.md"]


@pytest.mark.parametrize("name", ["bigbuckbunny.mp4", "cityCC0.mpg", "sample.oggtheora"])
def test_stored_frames_equal_decoded_frames(media_out, name):
    store = open_store(media_out)
    meta = next(v for v in store.videos() if v["source"] == name)
    with VideoDecoder(str(MEDIA / name), 30, 128) as decoder:
        decoded = [rgb for _, rgb in decoder.frames()]
    assert len(decoded) == meta["frames"]
    record = store.record(meta["id"])
    for start in (0, meta["frames"] // 2, meta["frames"] - 5):
        stored = record.frames("rgb", start, 5).permute(0, 2, 3, 1).float()
        original = torch.from_numpy(np.stack(decoded[start : start + 5])).float()
        psnr = 10 * torch.log10(255.0**2 / (stored - original).pow(2).mean())
        assert psnr > 30, psnr  # JPEG at quality 90: ~33-40 dB on these clips


def test_real_audio_is_aligned_and_finite(media_out):
    store = open_store(media_out)
    meta = next(v for v in store.videos() if v["source"] == "bigbuckbunny.mp4")
    spec = store.record(meta["id"]).spectrogram()
    assert spec.shape == (128, meta["audio"]["steps"]) and torch.isfinite(spec).all()
    assert spec.max() > np.log(1e-6) + 5  # real sound, not silence


# ---- flow -------------------------------------------------------------------------------------


def _mean_flow(out, source):
    store = open_store(out)
    meta = next(v for v in store.videos() if v["source"] == source)
    flow = schema.dequantise_flow(store.record(meta["id"]).frames("flow", 0, meta["frames"]).float())
    inner = flow[:, :, 8:-8, 8:-8]  # away from the wrap-around border
    return inner[:, 0].mean(dim=(1, 2)), inner[:, 1].mean(dim=(1, 2)), meta


def test_flow_sign_and_scale_on_a_known_translation(tmp_path):
    src = tmp_path / "src"
    make_video(src / "right2.mp4", frames=moving_frames(45, dx=2), fps=30)
    make_video(src / "up1.mp4", frames=moving_frames(45, dx=0, dy=-1, seed=3), fps=30)
    out = tmp_path / "out"
    run_prepare(src, out, "--size", "64", "--no-audio")
    x, y, meta = _mean_flow(out, "right2.mp4")
    assert meta["frames"] == 45 and meta["flow_frames"] == 45
    assert torch.allclose(x.median(), torch.tensor(2.0), atol=0.15) and y.abs().median() < 0.15
    x, y, _ = _mean_flow(out, "up1.mp4")
    assert torch.allclose(y.median(), torch.tensor(-1.0), atol=0.15) and x.abs().median() < 0.15


def test_upsampled_video_has_no_zero_flow(tmp_path):
    src = tmp_path / "src"
    make_video(src / "slow.mp4", frames=moving_frames(20, dx=2), fps=15)  # 2 px per 1/15 s
    out = tmp_path / "out"
    run_prepare(src, out, "--size", "64", "--no-audio")
    x, _, meta = _mean_flow(out, "slow.mp4")
    assert meta["frames"] == 40 and "repeated_frames" in meta["flags"]
    assert (x[:-2] - 1.0).abs().max() < 0.2  # each 1/30 s step carries half of the 2 px
    assert (x > 0.5).all()  # the last frames copy the previous field, none is zero


def test_tvl1_flow(tmp_path):
    src = tmp_path / "src"
    make_video(src / "right.mp4", frames=moving_frames(5, 48, 48, dx=2), fps=30)
    out = tmp_path / "out"
    run_prepare(src, out, "--size", "48", "--no-audio", flow="tvl1")
    x, y, meta = _mean_flow(out, "right.mp4")
    assert meta["flow_method"] == "tvl1"
    assert torch.allclose(x.mean(), torch.tensor(2.0), atol=0.2) and y.abs().mean() < 0.2


# ---- audio ------------------------------------------------------------------------------------


@pytest.mark.parametrize("freq,rate", [(1000, 16000), (3000, 44100)])
def test_pure_tone_lands_in_its_mel_bin(tmp_path, freq, rate):
    src = tmp_path / "src"
    make_video(src / "tone.mkv", seconds=2.0, audio=tone(freq, 2.0, rate), audio_rate=rate, audio_codec="flac")
    out = tmp_path / "out"
    manifest = run_prepare(src, out, "--size", "32", "--flow", "none")
    meta = manifest["tone.mkv"]
    spec = open_store(out).record(meta["id"]).spectrogram()
    assert spec.shape == (128, 256)
    peak_bins = spec[:, 8:-8].argmax(dim=0)
    assert (peak_bins == mel_bin_for_frequency(freq, AudioConfig())).float().mean() > 0.95


def test_audio_is_aligned_by_timestamps(tmp_path):
    """A tone that starts 1 s into the file lights up from step 128 on."""
    wave = np.concatenate([np.zeros(16000, np.float32), tone(2000, 1.0, 16000)])
    src = tmp_path / "src"
    make_video(src / "late.mkv", seconds=2.0, audio=wave, audio_codec="flac")
    out = tmp_path / "out"
    meta = run_prepare(src, out, "--size", "32", "--flow", "none")["late.mkv"]
    spec = open_store(out).record(meta["id"]).spectrogram()
    loud = (spec.max(dim=0).values > spec.max() - 5).nonzero().flatten()
    assert abs(int(loud[0]) - 128) <= 4


# ---- lists and labels -------------------------------------------------------------------------


def _tiny(path):
    return make_video(path, seconds=0.4, width=32, height=32)


def _quick(*extra):
    return ("--size", "32", "--flow", "none", "--no-audio", *extra)


def test_folder_labels_and_sorted_index(tmp_path):
    src = tmp_path / "src"
    for rel in ["Walk/a.mp4", "Run/b.mp4", "Run/c.mp4", "loose.mp4"]:
        _tiny(src / rel)
    out = tmp_path / "out"
    manifest = run_prepare(src, out, *_quick())
    assert manifest["Run/b.mp4"]["label"] == "Run" and manifest["Run/b.mp4"]["label_index"] == 0
    assert manifest["Walk/a.mp4"]["label_index"] == 1
    assert manifest["loose.mp4"]["label"] is None and manifest["loose.mp4"]["label_index"] is None
    assert open_store(out).class_names() == ["Run", "Walk"]


def test_ucf101_lists_share_classind(tmp_path):
    src, splits = tmp_path / "UCF-101", tmp_path / "ucfTrainTestlist"
    for rel in ["ApplyLipstick/v_1.avi", "Archery/v_2.avi", "Archery/v_3.avi"]:
        _tiny(src / rel)
    splits.mkdir()
    (splits / "classInd.txt").write_text("1 ApplyEyeMakeup\n2 ApplyLipstick\n3 Archery\n")
    (splits / "trainlist01.txt").write_text("ApplyLipstick/v_1.avi 2\nArchery/v_2.avi 3\n")
    (splits / "testlist01.txt").write_text("Archery/v_3.avi\n")
    train = run_prepare(src, tmp_path / "train", *_quick("--list", str(splits / "trainlist01.txt")))
    test = run_prepare(src, tmp_path / "test", *_quick("--list", str(splits / "testlist01.txt")))
    assert set(train) == {"ApplyLipstick/v_1.avi", "Archery/v_2.avi"} and set(test) == {"Archery/v_3.avi"}
    assert train["ApplyLipstick/v_1.avi"]["label_index"] == 1 and test["Archery/v_3.avi"]["label_index"] == 2
    assert open_store(tmp_path / "test").class_names() == ["ApplyEyeMakeup", "ApplyLipstick", "Archery"]


def test_hmdb51_split_files(tmp_path):
    src, splits = tmp_path / "hmdb51", tmp_path / "splits"
    for rel in ["brush_hair/x1.avi", "brush_hair/x2.avi", "cartwheel/y1.avi"]:
        _tiny(src / rel)
    splits.mkdir()
    (splits / "brush_hair_test_split1.txt").write_text("x1.avi 1 \nx2.avi 2 \n")
    (splits / "cartwheel_test_split1.txt").write_text("y1.avi 1 \n")
    (splits / "cartwheel_test_split2.txt").write_text("y1.avi 2 \n")
    train = run_prepare(src, tmp_path / "out", *_quick("--list", str(splits), "--list-subset", "train"))
    assert set(train) == {"brush_hair/x1.avi", "cartwheel/y1.avi"}
    assert train["cartwheel/y1.avi"]["label"] == "cartwheel" and train["cartwheel/y1.avi"]["label_index"] == 1


def test_kinetics_csv(tmp_path):
    src = tmp_path / "k400" / "train"
    _tiny(src / "air drumming" / "abcdefghijk_000010_000020.mp4")
    _tiny(src / "abseiling" / "zyxwvutsrqp_000001_000011.mp4")
    csv = tmp_path / "train.csv"
    csv.write_text(
        "label,youtube_id,time_start,time_end,split\n"
        "air drumming,abcdefghijk,10,20,train\n"
        "abseiling,zyxwvutsrqp,1,11,train\n"
        "abseiling,neverdownld,5,15,train\n"
    )
    manifest = run_prepare(tmp_path / "k400", tmp_path / "out", *_quick("--list", str(csv)))
    found = manifest["train/air drumming/abcdefghijk_000010_000020.mp4"]
    assert found["label"] == "air drumming" and found["label_index"] == 1 and found["status"] == "ok"
    missing = manifest["abseiling/neverdownld_000005_000015"]
    assert missing["status"] == "failed" and "not found" in missing["reason"]


# ---- both stores, parts -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_source(tmp_path_factory):
    src = tmp_path_factory.mktemp("small_src")
    for i in range(8):
        label = ["Jump", "Swim"][i % 2]
        make_video(
            src / label / f"v{i}.mp4",
            seconds=1.5,
            width=48,
            height=48,
            dx=1 + i % 3,
            seed=i,
            audio=tone(300 + 100 * i, 1.5, 16000) if i % 3 else None,
        )
    (src / "Jump" / "broken.mp4").write_bytes(b"\x00" * 1000)
    return src


def test_both_formats_store_identical_records(small_source, tmp_path):
    common = ("--size", "48", "--shard-max-videos", "3")
    run_prepare(small_source, tmp_path / "wds", *common, fmt="webdataset")
    run_prepare(small_source, tmp_path / "lmdb", *common, fmt="lmdb")
    wds_store, lmdb_store = open_store(tmp_path / "wds"), open_store(tmp_path / "lmdb")
    assert wds_store.format == "webdataset" and lmdb_store.format == "lmdb"
    assert len(wds_store.shard_paths()) == 3
    strip = lambda m: {k: v for k, v in m.items() if k not in ("shard", "part")}  # noqa: E731
    assert [strip(v) for v in wds_store.videos()] == [strip(v) for v in lmdb_store.videos()]
    seen = 0
    for record in wds_store.iter_records():
        twin = lmdb_store.record(record.id)
        for modality in ("rgb", "flow"):
            assert torch.equal(
                record.frames(modality, 0, record.meta["frames"]), twin.frames(modality, 0, record.meta["frames"])
            )
        if record.meta["has_audio"]:
            assert torch.equal(record.spectrogram(), twin.spectrogram())
        seen += 1
    assert seen == len(lmdb_store.videos()) == 8
    assert len(list(lmdb_store.iter_records())) == 8


def test_parts_cover_the_input_once(small_source, tmp_path):
    out = tmp_path / "parts"
    for index in range(3):
        run_prepare(small_source, out, *_quick("--shard-index", str(index), "--num-shards", "3"), fmt="webdataset")
    per_part = [
        {e["id"] for e in read_manifest(out / schema.part_dir_name(i, 3) / schema.MANIFEST_FILE)} for i in range(3)
    ]
    inputs = {v.id for v in lists.collect_inputs(small_source).videos}
    assert set().union(*per_part) == inputs and sum(map(len, per_part)) == len(inputs) == 9
    for i, ids in enumerate(per_part):
        assert all(lists.part_of(video_id, 3) == i for video_id in ids)
    store = open_store(out)
    assert len(store.parts) == 3 and len(store.manifest()) == 9 and len(store.videos()) == 8
    assert len(list(store.iter_records())) == 8


def test_resume_refuses_other_arguments(small_source, tmp_path, capsys):
    out = tmp_path / "out"
    run_prepare(small_source, out, *_quick())
    assert prepare.main(prepare_argv(small_source, out, *_quick("--fps", "25"))) == 2
    assert "other arguments" in capsys.readouterr().err
    # workers and progress may differ, and a finished run has nothing left to do
    assert prepare.main(prepare_argv(small_source, out, *_quick()) + ["--workers", "0"]) == 0
    assert len((out / schema.MANIFEST_FILE).read_text().splitlines()) == 9


def test_nothing_kept_is_an_error_exit(tmp_path, capsys):
    """Every input unreadable: the summary is still written, but prepare exits 1, so a script
    stops before training on an empty store; a re-run says the same."""
    src = tmp_path / "src"
    for name in ("a.mp4", "b.mp4"):
        (src / "Jump").mkdir(parents=True, exist_ok=True)
        (src / "Jump" / name).write_bytes(b"\x00" * 1000)
    out = tmp_path / "out"
    for _ in range(2):
        assert prepare.main(prepare_argv(src, out, *_quick()) + ["--workers", "0"]) == 1
        assert "error: no video was kept" in capsys.readouterr().err
    summary = json.loads((out / schema.SUMMARY_FILE).read_text())
    assert summary["videos"] == 0 and summary["failed"] == 2


# ---- kill -9 and resume -----------------------------------------------------------------------


def _run_and_kill(argv, manifest, min_lines, extra_delay):
    """Start a preparation in a child process; SIGKILL it once the manifest has ``min_lines``
    lines plus ``extra_delay`` seconds (or when it ends by itself)."""
    child = subprocess.Popen(
        [sys.executable, "-m", "data_tools.prepare", *argv],
        cwd=REPO,
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while child.poll() is None and time.monotonic() < deadline:
        if manifest.exists() and len(manifest.read_bytes().splitlines()) >= min_lines:
            time.sleep(extra_delay)
            break
        time.sleep(0.05)
    if child.poll() is None:
        child.send_signal(signal.SIGKILL)
    child.wait()
    return child.returncode


@pytest.mark.parametrize("fmt", ["lmdb", "webdataset"])
def test_kill_and_rerun_gives_every_video_exactly_once(small_source, tmp_path, fmt):
    out = tmp_path / "out"
    argv = prepare_argv(small_source, out, "--size", "48", "--shard-max-videos", "2", fmt=fmt)
    manifest = out / schema.MANIFEST_FILE
    # killed 0.2 s after the first video is recorded: mid-run, usually mid-video or mid-shard
    assert _run_and_kill(argv, manifest, 1, 0.2) == -signal.SIGKILL
    assert len(manifest.read_bytes().splitlines()) < 9  # the kill left work undone
    assert prepare.main(argv) == 0
    lines = [json.loads(line) for line in manifest.read_text().splitlines()]
    ids = [e["id"] for e in lines]
    assert len(ids) == len(set(ids)) == 9
    store = open_store(out)
    assert sorted(r.id for r in store.iter_records()) == sorted(v["id"] for v in store.videos())
    for record in store.iter_records():  # every stored chunk decodes
        record.frames("rgb", 0, record.meta["frames"])
    assert not list(out.rglob("*.tmp"))


def test_shard_renamed_but_not_recorded_is_recovered(small_source, tmp_path):
    """A kill between a shard's rename and its manifest append, and a torn manifest line."""
    out = tmp_path / "out"
    run_prepare(small_source, out, "--size", "48", "--shard-max-videos", "4", "--flow", "none", fmt="webdataset")
    manifest = out / schema.MANIFEST_FILE
    lines = manifest.read_text().splitlines(keepends=True)
    last_shard = sorted((out / schema.SHARDS_DIR).glob("*.tar"))[-1].name
    kept = [line for line in lines if json.loads(line).get("shard") != last_shard]
    manifest.write_text("".join(kept) + lines[-1][: len(lines[-1]) // 2])  # torn last line
    shards_before = sorted(p.name for p in (out / schema.SHARDS_DIR).glob("*.tar"))
    run_prepare(small_source, out, "--size", "48", "--shard-max-videos", "4", "--flow", "none", fmt="webdataset")
    ids = [json.loads(line)["id"] for line in manifest.read_text().splitlines()]
    assert len(ids) == len(set(ids)) == 9
    assert sorted(p.name for p in (out / schema.SHARDS_DIR).glob("*.tar")) == shards_before  # nothing redone
