"""Temporal sampling: reproducible generators, clip placement, short videos, time alignment."""

from collections import Counter

import pytest
import torch

from tricoclr.data.sampling import (
    ClipSpec,
    VideoTooShort,
    clip_frame_indices,
    clip_frame_limit,
    sample_clip_starts,
    sample_generator,
    spectrogram_span,
    video_too_short,
)


def draws(generator: torch.Generator) -> list[float]:
    return torch.rand(4, generator=generator).tolist()


# ---- sample_generator -----------------------------------------------------------------------


def test_generator_seed_is_a_stable_hash():
    # Fixed values: Python's salted hash() would change them from process to process.
    assert sample_generator(0, 0, 0, 0).initial_seed() == 6255612309636973493
    assert sample_generator(1, 2, 3, 1, "rgb").initial_seed() == 9177252287134267113


def test_generator_is_a_function_of_its_key_only():
    assert draws(sample_generator(7, 3, 42, 1, "rgb")) == draws(sample_generator(7, 3, 42, 1, "rgb"))
    base = (7, 3, 42, 1, "rgb")
    variants = [
        (8, 3, 42, 1, "rgb"),
        (7, 4, 42, 1, "rgb"),
        (7, 3, 43, 1, "rgb"),
        (7, 3, 42, 2, "rgb"),
        (7, 3, 42, 1, "flow"),
    ]
    seeds = {sample_generator(*key).initial_seed() for key in [base, *variants]}
    assert len(seeds) == 6


def test_generator_does_not_touch_global_rng():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    draws(sample_generator(0, 0, 0, 0))
    assert torch.equal(torch.rand(3), expected)


# ---- ClipSpec and clip placement -----------------------------------------------------------


def test_clip_spec_defaults_and_validation():
    spec = ClipSpec()
    assert (spec.frames, spec.stride, spec.min_gap_frames, spec.short_policy) == (30, 1, 0, "overlap")
    assert spec.span == 30 and spec.min_separation == 30
    assert ClipSpec(frames=16, stride=2, min_gap_frames=5).min_separation == 37
    for bad in [dict(frames=0), dict(stride=0), dict(min_gap_frames=-1), dict(short_policy="pad")]:
        with pytest.raises(ValueError):
            ClipSpec(**bad)


@pytest.mark.parametrize("num_frames", [67, 100, 300, 301])
@pytest.mark.parametrize(
    "spec", [ClipSpec(), ClipSpec(min_gap_frames=5), ClipSpec(frames=8, stride=4, min_gap_frames=3)]
)
def test_clips_inside_video_and_separated_by_the_gap(num_frames, spec):
    assert not video_too_short(num_frames, spec)
    first_later = 0
    for index in range(200):
        s1, s2 = sample_clip_starts(num_frames, spec, sample_generator(0, 0, index, 0))
        for start in (s1, s2):
            assert 0 <= start <= num_frames - spec.span
            assert int(clip_frame_indices(start, spec, num_frames).max()) < num_frames
        assert abs(s1 - s2) >= spec.span + spec.min_gap_frames
        first_later += s1 > s2
    assert 60 < first_later < 140  # random order


def test_placement_is_uniform_over_valid_pairs():
    # 6 frames, clips of 2, gap 1: valid ordered pairs (0,3) (0,4) (1,4) and their reverses.
    spec = ClipSpec(frames=2, min_gap_frames=1)
    counts = Counter(sample_clip_starts(6, spec, sample_generator(1, 0, i, 0)) for i in range(3000))
    assert set(counts) == {(0, 3), (0, 4), (1, 4), (3, 0), (4, 0), (4, 1)}
    assert all(400 < n < 600 for n in counts.values())  # 500 expected each, sd ~20


def test_exact_fit_uses_the_only_placement():
    spec = ClipSpec(frames=30, min_gap_frames=4)
    starts = {sample_clip_starts(64, spec, sample_generator(0, 0, i, 0)) for i in range(50)}
    assert starts == {(0, 34), (34, 0)}


def test_video_too_short_boundary():
    spec = ClipSpec(frames=30, min_gap_frames=4)
    assert not video_too_short(64, spec)
    assert video_too_short(63, spec)


def test_short_video_overlap_policy_puts_clips_as_far_apart_as_possible():
    spec = ClipSpec()  # 30 frames
    starts = {sample_clip_starts(45, spec, sample_generator(0, 0, i, 0)) for i in range(50)}
    assert starts == {(0, 15), (15, 0)}  # overlapping by 15 frames, both inside the video


def test_video_shorter_than_a_clip_repeats_its_last_frame():
    spec = ClipSpec(frames=8)
    assert sample_clip_starts(5, spec, sample_generator(0, 0, 0, 0)) == (0, 0)
    assert clip_frame_indices(0, spec, 5).tolist() == [0, 1, 2, 3, 4, 4, 4, 4]


def test_short_video_skip_policy_raises():
    spec = ClipSpec(short_policy="skip")
    with pytest.raises(VideoTooShort):
        sample_clip_starts(59, spec, sample_generator(0, 0, 0, 0))
    assert sample_clip_starts(60, spec, sample_generator(0, 0, 0, 0)) in {(0, 30), (30, 0)}


