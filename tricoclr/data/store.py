"""Read a prepared dataset: one interface over the LMDB and WebDataset stores.

    store = open_store("prepared/ucf101_train")       # a part, or a folder of part-* folders
    for meta in store.videos(): ...                    # kept videos, from the manifests
    rec = store.record(meta["id"])                     # LMDB: random access
    rgb = rec.frames("rgb", start=30, count=30)        # uint8 (30, 3, H, W); reads 2-3 chunks
    flow = rec.frames("flow", 30, 30)                  # uint8 (30, 2, H, W), quantised x, y
    spec = rec.spectrogram(step, 128)                  # float32 (128 mel, 128 steps)

WebDataset shards are read sequentially (``shard_paths`` for a training pipeline, or
``iter_records``); ``record_from_sample`` wraps one webdataset sample dict.

LMDB environments are opened read-only, lazily, once per process: an environment inherited
across ``fork`` (DataLoader workers) is unusable, so a store pickled or forked into a worker
opens its own on first use.
"""

from __future__ import annotations

import collections
import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_jpeg

from tricoclr.data import schema
from tricoclr.data.location import RemotePart, expand_braces, is_url, shard_samples

ReadHook = Callable[[str, str, int], None]  # (video id, part name, bytes)


# ---- manifests and parts --------------------------------------------------------------------


def read_manifest(path: str | Path) -> list[dict]:
    """Entries of a manifest.jsonl; a torn last line (a writer killed mid-append) is ignored.

    Later lines for the same id replace earlier ones.
    """
    path = Path(path)
    if not path.exists():
        return []
    return parse_manifest(path.read_bytes(), str(path))


def parse_manifest(data: bytes, source: str) -> list[dict]:
    """``read_manifest`` on a manifest's bytes; ``source`` (its path or URL) names it in errors."""
    entries: dict[str, dict] = {}
    lines = data.split(b"\n")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):  # the unterminated last line: a torn append
                break
            raise ValueError(f"{source}:{number}: corrupt manifest line") from None
        entries[entry["id"]] = entry
    return list(entries.values())


def find_parts(root: str | Path) -> list[Path]:
    """The part folders of a prepared dataset: ``root`` itself if it holds a manifest, else its
    ``part-*-of-*`` subfolders (sorted)."""
    root = Path(root)
    markers = (schema.MANIFEST_FILE, schema.ARGS_FILE, schema.LMDB_DIR, schema.SHARDS_DIR)
    if any((root / marker).exists() for marker in markers):
        return [root]
    parts = sorted(p for p in root.glob(schema.PART_GLOB) if p.is_dir())
    if not parts:
        raise FileNotFoundError(f"{root} is not a prepared dataset (no {schema.MANIFEST_FILE} and no part-* folders)")
    return parts


def detect_format(part: Path) -> str:
    """'lmdb' or 'webdataset', from the recorded arguments or the folders present."""
    args_file = part / schema.ARGS_FILE
    if args_file.exists():
        return json.loads(args_file.read_text())["format"]
    if (part / schema.LMDB_DIR).is_dir():
        return "lmdb"
    if (part / schema.SHARDS_DIR).is_dir():
        return "webdataset"
    raise FileNotFoundError(f"{part}: neither {schema.LMDB_DIR}/ nor {schema.SHARDS_DIR}/ found")


# ---- one video ------------------------------------------------------------------------------


