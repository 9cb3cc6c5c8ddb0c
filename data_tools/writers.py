"""The single writer of one part of a prepared dataset: store (LMDB or tar shards) + manifest.

Crash safety rests on one rule: a video's manifest line is appended (flushed and fsynced)
only after its data is durable — its LMDB transaction committed, or the tar shard holding it
fsynced and renamed from ``*.tar.tmp`` to ``*.tar``. So after any kill:

- a manifest line always points at complete data;
- a torn last manifest line is cut off on restart (``repair_manifest``);
- ``*.tar.tmp`` files are incomplete shards: deleted, their videos redone;
- a renamed shard whose manifest lines were not all written (killed between the rename and the
  append) is recognised on restart and its lines are rebuilt from the metas inside it;
- an LMDB video committed without its manifest line is simply redone (same keys overwritten,
  stale ones deleted first).
"""

from __future__ import annotations

import collections
import io
import json
import os
import tarfile
from pathlib import Path

import lmdb

from tricoclr.data import schema
from tricoclr.data.store import iter_shard_samples, read_manifest, release_environment
from tricoclr.durable import fsync_dir

try:
    import fcntl
except ImportError:  # not on Windows: no protection against two writers there
    fcntl = None

LMDB_INITIAL_MAP_SIZE = 1 << 30  # grown by doubling when full


# ---- small durable-file helpers ---------------------------------------------------------------


def append_jsonl(path: Path, entries: list[dict]) -> None:
    """Append JSON lines durably (one write, then fsync)."""
    if not entries:
        return
    data = "".join(json.dumps(e, sort_keys=True) + "\n" for e in entries).encode("utf-8")
    with open(path, "ab") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def repair_manifest(path: Path) -> list[dict]:
    """Cut a torn last line (a kill mid-append) off the manifest; return its entries."""
    if path.exists():
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            with open(path, "r+b") as handle:
                handle.truncate(data.rfind(b"\n") + 1)
                handle.flush()
                os.fsync(handle.fileno())
    return read_manifest(path)


# ---- manifest entries -------------------------------------------------------------------------


def modality_of(part: str) -> str:
    """'rgb_00003' -> 'rgb', 'audio' -> 'audio', 'meta' -> 'meta'."""
    return part.split("_", 1)[0]


def kept_entry(meta: dict, sizes: dict[str, int], **location) -> dict:
    """Manifest line of a stored video: its meta plus bytes (total and per modality) and where
    it is (e.g. the shard)."""
    by_modality: collections.Counter = collections.Counter()
    for part, size in sizes.items():
        by_modality[modality_of(part)] += size
    return {**meta, "bytes": sum(sizes.values()), "bytes_by_modality": dict(by_modality), **location}


def failed_entry(video_id: str, source: str, label, label_index, reason: str, **extra) -> dict:
    """Manifest line of a video that could not be prepared at all."""
    return {
        "id": video_id,
        "source": source,
        "label": label,
        "label_index": label_index,
        "status": schema.STATUS_FAILED,
        "reason": reason,
        "frames": 0,
        "seconds": 0.0,
        "has_audio": False,
        "bytes": 0,
        **extra,
    }


# ---- stores -----------------------------------------------------------------------------------


class LmdbSink:
    """One LMDB environment, written one video per transaction (durable at commit)."""

    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        existing = folder / "data.mdb"
        size = existing.stat().st_size if existing.exists() else 0
        self.map_size = max(LMDB_INITIAL_MAP_SIZE, 2 * size)
        release_environment(folder)  # a reader in this process would block the writer's open
        self.env = lmdb.open(str(folder), map_size=self.map_size, subdir=True, sync=True, metasync=True)

    def add(self, video_id: str, parts: dict[str, bytes]) -> tuple[dict, list[str]]:
        """Store a video; returns (its location, ids now durable)."""
        while True:
            try:
                with self.env.begin(write=True) as txn:
                    _delete_video(txn, video_id)
                    for part, blob in parts.items():
                        txn.put(schema.lmdb_key(video_id, part), blob)
                return {}, [video_id]
            except lmdb.MapFullError:
                self.map_size *= 2  # the aborted transaction left nothing behind
                self.env.set_mapsize(self.map_size)

    def discard(self, video_id: str) -> None:
        """Remove any records of a video (left by an earlier run that did not finish it)."""
        with self.env.begin(write=True) as txn:
            _delete_video(txn, video_id)

    def close(self) -> list[str]:
        self.env.close()
        return []


def _delete_video(txn, video_id: str) -> None:
    prefix = schema.lmdb_key(video_id, "")
    cursor = txn.cursor()
    if cursor.set_range(prefix):
        while bytes(cursor.key()).startswith(prefix):
            if not cursor.delete():
                break


