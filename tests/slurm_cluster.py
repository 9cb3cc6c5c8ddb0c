"""A real one-node SLURM cluster for the tests: ``munged``, ``slurmctld`` and ``slurmd`` started as
root in the foreground from a temporary folder (their own ``slurm.conf``, ``gres.conf``, munge key,
sockets and ports), stopped by PID.

The recipe (also in the README, "A one-node test cluster"): Debian's ``slurm-wlm`` 22.05 and
``munge``; ``SlurmctldHost=localhost``; the node is ``localhost`` with this machine's CPUs and
memory and 2 GPUs. Slurm 22.05's GPU plugin drops a GPU without ``File=`` ("Removing file-less GPU"),
so the two "GPUs" are links to ``/dev/null`` and ``/dev/zero``: nothing opens them, SLURM only
counts them (and sets ``CUDA_VISIBLE_DEVICES=0,1``, harmless without CUDA). Requeued jobs wait for
their credential to expire (``cred_expire``, 5 s here instead of 120 s) and for the next scheduling
pass (``sched_interval=2``): a requeue costs seconds, not the 2-3 minutes of a default scheduler.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

PLUGIN_DIRS = (
    "/usr/lib/x86_64-linux-gnu/slurm-wlm",
    "/usr/lib/aarch64-linux-gnu/slurm-wlm",
    "/usr/lib64/slurm",
    "/usr/lib/slurm",
)
DAEMONS = ("munged", "slurmctld", "slurmd")
PATH_WITH_SBIN = f"{os.environ.get('PATH', '')}:/usr/sbin:/usr/local/sbin"


class SlurmUnavailable(RuntimeError):
    """SLURM cannot run here (the message says why); the tests skip with it."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_resources() -> tuple[int, int]:
    """(CPUs, RealMemory in MiB) as slurmd sees this machine (``slurmd -C``)."""
    text = subprocess.run(
        ["slurmd", "-C"], capture_output=True, text=True, env={"PATH": PATH_WITH_SBIN}, timeout=30, check=False
    ).stdout
    found = dict(re.findall(r"(CPUs|RealMemory)=(\d+)", text))
    if "CPUs" not in found or "RealMemory" not in found:
        raise SlurmUnavailable(f"`slurmd -C` did not report CPUs and RealMemory: {text!r}")
    return int(found["CPUs"]), int(found["RealMemory"])


def slurm_conf(folder: Path, proctrack: str, cpus: int, memory_mb: int, ports: tuple[int, int]) -> str:
    plugin_dir = next((d for d in PLUGIN_DIRS if Path(d, "proctrack_linuxproc.so").exists()), None)
    if plugin_dir is None:
        raise SlurmUnavailable(f"no SLURM plugin folder among {PLUGIN_DIRS}")
    return "\n".join(
        [
            "ClusterName=tricoclr-test",
            "SlurmctldHost=localhost",
            f"SlurmctldPort={ports[0]}",
            f"SlurmdPort={ports[1]}",
            "AuthType=auth/munge",
            f"AuthInfo=socket={folder}/munge/socket,cred_expire=5",
            "CredType=cred/munge",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"PluginDir={plugin_dir}",
            f"StateSaveLocation={folder}/state",
            f"SlurmdSpoolDir={folder}/spool",
            f"SlurmctldPidFile={folder}/slurmctld.pid",
            f"SlurmdPidFile={folder}/slurmd.pid",
            f"SlurmctldLogFile={folder}/log/slurmctld.log",
            f"SlurmdLogFile={folder}/log/slurmd.log",
            f"ProctrackType=proctrack/{proctrack}",
            "TaskPlugin=task/none",
            "SchedulerType=sched/builtin",
            "SchedulerParameters=sched_interval=2",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "GresTypes=gpu",
            "ReturnToService=2",
            "MpiDefault=none",
            "JobCompType=jobcomp/none",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "KillWait=30",
            "MinJobAge=3600",
            f"NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} Gres=gpu:2 State=UNKNOWN",
            "PartitionName=test Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4",
            "",
        ]
    )


