"""The prepared-sample schema, shared by the writers (data_tools) and the readers (tricoclr.data).

One sample per video, the same in both stores (see docs/schema.md):

- ``meta``: a JSON object (``VideoMeta``): id, source, label, label_index, fps, frames, height,
  width, chunk_frames, flow encoding, audio parameters, has_audio...
- ``rgb/<chunk>``: ``chunk_frames`` consecutive RGB frames, each a JPEG, packed into one blob.
- ``flow/<chunk>``: the flow fields of the same frames, each a greyscale JPEG holding the x field
  on top of the y field (rows [0, H) and [flow_y_offset(H), +H)), quantised with
  ``quantise_flow``.
- ``audio``: the log-mel spectrogram of the whole video, float16 ``.npy`` (n_mels x steps).

A clip touches only the chunks that overlap it, so a reader never decodes a whole video.
No pickle anywhere: blobs are a tiny length-prefixed container, arrays are ``.npy`` without
object arrays.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
import struct

import numpy as np

# 2: frames turned by the display matrix (display_rotation, display_mirror) and usable spans;
# a resume refuses to mix them into a part prepared with version 1 (prepare_args.json).
SCHEMA_VERSION = 2
DEFAULT_CHUNK_FRAMES = 16

# Flow quantisation (docs/schema.md): clip to +-20 px, q = round((v + 20) * 255 / 40).
FLOW_BOUND = 20.0
FLOW_ENCODING = "jpeg-gray-xy-stacked"  # x field on top of y field, one 8-bit channel

# Log-mel defaults: 128 steps per second at 16 kHz means a hop of 125 samples.
AUDIO_SAMPLE_RATE = 16000
AUDIO_N_MELS = 128
AUDIO_N_FFT = 1024
AUDIO_STEPS_PER_SECOND = 128

VIDEO_MODALITIES = ("rgb", "flow")
AUDIO_LOG_OFFSET = 1e-6  # log(mel + offset): the log of digital silence is log(1e-6) ~ -13.8

# Part kinds of a sample and their file extension inside a WebDataset tar member name.
META_PART = "meta"
AUDIO_PART = "audio"
_PART_EXTENSIONS = {META_PART: "json", AUDIO_PART: "npy"}
CHUNK_EXTENSION = "tcf"  # "TriCoCLR frames": a pack_frames blob

# On-disk layout of a prepared dataset (one "part", or OUT/part-IIIII-of-NNNNN/ folders).
MANIFEST_FILE = "manifest.jsonl"
ARGS_FILE = "prepare_args.json"
CLASSES_FILE = "classes.json"
SUMMARY_FILE = "summary.json"
LMDB_DIR = "lmdb"
SHARDS_DIR = "shards"
SHARD_PATTERN = "shard-{index:06d}.tar"
PART_GLOB = "part-*-of-*"

STATUS_OK, STATUS_PARTIAL, STATUS_FAILED = "ok", "partial", "failed"
KEPT_STATUSES = (STATUS_OK, STATUS_PARTIAL)


def quantise_flow(flow: np.ndarray) -> np.ndarray:
    """float flow in px -> uint8, saturating at +-FLOW_BOUND."""
    q = np.round((np.clip(flow, -FLOW_BOUND, FLOW_BOUND) + FLOW_BOUND) * 255.0 / (2 * FLOW_BOUND))
    return q.astype(np.uint8)


def dequantise_flow(q):
    """uint8 (numpy or torch) -> float flow in px. Works on both array types."""
    return q * (2 * FLOW_BOUND / 255.0) - FLOW_BOUND


def flow_y_offset(height: int) -> int:
    """Row where the y field starts in a stacked flow JPEG: ``height`` rounded up to 8.

    Starting the y field on a JPEG block boundary keeps the 8x8 DCT blocks from mixing the
    bottom rows of the x field with the top rows of the y field; the rows in between are
    padding (edge copies of the x field) that readers skip.
    """
    return -(-height // 8) * 8


def audio_step_for_frame(frame: float, fps: float, steps_per_second: int = AUDIO_STEPS_PER_SECOND) -> int:
    """Index of the spectrogram step aligned with the start of video frame ``frame`` (also a frame
    count -> step count). The one definition the writer and the readers share; halves round up
    (Python's round() would go to even, and the two sides must never disagree)."""
    return math.floor(frame * steps_per_second / fps + 0.5)


def part_dir_name(shard_index: int, num_shards: int) -> str:
    """Folder of one part of a dataset prepared as ``num_shards`` independent jobs."""
    return f"part-{shard_index:05d}-of-{num_shards:05d}"


def parse_part_dir_name(name: str) -> tuple[int, int] | None:
    """(shard index, number of shards) of a part folder name, None for any other name."""
    match = re.fullmatch(r"part-(\d+)-of-(\d+)", name)
    return (int(match[1]), int(match[2])) if match else None


def part_of(video_id: str, num_parts: int) -> int:
    """Which of ``num_parts`` parts holds a video: a stable, balanced hash of its id."""
    return int(hashlib.sha1(video_id.encode("utf-8")).hexdigest()[:12], 16) % num_parts


# ---- keys ---------------------------------------------------------------------------------


def chunk_key(modality: str, index: int) -> str:
    """Name of a chunk inside a sample ('rgb.0003' style, webdataset-safe: no second dot)."""
    return f"{modality}_{index:05d}"


def lmdb_key(video_id: str, part: str) -> bytes:
    """LMDB key for one part of one video: b'<id>/meta', b'<id>/rgb_00003', b'<id>/audio'."""
    return f"{video_id}/{part}".encode()


def member_name(part: str) -> str:
    """File name of a sample part inside a WebDataset tar, after the key: 'meta.json', 'rgb_00003.tcf'."""
    return f"{part}.{_PART_EXTENSIONS.get(part, CHUNK_EXTENSION)}"


def part_from_member(member: str) -> str:
    """Inverse of member_name: 'rgb_00003.tcf' -> 'rgb_00003'."""
    return member.split(".", 1)[0]


def chunks_for_span(start: int, count: int, chunk_frames: int) -> range:
    """Indices of the chunks that hold frames [start, start + count)."""
    if count <= 0:
        return range(0)
    return range(start // chunk_frames, (start + count - 1) // chunk_frames + 1)


# ---- the frame pack: N JPEGs in one blob --------------------------------------------------

_MAGIC = b"TCF1"


def pack_frames(frames: list[bytes]) -> bytes:
    """[jpeg bytes, ...] -> one blob: magic, uint32 count, uint32 lengths, payloads."""
    header = _MAGIC + struct.pack(f"<I{len(frames)}I", len(frames), *[len(f) for f in frames])
    return header + b"".join(frames)


def unpack_frames(blob: bytes | memoryview) -> list[memoryview]:
    """Inverse of pack_frames; returns zero-copy views of each JPEG."""
    view = memoryview(blob)
    return [view[start:end] for start, end in frame_spans(view)]


def frame_spans(blob: bytes | memoryview) -> list[tuple[int, int]]:
    """(start, end) byte offsets of each JPEG in a pack_frames blob, checked against its length."""
    view = memoryview(blob)
    if bytes(view[:4]) != _MAGIC:
        raise ValueError("not a TriCoCLR frame pack (bad magic)")
    (count,) = struct.unpack_from("<I", view, 4)
    lengths = struct.unpack_from(f"<{count}I", view, 8)
    offset = 8 + 4 * count
    spans = []
    for n in lengths:
        spans.append((offset, offset + n))
        offset += n
    if offset != len(view):
        raise ValueError(f"frame pack length mismatch: header says {offset} bytes, blob has {len(view)}")
    return spans


# ---- arrays and meta ------------------------------------------------------------------------


def encode_array(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def decode_array(blob: bytes | memoryview) -> np.ndarray:
    return np.load(io.BytesIO(bytes(blob)), allow_pickle=False)


def encode_meta(meta: dict) -> bytes:
    return json.dumps(meta, sort_keys=True).encode()


def decode_meta(blob: bytes | memoryview) -> dict:
    return json.loads(bytes(blob))
