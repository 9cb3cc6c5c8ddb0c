"""Optical flow for the output frame sequence: estimators, duplicate-aware sequencing, encoding.

Flow field ``i`` is the motion from output frame ``i`` to frame ``i + 1`` in pixels of the
stored frame size. Two policies make it usable for training (docs/schema.md):

- Repeated frames (frame-rate up-sampling, VFR gaps) would give all-zero fields, a shortcut a
  flow encoder learns. Flow is computed only between *distinct* source frames, and the motion
  A -> B is spread evenly over the ``r`` output steps from A's first appearance to B's:
  each of them gets flow(A, B) / r.
- T frames give T - 1 fields; the last frame (and any repeats of it) gets a copy of the
  previous field, so a video has as many flow frames as RGB frames.

Estimators come in two kinds (see ``register_flow_method``): per-video ones run in each worker on
a window of one video's frames (OpenCV's TV-L1 and Farneback); batched ones (``tvl1-torch``) run
in the main process on pairs gathered from many videos at once, because a GPU needs thousands of
pairs per call to be fast. Both share the sequencing policy (``FlowSequencer``, ``FlowSpreader``)
and the encoding (``encode_flow``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torchvision.io import encode_jpeg

from tricoclr.data import schema
from tricoclr.ops.tvl1 import TVL1Params, create_opencv_tvl1, tvl1_flow

try:
    import cv2
except ImportError:  # flow "none" still works without OpenCV
    cv2 = None

# (N, H, W) uint8 greyscale frames of one video -> (N - 1, H, W, 2) float32 flow (x, y) in pixels.
FlowEstimator = Callable[[np.ndarray], np.ndarray]
# (B, H, W) uint8 first frames, (B, H, W) uint8 second frames (pairs from any videos) ->
# (B, H, W, 2) float32 flow from each first frame to its second frame.
PairFlowEstimator = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class FlowOptions:
    """Settings a flow method's factory receives; each method uses those that apply to it."""

    tvl1: TVL1Params | None = None  # TV-L1 methods; None: OpenCV's defaults
    device: str = "cpu"  # batched methods: where the pairs are computed
    compile: bool | None = None  # batched methods: torch.compile (None: on CUDA only)


@dataclass(frozen=True)
class _Method:
    factory: Callable[[FlowOptions], Callable]
    batched: bool


_FLOW_METHODS: dict[str, _Method] = {}

# Methods that are TV-L1 and take --tvl1-* parameters.
TVL1_METHODS = frozenset({"tvl1", "tvl1-torch"})
# TVL1Params fields that change speed only: not recorded in metas.
_SPEED_ONLY_TVL1_FIELDS = frozenset({"check_every", "median_chunk_pixels"})


def register_flow_method(name: str, factory: Callable[[FlowOptions], Callable], *, batched: bool = False) -> None:
    """Add a flow method selectable with ``--flow NAME``.

    ``factory(options)`` runs once per process that uses the method and should import heavy
    dependencies itself. Per-video methods (``batched=False``) return a ``FlowEstimator`` that
    each worker process runs on windows of one video's distinct frames. Batched methods return a
    ``PairFlowEstimator`` that the main process of ``prepare`` runs on pairs gathered from many
    videos (the workers then only decode and send the greyscale frames).
    """
    _FLOW_METHODS[name] = _Method(factory, batched)


def available_flow_methods() -> list[str]:
    """Names accepted by ``--flow`` in this environment, plus "none"."""
    return sorted(_FLOW_METHODS) + ["none"]


def default_flow_method() -> str:
    """TV-L1 as the paper: OpenCV contrib's when installed, else the PyTorch one (which needs no
    OpenCV at all, e.g. on a GPU machine with the plain install)."""
    return "tvl1" if "tvl1" in _FLOW_METHODS else "tvl1-torch"


def is_batched_flow_method(name: str) -> bool:
    """True when ``--flow NAME`` is computed by the main process across videos."""
    return name in _FLOW_METHODS and _FLOW_METHODS[name].batched


