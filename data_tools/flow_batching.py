"""The flow of a batched method (``tvl1-torch``), computed in the main process of
``tricoclr-data prepare`` for the videos of all workers together: pairs of frames from many videos
per device call, on a thread of their own, each video finished (flow spread, encoded, packed) as
its last field arrives."""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable

import numpy as np

from data_tools.encode_video import ChunkPacker, PendingFlow, PrepareConfig, add_flow_fields, sample_entry
from data_tools.flow import FlowSpreader, PairFlowEstimator
from tricoclr.data import schema


class _FlowVideo:
    """A video waiting for its flow: its sample so far, its frames and its flow in progress."""

    def __init__(self, entry: dict, parts: dict[str, bytes], pending: PendingFlow, order: int, config: PrepareConfig):
        self.entry, self.parts = entry, parts
        self.frames, self.runs = pending.frames, pending.runs
        self.pairs = pending.pairs
        self.size = tuple(pending.frames.shape[1:])
        self.order = order  # arrival number: older videos go first
        self.quality = config.flow_quality
        self.spreader = FlowSpreader()
        self.packer = ChunkPacker("flow", config.chunk_frames)
        self.done = 0  # fields received, always a prefix: batches are taken and run in FIFO order

    def add_field(self, pair: int, field: np.ndarray) -> None:
        if pair != self.done:  # the spreading and the packing stream in frame order
            raise RuntimeError(f"flow of {self.entry['id']}: field {pair} arrived before field {self.done}")
        add_flow_fields(self.packer, [self.spreader.spread(field, self.runs[pair])], self.quality)
        self.done += 1

    def finish(self) -> tuple[dict, dict[str, bytes]]:
        """The complete sample and its manifest entry (sizes now include the flow)."""
        add_flow_fields(self.packer, [self.spreader.last(self.runs[-1], self.size)], self.quality)
        self.parts.update(self.packer.finish())
        self.frames = None
        return sample_entry(schema.decode_meta(self.parts[schema.META_PART]), self.parts), self.parts


class _DeviceThread:
    """Runs a pair estimator on its own thread, one batch at a time in submission order, so that
    the main thread keeps collecting worker results and encoding finished fields meanwhile
    (the device work mostly waits on the device, outside the GIL)."""

    def __init__(self, estimate: PairFlowEstimator):
        self._estimate = estimate
        self._inbox: queue.Queue = queue.Queue()
        self._outbox: queue.Queue = queue.Queue()
        self.in_flight = 0
        self.busy_seconds = 0.0
        self._thread = threading.Thread(target=self._run, name="flow-device", daemon=True)
        self._thread.start()

    def submit(self, batch: list, frames0: np.ndarray, frames1: np.ndarray) -> None:
        self.in_flight += 1
        self._inbox.put((batch, frames0, frames1))

    def results(self, wait: float = 0.0) -> list[tuple[list, np.ndarray]]:
        """Finished (batch, fields), oldest first; waits up to ``wait`` s when none is ready."""
        done = []
        block = wait > 0 and self.in_flight > 0
        while True:
            try:
                batch, fields, seconds, error = self._outbox.get(block=block, timeout=wait if block else None)
            except queue.Empty:
                return done
            block = False
            self.in_flight -= 1
            if error is not None:
                height, width = batch[0][0].size
                raise RuntimeError(
                    f"flow failed on a batch of {len(batch)} pairs of {width}x{height} frames: "
                    f"{type(error).__name__}: {error} (out of device memory? try a smaller --flow-batch)"
                ) from error
            self.busy_seconds += seconds
            done.append((batch, fields))

    def close(self) -> None:
        self._inbox.put(None)
        if self.in_flight == 0:
            self._thread.join(timeout=5)
        # else: the daemon thread is abandoned mid-batch (the run is being interrupted)

    def _run(self) -> None:
        while (item := self._inbox.get()) is not None:
            batch, frames0, frames1 = item
            start = time.monotonic()
            try:
                fields = self._estimate(frames0, frames1)
            except BaseException as exc:  # handed to the main thread, which stops the run
                self._outbox.put((batch, None, 0.0, exc))
                return
            self._outbox.put((batch, fields, time.monotonic() - start, None))


