"""The modality registry: everything that differs between RGB, flow and audio lives here.

The method, the trainer and the evaluation never name a modality in their logic; they look it up
here. Adding a fourth modality (e.g. text) means one new ``Modality`` entry (plus its extractor in
``data_tools`` and, if needed, a backbone in ``tricoclr.models.backbones``).

An entry says how to read one clip of the modality from a prepared record, how to augment it on
the loader workers (geometric part, deterministic from a generator), how to finish it on the
training device (photometric part, batched), and how to present it for evaluation (no randomness).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from tricoclr.data import transforms
from tricoclr.data.sampling import ClipSpec, clip_frame_indices, spectrogram_span
from tricoclr.data.schema import dequantise_flow


@dataclass(frozen=True)
class ClipRequest:
    """Where a clip lies in its video, in the units every modality can convert from."""

    start_frame: int
    spec: ClipSpec
    fps: float
    num_frames: int  # frames the clip may read: the video's, or the end of its span (meta spans)


@dataclass(frozen=True)
class Modality:
    name: str
    in_channels: int
    default_backbone: str
    # record, clip request, data config -> raw clip (uint8 frames or a float spectrogram slice)
    read: Callable
    # raw clip, generator, data config -> network-layout tensor ((C,T,H,W) video, (1,F,T) audio),
    # or (tensor, per-clip parameters for finish_on_device) when the geometry decides them
    augment: Callable
    # raw clip, data config -> network-layout tensor with no randomness (evaluation)
    present: Callable
    # meta -> whether this video can serve the modality (e.g. it has audible audio)
    available: Callable = lambda meta: True
    # per-clip parameters for the device-side part, drawn on the worker (None: nothing on device)
    sample_device_params: Callable | None = None
    # batched device-side finish: (batch tensor, batched params or None) -> float tensor
    finish_on_device: Callable = lambda batch, params: batch
    extras: dict = field(default_factory=dict)


# ---- video modalities (rgb, flow) --------------------------------------------------------------


def _read_video(store_key: str):
    def read(record, clip: ClipRequest, data_cfg: dict) -> torch.Tensor:
        # Flow may hold fewer fields than there are frames: clamp to what the record stores.
        stored = int(record.meta.get(f"{store_key}_frames", clip.num_frames)) if store_key != "rgb" else clip.num_frames
        indices = clip_frame_indices(clip.start_frame, clip.spec, min(clip.num_frames, stored))
        return record.frames_at(store_key, indices.tolist())  # (T, C, H, W) uint8, only its chunks

    return read


def _centre_crop_resize(frames: torch.Tensor, size: int) -> torch.Tensor:
    """(T,C,H,W) -> (T,C,size,size): the largest centred square, resized (evaluation view)."""
    _, _, h, w = frames.shape
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = frames[:, :, top : top + side, left : left + side]
    if side == size:
        return square
    return F.interpolate(square.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def _rgb_augment(raw, generator, data_cfg):
    clip = transforms.rgb_geometric(raw, generator, size=data_cfg["size"], scale=tuple(data_cfg["crop_scale"]))
    return clip.permute(1, 0, 2, 3).contiguous()  # (3, T, H, W) uint8; photometric on device


def _rgb_present(raw, data_cfg):
    clip = _centre_crop_resize(raw, data_cfg["size"]).round().clamp(0, 255).to(torch.uint8)
    return clip.permute(1, 0, 2, 3).contiguous()


def _rgb_finish(batch, params):
    return transforms.apply_photometric(batch, params)


def _rgb_finish_eval(batch, params):
    """Evaluation: normalisation only (CoCLR left colour jitter on at test time)."""
    mean = torch.tensor(transforms.IMAGENET_MEAN, device=batch.device).view(1, 3, 1, 1, 1)
    std = torch.tensor(transforms.IMAGENET_STD, device=batch.device).view(1, 3, 1, 1, 1)
    return (batch.float() / 255 - mean) / std


def _flow_augment(raw, generator, data_cfg):
    """(2, T, H, W) uint8 plus the per-clip affine that the device applies (dequantise, scale
    with the crop, negate x on a flip, normalise): a quarter of the bytes of float32 flow."""
    box = transforms.sample_crop_flip(generator, raw.shape[-2], raw.shape[-1], tuple(data_cfg["crop_scale"]))
    quantised, scale, shift = transforms.flow_crop_quantised(raw, box, data_cfg["size"], normalise=True)
    return quantised, {"scale": scale, "shift": shift}


def _flow_finish(batch, params):
    return transforms.apply_flow_affine(batch, params["scale"], params["shift"])


def _flow_present(raw, data_cfg):
    _, _, h, w = raw.shape
    side = min(h, w)
    flow = dequantise_flow(_centre_crop_resize(raw, data_cfg["size"]).float())
    flow = flow * (data_cfg["size"] / side)  # vectors scale with the resize
    return transforms.normalise_flow(flow).permute(1, 0, 2, 3).contiguous()


# ---- audio ------------------------------------------------------------------------------------


def _flow_available(meta: dict) -> bool:
    return meta.get("flow_method", "none") != "none" and int(meta.get("flow_frames", 0)) > 0


def _audio_available(meta: dict) -> bool:
    return bool(meta.get("has_audio")) and not meta.get("audio_silent", False)


def _read_spectrogram(record, clip: ClipRequest, data_cfg: dict) -> torch.Tensor:
    """The clip's log-mel slice, (F, steps) float32, padded at the end of the video with the
    spectrogram's minimum (the quietest level) so every clip covers its whole time span."""
    start, steps = spectrogram_span(clip.start_frame, clip.spec, clip.fps)
    total = int(record.meta["audio"]["steps"])
    start = max(0, min(start, total - 1))
    spec = record.spectrogram(start, min(steps, total - start))
    if spec.shape[-1] < steps:
        spec = F.pad(spec, (0, steps - spec.shape[-1]), value=float(spec.min()))
    return spec