def _method(name: str, batched: bool) -> _Method:
    if name not in _FLOW_METHODS:
        raise ValueError(
            f"unknown or unavailable flow method {name!r}; available: {', '.join(available_flow_methods())}"
        )
    method = _FLOW_METHODS[name]
    if method.batched != batched:
        raise ValueError(f"flow method {name!r} is {'' if method.batched else 'not '}a batched method")
    return method


def make_flow_estimator(name: str, options: FlowOptions = FlowOptions()) -> FlowEstimator | None:
    """The per-video estimator for ``--flow NAME``; None for "none"."""
    if name == "none":
        return None
    return _method(name, batched=False).factory(options)


def make_pair_flow_estimator(name: str, options: FlowOptions = FlowOptions()) -> PairFlowEstimator:
    """The estimator of a batched method, for pairs from many videos."""
    return _method(name, batched=True).factory(options)


def flow_params_meta(name: str, tvl1: TVL1Params | None) -> dict | None:
    """The TV-L1 parameters to record in a video's meta (``flow_params``), or None.

    ``tvl1-torch`` always records them; OpenCV's ``tvl1`` only when ``--tvl1-*`` options set
    them (``tvl1`` not None), so that its metas stay as they were before these options existed.
    """
    if name not in TVL1_METHODS or (name == "tvl1" and tvl1 is None):
        return None
    params = dataclasses.asdict(tvl1 or TVL1Params())
    return {k: v for k, v in params.items() if k not in _SPEED_ONLY_TVL1_FIELDS}


