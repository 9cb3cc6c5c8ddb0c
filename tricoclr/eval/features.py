"""Deterministic per-video features of an encoder over a prepared store, cached on disk.

Protocol: clips are taken across each whole video as non-overlapping sliding windows (one clip at
the start when the video is shorter than a window), each presented without randomness (centre
crop, no flip, no colour change: CoCLR left colour jitter on at test time); the backbone's pooled
output (before the projection head) is averaged over a video's clips.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tricoclr import modalities as registry
from tricoclr.data.sampling import ClipSpec
from tricoclr.data.store import open_store

EVAL_DATA_KEYS = ("clip_frames", "clip_stride", "size", "spectrogram_steps")


def window_starts(num_frames: int, spec: ClipSpec, max_clips: int | None = None) -> list[int]:
    """Start frames of non-overlapping windows covering the video (evenly thinned to max_clips)."""
    span = spec.frames * spec.stride
    starts = list(range(0, max(1, num_frames - span + 1), span)) or [0]
    if max_clips is not None and len(starts) > max_clips:
        step = len(starts) / max_clips
        starts = [starts[int(i * step)] for i in range(max_clips)]
    return starts


def default_cache_dir() -> Path:
    return Path(os.environ.get("TRICOCLR_CACHE", Path.home() / ".cache" / "tricoclr")) / "features"


def _store_fingerprint(store) -> str:
    digest = hashlib.sha256()
    for meta in store.videos():
        digest.update(json.dumps([meta["id"], meta.get("frames"), meta.get("label_index")]).encode())
    return digest.hexdigest()


@torch.no_grad()
def extract_features(encoder, modality: str, store_path, data_cfg: dict, device="cpu", batch_size: int = 16,
                     max_clips: int | None = None, cache_key: str | None = None, cache_dir: Path | None = None) -> dict:
    """Features of every usable video of a store, sorted by video id.

    Returns {"ids": [...], "features": (N, D) float32, "labels": (N,) int64 (-1 unknown),
    "middle_frames": list of (H, W, 3) uint8 thumbnails when the modality is RGB-like}.
    Cached on disk under ``cache_key`` (e.g. the encoder file's hash) + the store and settings.
    """
    store = open_store(store_path)
    spec_settings = {k: data_cfg[k] for k in EVAL_DATA_KEYS}
    cache_path = None
    if cache_key is not None:
        key = hashlib.sha256(json.dumps([cache_key, modality, spec_settings, max_clips,
                                         _store_fingerprint(store)], sort_keys=True).encode()).hexdigest()[:32]
        cache_path = (cache_dir or default_cache_dir()) / f"{key}.safetensors"
        if cache_path.exists():
            tensors = load_file(cache_path)
            with open(cache_path.with_suffix(".json")) as f:
                ids = json.load(f)["ids"]
            return {"ids": ids, "features": tensors["features"], "labels": tensors["labels"],
                    "thumbnails": tensors.get("thumbnails")}

    spec = ClipSpec(frames=data_cfg["clip_frames"], stride=data_cfg["clip_stride"])
    entry = registry.get(modality)
    encoder = encoder.to(device).eval()
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    labels: dict[str, int] = {}
    thumbnails: dict[str, torch.Tensor] = {}
    pending: list[tuple[str, torch.Tensor]] = []

    def flush():
        if not pending:
            return
        clips = torch.stack([clip for _, clip in pending]).to(device)
        feats = encoder.features(registry.finish_for_eval(modality, clips)).float().cpu()
        for (vid, _), feat in zip(pending, feats):
            sums[vid] = sums.get(vid, 0) + feat
            counts[vid] = counts.get(vid, 0) + 1
        pending.clear()

    for record in store.iter_records():
        meta = record.meta
        if not entry.available(meta):
            continue
        vid, num_frames = meta["id"], int(meta["frames"])
        labels[vid] = -1 if meta.get("label_index") is None else int(meta["label_index"])
        for start in window_starts(num_frames, spec, max_clips):
            clip = registry.ClipRequest(start, spec, float(meta["fps"]), num_frames)
            presented = entry.present(entry.read(record, clip, data_cfg), data_cfg)
            pending.append((vid, presented))
            if len(pending) >= batch_size:
                flush()
        if modality == "rgb" or entry.in_channels == 3:
            middle = record.frames(modality, num_frames // 2, 1)[0]
            thumbnails[vid] = torch.nn.functional.interpolate(middle[None].float(), size=(64, 64), mode="bilinear",
                                                              antialias=True)[0].round().clamp(0, 255).to(torch.uint8)
    flush()
    ids = sorted(sums)
    result = {
        "ids": ids,
        "features": torch.stack([sums[i] / counts[i] for i in ids]) if ids else torch.zeros(0, 0),
        "labels": torch.tensor([labels[i] for i in ids], dtype=torch.long),
        "thumbnails": torch.stack([thumbnails[i] for i in ids]) if thumbnails else None,
    }
    if cache_path is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"features": result["features"].contiguous(), "labels": result["labels"]}
        if result["thumbnails"] is not None:
            tensors["thumbnails"] = result["thumbnails"].contiguous()
        tmp = cache_path.with_suffix(".tmp")
        save_file(tensors, str(tmp))
        with open(cache_path.with_suffix(".json"), "w") as f:
            json.dump({"ids": ids}, f)
        os.replace(tmp, cache_path)
    return result


def leave_one_out_r1(encoder, modality: str, store_path, data_cfg: dict, device="cpu") -> float:
    """Online kNN monitor: R@1 (%) of each labelled video's nearest other video in the store."""
    from tricoclr.eval.retrieval import center_and_normalise

    was_training = encoder.training
    out = extract_features(encoder, modality, store_path, data_cfg, device=device, max_clips=4)
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