class CrossVideoFlow:
    """The flow of a batched method (``tvl1-torch``), computed in the main process for the
    videos of all workers together.

    Each video waits in a pool with its sample; its consecutive pairs join the queue of its
    frame size (a batch needs one size). Whenever the device is idle, the size whose oldest
    pair waited longest runs (up to ``batch_size`` of its pairs, from several videos); while a
    batch runs, a second one is queued only if a full batch is ready. So batches are full
    whenever the device is the bottleneck, and smaller only when it outpaces decoding.
    A video whose last field arrives is finished (fields spread over repeated frames, encoded,
    packed as the per-video methods do) and handed to ``on_complete`` (the writer): in order of
    completion. ``full()`` is true while ``max_pairs`` or more pairs await their flow: the
    caller then gives workers no new video, which bounds the pool's memory.
    """

    def __init__(
        self,
        estimate: PairFlowEstimator,
        config: PrepareConfig,
        batch_size: int,
        max_pairs: int,
        on_complete: Callable[[dict, dict[str, bytes]], None],
    ):
        if batch_size < 1 or max_pairs < 1:
            raise ValueError("the flow batch and the pool must hold at least one pair")
        self.config = config
        self.batch_size = batch_size
        self.max_pairs = max_pairs
        self.on_complete = on_complete
        self.groups: dict[tuple[int, int], deque[tuple[_FlowVideo, int]]] = {}
        self.waiting_pairs = 0  # pairs without their flow yet (queued or on the device)
        self.videos = 0  # videos in the pool
        self.pairs_done = 0
        self.batches = 0
        self._arrivals = 0
        self._started: float | None = None
        self.device = _DeviceThread(estimate)

    def add(self, entry: dict, parts: dict[str, bytes], pending: PendingFlow) -> None:
        video = _FlowVideo(entry, parts, pending, self._arrivals, self.config)
        self._arrivals += 1
        if video.pairs == 0:  # a single distinct frame: zero flow, nothing to compute
            self.on_complete(*video.finish())
            return
        self.groups.setdefault(video.size, deque()).extend((video, i) for i in range(video.pairs))
        self.waiting_pairs += video.pairs
        self.videos += 1
        self._launch()

    def full(self) -> bool:
        return self.waiting_pairs >= self.max_pairs

    def service(self, wait: float = 0.0) -> None:
        """Take in finished batches (finishing their complete videos), then start new ones."""
        for batch, fields in self.device.results(wait):
            for (video, pair), field in zip(batch, fields):
                video.add_field(pair, field)
                if video.done == video.pairs:
                    self.videos -= 1
                    self.on_complete(*video.finish())
            self.waiting_pairs -= len(batch)
            self.pairs_done += len(batch)
        self._launch()

    def drain(self) -> None:
        """Compute everything still waiting (the input is exhausted)."""
        while self.waiting_pairs:
            self.service(wait=0.5)

    def close(self) -> None:
        self.device.close()

    def report(self) -> str | None:
        if not self.batches:
            return None
        wall = max(time.monotonic() - self._started, 1e-9)
        busy = max(self.device.busy_seconds, 1e-9)
        return (
            f"flow: {self.pairs_done} pairs in {self.batches} batches (mean {self.pairs_done / self.batches:.0f}), "
            f"{self.pairs_done / busy:.1f} pairs/s of device time, "
            f"{self.pairs_done / wall:.1f} pairs/s overall, device busy {100 * busy / wall:.0f} %"
        )

    def _launch(self) -> None:
        while self.device.in_flight < 2:
            idle = self.device.in_flight == 0
            ready = [key for key, pairs in self.groups.items() if idle or len(pairs) >= self.batch_size]
            if not ready:
                return
            key = min(ready, key=lambda k: self.groups[k][0][0].order)
            pairs = self.groups[key]
            batch = [pairs.popleft() for _ in range(min(self.batch_size, len(pairs)))]
            if not pairs:
                del self.groups[key]
            frames0 = np.stack([video.frames[i] for video, i in batch])
            frames1 = np.stack([video.frames[i + 1] for video, i in batch])
            if self._started is None:
                self._started = time.monotonic()
            self.device.submit(batch, frames0, frames1)
            self.batches += 1
