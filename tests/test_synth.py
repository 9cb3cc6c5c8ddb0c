"""Tests of ``tricoclr-data synth`` (data_tools/synth.py): layout, decoding, determinism, class
table and the sound's visual trace. Tiny sizes: 3 classes x 2 videos x 2 s at 64 x 64."""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import av
import numpy as np
import pytest

from data_tools import synth

CLASSES, VIDEOS, SECONDS, FPS, SIZE, RATE = 3, 2, 2.0, 30, 64, 22050


def tiny(out: Path, seed: int = 0, workers: int = 1) -> dict:
    """The small dataset every test here uses."""
    return synth.synthesize(
        out,
        classes=CLASSES,
        videos_per_class=VIDEOS,
        seconds=SECONDS,
        fps=FPS,
        size=SIZE,
        seed=seed,
        workers=workers,
        audio_rate=RATE,
    )


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    tiny(out)
    return out


def all_videos(root: Path) -> list[str]:
    """Video paths relative to root/videos, sorted."""
    return sorted(p.relative_to(root / "videos").as_posix() for p in (root / "videos").rglob("*.mp4"))


def decode(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """All RGB frames (T x H x W x 3) and all mono audio samples of a file."""
    with av.open(str(path)) as container:
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    with av.open(str(path)) as container:
        audio = np.concatenate([f.to_ndarray() for f in container.decode(audio=0)], axis=1)
    return frames, audio[0]


# ---- layout -------------------------------------------------------------------------------


def test_layout_and_split_files(dataset):
    splits = dataset / "splits"
    class_ind = [line.split() for line in (splits / "classInd.txt").read_text().splitlines()]
    names = [spec.name for spec in synth.class_table(CLASSES)]
    assert class_ind == [[str(i + 1), name] for i, name in enumerate(names)]
    label_of = {name: int(index) for index, name in class_ind}

    train = [line.split() for line in (splits / "trainlist01.txt").read_text().splitlines()]
    test = (splits / "testlist01.txt").read_text().splitlines()
    assert all(len(entry) == 2 for entry in train) and all(" " not in line for line in test)
    listed = [path for path, _ in train] + test
    # every video in exactly one list, and nothing listed that does not exist
    assert sorted(listed) == all_videos(dataset) and len(set(listed)) == len(listed)
    assert len(listed) == CLASSES * VIDEOS
    for path, label in train:
        assert label_of[path.split("/")[0]] == int(label)
    for name in names:  # at least one train and one test video per class
        assert any(p.startswith(name + "/") for p, _ in train)
        assert any(p.startswith(name + "/") for p in test)
        assert (dataset / "videos" / name / f"v_{name}_g01_c01.mp4").is_file()

    described = json.loads((dataset / "classes.json").read_text())
    assert [c["name"] for c in described["classes"]] == names
    assert [c["index"] for c in described["classes"]] == [1, 2, 3]
    first = described["classes"][0]
    assert first["name"] == first["appearance"]["name"] + first["motion"]["name"] + first["sound"]["name"]


def test_train_count_keeps_one_of_each():
    assert synth.train_count(10, 0.7) == 7
    assert synth.train_count(2, 0.7) == 1
    assert synth.train_count(2, 0.99) == 1 and synth.train_count(3, 0.01) == 1
    assert synth.train_count(1, 0.7) == 1


def test_files_decode_with_requested_format(dataset):
    for relative in all_videos(dataset):
        path = dataset / "videos" / relative
        with av.open(str(path)) as container:
            video, audio = container.streams.video[0], container.streams.audio[0]
            assert video.codec_context.name == "h264" and audio.codec_context.name == "aac"
            assert video.average_rate == FPS and audio.sample_rate == RATE
            first_audio = next(container.decode(audio=0))
            assert first_audio.time == 0.0  # audio starts with the video, no offset
        frames, samples = decode(path)
        assert frames.shape == (int(SECONDS * FPS), SIZE, SIZE, 3)
        # AAC pads its last frame: the audio covers the video, by at most one frame more
        assert SECONDS * RATE <= len(samples) < SECONDS * RATE + 2 * 1024
        assert 0.01 < np.abs(samples).max() <= 1.0


# ---- determinism --------------------------------------------------------------------------


def test_same_seed_same_decoded_content_whatever_the_workers(dataset, tmp_path):
    summary = tiny(tmp_path, seed=0, workers=2)
    assert summary["videos"] == CLASSES * VIDEOS
    assert all_videos(tmp_path) == all_videos(dataset)
    for relative in all_videos(dataset):
        frames_a, audio_a = decode(dataset / "videos" / relative)
        frames_b, audio_b = decode(tmp_path / "videos" / relative)
        np.testing.assert_array_equal(frames_a, frames_b)
        np.testing.assert_array_equal(audio_a, audio_b)
    for name in ("classes.json", "splits/trainlist01.txt", "splits/testlist01.txt"):
        assert (dataset / name).read_text() == (tmp_path / name).read_text()


def test_different_seeds_differ():
    def content(seed):
        job = synth.VideoJob("", CLASSES, 0, 0, seed, 1.0, FPS, SIZE, RATE)
        _, nuisance, pixels, audio, _ = synth.make_video_content(job)
        return nuisance, np.stack(list(pixels)), audio

    nuisance_a, frames_a, audio_a = content(0)
    nuisance_b, frames_b, audio_b = content(1)
    assert nuisance_a != nuisance_b
    assert np.abs(frames_a.astype(int) - frames_b).mean() > 5
    assert not np.allclose(audio_a, audio_b)


# ---- class table --------------------------------------------------------------------------


def pairs_sharing(table, factors: tuple[str, ...]) -> list[tuple[int, int]]:
    """Class pairs that agree on every named factor."""
    return [
        (a.index, b.index)
        for a, b in itertools.combinations(table, 2)
        if all(getattr(a, f) == getattr(b, f) for f in factors)
    ]


def test_default_class_table_makes_each_modality_necessary():
    table = synth.class_table(10)
    assert len({spec.name for spec in table}) == 10
    for factor in ("appearance", "motion", "sound"):  # each modality alone confuses classes
        assert len(pairs_sharing(table, (factor,))) >= 4
    assert pairs_sharing(table, ("appearance", "motion", "sound")) == []
    # pairs that only the sound separates (appearance + motion equal): the twins
    assert pairs_sharing(table, ("appearance", "motion")) == [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
    # and pairs that only the motion / only the appearance separates
    assert len(pairs_sharing(table, ("appearance", "sound"))) == 2
    assert len(pairs_sharing(table, ("motion", "sound"))) == 2
    # colour alone is weaker still: 8 of 10 classes are red
    assert sum(spec.appearance.hue == 0.0 for spec in table) == 8


@pytest.mark.parametrize("n_classes", [2, 3, 4, 7, 10, 11, 20, 37, synth.MAX_CLASSES])
def test_class_table_any_size(n_classes):
    table = synth.class_table(n_classes)
    assert [spec.index for spec in table] == list(range(n_classes))
    triples = {(s.appearance, s.motion, s.sound) for s in table}
    assert len(triples) == n_classes and len({s.name for s in table}) == n_classes
    assert all(s.name.isalnum() for s in table)
    assert synth.class_table(n_classes) == table  # deterministic
    if n_classes >= 4:
        for factor in ("appearance", "motion", "sound"):
            assert pairs_sharing(table, (factor,))
        assert pairs_sharing(table, ("appearance", "motion"))


def test_class_table_properties_for_every_size():
    """The module docstring's claims, for every supported class count."""
    for n_classes in range(2, synth.MAX_CLASSES + 1):
        triples = synth.factor_indices(n_classes)
        assert len(set(triples)) == n_classes
        pairs = list(itertools.combinations(triples, 2))
        if n_classes >= 4:
            for k in range(3):  # each factor alone confuses some pair
                assert any(a[k] == b[k] for a, b in pairs), (n_classes, k)
            assert any(a[:2] == b[:2] for a, b in pairs)  # twins: only the sound separates
        else:
            assert len({t[2] for t in triples}) == n_classes  # each class its own sound


def test_class_table_rejects_too_many():
    with pytest.raises(ValueError):
        synth.class_table(synth.MAX_CLASSES + 1)


def test_every_sound_has_its_own_rhythm():
    """The visual trace can only separate sounds whose envelopes differ."""
    t = np.arange(4 * RATE) / RATE
    traces = [synth.frame_trace(synth.sound_envelope(s, t, 1.0, 0.0)[0], RATE, FPS, 4 * FPS) for s in synth.SOUNDS]
    for a, b in itertools.combinations(range(len(traces)), 2):
        best = max(np.corrcoef(traces[a], np.roll(traces[b], lag))[0, 1] for lag in range(FPS))
        assert best < 0.9, (synth.SOUNDS[a].name, synth.SOUNDS[b].name, best)


# ---- the sound's visual trace ---------------------------------------------------------------


def object_mask(spec, nuisance, frames: int) -> np.ndarray:
    """Per-frame object pixels: where rendering with the object dimmed differs from undimmed."""

    def render(level):
        rng = np.random.default_rng(0)  # same background and noise for both renders
        trace = np.full(frames, level, np.float32)
        return np.stack(list(synth.render_frames(spec, nuisance, trace, FPS, SIZE, rng, 0.5)))

    difference = np.abs(render(1.0).astype(int) - render(0.0)).sum(axis=-1)
    return difference > 30


def test_sound_leaves_a_faint_visual_trace(dataset):
    job = synth.VideoJob("", CLASSES, 0, 0, 0, SECONDS, FPS, SIZE, RATE)
    spec, nuisance, _, _, trace = synth.make_video_content(job)
    assert spec.motion.name == "Swing" and spec.sound.name == "Drum"  # translation, sharp beats
    frames, samples = decode(dataset / "videos" / spec.name / synth.video_name(spec.name, 0))
    count = len(frames)

    # loudness per frame, measured on the decoded audio
    edges = np.round(np.arange(count + 1) * RATE / FPS).astype(int)
    loudness = np.array([np.sqrt(np.mean(samples[a:b] ** 2)) for a, b in zip(edges, edges[1:])])

    # brightness of the object per frame, measured on the decoded video
    mask = object_mask(spec, nuisance, count)
    assert mask.sum(axis=(1, 2)).min() > 50
    brightness = np.array([frames[i][mask[i]].mean() for i in range(count)])

    assert np.corrcoef(trace, loudness)[0, 1] > 0.8  # the trace follows what is heard
    assert np.corrcoef(brightness, loudness)[0, 1] > 0.6  # it is seen in the decoded video ...
    # ... and faint: brightness = base * (1 - depth + depth * trace), fitted on decoded pixels
    slope, intercept = np.polyfit(trace, brightness, 1)
    depth = slope / (slope + intercept)
    assert 0.5 * synth.TRACE_DEPTH < depth < 1.5 * synth.TRACE_DEPTH <= 0.3


def test_cli_arguments_and_run(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    synth.add_arguments(parser)
    args = parser.parse_args(
        [
            "--out",
            str(tmp_path),
            "--classes",
            "2",
            "--videos-per-class",
            "1",
            "--seconds",
            "0.54",
            "--size",
            "32",
            "--fps",
            "10",
        ]
    )
    assert (args.workers, args.seed, args.train_fraction) == (1, 0, 0.7)
    assert synth.run(args) == 0
    assert "2 videos" in capsys.readouterr().out
    assert len(all_videos(tmp_path)) == 2
    frames, samples = decode(next((tmp_path / "videos").rglob("*.mp4")))
    assert frames.shape == (5, 32, 32, 3)  # 0.54 s at 10 fps rounds to 5 frames ...
    assert len(samples) >= 0.5 * RATE  # ... and the audio covers all five


# ---- scenes, camera, colour (issue 15) ------------------------------------------------------


def rendered(class_index: int, video: int, **nuisance) -> tuple[synth.Nuisance, np.ndarray]:
    job = synth.VideoJob("", 10, class_index, video, 0, 1.0, FPS, SIZE, RATE, **nuisance)
    _, drawn, pixels, _, _ = synth.make_video_content(job)
    return drawn, np.stack(list(pixels)).astype(int)


def corner(frames: np.ndarray) -> np.ndarray:
    """Mean of a 6 x 6 corner patch per frame: backdrop only (the object stays near the centre)."""
    return frames[:, :6, :6].mean(axis=(1, 2, 3))


def test_videos_share_scenes_and_a_panning_camera_moves_the_backdrop():
    pool = [rendered(c, v, scenes=3, camera=True, colour="video")[0] for c in range(4) for v in range(3)]
    assert {n.scene for n in pool} <= {0, 1, 2} and len({n.scene for n in pool}) > 1
    # videos of different classes filmed in one scene share its backdrop (kind and colours) ...
    by_scene = {}
    for n in pool:
        by_scene.setdefault(n.scene, set()).add((n.bg_kind, n.bg_rgb1, n.bg_rgb2))
    assert all(len(backdrops) == 1 for backdrops in by_scene.values())
    # ... and every camera moves at CAMERA_SPEED frame widths per second
    speeds = [np.hypot(*n.camera_velocity) for n in pool]
    assert all(synth.CAMERA_SPEED[0] - 1e-9 <= s <= synth.CAMERA_SPEED[1] + 1e-9 for s in speeds)
    # the object's hue is drawn per video: videos of one class differ in colour
    hues = {round(n.object_rgb[0], 3) for n in pool[:3]}
    assert len(hues) == 3


def test_camera_offsets_pan_back_and_forth_inside_the_canvas():
    nuisance = rendered(0, 0, camera=True)[0]
    times = np.arange(0, 60, 1 / FPS)
    offsets = synth.camera_offsets(nuisance, times, SIZE, synth.CANVAS)
    assert offsets.min() >= 0 and offsets.max() <= round((synth.CANVAS - 1) * SIZE)
    steps = np.abs(np.diff(offsets, axis=0)).max()
    assert steps <= 1  # at most a pixel per frame: a smooth pan at 64 px
    static = rendered(0, 0)[0]
    assert not synth.camera_offsets(static, times, SIZE, 1.0).any()


def test_static_camera_and_own_backdrops_give_a_still_backdrop():
    for video in range(4):
        drawn, still = rendered(2, video, scenes=0, camera=False, colour="class")
        assert drawn.scene == -1 and drawn.camera_velocity == (0.0, 0.0)
        assert np.ptp(corner(still)) < 4  # pixel noise only


def test_options_off_reproduce_the_first_generator_pixel_for_pixel():
    """--scenes 0 --static-camera --object-colour class is the first version's data (the README's
    demo figures were measured on it): checksums taken from that version (commit 1517822)."""
    job = synth.VideoJob("", 10, 3, 2, 0, 1.0, 30, 64, 22050)  # scenes 0, static, class colour
    _, _, pixels, audio, _ = synth.make_video_content(job)
    frames = list(pixels)
    assert int(frames[0].astype(np.int64).sum()) == 408007
    assert int(frames[-1].astype(np.int64).sum()) == 405698
    assert float(np.abs(audio).sum()) == pytest.approx(727.942626953125, rel=1e-6)
