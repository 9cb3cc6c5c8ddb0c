"""Temporal sampling: which two clips of a video a training sample uses, and where they lie in
every modality.

A sample is two clips from different times of the same video (docs/design.md, "Augmentation").
Everything here is a pure function of its arguments; all randomness comes from a
``torch.Generator`` made by :func:`sample_generator`, whose seed depends only on
(seed, epoch, video index, view, stream) -- never on rank, worker count or batch size -- so a run
draws the same clips and augmentations whatever the world size, and can resume mid-epoch.

Time conventions (frames at ``fps``; flow field ``i`` belongs to frame ``i``):

- A clip of ``ClipSpec(frames, stride)`` starting at frame ``s`` reads frames
  ``s, s + stride, ..., s + (frames - 1) * stride`` and *covers* the time
  ``[s / fps, (s + span) / fps)`` with ``span = frames * stride`` (the last frame read stands for
  ``stride`` frames of time). A clip is inside the video when ``0 <= s <= num_frames - span``.
- RGB and flow use the same frame indices (:func:`clip_frame_indices`); the audio slice covering
  the same time is :func:`spectrogram_span`.
- A video with frames missing in the middle (meta ``spans``: half-open ``[start, end)`` ranges of
  usable frames between timestamp gaps) only gets clips that lie wholly inside one span; without
  ``spans``, or with one span covering the video, the draws are exactly those of an unbroken
  video.

View numbering for :func:`sample_generator` (constants below): view 0 draws the pair of clip
positions, views 1 and 2 draw the augmentations of clip 1 and clip 2.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from tricoclr.data.schema import AUDIO_STEPS_PER_SECOND, audio_step_for_frame

VIEW_CLIP_POSITIONS = 0
VIEW_CLIP_1 = 1
VIEW_CLIP_2 = 2

SHORT_POLICIES = ("overlap", "skip")


class VideoTooShort(ValueError):
    """The video cannot hold two separated clips and the policy is ``"skip"``."""


def sample_generator(seed: int, epoch: int, video_index: int, view: int, stream: str = "") -> torch.Generator:
    """A CPU generator seeded by a stable hash of (seed, epoch, video_index, view, stream).

    blake2b rather than Python's ``hash()``, which is salted per process and would differ
    between workers. ``stream`` separates independent random streams (e.g. "rgb", "flow",
    "audio", "photometric") so that adding or changing one modality's augmentation never shifts
    another's randomness.
    """
    key = f"tricoclr|{seed}|{epoch}|{video_index}|{view}|{stream}".encode()
    digest = hashlib.blake2b(key, digest_size=8).digest()
    generator = torch.Generator(device="cpu")
    # 63 bits: manual_seed accepts any uint64, but a non-negative int is unambiguous everywhere.
    generator.manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))
    return generator


@dataclass(frozen=True)
class ClipSpec:
    """How a clip is cut from a video.

    frames: frames per clip (30 = one second at 30 fps).
    stride: take every ``stride``-th frame; the clip covers ``frames * stride`` frames of time.
    min_gap_frames: minimum gap between the end of one clip and the start of the other.
    short_policy: what to do with a video too short for two separated clips
        (:func:`video_too_short`):

        - ``"overlap"``: the clips are placed as far apart as the video allows, i.e. the first
          and the last possible clip (starts ``0`` and ``num_frames - span``) in random order,
          overlapping if need be. A video shorter than one clip gives both clips start 0 and
          its frame indices are clamped to the last frame (the last frame repeats; the audio
          slice is padded, see ``transforms.spectrogram_geometric``).
        - ``"skip"``: :func:`sample_clip_starts` raises :class:`VideoTooShort`; the dataset
          decides what to do (e.g. filter such videos out when building the index).
    """

    frames: int = 30
    stride: int = 1
    min_gap_frames: int = 0
    short_policy: str = "overlap"

    def __post_init__(self) -> None:
        if self.frames < 1 or self.stride < 1 or self.min_gap_frames < 0:
            raise ValueError(f"invalid ClipSpec: {self}")
        if self.short_policy not in SHORT_POLICIES:
            raise ValueError(f"short_policy must be one of {SHORT_POLICIES}, got {self.short_policy!r}")

    @property
    def span(self) -> int:
        """Frames of time one clip covers."""
        return self.frames * self.stride

    @property
    def min_separation(self) -> int:
        """Smallest allowed distance between the two start frames (no overlap, plus the gap)."""
        return self.span + self.min_gap_frames


def video_too_short(num_frames: int, spec: ClipSpec, spans: list | None = None) -> bool:
    """True when two clips with the gap between them do not fit in ``num_frames`` frames (or,
    given ``spans``, when no two such clips fit, each inside a span)."""
    gapped = _gapped_spans(num_frames, spans)
    if gapped is None:
        return num_frames < spec.span + spec.min_separation
    starts = valid_clip_starts(gapped, spec)
    return len(starts) == 0 or int(starts[-1] - starts[0]) < spec.min_separation


def _gapped_spans(num_frames: int, spans: list | None) -> list[tuple[int, int]] | None:
    """``spans`` clipped to the video as (start, end) pairs; None when the whole video is usable
    (no spans recorded, or a single span covering every frame)."""
    if spans is None:
        return None
    clipped = [(max(0, int(a)), min(num_frames, int(b))) for a, b in spans]
    clipped = sorted((a, b) for a, b in clipped if b > a)
    if clipped == [(0, num_frames)]:
        return None
    if not clipped:
        raise ValueError(f"no usable frames: spans {spans} hold none of the {num_frames} frames")
    return clipped


def valid_clip_starts(spans: list[tuple[int, int]], spec: ClipSpec) -> torch.Tensor:
    """Sorted start frames (int64) of every clip that lies wholly inside one span."""
    ranges = [torch.arange(a, b - spec.span + 1, dtype=torch.int64) for a, b in spans if b - a >= spec.span]
    return torch.cat(ranges) if ranges else torch.zeros(0, dtype=torch.int64)


def clip_frame_limit(start: int, num_frames: int, spans: list | None = None) -> int:
    """Frame count to clamp a clip starting at ``start`` to (``clip_frame_indices``'s
    ``num_frames``): the end of the span holding ``start``, else the video's length."""
    gapped = _gapped_spans(num_frames, spans)
    for a, b in gapped or ():
        if a <= start < b:
            return b
    return num_frames