class ShardSink:
    """WebDataset tar shards, each written as ``*.tar.tmp`` and renamed when complete.

    A sample is consecutive members ``<id>.<part>.<ext>`` (webdataset's convention), written
    with the standard tarfile module: fixed mtime and owner, so the same videos give
    byte-identical shards.
    """

    def __init__(self, folder: Path, max_bytes: int, max_videos: int = 0):
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.max_bytes = max_bytes
        self.max_videos = max_videos
        for stale in folder.glob("*.tar.tmp"):  # a shard a killed run did not finish
            stale.unlink()
        indices = [int(p.name[len("shard-") : -len(".tar")]) for p in self.shard_paths()]
        self.next_index = max(indices) + 1 if indices else 0
        self._file = None
        self._tar = None
        self._ids: list[str] = []

    def shard_paths(self) -> list[Path]:
        return sorted(self.folder.glob("shard-*.tar"))

    def recover_entries(self, recorded: set[str]) -> list[dict]:
        """Manifest lines for videos inside a complete shard but missing from the manifest.

        Shards are completed and recorded one at a time, so only the last complete shard can
        hold such videos (a kill between its rename and its manifest append).
        """
        entries = []
        for shard in self.shard_paths()[-1:]:
            for sample in iter_shard_samples([str(shard)]):
                if sample["__key__"] in recorded:
                    continue
                sizes = {schema.part_from_member(k): len(v) for k, v in sample.items() if not k.startswith("__")}
                meta = schema.decode_meta(sample[schema.member_name(schema.META_PART)])
                entries.append(kept_entry(meta, sizes, shard=shard.name))
        return entries

    def add(self, video_id: str, parts: dict[str, bytes]) -> tuple[dict, list[str]]:
        """Append a video to the open shard; returns (its location, ids now durable)."""
        if self._tar is None:
            self._open()
        for part in sorted(parts):
            _add_member(self._tar, f"{video_id}.{schema.member_name(part)}", parts[part])
        self._ids.append(video_id)
        location = {"shard": self._final_path().name}
        full = self._file.tell() >= self.max_bytes or (self.max_videos and len(self._ids) >= self.max_videos)
        return location, self._finish() if full else []

    def discard(self, video_id: str) -> None:
        """Nothing to do: a video only reaches a complete shard together with its manifest line."""

    def close(self) -> list[str]:
        return self._finish() if self._tar is not None else []

    def _final_path(self) -> Path:
        return self.folder / schema.SHARD_PATTERN.format(index=self.next_index)

    def _open(self) -> None:
        self._file = open(self._final_path().with_suffix(".tar.tmp"), "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)

    def _finish(self) -> list[str]:
        """Complete the open shard: end-of-archive, fsync, rename; returns its ids."""
        self._tar.close()  # writes the end-of-archive blocks; the file stays open
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        final = self._final_path()
        os.replace(final.with_suffix(".tar.tmp"), final)
        fsync_dir(self.folder)
        ids, self._ids = self._ids, []
        self._tar = self._file = None
        self.next_index += 1
        return ids


def _add_member(tar: tarfile.TarFile, name: str, blob: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(blob)
    info.mode = 0o444
    info.mtime = 0
    info.uname = info.gname = "tricoclr"
    tar.addfile(info, io.BytesIO(blob))


# ---- one part ---------------------------------------------------------------------------------


class PartWriter:
    """Owns one part folder: its store, its manifest, and the lock that keeps writers single."""

    def __init__(self, part_dir: Path, format: str, shard_max_bytes: int = 256 << 20, shard_max_videos: int = 0):
        part_dir.mkdir(parents=True, exist_ok=True)
        self.part_dir = part_dir
        self.manifest_path = part_dir / schema.MANIFEST_FILE
        self._lock = _lock_part(part_dir)
        entries = repair_manifest(self.manifest_path)
        if format == "lmdb":
            self.sink = LmdbSink(part_dir / schema.LMDB_DIR)
        elif format == "webdataset":
            self.sink = ShardSink(part_dir / schema.SHARDS_DIR, shard_max_bytes, shard_max_videos)
            recovered = self.sink.recover_entries({e["id"] for e in entries})
            append_jsonl(self.manifest_path, recovered)
            entries += recovered
        else:
            raise ValueError(f"unknown format {format!r}; expected 'webdataset' or 'lmdb'")
        self.done: set[str] = {e["id"] for e in entries}
        self._pending: dict[str, dict] = {}  # stored but not yet durable (open shard)

    def add(self, entry: dict, parts: dict[str, bytes] | None) -> None:
        """Record one processed video: ``parts`` is None for a failed one."""
        if parts is None:
            self.sink.discard(entry["id"])
            self._record([entry])
            return
        location, durable = self.sink.add(entry["id"], parts)
        entry.update(location)
        self._pending[entry["id"]] = entry
        self._record([self._pending.pop(i) for i in durable])

    def close(self) -> None:
        durable = self.sink.close()
        self._record([self._pending.pop(i) for i in durable])
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def _record(self, entries: list[dict]) -> None:
        append_jsonl(self.manifest_path, entries)
        self.done.update(e["id"] for e in entries)


def _lock_part(part_dir: Path):
    """An exclusive lock on the part (released by the OS even on kill -9)."""
    handle = open(part_dir / ".prepare.lock", "a")
    if fcntl is not None:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise RuntimeError(f"another 'tricoclr-data prepare' is writing {part_dir}") from None
    return handle
