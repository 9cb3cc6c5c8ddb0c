"""The project's one queue module: aligned FIFO queues of past keys and their oracle vectors.

Queue B (``keys``) holds past momentum-encoder keys, queue O (``oracle``) the oracle vectors of
the same samples, and ``video_ids`` / ``labels`` the source video and class of each entry (labels
only for logging the mining precision). All are registered buffers, so a checkpoint of the owning
method holds them and a resume continues with exactly the same queue.

The caller gathers a batch across ranks before ``enqueue`` (``tricoclr.distributed
.gather_from_all_ranks``), so every rank holds identical queues.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FeatureQueue(nn.Module):
    """Two aligned FIFO queues of length ``size``: keys (size, dim) and oracle (size, oracle_dim).

    Initial state (MoCo's convention): ``keys`` are random unit vectors, so InfoNCE has negatives
    from the first step (they are noise that the FIFO pushes out within size / batch steps);
    ``oracle`` is zeros, ``video_ids`` and ``labels`` are -1 (no video, unknown class). Oracle
    mining only runs once ``is_full``, so the unfilled oracle slots are never ranked, and id -1
    never matches a video.

    Buffers: ``keys``, ``oracle``, ``video_ids`` (int64), ``labels`` (int64), ``ptr`` (next slot
    to write, 0-dim int64) and ``num_filled`` (slots holding real entries, 0-dim int64).
    """

    def __init__(self, size: int, dim: int, oracle_dim: int = 0):
        super().__init__()
        if size <= 0 or dim <= 0 or oracle_dim < 0:
            raise ValueError(f"invalid queue shape: size={size}, dim={dim}, oracle_dim={oracle_dim}")
        self.size = int(size)
        self.dim = int(dim)
        self.oracle_dim = int(oracle_dim)
        self.register_buffer("keys", torch.empty(self.size, self.dim))
        self.register_buffer("oracle", torch.empty(self.size, self.oracle_dim))
        self.register_buffer("video_ids", torch.empty(self.size, dtype=torch.long))
        self.register_buffer("labels", torch.empty(self.size, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("num_filled", torch.zeros((), dtype=torch.long))
        self.reset()

    @torch.no_grad()
    def reset(self, generator: torch.Generator | None = None) -> None:
        """Fresh queues (a new stage refills its queues from scratch)."""
        random_keys = torch.randn(self.size, self.dim, generator=generator)
        self.keys.copy_(F.normalize(random_keys, dim=1))
        self.oracle.zero_()
        self.video_ids.fill_(-1)
        self.labels.fill_(-1)
        self.ptr.zero_()
        self.num_filled.zero_()

    @torch.no_grad()
    def enqueue(
        self,
        keys: torch.Tensor,
        oracle: torch.Tensor | None = None,
        video_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> None:
        """Write a (gathered) batch of n entries at ``ptr``, wrapping around the end.

        A batch longer than the queue keeps only its last ``size`` entries. Inputs are detached
        and cast to the buffers' dtype. Missing ``video_ids`` / ``labels`` are stored as -1;
        ``oracle`` is required when ``oracle_dim`` > 0.
        """
        if keys.dim() != 2 or keys.shape[1] != self.dim:
            raise ValueError(f"keys must be (n, {self.dim}), got {tuple(keys.shape)}")
        n = keys.shape[0]
        if oracle is None:
            if self.oracle_dim > 0:
                raise ValueError(f"this queue stores oracle vectors of dim {self.oracle_dim}")
            oracle = keys.new_zeros(n, 0)
        if oracle.shape != (n, self.oracle_dim):
            raise ValueError(f"oracle must be ({n}, {self.oracle_dim}), got {tuple(oracle.shape)}")
        if video_ids is None:
            video_ids = torch.full((n,), -1, dtype=torch.long)
        if labels is None:
            labels = torch.full((n,), -1, dtype=torch.long)
        if video_ids.shape != (n,) or labels.shape != (n,):
            raise ValueError(f"video_ids and labels must be ({n},)")

        if n > self.size:  # only the newest entries would survive anyway
            keys, oracle = keys[-self.size :], oracle[-self.size :]
            video_ids, labels = video_ids[-self.size :], labels[-self.size :]
            n = self.size
        if n == 0:
            return
        device = self.keys.device
        # Slot indices computed on the device: no host sync per step.
        slots = (self.ptr + torch.arange(n, device=device)) % self.size
        self.keys.index_copy_(0, slots, keys.detach().to(device, self.keys.dtype))
        self.oracle.index_copy_(0, slots, oracle.detach().to(device, self.oracle.dtype))
        self.video_ids.index_copy_(0, slots, video_ids.detach().to(device, torch.long))
        self.labels.index_copy_(0, slots, labels.detach().to(device, torch.long))
        self.ptr.copy_((self.ptr + n) % self.size)
        self.num_filled.copy_(torch.clamp(self.num_filled + n, max=self.size))

    @property
    def is_full(self) -> bool:
        """True once every slot holds a real entry (oracle mining may start)."""
        return int(self.num_filled) == self.size

    @property
    def full_on_device(self) -> torch.Tensor:
        """``is_full`` as a 0-dim bool tensor on the queue's device: read without a host sync."""
        return self.num_filled == self.size

    @property
    def fill_fraction(self) -> float:
        return int(self.num_filled) / self.size

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}, oracle_dim={self.oracle_dim}"