def _sample_starts_in_spans(
    spans: list[tuple[int, int]], spec: ClipSpec, generator: torch.Generator
) -> tuple[int, int]:
    """Both clips inside spans, ``|start1 - start2| >= spec.min_separation``, uniform over such
    ordered pairs (one draw: the pair's rank among all of them). Short cases as ClipSpec says,
    with the longest span standing for the video when no span holds a whole clip."""
    starts = valid_clip_starts(spans, spec)
    if len(starts) == 0 or int(starts[-1] - starts[0]) < spec.min_separation:
        if spec.short_policy == "skip":
            raise VideoTooShort(f"spans {spans} cannot hold two clips of {spec}")
        if len(starts) == 0:
            longest = max(spans, key=lambda span: span[1] - span[0])
            return longest[0], longest[0]
        first, last = int(starts[0]), int(starts[-1])
        earlier_first = bool(torch.rand((), generator=generator) < 0.5)
        return (first, last) if earlier_first else (last, first)
    # For each first start x, the second may be any start outside (x - sep, x + sep).
    near_low = torch.searchsorted(starts, starts - spec.min_separation + 1)
    near_high = torch.searchsorted(starts, starts + spec.min_separation)
    partners = len(starts) - (near_high - near_low)
    cumulative = torch.cumsum(partners, 0)
    rank = int(torch.randint(int(cumulative[-1]), (1,), generator=generator))
    i = int(torch.searchsorted(cumulative, torch.tensor(rank), right=True))
    r = rank - (int(cumulative[i - 1]) if i else 0)
    j = r if r < int(near_low[i]) else int(near_high[i]) + r - int(near_low[i])
    return int(starts[i]), int(starts[j])


