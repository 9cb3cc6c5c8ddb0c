"""The prepared-sample schema, shared by the writers (data_tools) and the readers (tricoclr.data).

One sample per video, the same in both stores (see docs/schema.md):

- ``meta``: a JSON object (``VideoMeta``): id, source, label, label_index, fps, frames, height,
  width, chunk_frames, flow encoding, audio parameters, has_audio...
- ``rgb/<chunk>``: ``chunk_frames`` consecutive RGB frames, each a JPEG, packed into one blob.
- ``flow/<chunk>``: the flow fields of the same frames, each a greyscale JPEG holding the x field
  on top of the y field (2H x W), quantised with ``quantise_flow``.
- ``audio``: the log-mel spectrogram of the whole video, float16 ``.npy`` (n_mels x steps).

A clip touches only the chunks that overlap it, so a reader never decodes a whole video.
No pickle anywhere: blobs are a tiny length-prefixed container, arrays are ``.npy`` without
object arrays.
"""

from __future__ import annotations

import io
import json
import struct

import numpy as np

SCHEMA_VERSION = 1
DEFAULT_CHUNK_FRAMES = 16

# Flow quantisation (DESIGN.md): clip to +-20 px, q = round((v + 20) * 255 / 40).
FLOW_BOUND = 20.0
FLOW_ENCODING = "jpeg-gray-xy-stacked"  # x field on top of y field, one 8-bit channel

# Log-mel defaults: 128 steps per second at 16 kHz means a hop of 125 samples.
AUDIO_SAMPLE_RATE = 16000
AUDIO_N_MELS = 128
AUDIO_N_FFT = 1024
AUDIO_STEPS_PER_SECOND = 128

VIDEO_MODALITIES = ("rgb", "flow")


def quantise_flow(flow: np.ndarray) -> np.ndarray:
    """float flow in px -> uint8, saturating at +-FLOW_BOUND."""
    q = np.round((np.clip(flow, -FLOW_BOUND, FLOW_BOUND) + FLOW_BOUND) * 255.0 / (2 * FLOW_BOUND))
    return q.astype(np.uint8)


def dequantise_flow(q):
    """uint8 (numpy or torch) -> float flow in px. Works on both array types."""
    return q * (2 * FLOW_BOUND / 255.0) - FLOW_BOUND


# ---- keys ---------------------------------------------------------------------------------


def chunk_index(frame: int, chunk_frames: int) -> int:
    return frame // chunk_frames


def chunk_key(modality: str, index: int) -> str:
    """Name of a chunk inside a sample ('rgb.0003' style, webdataset-safe: no second dot)."""
    return f"{modality}_{index:05d}"


def lmdb_key(video_id: str, part: str) -> bytes:
    """LMDB key for one part of one video: b'<id>/meta', b'<id>/rgb_00003', b'<id>/audio'."""
    return f"{video_id}/{part}".encode()


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
    if bytes(view[:4]) != _MAGIC:
        raise ValueError("not a TriCoCLR frame pack (bad magic)")
    (count,) = struct.unpack_from("<I", view, 4)
    lengths = struct.unpack_from(f"<{count}I", view, 8)
    offset = 8 + 4 * count
    out = []
    for n in lengths:
        out.append(view[offset : offset + n])
        offset += n
    if offset != len(view):
        raise ValueError(f"frame pack length mismatch: header says {offset} bytes, blob has {len(view)}")
    return out


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