def _audio_augment(raw, generator, data_cfg):
    return transforms.spectrogram_geometric(raw, generator, out_steps=data_cfg["spectrogram_steps"],
                                            expected_steps=raw.shape[-1])


def _audio_present(raw, data_cfg):
    """No warp, no masks: the slice resampled to the network's number of steps."""
    fitted = F.interpolate(raw[None].float(), size=data_cfg["spectrogram_steps"], mode="linear", align_corners=False)
    return fitted  # (1, F, steps)


MODALITIES: dict[str, Modality] = {}


def register(modality: Modality) -> Modality:
    if modality.name in MODALITIES:
        raise ValueError(f"modality '{modality.name}' is registered twice")
    MODALITIES[modality.name] = modality
    return modality


register(
    Modality(
        name="rgb",
        in_channels=3,
        default_backbone="s3d",
        read=_read_video("rgb"),
        augment=_rgb_augment,
        present=_rgb_present,
        sample_device_params=transforms.sample_photometric_params,
        finish_on_device=_rgb_finish,
        extras={"finish_eval": _rgb_finish_eval},
    )
)
register(
    Modality(
        name="flow",
        in_channels=2,
        default_backbone="s3d",
        read=_read_video("flow"),
        augment=_flow_augment,
        present=_flow_present,
        available=_flow_available,
        finish_on_device=_flow_finish,
    )
)
register(
    Modality(
        name="audio",
        in_channels=1,
        default_backbone="resnet18",
        read=_read_spectrogram,
        augment=_audio_augment,
        present=_audio_present,
        available=_audio_available,
    )
)


def get(name: str) -> Modality:
    try:
        return MODALITIES[name]
    except KeyError:
        raise KeyError(f"unknown modality '{name}'; registered: {sorted(MODALITIES)}") from None


def finish_for_eval(name: str, batch: torch.Tensor) -> torch.Tensor:
    """Device-side finish without randomness (evaluation): normalisation only."""
    modality = get(name)
    finish = modality.extras.get("finish_eval")
    return finish(batch, None) if finish else batch
