"""One training sample: which modalities and views a stage reads, which videos it can use, and
how a video becomes a sample (on the loader workers) and a batch becomes model input (on the device).

Every random choice is drawn from ``sample_generator(seed, epoch, video_index, view, stream)``:
never from the rank, the worker or the batch size, so both loaders (``tricoclr.data.lmdb_loader``,
``tricoclr.data.stream_loader``) give a video the same sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tricoclr.data import modalities as registry
from tricoclr.data.sampling import clip_frame_limit, clip_spec_of, sample_clip_starts, sample_generator, video_too_short

CLIP_STREAM = "clips"
# Per sample: records skipped (broken) in that worker since its previous sample.
BROKEN_KEY = "broken_records"


@dataclass(frozen=True)
class StageViews:
    """Which modalities a stage reads, and which views of each.

    The trained modality needs both views (query and key); a frozen sampler only view 2 (the
    oracle looks at the key's clip), so its view 1 is never decoded.
    """

    both_views: tuple[str, ...]
    view2_only: tuple[str, ...] = ()

    @property
    def all(self) -> tuple[str, ...]:
        return self.both_views + self.view2_only

    def views_of(self, name: str) -> tuple[int, ...]:
        return (1, 2) if name in self.both_views else (2,)


def usable_videos(metas: list[dict], views: StageViews, data_cfg: dict) -> list[int]:
    """Indices (into the sorted video list) of videos this stage can use.

    Policy (documented in docs/schema.md): videos whose record lacks a needed modality (no audible
    audio) are left out of stages that use it; with ``short_policy: skip`` so are videos too short
    for two clips. The choice depends on the metadata only, so every rank agrees.
    """
    spec = clip_spec_of(data_cfg)
    keep = []
    for index, meta in enumerate(metas):
        if not all(registry.get(name).available(meta) for name in views.all):
            continue
        if spec.short_policy == "skip" and video_too_short(int(meta["frames"]), spec, meta.get("spans")):
            continue
        keep.append(index)
    return keep


def missing_modalities(metas: list[dict], modalities, data_cfg: dict) -> list[str]:
    """The modalities of ``modalities`` that no video of the store can serve (e.g. flow in a store
    prepared with ``--flow none``, audio when every video is silent): a run that needs one would
    otherwise train every stage before it, then fail when that stage opens its loader."""
    return [name for name in modalities if not usable_videos(metas, StageViews(both_views=(name,)), data_cfg)]


def build_sample(record, video_index: int, epoch: int, seed: int, views: StageViews, data_cfg: dict) -> dict:
    """One training sample: for each modality and view, the worker-side augmented clip.

    Reads only the stage's modalities and views, and of those only the chunks the clips touch.
    Clips never cross a gap in the video's frames (meta ``spans``).
    """
    meta = record.meta
    spec = clip_spec_of(data_cfg)
    num_frames, spans = int(meta["frames"]), meta.get("spans")
    starts = sample_clip_starts(num_frames, spec, sample_generator(seed, epoch, video_index, 0, CLIP_STREAM), spans)
    label = meta.get("label_index")
    sample = {
        "video_index": torch.tensor(video_index, dtype=torch.long),
        "video_id": meta["id"],
        "label": torch.tensor(-1 if label is None else int(label), dtype=torch.long),
    }
    worker_clips = {}  # (clip source, view) -> augmented clip: a derived modality reuses its source's
    for name in views.all:
        modality = registry.get(name)
        for view in views.views_of(name):
            start = starts[view - 1]
            clip = registry.ClipRequest(start, spec, float(meta["fps"]), clip_frame_limit(start, num_frames, spans))
            if (modality.clip_source, view) not in worker_clips:
                source = registry.get(modality.clip_source)
                raw = source.read(record, clip, data_cfg)
                generator = sample_generator(seed, epoch, video_index, view, source.name)
                worker_clips[source.name, view] = source.augment(raw, generator, data_cfg)
            augmented = worker_clips[modality.clip_source, view]
            if isinstance(augmented, tuple):  # the worker's geometry decided the device-side parameters
                sample[f"{name}.view{view}"], sample[f"{name}.view{view}.params"] = augmented
            else:
                sample[f"{name}.view{view}"] = augmented
            if modality.sample_device_params is not None:
                device_generator = sample_generator(seed, epoch, video_index, view, f"{name}/device")
                sample[f"{name}.view{view}.params"] = modality.sample_device_params(device_generator)
    return sample


def finish_batch(batch: dict, views: StageViews, device: torch.device | str) -> dict:
    """Move a collated batch to the device and run each modality's device-side part there."""
    # non_blocking: a blocking host-to-device copy waits for the device's queued work (a sync per step)
    out = {k: batch[k].to(device, non_blocking=True) for k in ("video_index", "label")}
    for name in views.all:
        modality = registry.get(name)
        for view in views.views_of(name):
            key = f"{name}.view{view}"
            tensor = batch[key].to(device, non_blocking=True)
            # Per-clip parameters stay on the CPU: the device-side part reads its per-clip
            # decisions there without waiting on the device.
            out[key] = modality.finish_on_device(tensor, batch.get(f"{key}.params"))
    return out


def with_broken_count(sample: dict, broken: int) -> dict:
    """``sample`` with ``BROKEN_KEY``: the records this worker skipped (broken) since its previous
    sample, a long scalar tensor that ``EpochLoader`` adds to ``DataStats``."""
    sample[BROKEN_KEY] = torch.tensor(broken, dtype=torch.long)
    return sample
