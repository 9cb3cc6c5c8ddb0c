"""Optical flow for the output frame sequence: estimators, duplicate-aware sequencing, encoding.

Flow field ``i`` is the motion from output frame ``i`` to frame ``i + 1`` in pixels of the
stored frame size. Two policies make it usable for training (docs/schema.md):

- Repeated frames (frame-rate up-sampling, VFR gaps) would give all-zero fields, a shortcut a
  flow encoder learns. Flow is computed only between *distinct* source frames, and the motion
  A -> B is spread evenly over the ``r`` output steps from A's first appearance to B's:
  each of them gets flow(A, B) / r.
- T frames give T - 1 fields; the last frame (and any repeats of it) gets a copy of the
  previous field, so a video has as many flow frames as RGB frames.

Estimators take a whole window of frames at once so that a batched GPU implementation fits the
same slot as the pairwise OpenCV ones (see ``register_flow_method``).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torchvision.io import encode_jpeg

from tricoclr.data import schema

try:
    import cv2
except ImportError:  # flow "none" still works without OpenCV
    cv2 = None

# (N, H, W) uint8 greyscale frames -> (N - 1, H, W, 2) float32 flow (x, y) in pixels.
FlowEstimator = Callable[[np.ndarray], np.ndarray]

_FLOW_METHODS: dict[str, Callable[[], FlowEstimator]] = {}


def register_flow_method(name: str, factory: Callable[[], FlowEstimator]) -> None:
    """Add a flow method selectable with ``--flow NAME``.

    ``factory()`` runs once per worker process and returns the estimator; it should import
    heavy dependencies itself. A GPU TV-L1 (tricoclr.ops.tvl1) plugs in here as
    ``register_flow_method("tvl1-torch", lambda: <wrap flow_for_frame_sequence>)``.
    """
    _FLOW_METHODS[name] = factory


def available_flow_methods() -> list[str]:
    """Names accepted by ``--flow`` in this environment, plus "none"."""
    return sorted(_FLOW_METHODS) + ["none"]


def default_flow_method() -> str:
    """TV-L1 (as the paper) when OpenCV contrib is installed, else Farneback."""
    return "tvl1" if "tvl1" in _FLOW_METHODS else "farneback"


def make_flow_estimator(name: str) -> FlowEstimator | None:
    """The estimator for ``--flow NAME``; None for "none"."""
    if name == "none":
        return None
    if name not in _FLOW_METHODS:
        raise ValueError(f"unknown or unavailable flow method {name!r}; available: {', '.join(available_flow_methods())}")
    return _FLOW_METHODS[name]()


def _pairwise(estimate_pair: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> FlowEstimator:
    def estimate(frames: np.ndarray) -> np.ndarray:
        fields = [estimate_pair(a, b) for a, b in zip(frames[:-1], frames[1:])]
        h, w = frames.shape[1:]
        return np.stack(fields).astype(np.float32) if fields else np.zeros((0, h, w, 2), np.float32)

    return estimate


def _opencv_tvl1() -> FlowEstimator:
    # OpenCV's defaults (5 scales, 5 warps, lambda 0.15) are what CoCLR's dense_flow used.
    tvl1 = cv2.optflow.DualTVL1OpticalFlow_create()
    return _pairwise(lambda a, b: tvl1.calc(a, b, None))


def _opencv_farneback() -> FlowEstimator:
    return _pairwise(
        lambda a, b: cv2.calcOpticalFlowFarneback(
            a, b, None, pyr_scale=0.5, levels=3, winsize=15, iterations=3, poly_n=5, poly_sigma=1.2, flags=0
        )
    )


if cv2 is not None:
    register_flow_method("farneback", _opencv_farneback)
    if hasattr(cv2, "optflow"):
        register_flow_method("tvl1", _opencv_tvl1)


def to_gray(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (H, W) uint8 luma (ITU-R BT.601 weights, as OpenCV)."""
    gray = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
    return np.clip(gray + 0.5, 0, 255).astype(np.uint8)


class FlowSequencer:
    """Turns the output frames (source index, grey image) into one flow field per frame.

    ``push`` and ``finish`` return ``(field, repeat)`` pairs in frame order: ``field`` (H, W, 2)
    float32 applies to the next ``repeat`` output frames. Frames are estimated in windows of
    ``window`` distinct frames (overlapping by one), so memory does not grow with the video.
    """

    def __init__(self, estimator: FlowEstimator, window: int = 32):
        self.estimator = estimator
        self.window = window
        self.distinct: list[np.ndarray] = []  # distinct frames waiting for their flow
        self.runs: list[int] = []  # how many output frames each distinct frame covers
        self.last_source: int | None = None
        self.last_field: np.ndarray | None = None

    def push(self, source_index: int, gray: np.ndarray) -> list[tuple[np.ndarray, int]]:
        if source_index == self.last_source:
            self.runs[-1] += 1
            return []
        self.last_source = source_index
        self.distinct.append(gray)
        self.runs.append(1)
        if len(self.distinct) <= self.window:
            return []
        return self._flush_window()

    def finish(self) -> list[tuple[np.ndarray, int]]:
        """Fields for the remaining frames; the last run repeats the previous field."""
        if not self.distinct:
            return []
        out = self._flush_window() if len(self.distinct) > 1 else []
        if self.last_field is None:  # a single distinct frame: no motion was ever observed
            self.last_field = np.zeros((*self.distinct[0].shape, 2), np.float32)
        out.append((self.last_field, self.runs[-1]))
        self.distinct, self.runs = [], []
        return out

    def _flush_window(self) -> list[tuple[np.ndarray, int]]:
        """Estimate every pair of the buffered distinct frames; keep the last frame buffered
        (its run may still grow and its flow needs the next frame)."""
        fields = self.estimator(np.stack(self.distinct))
        out = []
        for field, run in zip(fields, self.runs[:-1]):
            self.last_field = (field / run).astype(np.float32)
            out.append((self.last_field, run))
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
