"""Preemption requests: a SIGUSR1 or SIGTERM, or a request file, asks the trainer to checkpoint at
the next optimizer step and exit (``Trainer`` all-reduces the answer, so one rank hearing it is
enough).

Why a file as well as the signal: a signal that arrives before a process has its handler is lost
(or kills it), and the SLURM scripts' warning can come at any time, start-up included. The batch
script therefore records every warning it gets by touching the file named in ``TRICOCLR_PREEMPT_FILE``
(a fresh path per job run, on the node of rank 0); ``install`` checks it right after installing the
handlers, so a request made before that is seen, and one made after it is caught by the handler.
The training entry point (``tricoclr/train.py``) installs the handlers before importing anything
heavy. Standard library only: importing this module must take microseconds.
"""

from __future__ import annotations

import os
import signal

REQUEST_FILE_ENV = "TRICOCLR_PREEMPT_FILE"
SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

_signal_received = False


def _on_signal(signum, frame) -> None:
    global _signal_received
    _signal_received = True


def install() -> None:
    """Catch SIGUSR1 and SIGTERM from now on (no-op outside the main thread, e.g. a notebook
    worker, where Python cannot install handlers)."""
    for sig in SIGNALS:
        try:
            signal.signal(sig, _on_signal)
        except ValueError:
            return


def requested() -> bool:
    """True once a preemption signal arrived in this process, or the request file exists."""
    if _signal_received:
        return True
    path = os.environ.get(REQUEST_FILE_ENV)
    return bool(path) and os.path.exists(path)