def clip_spec_of(data_cfg) -> ClipSpec:
    """The ClipSpec of a ``data`` config section (or any mapping with its clip keys)."""
    return ClipSpec(
        frames=data_cfg["clip_frames"],
        stride=data_cfg["clip_stride"],
        min_gap_frames=data_cfg["min_gap_frames"],
        short_policy=data_cfg["short_policy"],
    )


def _distinct_pair(upper: int, generator: torch.Generator) -> tuple[int, int]:
    """A uniformly random ordered pair of distinct integers in ``[0, upper)`` (upper >= 2)."""
    first = int(torch.randint(upper, (1,), generator=generator))
    second = int(torch.randint(upper - 1, (1,), generator=generator))
    # Skip over `first` so that the second value is uniform over the other upper - 1 values.
    return first, second + (second >= first)


def sample_clip_starts(
    num_frames: int, spec: ClipSpec, generator: torch.Generator, spans: list | None = None
) -> tuple[int, int]:
    """Start frames of the two clips of a sample.

    When the video allows it, both clips lie inside the video and ``|start1 - start2| >=
    spec.min_separation`` (no overlap, at least ``min_gap_frames`` between them); the pair is
    uniform over all such placements, in random order (clip 1 may come after clip 2).
    Otherwise ``spec.short_policy`` decides (see :class:`ClipSpec`). ``spans`` (the meta's
    usable ``[start, end)`` frame ranges between timestamp gaps) keeps each clip inside one
    span; clamp its frames with :func:`clip_frame_limit`. Raises ValueError for a video without
    frames (or spans holding none of them), VideoTooShort as ClipSpec says.
    """
    if num_frames < 1:
        raise ValueError(f"a video needs at least one frame, got {num_frames}")
    gapped = _gapped_spans(num_frames, spans)
    if gapped is not None:
        return _sample_starts_in_spans(gapped, spec, generator)
    last_start = num_frames - spec.span
    if video_too_short(num_frames, spec):
        if spec.short_policy == "skip":
            raise VideoTooShort(f"{num_frames} frames cannot hold two clips of {spec}")
        last_start = max(last_start, 0)
        earlier_first = bool(torch.rand((), generator=generator) < 0.5)
        return (0, last_start) if earlier_first else (last_start, 0)
    # Placements (e, l) with 0 <= e and e + sep <= l <= last_start are in bijection with pairs
    # a < b drawn from [0, slack + 2) via e = a, l = b - 1 + sep; an ordered distinct pair gives
    # both a uniform placement and a uniform order.
    slack = last_start - spec.min_separation
    a, b = _distinct_pair(slack + 2, generator)
    early, late = min(a, b), max(a, b) - 1 + spec.min_separation
    return (early, late) if a < b else (late, early)


def clip_frame_indices(start: int, spec: ClipSpec, num_frames: int) -> torch.Tensor:
    """The frame indices (int64, shape ``(spec.frames,)``) a clip reads, clamped to the video.

    Clamping only matters for videos shorter than one clip (the last frame repeats). Use the
    same indices for RGB and flow; pass the flow's own count as ``num_frames`` if the store
    holds fewer flow fields than frames.
    """
    indices = start + spec.stride * torch.arange(spec.frames, dtype=torch.int64)
    return indices.clamp_(0, num_frames - 1)


def spectrogram_span(
    start_frame: int, spec: ClipSpec, fps: float, steps_per_second: int = AUDIO_STEPS_PER_SECOND
) -> tuple[int, int]:
    """``(start_step, num_steps)`` of the spectrogram slice covering the same time as a clip.

    ``start_step = round(start_frame / fps * steps_per_second)`` and
    ``num_steps = round(spec.span / fps * steps_per_second)`` (a fixed length for a given spec,
    so all slices of a run have the same shape): 30 frames at 30 fps give 128 steps, frame 15
    maps to step 64. The slice may run past the end of the spectrogram for the last clip of a
    video; the augmentation pads it.
    """
    start_step = audio_step_for_frame(start_frame, fps, steps_per_second)
    num_steps = audio_step_for_frame(spec.span, fps, steps_per_second)
    return start_step, num_steps
