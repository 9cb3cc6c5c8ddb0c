"""The worker pool of ``tricoclr-data prepare``: one task per worker process at a time, so that a
worker that crashes (a decoder segfault, out of memory) or hangs past a timeout is replaced and
only its own task is reported as failed."""

from __future__ import annotations

import multiprocessing
import time
from collections import deque
from collections.abc import Callable, Iterator
from multiprocessing.connection import wait

import torch

# Imported once by the forkserver (a string, not an import: the pool runs any job). The server
# starts once per process, so this names the module of prepare's job (``process_video``), which
# loads torch, PyAV and OpenCV; a job of another module works too, importing it in each worker.
PRELOAD_MODULES = ("data_tools.encode_video",)


def _limit_threads() -> None:
    """One thread per worker process: the pool provides the parallelism."""
    torch.set_num_threads(1)
    try:
        import cv2

        cv2.setNumThreads(1)
    except ImportError:
        pass


_READY = "ready"


def _worker_loop(conn, job: Callable, config) -> None:
    _limit_threads()
    conn.send(_READY)  # imports done: the main process starts timing tasks from here
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):  # the main process is gone
            return
        if task is None:
            return
        result = job(task, config)
        try:
            conn.send(result)
        except (BrokenPipeError, OSError):
            return


class _Worker:
    """One worker process and its pipe; handles one task at a time."""

    def __init__(self, ctx, job: Callable, config):
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker_loop, args=(child, job, config), daemon=True)
        self.process.start()
        child.close()
        self.ready = False
        self.task = None
        self.started = 0.0

    def assign(self, task) -> None:
        self.task, self.started = task, time.monotonic()
        self.conn.send(task)

    def check_ready(self) -> None:
        """Notice the start-up message; a worker that dies before it cannot run anything."""
        if self.conn.poll():
            if self.conn.recv() == _READY:
                self.ready = True
        elif not self.process.is_alive():
            raise RuntimeError(f"a worker process failed to start (exit code {self.process.exitcode})")

    def stop(self, kill: bool = False) -> None:
        if kill or not self.process.is_alive():
            self.process.kill()
        else:
            try:
                self.conn.send(None)
            except (BrokenPipeError, OSError):
                self.process.kill()
        self.process.join(timeout=5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()


def _worker_context():
    """forkserver where available (fast worker starts, no inherited threads or handles), else spawn."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        # The server imports the heavy modules once; each worker forks from it ready to run.
        ctx.set_forkserver_preload(list(PRELOAD_MODULES))
        return ctx
    return multiprocessing.get_context("spawn")


def run_tasks(
    tasks: list,
    job: Callable,
    config,
    workers: int,
    timeout: float | None = None,
    *,
    hold: Callable[[], bool] | None = None,
    tick: Callable[[float], None] | None = None,
) -> Iterator[tuple[object, object, str | None]]:
    """Run ``job(task, config)`` for every task; yields (task, result, crash reason).

    ``workers == 0`` runs in this process. Otherwise each worker process handles one task at a
    time, so a worker that dies (segfault, out of memory) or runs past ``timeout`` seconds is
    replaced and only its own task is reported, with result None and the crash reason.

    For a consumer with work of its own (the cross-video flow): no new task starts while
    ``hold()`` is true, and ``tick(wait)`` is called between results at least every 50 ms; it
    may block up to ``wait`` seconds when nothing else can happen.
    """
    hold = hold or (lambda: False)
    if workers == 0:
        for task in tasks:
            while hold():
                tick(0.1)
            yield task, job(task, config), None
            if tick:
                tick(0.0)
        return
    ctx = _worker_context()
    tasks = deque(tasks)
    pool = [_Worker(ctx, job, config) for _ in range(min(workers, len(tasks)))]
    try:
        while tasks or any(w.task is not None for w in pool):
            for worker in pool:
                if worker.ready and worker.task is None and tasks and not hold():
                    worker.assign(tasks.popleft())
            wait([w.conn for w in pool] + [w.process.sentinel for w in pool], timeout=0.05 if tick else 1.0)
            if tick:
                tick(0.0)
            for i, worker in enumerate(pool):
                if not worker.ready:
                    worker.check_ready()
                    continue
                outcome = _collect(worker, timeout)
                if outcome is None:
                    continue
                task, result, crash = outcome
                if crash is not None:
                    worker.stop(kill=True)
                    pool[i] = _Worker(ctx, job, config)
                yield task, result, crash
    finally:
        for worker in pool:
            worker.stop(kill=worker.task is not None)


def _collect(worker: _Worker, timeout: float | None):
    """(task, result, crash reason) if the worker's task is over, else None."""
    if worker.task is None:
        return None
    task = worker.task
    if worker.conn.poll():
        try:
            result = worker.conn.recv()
        except (EOFError, OSError):
            worker.task = None
            return task, None, f"worker process died (exit code {worker.process.exitcode}) while preparing this video"
        worker.task = None
        return task, result, None
    if not worker.process.is_alive():
        worker.task = None
        return task, None, f"worker process died (exit code {worker.process.exitcode}) while preparing this video"
    if timeout and time.monotonic() - worker.started > timeout:
        worker.task = None
        return task, None, f"timed out after {timeout:g} s (--video-timeout)"
    return None