class VideoRecord:
    """One prepared video; fetches only the chunks a request needs.

    ``fetch(parts)`` returns the blobs of the named parts ('rgb_00003', 'audio', ...), None for
    a missing one.
    """

    def __init__(self, meta: dict, fetch: Callable[[list[str]], list[bytes | None]]):
        self.meta = meta
        self._fetch = fetch
        self._spectrogram = None  # decoded once per record: both views of a sample slice it

    @property
    def id(self) -> str:
        return self.meta["id"]

    def frames(self, modality: str, start: int, count: int) -> torch.Tensor:
        """uint8 (count, C, H, W) frames [start, start + count): rgb C=3, flow C=2 (x, y).

        Flow values are quantised (schema.dequantise_flow gives pixels). Memory layout as
        ``frames_at``.
        """
        total = self._frame_count(modality)
        if start < 0 or count < 0 or start + count > total:
            raise IndexError(f"{self.id}: {modality} frames [{start}, {start + count}) outside [0, {total})")
        return self.frames_at(modality, list(range(start, start + count)))

    def frames_at(self, modality: str, indices: list[int]) -> torch.Tensor:
        """uint8 (len(indices), C, H, W): the given frames (any order, repeats allowed).

        Decodes each distinct frame once and only those (a strided clip skips the frames in
        between). The result keeps the decoder's memory layout, which saves a copy per frame
        and suits the resize that follows: RGB is channels-last (``torch.channels_last``: the
        pixel-interleaved rows libjpeg writes), flow a view of the stacked greyscale images
        (x rows above y rows; contiguous when H is a multiple of 8). Values do not depend on
        the layout; ``.contiguous()`` gives the usual one. ValueError if a frame does not
        decode to the meta's size.
        """
        total = self._frame_count(modality)
        if any(i < 0 or i >= total for i in indices):
            raise IndexError(f"{self.id}: {modality} frame indices outside [0, {total})")
        distinct = sorted(set(indices))
        height, width = self.meta["height"], self.meta["width"]
        if not distinct:
            channels = 2 if modality == "flow" else 3
            return torch.empty((0, channels, height, width), dtype=torch.uint8)
        images = decode_jpeg(
            self._jpegs(modality, distinct), mode=ImageReadMode.GRAY if modality == "flow" else ImageReadMode.RGB
        )
        if modality == "flow":
            y_offset = self.meta.get("flow_y_offset", height)
            self._check_sizes(modality, distinct, images, (1, y_offset + height, width))
            stacked = torch.stack(images)  # (T, 1, Y + H, W)
            # x field: rows [0, H); y field: rows [Y, Y + H) of each image -- a view, no copy.
            out = stacked.as_strided((len(distinct), 2, height, width), (stacked.stride(0), y_offset * width, width, 1))
        else:
            self._check_sizes(modality, distinct, images, (3, height, width))
            # The decoder's (3, H, W) images are (H, W, 3) in memory: stack those, no transposition.
            out = torch.stack([image.permute(1, 2, 0) for image in images]).permute(0, 3, 1, 2)
        if distinct == list(indices):
            return out
        position = {index: slot for slot, index in enumerate(distinct)}
        return out[[position[i] for i in indices]]

    def _jpegs(self, modality: str, indices: list[int]) -> list[torch.Tensor]:
        """The encoded frames at sorted ``indices``, as 1-D uint8 views of their chunks (one copy
        of each chunk blob, none per frame), fetching only the chunks that hold them."""
        chunk_frames = self.meta["chunk_frames"]
        chunks = sorted({i // chunk_frames for i in indices})
        blobs = dict(zip(chunks, self._fetch([schema.chunk_key(modality, c) for c in chunks])))
        unpacked: dict[int, tuple[torch.Tensor, list[tuple[int, int]]]] = {}
        jpegs = []
        for index in indices:
            chunk = index // chunk_frames
            if chunk not in unpacked:
                if blobs[chunk] is None:
                    raise KeyError(f"{self.id}: chunk {schema.chunk_key(modality, chunk)} missing from the store")
                data = torch.frombuffer(bytearray(blobs[chunk]), dtype=torch.uint8)
                unpacked[chunk] = (data, schema.frame_spans(blobs[chunk]))
            data, spans = unpacked[chunk]
            start, end = spans[index - chunk * chunk_frames]
            jpegs.append(data[start:end])
        return jpegs

    def _check_sizes(self, modality: str, indices: list[int], images: list[torch.Tensor], expected: tuple) -> None:
        for index, image in zip(indices, images):
            if tuple(image.shape) != expected:
                raise ValueError(
                    f"{self.id}: {modality} frame {index} decodes to {tuple(image.shape)}, the meta says {expected}"
                )

    def _frame_count(self, modality: str) -> int:
        if modality == "rgb":
            return self.meta["frames"]
        if modality == "flow":
            if self.meta.get("flow_method", "none") == "none":
                raise KeyError(f"{self.id}: prepared without flow (--flow none)")
            return self.meta["flow_frames"]
        raise KeyError(f"unknown video modality {modality!r}; expected one of {schema.VIDEO_MODALITIES}")

    def spectrogram(self, start_step: int = 0, num_steps: int | None = None) -> torch.Tensor:
        """float32 (n_mels, num_steps) log-mel slice; steps past the end read as silence.

        Frame ``f`` starts at step schema.audio_step_for_frame(f, fps).
        """
        if not self.meta.get("has_audio"):
            silent = " (its audio is silent)" if self.meta.get("audio_silent") else ""
            raise ValueError(f"{self.id}: no audio{silent}; stages using audio skip such videos (docs/schema.md)")
        if self._spectrogram is None:
            (blob,) = self._fetch([schema.AUDIO_PART])
            if blob is None:
                raise KeyError(f"{self.id}: audio record missing from the store")
            self._spectrogram = schema.decode_array(blob)
        spec = self._spectrogram
        steps = spec.shape[1]
        num_steps = steps - start_step if num_steps is None else num_steps
        if start_step < 0 or start_step >= steps or num_steps < 0:
            raise IndexError(
                f"{self.id}: spectrogram steps [{start_step}, {start_step + num_steps}) outside [0, {steps})"
            )
        out = torch.from_numpy(spec[:, start_step : start_step + num_steps].astype(np.float32))
        if out.shape[1] < num_steps:  # rounding at the very end of the video
            # the stored (float16) value of silence, so padding equals recorded silence
            silence = float(np.float16(np.log(self.meta["audio"]["log_offset"])))
            out = torch.cat([out, torch.full((out.shape[0], num_steps - out.shape[1]), silence)], dim=1)
        return out

    def array(self, part: str) -> np.ndarray:
        """The numpy array stored as part ``part`` (written with ``schema.encode_array``): the
        reader of a stored modality that keeps one array per video (docs/adding_a_modality.md).
        Raises KeyError naming the video and part when the record lacks it."""
        (blob,) = self._fetch([part])
        if blob is None:
            raise KeyError(f"{self.id}: no '{part}' part in the store")
        return schema.decode_array(blob)


def record_from_sample(sample: dict[str, bytes]) -> VideoRecord:
    """A VideoRecord over one webdataset sample dict ('__key__', 'meta.json', 'rgb_00000.tcf', ...)."""
    meta = schema.decode_meta(sample[schema.member_name(schema.META_PART)])
    blobs = {schema.part_from_member(k): v for k, v in sample.items() if not k.startswith("__")}
    return VideoRecord(meta, lambda parts: [blobs.get(p) for p in parts])


# ---- LMDB access ----------------------------------------------------------------------------


# One read-only environment per LMDB and process, shared by every reader in it: LMDB forbids
# opening the same environment twice in one process (py-lmdb refuses), and one inherited
# across fork must not be used in the child.
_ENVIRONMENTS: dict[str, tuple[int, object]] = {}  # real path -> (pid that opened it, env)


def _readonly_environment(path: Path):
    import lmdb

    key = os.path.realpath(path)
    entry = _ENVIRONMENTS.get(key)
    if entry is not None and entry[0] == os.getpid():
        return entry[1]
    if entry is not None:  # inherited from the parent: release this process's copy first
        release_environment(path)
    # lock=False: readers never write, and a lock file on a shared FS is a liability.
    env = lmdb.open(str(path), readonly=True, lock=False, readahead=False, meminit=False, max_readers=2048, subdir=True)
    _ENVIRONMENTS[key] = (os.getpid(), env)
    return env


def release_environment(path: str | Path) -> None:
    """Close this process's read-only handle on an LMDB (before writing to it in-process)."""
    entry = _ENVIRONMENTS.pop(os.path.realpath(path), None)
    if entry is not None:
        try:
            entry[1].close()
        except Exception:  # an inherited handle may refuse; it is dropped either way
            pass


class _LmdbReader:
    """Read access to one part's LMDB, opened on first use in each process."""

    def __init__(self, path: Path):
        self.path = path
        self._key: str | None = None  # realpath, resolved once: not a filesystem walk per read

    def env(self):
        if self._key is None:
            self._key = os.path.realpath(self.path)
        entry = _ENVIRONMENTS.get(self._key)
        if entry is not None and entry[0] == os.getpid():
            return entry[1]
        return _readonly_environment(self.path)

    def get_many(self, keys: list[bytes]) -> list[bytes | None]:
        with self.env().begin(buffers=False) as txn:
            return [txn.get(key) for key in keys]

    def ids(self) -> Iterator[str]:
        """Every video id in the environment, in key order, one seek per video.

        Keys are '<id>/<part>' and ids use [A-Za-z0-9_-] only, so jumping to '<id>0' ('0'
        follows '/') skips exactly that video's keys.
        """
        with self.env().begin() as txn:
            cursor = txn.cursor()
            found = cursor.first()
            while found:
                video_id = bytes(cursor.key()).split(b"/", 1)[0]
                yield video_id.decode()
                found = cursor.set_range(video_id + b"0")


# ---- the dataset ----------------------------------------------------------------------------


class VideoStore:
    """A prepared dataset (all its parts), read-only. Use ``open_store``.

    ``parts`` are local folders (``Path``) or, for a store behind a URL, ``RemotePart``s; both
    have a ``name``. ``root`` is the path or URL the store was opened from.
    """

    def __init__(self, root: Path | str, parts: list[Path] | list[RemotePart], format: str):
        self.root = root
        self.parts = parts
        self.format = format
        self.stats: collections.Counter = collections.Counter()  # 'reads', 'bytes', per part name
        self.on_read: ReadHook | None = None
        self._manifest: list[dict] | None = None
        self._lmdb = {part.name: _LmdbReader(part / schema.LMDB_DIR) for part in parts} if format == "lmdb" else {}

    def __getstate__(self):
        state = dict(self.__dict__)
        state["on_read"] = None  # hooks are per process (and often not picklable)
        state["_manifest"] = None  # large; workers use record(), which does not need it
        return state

    # metadata

    def manifest(self) -> list[dict]:
        """Every manifest entry of every part, failed ones included, sorted by id.

        A part without a manifest (a store copied on its own) is described from the metas
        stored in it, which costs a scan of the store.
        """
        if self._manifest is None:
            entries = []
            for part in self.parts:
                if isinstance(part, RemotePart):  # required: the URL store's index of shards
                    found = parse_manifest(part.read(schema.MANIFEST_FILE), part.address(schema.MANIFEST_FILE))
                else:
                    manifest = part / schema.MANIFEST_FILE
                    found = read_manifest(manifest) if manifest.exists() else self._metas_in_store(part)
                for entry in found:
                    entry["part"] = part.name
                    entries.append(entry)
            self._manifest = sorted(entries, key=lambda e: e["id"])
        return self._manifest

    def _metas_in_store(self, part: Path) -> list[dict]:
        if self.format == "lmdb":
            reader = self._lmdb[part.name]
            keys = [schema.lmdb_key(video_id, schema.META_PART) for video_id in reader.ids()]
            return [schema.decode_meta(blob) for blob in reader.get_many(keys)]
        shards = sorted(str(p) for p in (part / schema.SHARDS_DIR).glob("shard-*.tar"))
        return [record_from_sample(sample).meta for sample in iter_shard_samples(shards)]

    def videos(self) -> list[dict]:
        """Metas of the kept videos (status ok or partial), sorted by id."""
        return [e for e in self.manifest() if e["status"] in schema.KEPT_STATUSES]

    def class_names(self) -> list[str] | None:
        """Class names in label_index order, as fixed at prepare time."""
        for part in self.parts:
            if isinstance(part, RemotePart):  # prepare always writes it; over a URL it is required
                return json.loads(part.read(schema.CLASSES_FILE))["names"]
            classes = part / schema.CLASSES_FILE
            if classes.exists():
                return json.loads(classes.read_text())["names"]
        labels = {e["label"] for e in self.videos() if e.get("label") is not None}
        return sorted(labels) or None

    # random access (LMDB)

    def record(self, video_id: str) -> VideoRecord:
        """Random access to one video (LMDB only). Reads its meta from the store (one small
        read, no manifest needed, so DataLoader workers never parse manifests); frames and
        spectrograms are read on request."""
        if self.format != "lmdb":
            raise NotImplementedError(
                "a WebDataset store is read sequentially: use shard_paths() with webdataset, or iter_records(); "
                "prepare with --format lmdb for random access"
            )
        key = schema.lmdb_key(video_id, schema.META_PART)
        for part in self._parts_to_search(video_id):
            reader = self._lmdb[part]
            (blob,) = reader.get_many([key])
            if blob is not None:
                self._count(video_id, schema.META_PART, len(blob))
                return VideoRecord(schema.decode_meta(blob), self._fetcher(reader, video_id))
        raise KeyError(f"video {video_id!r} not in {self.root}")

    def _parts_to_search(self, video_id: str) -> list[str]:
        """The part that holds ``video_id`` first (parts are chosen by a hash of the id)."""
        names = [part.name for part in self.parts]
        numbered = [schema.parse_part_dir_name(name) for name in names]
        if len(names) > 1 and all(numbered) and len({n for _, n in numbered}) == 1:
            wanted = schema.part_of(video_id, numbered[0][1])
            names.sort(key=lambda name: schema.parse_part_dir_name(name)[0] != wanted)
        return names

    def _fetcher(self, reader: _LmdbReader, video_id: str):
        def fetch(parts: list[str]) -> list[bytes | None]:
            blobs = reader.get_many([schema.lmdb_key(video_id, p) for p in parts])
            for part, blob in zip(parts, blobs):
                self._count(video_id, part, len(blob) if blob is not None else 0)
            return blobs

        return fetch

    def _count(self, video_id: str, part: str, nbytes: int) -> None:
        self.stats["reads"] += 1
        self.stats["bytes"] += nbytes
        self.stats[part] += 1
        if self.on_read is not None:
            self.on_read(video_id, part, nbytes)

    # sequential access (both formats)

    def shard_paths(self) -> list[str]:
        """All complete WebDataset shards of all parts (never a half-written .tmp), sorted: local
        paths, or for a URL store the URLs (commands) of the shards its manifests name."""
        if self.format != "webdataset":
            raise NotImplementedError("shard_paths() is for WebDataset stores; this one is LMDB")
        paths = []
        for part in self.parts:
            if isinstance(part, RemotePart):  # a URL cannot be listed in general: the manifest is the index
                names = {e["shard"] for e in self.manifest() if e["part"] == part.name and e.get("shard")}
                paths += [part.address(f"{schema.SHARDS_DIR}/{name}") for name in names]
            else:
                paths += [str(p) for p in (part / schema.SHARDS_DIR).glob("shard-*.tar")]
        return sorted(paths)

    def shard_address(self, part_name: str, shard: str) -> str:
        """Path or URL of the shard a manifest entry names (its ``part`` and ``shard``)."""
        part = next(p for p in self.parts if p.name == part_name)
        if isinstance(part, RemotePart):
            return part.address(f"{schema.SHARDS_DIR}/{shard}")
        return str(part / schema.SHARDS_DIR / shard)

    def iter_records(self) -> Iterator[VideoRecord]:
        """Every stored video once, sequentially (LMDB: in id order; WebDataset: shard order)."""
        if self.format == "lmdb":
            for reader in self._lmdb.values():
                for video_id in reader.ids():
                    (blob,) = reader.get_many([schema.lmdb_key(video_id, schema.META_PART)])
                    yield VideoRecord(schema.decode_meta(blob), self._fetcher(reader, video_id))
        else:
            for sample in iter_shard_samples(self.shard_paths()):
                yield record_from_sample(sample)


def iter_shard_samples(shard_paths: Iterable[str]) -> Iterator[dict]:
    """Raw sample dicts of WebDataset shards (paths or URLs), read in order in this process only.

    A plain pipeline (shard list -> samples) with no node or worker splitting: this is a full
    scan (inspection, conversion, tests), not a training loader. An unreadable shard raises
    (a missing one: FileNotFoundError naming it).
    """
    yield from shard_samples(list(shard_paths))


def open_store(path: str | Path) -> VideoStore:
    """Open a prepared dataset folder (a single part, or a folder of part-* folders), or a
    WebDataset store behind a URL (``open_url_store``)."""
    if is_url(path):
        return open_url_store(path)
    root = Path(path)
    parts = find_parts(root)
    formats = {detect_format(part) for part in parts}
    if len(formats) != 1:
        raise ValueError(f"{root}: parts mix formats {sorted(formats)}")
    store = VideoStore(root, parts, formats.pop())
    return store


def remote_parts(address: str) -> list[RemotePart]:
    """The parts a URL names: each brace-expanded address is a part (it holds a manifest), or a
    folder whose part-*-of-* folders its filesystem can list. FileNotFoundError naming the
    address otherwise."""
    parts = []
    for expanded in expand_braces(address):
        here = RemotePart(expanded)
        if here.has(schema.MANIFEST_FILE):
            parts.append(here)
            continue
        below = here.subparts(schema.PART_GLOB)
        if not below:
            raise FileNotFoundError(
                f"{expanded} is not a prepared store: {here.why_missing(schema.MANIFEST_FILE)}; and no "
                f"{schema.PART_GLOB} folders listed there (give the URL of a part, or the parts as a brace "
                "range such as .../part-{00000..00007}-of-00008)"
            )
        parts += below
    names = [part.name for part in parts]
    if len(set(names)) != len(names):
        raise ValueError(f"{address}: parts with the same name {sorted(names)}; name each part's folder in the URL")
    return parts


def open_url_store(address: str) -> VideoStore:
    """Open a WebDataset store behind a URL or a ``pipe:`` template (tricoclr.data.location).

    Each part's prepare_args.json, manifest.jsonl and classes.json are required (prepare writes
    them first); shards are the ones the manifests name, streamed when read. LMDB is refused.
    """
    parts = remote_parts(address)
    formats = {json.loads(part.read(schema.ARGS_FILE))["format"] for part in parts}
    if len(formats) != 1:
        raise ValueError(f"{address}: parts mix formats {sorted(formats)}")
    format = formats.pop()
    if format != "webdataset":
        raise ValueError(
            f"{address}: an {format} store cannot be read over a URL (it needs random access to local files); "
            "copy it to a local or shared disk, or prepare the data with --format webdataset"
        )
    return VideoStore(address, parts, format)
