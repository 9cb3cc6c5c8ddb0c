"""On a CPU the trainer leaves a core to each data worker (``tricoclr.backend.share_cores_with_workers``)."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import REPO

CODE = """
import os, torch
from accelerate import Accelerator
from tricoclr.backend import share_cores_with_workers
accelerator = Accelerator(cpu=True)
cores = len(os.sched_getaffinity(0))
torch.set_num_threads(cores)
print(share_cores_with_workers(accelerator, 0), share_cores_with_workers(accelerator, 1), torch.get_num_threads(), cores)
torch.set_num_threads(cores)
os.environ["OMP_NUM_THREADS"] = str(cores)
print(share_cores_with_workers(accelerator, 1), torch.get_num_threads())
"""


def test_threads_leave_a_core_per_worker_unless_the_user_chose():
    # A fresh process: the test session itself runs with OMP_NUM_THREADS=1 (conftest).
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "LOCAL_WORLD_SIZE")}
    result = subprocess.run([sys.executable, "-c", CODE], env=env, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    first, second = result.stdout.split("\n")[:2]
    no_workers, one_worker, threads, cores = first.split()
    expected = max(1, int(cores) - 1)
    assert no_workers == "None" and int(threads) == expected
    assert one_worker == (str(expected) if expected < int(cores) else "None")
    assert second.split() == ["None", cores]  # OMP_NUM_THREADS set: left as it is