@dataclass
class Cluster:
    """A running one-node cluster; ``env`` is what SLURM's clients need (``SLURM_CONF``)."""

    folder: Path
    proctrack: str
    env: dict
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    def command(self, *args: str, check: bool = True, env: dict | None = None, cwd=None) -> str:
        result = subprocess.run(
            list(args),
            capture_output=True,
            text=True,
            timeout=60,
            cwd=cwd,
            check=False,
            env=dict(env or os.environ, **self.env),
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({result.returncode}): {result.stderr}")
        return result.stdout

    def sbatch(self, *args: str, cwd: Path, env: dict) -> int:
        return int(self.command("sbatch", "--parsable", *args, cwd=cwd, env=env).strip().split(";")[0])

    def job(self, job_id: int) -> dict:
        """``scontrol show job -o``'s fields (JobState, Restarts, Reason, ExitCode, Command, ...)."""
        line = self.command("scontrol", "show", "job", "-o", str(job_id))
        return dict(re.findall(r"(\w+)=(\S*)", line))

    def wait_for_end(self, job_id: int, timeout: float, max_restarts: int = 4, on_poll=None) -> dict:
        """Poll until the job has ended (not PENDING/RUNNING/...); more than ``max_restarts``
        requeues, or ``timeout`` seconds, cancel it and fail. (A requeued job is not released
        with ``scontrol update StartTime=now``: started before its old credential expired, it is
        killed at once, "Job credential revoked"; the short ``cred_expire`` is the way.)"""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if on_poll is not None:
                on_poll(info)
            if info["JobState"] not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "SUSPENDED"):
                return info
            if int(info.get("Restarts", 0)) > max_restarts or time.monotonic() > deadline:
                self.command("scancel", str(job_id), check=False)
                raise AssertionError(
                    f"job {job_id} still {info['JobState']} after {info.get('Restarts')} requeues "
                    f"(limit {max_restarts}) or {timeout} s:\n{self.log_tail()}"
                )
            time.sleep(0.5)

    def wait_for_state(self, job_id: int, state: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while (info := self.job(job_id))["JobState"] != state:
            assert time.monotonic() < deadline, f"job {job_id} not {state} within {timeout} s: {info}"
            time.sleep(0.2)
        return info

    def log_tail(self, lines: int = 15) -> str:
        tails = []
        for name in ("slurmctld.log", "slurmd.log"):
            path = self.folder / "log" / name
            text = path.read_text(errors="replace").splitlines()[-lines:] if path.exists() else ["(none)"]
            tails.append(f"--- {name}\n" + "\n".join(text))
        return "\n".join(tails)

    def stop(self) -> None:
        """Cancel the jobs still there (a job left running would outlive slurmd in its
        slurmstepd), then SIGTERM each daemon by PID (slurmd first), SIGKILL after 15 s."""
        if all(p.poll() is None for p in self.processes.values()):
            jobs = self.command("squeue", "-h", "-o", "%A", check=False).split()
            if jobs:
                self.command("scancel", *jobs, check=False)
                deadline = time.monotonic() + 45  # KillWait is 30 s
                while self.command("squeue", "-h", "-o", "%A", check=False).split() and time.monotonic() < deadline:
                    time.sleep(0.5)
        for name in reversed(DAEMONS):
            process = self.processes.get(name)
            if process is None or process.poll() is not None:
                continue
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=15)


def why_unavailable() -> str | None:
    """Why SLURM cannot start here, or None."""
    if os.name != "posix" or os.geteuid() != 0:
        return "the one-node SLURM cluster runs its daemons as root; this test process is not root"
    missing = [d for d in (*DAEMONS, "sbatch", "srun", "scontrol") if shutil.which(d, path=PATH_WITH_SBIN) is None]
    if missing:
        return (
            f"SLURM/munge not installed (missing {', '.join(missing)}): apt-get install slurm-wlm munge (Debian/Ubuntu)"
        )
    return None


def _start(cluster: Cluster, name: str, args: list[str]) -> None:
    with open(cluster.folder / "log" / f"{name}.out", "w") as log:
        cluster.processes[name] = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PATH=PATH_WITH_SBIN, **cluster.env)
        )


def start_cluster(folder: Path, proctrack: str = "linuxproc", timeout: float = 60) -> Cluster:
    """Start the daemons and wait until the node is idle; SlurmUnavailable if they cannot start."""
    reason = why_unavailable()
    if reason:
        raise SlurmUnavailable(reason)
    for sub in ("munge", "state", "spool", "log", "gpus"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    (folder / "munge").chmod(0o700)
    key = folder / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    for index, device in enumerate(("/dev/null", "/dev/zero")):  # see the module docstring
        link = folder / "gpus" / f"gpu{index}"
        link.unlink(missing_ok=True)
        link.symlink_to(device)
    cpus, memory = _node_resources()
    conf = folder / "slurm.conf"
    conf.write_text(slurm_conf(folder, proctrack, cpus, memory, (_free_port(), _free_port())))
    (folder / "gres.conf").write_text(f"NodeName=localhost Name=gpu File={folder}/gpus/gpu[0-1]\n")
    (folder / "cgroup.conf").write_text("CgroupPlugin=cgroup/v1\nCgroupMountpoint=/sys/fs/cgroup\n")
    cluster = Cluster(folder, proctrack, {"SLURM_CONF": str(conf)})
    _start(
        cluster,
        "munged",
        [
            "munged",
            "--foreground",
            "--force",
            f"--socket={folder}/munge/socket",
            f"--key-file={key}",
            f"--pid-file={folder}/munge/munged.pid",
            f"--log-file={folder}/log/munged.log",
            f"--seed-file={folder}/munge/seed",
        ],
    )
    _start(cluster, "slurmctld", ["slurmctld", "-D", "-i", "-f", str(conf)])
    _start(cluster, "slurmd", ["slurmd", "-D", "-N", "localhost", "-f", str(conf)])
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        dead = [name for name, p in cluster.processes.items() if p.poll() is not None]
        if dead:
            break
        state = cluster.command("sinfo", "-h", "-N", "-o", "%T", check=False).strip()
        if state == "idle":
            return cluster
        time.sleep(0.5)
    cluster.stop()
    outputs = "\n".join(
        f"--- {p.name}\n{p.read_text(errors='replace')[-1500:]}" for p in sorted((folder / "log").glob("*.out"))
    )
    raise SlurmUnavailable(
        f"the one-node cluster did not come up (node state {state!r}, exited: "
        f"{[n for n, p in cluster.processes.items() if p.poll() is not None]}):\n"
        f"{outputs}\n{cluster.log_tail()}"
    )
