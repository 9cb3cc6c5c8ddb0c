"""Deterministic per-video features of an encoder over a prepared store, cached on disk.

Protocol: clips are taken across each whole video as non-overlapping sliding windows (one clip at
the start when the video is shorter than a window), each presented without randomness (centre
crop, no flip, no colour change: CoCLR left colour jitter on at test time); the backbone's pooled
output (before the projection head) is averaged over a video's clips.

Each video's clips go through the encoder on their own (never batched with another video's), so
a video's feature does not depend on the loader's worker count or order.

Videos a modality cannot use (e.g. no audible audio for an audio encoder) and records that fail
to decode are left out and counted (``excluded``); an unlabelled video is an error, because every
metric here needs labels.

The cache key is a hash of the encoder's weights (or a key the caller gives), the modality, the
clip settings, ``max_clips``, the store's manifest and :data:`FEATURE_PROTOCOL`: a changed encoder
file or a re-prepared store never reads stale features.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from tricoclr.config import clip_settings
from tricoclr.data import modalities as registry
from tricoclr.data.sampling import ClipSpec, clip_frame_limit, clip_spec_of
from tricoclr.data.store import VideoRecord, open_store
from tricoclr.eval.retrieval import center_and_normalise

log = logging.getLogger(__name__)

# Bump when extraction changes what a cached feature means: older cache files stop matching.
FEATURE_PROTOCOL = 2


class EvalError(ValueError):
    """An evaluation cannot run as asked (unlabelled store, label mismatch, nothing usable)."""


def window_starts(
    num_frames: int, spec: ClipSpec, max_clips: int | None = None, spans: list | None = None
) -> list[int]:
    """Start frames of non-overlapping windows covering the video (evenly thinned to max_clips).

    ``spans`` (meta: usable frame ranges between timestamp gaps) tiles each span on its own, so
    no window crosses a gap; a video whose spans hold no whole window gets one at the start of
    its longest span.
    """
    span = spec.frames * spec.stride
    usable = [(int(a), int(b)) for a, b in spans] if spans else [(0, num_frames)]
    starts = [s for a, b in usable for s in range(a, b - span + 1, span)]
    if not starts:
        starts = [max(usable, key=lambda ab: ab[1] - ab[0])[0]]
    if max_clips is not None and len(starts) > max_clips:
        step = len(starts) / max_clips
        starts = [starts[int(i * step)] for i in range(max_clips)]
    return starts


def default_cache_dir() -> Path:
    return Path(os.environ.get("TRICOCLR_CACHE", Path.home() / ".cache" / "tricoclr")) / "features"


def weights_fingerprint(module: torch.nn.Module) -> str:
    """sha256 of every parameter and buffer (names, dtypes, shapes, bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def store_fingerprint(store) -> str:
    """sha256 of the kept videos' manifest entries: changes when the store is re-prepared."""
    digest = hashlib.sha256()
    for meta in store.videos():
        digest.update(json.dumps(meta, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def usable_videos(store, modality: str) -> list[dict]:
    """Metas of the kept videos this modality can use (e.g. only those with audible audio)."""
    entry = registry.get(modality)
    return [meta for meta in store.videos() if entry.available(meta)]


def check_labelled(metas: list[dict], store_root) -> None:
    unlabelled = [meta["id"] for meta in metas if meta.get("label_index") is None]
    if unlabelled:
        raise EvalError(
            f"{store_root}: {len(unlabelled)} of {len(metas)} videos have no label (e.g. {unlabelled[0]}); "
            "evaluation needs labelled stores: prepare them with --list (a split file) and its classInd.txt"
        )


def window_clips(record: VideoRecord, modality: str, data_cfg: dict, max_clips: int | None):
    """Yield the raw clip (as the modality reads it) of every evaluation window of one video."""
    entry = registry.get(modality)
    spec = clip_spec_of(clip_settings(data_cfg))
    num_frames, fps, spans = int(record.meta["frames"]), float(record.meta["fps"]), record.meta.get("spans")
    for start in window_starts(num_frames, spec, max_clips, spans):
        limit = clip_frame_limit(start, num_frames, spans)
        yield entry.read(record, registry.ClipRequest(start, spec, fps, limit), data_cfg)


def present_clips(record: VideoRecord, modality: str, data_cfg: dict, max_clips: int | None) -> torch.Tensor:
    """(clips, ...) every evaluation window of one video, presented without randomness."""
    entry = registry.get(modality)
    return torch.stack([entry.present(raw, data_cfg) for raw in window_clips(record, modality, data_cfg, max_clips)])


class VideoClips(IterableDataset):
    """Each listed video of a store once, as a dict of its clips, label and thumbnail.

    Loader workers take every W-th listed video in store order. A record that fails to read
    yields ``{"id", "error"}`` instead, so the caller can count it rather than crash.
    """

    def __init__(self, store_path, modality: str, data_cfg: dict, video_ids: set[str], max_clips: int | None):
        self.store_path, self.modality, self.data_cfg = store_path, modality, data_cfg
        self.video_ids, self.max_clips = video_ids, max_clips

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        position = -1
        for record in open_store(self.store_path).iter_records():
            if record.id not in self.video_ids:
                continue
            position += 1
            if position % workers != worker:
                continue
            try:
                yield {
                    "id": record.id,
                    "label": int(record.meta["label_index"]),
                    "clips": present_clips(record, self.modality, self.data_cfg, self.max_clips),
                    "thumbnail": registry.get(self.modality).thumbnail(record),
                }
            except (KeyError, ValueError, IndexError, RuntimeError, OSError) as error:
                yield {"id": record.id, "error": f"{type(error).__name__}: {error}"}


@torch.no_grad()
def encode_video(encoder, modality: str, clips: torch.Tensor, device, batch_size: int) -> torch.Tensor:
    """The mean pooled backbone feature over one video's clips, float32 on the CPU."""
    total = None
    for chunk in clips.split(batch_size):
        batch = registry.finish_for_eval(modality, chunk.to(device))
        summed = encoder.features(batch).float().sum(dim=0).cpu()
        total = summed if total is None else total + summed
    return total / clips.shape[0]


def extract_features(
    encoder,
    modality: str,
    store_path,
    data_cfg: dict,
    device="cpu",
    batch_size: int = 16,
    max_clips: int | None = None,
    cache_dir: Path | str | None = None,
    workers: int = 0,
    require_labels: bool = True,
    cache_key: str | None = None,
) -> dict:
    """Features of every usable video of a store, sorted by video id.

    Returns {"ids": [...], "features": (N, D) float32, "labels": (N,) int64 (-1: unlabelled, only
    with ``require_labels=False``), "thumbnails": (N, 3, 64, 64) uint8 middle RGB frames,
    "excluded": kept videos left out (not usable by the modality, or unreadable)}.
    Cached when ``cache_dir`` or ``cache_key`` is given: read from / written to ``cache_dir``
    (default :func:`default_cache_dir`). ``cache_key`` names the encoder in the key instead of a
    hash of its weights (e.g. an encoder file's hash, computed once by the caller).
    """
    store = open_store(store_path)
    metas = usable_videos(store, modality)
    if require_labels:
        check_labelled(metas, store.root)
    num_kept = len(store.videos())
    cache_path = None
    if cache_dir is not None or cache_key is not None:
        key = _cache_key(cache_key or weights_fingerprint(encoder), modality, store, data_cfg, max_clips)
        cache_path = Path(cache_dir or default_cache_dir()) / f"{key}.safetensors"
        if cache_path.exists():
            return _read_cache(cache_path)
    result = _extract(encoder, modality, store_path, data_cfg, metas, device, batch_size, max_clips, workers)
    result["excluded"] = num_kept - len(result["ids"])
    if cache_path is not None:
        _write_cache(cache_path, result)
    return result


def _extract(encoder, modality, store_path, data_cfg, metas, device, batch_size, max_clips, workers) -> dict:
    labels_of = {meta["id"]: meta.get("label_index") for meta in metas}
    dataset = VideoClips(store_path, modality, data_cfg, set(labels_of), max_clips)
    loader = DataLoader(dataset, batch_size=None, num_workers=workers)
    encoder = encoder.to(device).eval()
    features, thumbnails = {}, {}
    for item in loader:
        if "error" in item:
            log.warning("%s: left out of the evaluation: %s", item["id"], item["error"])
            continue
        features[item["id"]] = encode_video(encoder, modality, item["clips"], device, batch_size)
        thumbnails[item["id"]] = item["thumbnail"]
    ids = sorted(features)
    return {
        "ids": ids,
        "features": torch.stack([features[i] for i in ids]) if ids else torch.zeros(0, 0),
        "labels": torch.tensor([-1 if labels_of[i] is None else int(labels_of[i]) for i in ids], dtype=torch.long),
        "thumbnails": torch.stack([thumbnails[i] for i in ids]) if ids else torch.zeros(0, 3, 0, 0, dtype=torch.uint8),
    }


def _cache_key(encoder_key: str, modality, store, data_cfg, max_clips) -> str:
    settings = clip_settings(data_cfg)
    parts = [FEATURE_PROTOCOL, encoder_key, modality, settings, max_clips, store_fingerprint(store)]
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def _read_cache(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    return {"ids": json.loads(metadata["ids"]), "excluded": int(metadata["excluded"]), **tensors}


def _write_cache(path: Path, result: dict) -> None:
    """One file, written beside its final name and renamed: readers never see a partial cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: result[name].contiguous() for name in ("features", "labels", "thumbnails")}
    metadata = {"ids": json.dumps(result["ids"]), "excluded": str(result["excluded"])}
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        save_file(tensors, temporary, metadata=metadata)
        os.chmod(temporary, 0o644)  # mkstemp's 0600 would hide a shared cache from other users
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def leave_one_out_r1(encoder, modality: str, store_path, data_cfg: dict, device="cpu") -> float:
    """Online kNN monitor: R@1 (%) of each labelled video's nearest other video in the store."""
    was_training = encoder.training
    out = extract_features(encoder, modality, store_path, data_cfg, device=device, max_clips=4, require_labels=False)
    encoder.train(was_training)
    feats, labels = out["features"], out["labels"]
    keep = labels >= 0
    feats, labels = feats[keep], labels[keep]
    if len(labels) < 2:
        return float("nan")
    normed, _ = center_and_normalise(feats, feats)
    similarity = normed @ normed.t()
    similarity.fill_diagonal_(-float("inf"))
    nearest = similarity.argmax(dim=1)
    return float((labels[nearest] == labels).float().mean() * 100)