def test_placement_is_deterministic_and_changes_with_epoch():
    spec = ClipSpec()
    by_epoch = [
        [sample_clip_starts(300, spec, sample_generator(3, epoch, i, 0)) for i in range(20)] for epoch in (0, 0, 1)
    ]
    assert by_epoch[0] == by_epoch[1]
    assert by_epoch[0] != by_epoch[2]


# ---- frame indices and time alignment ------------------------------------------------------


def test_clip_frame_indices_follow_the_stride():
    indices = clip_frame_indices(10, ClipSpec(frames=4, stride=3), 100)
    assert indices.dtype == torch.int64
    assert indices.tolist() == [10, 13, 16, 19]


def test_spectrogram_span_of_the_default_clip():
    spec = ClipSpec()
    assert spectrogram_span(0, spec, fps=30) == (0, 128)
    assert spectrogram_span(15, spec, fps=30) == (64, 128)
    assert spectrogram_span(60, ClipSpec(frames=30, stride=2), fps=30) == (256, 256)


@pytest.mark.parametrize("fps", [24.0, 25.0, 29.97, 30.0, 60.0])
def test_every_modality_covers_the_same_time(fps):
    """RGB/flow frames and spectrogram steps of a clip start and end at the same time (to half a
    step), and all slices of a spec have one length."""
    spec = ClipSpec(frames=30)
    num_frames = int(10 * fps)
    lengths = set()
    for index in range(20):
        for start in sample_clip_starts(num_frames, spec, sample_generator(0, 0, index, 0)):
            frames = clip_frame_indices(start, spec, num_frames)
            start_step, num_steps = spectrogram_span(start, spec, fps)
            lengths.add(num_steps)
            assert abs(start_step / 128 - int(frames[0]) / fps) <= 0.5 / 128
            clip_end = (int(frames[-1]) + spec.stride) / fps
            assert abs((start_step + num_steps) / 128 - clip_end) <= 1.0 / 128
            assert start_step + num_steps <= round(num_frames / fps * 128) + 1
    assert len(lengths) == 1


# ---- usable spans (videos with frames missing in the middle) ----------------------------------


def test_spans_covering_the_video_draw_exactly_as_without():
    spec = ClipSpec(frames=8, stride=2, min_gap_frames=3)
    for index in range(50):
        plain = sample_clip_starts(100, spec, sample_generator(0, 0, index, 0))
        assert sample_clip_starts(100, spec, sample_generator(0, 0, index, 0), [[0, 100]]) == plain
        assert sample_clip_starts(100, spec, sample_generator(0, 0, index, 0), None) == plain
    assert clip_frame_limit(40, 100, [[0, 100]]) == 100 and clip_frame_limit(40, 100) == 100


def test_placement_in_spans_is_uniform_over_valid_pairs():
    # spans [0, 3) and [5, 8), clips of 2: starts 0, 1, 5, 6; pairs at least 2 apart
    spans = [[0, 3], [5, 8]]
    spec = ClipSpec(frames=2)
    counts = Counter(sample_clip_starts(8, spec, sample_generator(2, 0, i, 0), spans) for i in range(4000))
    pairs = {(0, 5), (0, 6), (1, 5), (1, 6)}
    assert set(counts) == pairs | {(b, a) for a, b in pairs}
    assert min(counts.values()) > 400 and max(counts.values()) < 600  # 500 expected each
    assert not video_too_short(8, spec, spans) and not video_too_short(8, ClipSpec(frames=3), spans)
    assert video_too_short(8, ClipSpec(frames=4), spans)  # no span holds one (8 frames would hold two)


def test_short_spans_follow_the_short_policy():
    spans = [[0, 3], [4, 6]]  # starts 0, 1 and 4 for clips of 2; 5 apart needed
    spec = ClipSpec(frames=2, min_gap_frames=3)
    assert video_too_short(6, spec, spans)
    starts = {sample_clip_starts(6, spec, sample_generator(0, 0, i, 0), spans) for i in range(50)}
    assert starts == {(0, 4), (4, 0)}  # as far apart as the spans allow
    with pytest.raises(VideoTooShort):
        sample_clip_starts(
            6, ClipSpec(frames=2, min_gap_frames=3, short_policy="skip"), sample_generator(0, 0, 0, 0), spans
        )
    # no span holds a whole clip: the longest span's start, clamped to that span's end
    spec = ClipSpec(frames=5)
    assert sample_clip_starts(10, spec, sample_generator(0, 0, 0, 0), [[0, 2], [6, 9]]) == (6, 6)
    assert clip_frame_limit(6, 10, [[0, 2], [6, 9]]) == 9
    assert clip_frame_indices(6, spec, 9).tolist() == [6, 7, 8, 8, 8]


def test_spans_without_frames_are_an_error():
    with pytest.raises(ValueError, match="no usable frames"):
        sample_clip_starts(10, ClipSpec(frames=2), sample_generator(0, 0, 0, 0), [[12, 20]])