def _pairwise(estimate_pair: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> FlowEstimator:
    def estimate(frames: np.ndarray) -> np.ndarray:
        fields = [estimate_pair(a, b) for a, b in zip(frames[:-1], frames[1:])]
        h, w = frames.shape[1:]
        return np.stack(fields).astype(np.float32) if fields else np.zeros((0, h, w, 2), np.float32)

    return estimate


def _opencv_tvl1(options: FlowOptions) -> FlowEstimator:
    # OpenCV's defaults (5 scales, 5 warps, lambda 0.15) are what CoCLR's dense_flow used.
    if options.tvl1 is None:
        tvl1 = cv2.optflow.DualTVL1OpticalFlow_create()
    else:
        tvl1 = create_opencv_tvl1(options.tvl1)
    return _pairwise(lambda a, b: tvl1.calc(a, b, None))


def _opencv_farneback(options: FlowOptions) -> FlowEstimator:
    return _pairwise(
        lambda a, b: cv2.calcOpticalFlowFarneback(
            a, b, None, pyr_scale=0.5, levels=3, winsize=15, iterations=3, poly_n=5, poly_sigma=1.2, flags=0
        )
    )


def _torch_tvl1(options: FlowOptions) -> PairFlowEstimator:
    """tricoclr.ops.tvl1 (OpenCV's TV-L1 replicated in PyTorch) on ``options.device``."""
    device = torch.device(options.device)
    params = options.tvl1 or TVL1Params()

    def estimate(frames0: np.ndarray, frames1: np.ndarray) -> np.ndarray:
        frame0, frame1 = (torch.from_numpy(np.ascontiguousarray(f)).to(device) for f in (frames0, frames1))
        flow = tvl1_flow(frame0, frame1, params, compile=options.compile)
        return flow.permute(0, 2, 3, 1).contiguous().cpu().numpy()

    return estimate


if cv2 is not None:
    register_flow_method("farneback", _opencv_farneback)
    if hasattr(cv2, "optflow"):
        register_flow_method("tvl1", _opencv_tvl1)
register_flow_method("tvl1-torch", _torch_tvl1, batched=True)  # needs torch only


def to_gray(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (H, W) uint8 luma (ITU-R BT.601 weights, as OpenCV)."""
    gray = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
    return np.clip(gray + 0.5, 0, 255).astype(np.uint8)


class FlowSpreader:
    """The repeated-frame policy for one video, fed in frame order.

    ``spread(field, run)``: the field from a distinct frame to the next one, spread over the
    ``run`` output frames that show the first: each gets field / run. ``last(run, shape)``: the
    last distinct frame (and its repeats) copies the previous output field; zero flow when the
    video has a single distinct frame.
    """

    def __init__(self):
        self.last_field: np.ndarray | None = None

    def spread(self, field: np.ndarray, run: int) -> tuple[np.ndarray, int]:
        self.last_field = (field / run).astype(np.float32)
        return self.last_field, run

    def last(self, run: int, shape: tuple[int, int]) -> tuple[np.ndarray, int]:
        if self.last_field is None:  # a single distinct frame: no motion was ever observed
            self.last_field = np.zeros((*shape, 2), np.float32)
        return self.last_field, run


class FlowSequencer:
    """Turns the output frames (source index, grey image) into one flow field per frame.

    ``push`` and ``finish`` return ``(field, repeat)`` pairs in frame order: ``field`` (H, W, 2)
    float32 applies to the next ``repeat`` output frames. Frames are estimated in windows of
    ``window`` distinct frames (overlapping by one), so memory does not grow with the video.

    Without an estimator the sequencer only collects: ``collected()`` gives every distinct frame
    and its run, for a batched method to compute elsewhere (then spread with a ``FlowSpreader``).
    """

    def __init__(self, estimator: FlowEstimator | None, window: int = 32):
        self.estimator = estimator
        self.window = window
        self.distinct: list[np.ndarray] = []  # distinct frames waiting for their flow
        self.runs: list[int] = []  # how many output frames each distinct frame covers
        self.last_source: int | None = None
        self.spreader = FlowSpreader()

    def push(self, source_index: int, gray: np.ndarray) -> list[tuple[np.ndarray, int]]:
        if source_index == self.last_source:
            self.runs[-1] += 1
            return []
        self.last_source = source_index
        self.distinct.append(gray)
        self.runs.append(1)
        if self.estimator is None or len(self.distinct) <= self.window:
            return []
        return self._flush_window()

    def finish(self) -> list[tuple[np.ndarray, int]]:
        """Fields for the remaining frames; the last run repeats the previous field."""
        if not self.distinct:
            return []
        out = self._flush_window() if len(self.distinct) > 1 else []
        out.append(self.spreader.last(self.runs[-1], self.distinct[0].shape))
        self.distinct, self.runs = [], []
        return out

    def collected(self) -> tuple[np.ndarray, list[int]] | None:
        """(distinct frames (D, H, W) uint8, their runs), or None when no frame was pushed."""
        if not self.distinct:
            return None
        return np.stack(self.distinct), list(self.runs)

    def _flush_window(self) -> list[tuple[np.ndarray, int]]:
        """Estimate every pair of the buffered distinct frames; keep the last frame buffered
        (its run may still grow and its flow needs the next frame)."""
        fields = self.estimator(np.stack(self.distinct))
        out = [self.spreader.spread(field, run) for field, run in zip(fields, self.runs[:-1])]
        self.distinct, self.runs = self.distinct[-1:], self.runs[-1:]
        return out


def encode_flow(field: np.ndarray, quality: int) -> bytes:
    """(H, W, 2) float flow -> greyscale JPEG of the quantised x field above the y field.

    Layout (schema.FLOW_ENCODING): rows [0, H) hold x, rows [Y, Y + H) hold y, with
    Y = schema.flow_y_offset(H) (H rounded up to a multiple of 8; the rows between repeat
    the last x row so that no JPEG block mixes the two fields).
    """
    q = schema.quantise_flow(field)
    h, w = q.shape[:2]
    y_offset = schema.flow_y_offset(h)
    stacked = np.empty((y_offset + h, w), np.uint8)
    stacked[:h] = q[..., 0]
    stacked[h:y_offset] = q[h - 1, :, 0]
    stacked[y_offset:] = q[..., 1]
    return encode_jpeg(torch.from_numpy(stacked)[None], quality=quality).numpy().tobytes()
