"""The modality registry: the one place a modality lives.

Every other module of ``tricoclr`` acts on what an entry declares and never branches on a
modality's name, tensor rank or channel count (``tests/test_structure.py`` walks the code and
checks it). An entry declares, as typed fields:

- where its clips come from: the stored parts it reads (``stored_parts``, written by
  ``tricoclr-data prepare``) or the modality it is derived from (``derived_from``: no storage);
- its ``layout`` ("video": (C, T, H, W) clips; "spectrogram": (C, F, T)-like slices);
- how a clip is read (``read``), augmented on the loader workers (``augment``, geometric,
  deterministic from a generator), finished on the training device (``sample_device_params``,
  ``finish_on_device``, batched) and presented for evaluation (``present``, ``eval_views``,
  ``finish_eval``: no randomness);
- its encoder: ``default_backbone``, ``in_channels`` and ``backbone_options`` (model config ->
  extra options of the backbone builder);
- how it is drawn: ``draw`` (a batch -> (B, 3, H, W) images in [0, 1], TensorBoard),
  ``thumbnail`` (a record -> (3, 64, 64) uint8, the retrieval figure) and ``sheet`` (a record and
  frame indices -> uint8 images, its row of ``tricoclr-data inspect``'s contact sheet);
- its ``display_name`` (tables, figures).

A new modality is one ``register(Modality(...))`` call, from inside or outside the package
(docs/adding_a_modality.md; ``tests/test_modality_outside.py`` adds one from a test file).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from tricoclr.data import transforms
from tricoclr.data.sampling import ClipSpec, clip_frame_indices, spectrogram_span
from tricoclr.data.schema import dequantise_flow

LAYOUTS = ("video", "spectrogram")
# The encoder evaluation reports unless told otherwise: the paper evaluates the RGB encoder.
DEFAULT_EVAL_MODALITY = "rgb"
THUMBNAIL_SIZE = 64


@dataclass(frozen=True)
class ClipRequest:
    """Where a clip lies in its video, in the units every modality can convert from."""

    start_frame: int
    spec: ClipSpec
    fps: float
    num_frames: int  # frames the clip may read: the video's, or the end of its span (meta spans)


def _identity_finish(batch, params):
    return batch


def _always(meta: dict) -> bool:
    return True


def _no_backbone_options(model_cfg, backbone: str):
    return None


def _single_view(raw):
    return [raw]


def square_crops(frames: torch.Tensor) -> list[torch.Tensor]:
    """(T,C,H,W) -> three (T,C,S,S) squares, S the shorter side: start, centre and end of the longer
    (the evaluation windows of video modalities)."""
    _, _, h, w = frames.shape
    side = min(h, w)
    crops = []
    for fraction in (0.0, 0.5, 1.0):
        top, left = int(round((h - side) * fraction)), int(round((w - side) * fraction))
        crops.append(frames[:, :, top : top + side, left : left + side])
    return crops


def _scaled_to_unit(image: torch.Tensor) -> torch.Tensor:
    low = image.amin(dim=(1, 2, 3), keepdim=True)
    high = image.amax(dim=(1, 2, 3), keepdim=True)
    return (image - low) / (high - low).clamp_min(1e-6)


def draw_video_frames(batch: torch.Tensor) -> torch.Tensor:
    """(B, 3, T, H, W) -> the middle frames (B, 3, H, W), each scaled to [0, 1]."""
    return _scaled_to_unit(batch[:, :, batch.shape[2] // 2].float())


def draw_vector_field(batch: torch.Tensor) -> torch.Tensor:
    """(B, 2, T, H, W) flow -> the middle fields as (x, y, 0) colour images (B, 3, H, W) in [0, 1]."""
    image = batch[:, :, batch.shape[2] // 2].float()
    return _scaled_to_unit(torch.cat([image, torch.zeros_like(image[:, :1])], dim=1))


def draw_spectrogram(batch: torch.Tensor) -> torch.Tensor:
    """(B, 1, F, T) -> upright grey images (B, 3, F, T) in [0, 1] (low frequencies at the bottom)."""
    return _scaled_to_unit(batch.float().flip(2)).expand(-1, 3, -1, -1)


def middle_rgb_thumbnail(record) -> torch.Tensor:
    """(3, 64, 64) uint8: the centre square of the video's middle stored RGB frame."""
    frame = record.frames("rgb", int(record.meta["frames"]) // 2, 1)[0]
    _, h, w = frame.shape
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = frame[None, :, top : top + side, left : left + side].float()
    small = F.interpolate(
        square, size=(THUMBNAIL_SIZE, THUMBNAIL_SIZE), mode="bilinear", align_corners=False, antialias=True
    )
    return small[0].round().clamp(0, 255).to(torch.uint8)


# ---- contact sheet rows (``Modality.sheet``) ---------------------------------------------------


def sheet_video_frames(record, indices: list[int]) -> torch.Tensor:
    """The stored RGB frames at ``indices``: (N, 3, H, W) uint8, one contact-sheet tile each."""
    return record.frames_at("rgb", indices).contiguous()


def flow_to_rgb(flow: np.ndarray, max_magnitude: float | None = None) -> np.ndarray:
    """(2, H, W) flow in pixels -> (H, W, 3) uint8 colour image.

    Hue encodes direction (0 = rightward red, going round the colour wheel), brightness the
    magnitude relative to ``max_magnitude`` (default: the 99th percentile, at least 1 px).
    """
    x, y = flow[0], flow[1]
    magnitude = np.hypot(x, y)
    if max_magnitude is None:
        max_magnitude = max(float(np.percentile(magnitude, 99)), 1.0)
    hue = (np.arctan2(y, x) / (2 * np.pi)) % 1.0
    hsv = np.stack([hue * 255, np.full_like(hue, 255), np.clip(magnitude / max_magnitude, 0, 1) * 255], axis=-1)
    return np.array(Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB"))  # a writable copy


def sheet_flow_colours(record, indices: list[int]) -> torch.Tensor:
    """The stored flow fields at ``indices`` in the usual colour coding (``flow_to_rgb``), with
    one brightness scale for the row (the largest 99th-percentile magnitude, at least 1 px):
    (N, 3, H, W) uint8."""
    flows = dequantise_flow(record.frames_at("flow", indices).numpy().astype(np.float32))  # (N, 2, H, W) px
    bound = max(max(float(np.percentile(np.hypot(f[0], f[1]), 99)) for f in flows), 1.0)
    return torch.stack([torch.from_numpy(flow_to_rgb(f, bound)).permute(2, 0, 1) for f in flows])


def sheet_spectrogram(record, indices: list[int]) -> torch.Tensor:
    """The whole stored log-mel spectrogram as one grey image, low frequencies at the bottom, the
    80 dB below its loudest bin: (1, 3, n_mels, steps) uint8 (``indices`` unused)."""
    log_mel = record.spectrogram().numpy()
    top = float(log_mel.max())
    floor = top - np.log(10.0) * 8  # 80 dB of power below the loudest bin
    scaled = (np.clip(log_mel, floor, top) - floor) / max(top - floor, 1e-6)
    grey = torch.from_numpy((scaled[::-1] * 255).astype(np.uint8))
    return grey.expand(1, 3, -1, -1).contiguous()


@dataclass(frozen=True)
class Modality:
    """One modality, as data and small functions (see the module docstring for each field's role).

    Raises ``ValueError`` at construction for an unknown layout, a modality that both reads stored
    parts and is derived, or one that does neither.
    """

    name: str
    layout: str  # "video" (C,T,H,W) or "spectrogram" (C,F,T)
    in_channels: int  # of the network-layout tensor the encoder sees
    default_backbone: str  # a name in tricoclr.models.backbones (or a torchvision model)
    # record, clip request, data config -> raw clip (uint8 frames, a float spectrogram slice...)
    read: Callable
    # raw clip, generator, data config -> network-layout tensor, or (tensor, per-clip parameters
    # for finish_on_device) when the geometry decides them
    augment: Callable
    # raw clip, data config -> network-layout tensor with no randomness (evaluation)
    present: Callable
    stored_parts: tuple[str, ...] = ()  # store parts read ("rgb", "flow", "audio"; schema.md)
    derived_from: str | None = None  # read and augment on the workers as this modality's clip
    display_name: str = ""  # tables and figures; defaults to the name capitalised
    # meta -> whether this video can serve the modality (e.g. it has audible audio)
    available: Callable = _always
    # per-clip parameters for the device-side part, drawn on the worker (None: nothing on device)
    sample_device_params: Callable | None = None
    # batched device-side finish: (batch tensor, batched params or None) -> float tensor
    finish_on_device: Callable = _identity_finish
    # batched device-side finish without randomness (evaluation): (batch, None) -> float tensor
    finish_eval: Callable = _identity_finish
    # raw clip -> the list of raw windows evaluated per clip (video: three square crops)
    eval_views: Callable = _single_view
    # (model config, backbone name) -> extra keyword options of the backbone builder, or None
    backbone_options: Callable = _no_backbone_options
    # a batch of network-layout clips -> (B, 3, H, W) float images in [0, 1] (TensorBoard)
    draw: Callable = draw_video_frames
    # a store record -> (3, 64, 64) uint8 image (retrieval figure)
    thumbnail: Callable = middle_rgb_thumbnail
    # (store record, frame indices) -> uint8 (N, 3, H, W): its row of the contact sheet of
    # ``tricoclr-data inspect``, drawn for videos where ``available`` holds. A "video" layout gives
    # one tile per index, a "spectrogram" layout one image (N = 1) stretched across the row. None:
    # no row (the default; derived modalities such as rgbdiff have none, as the sheet shows what
    # the store holds)
    sheet: Callable | None = None

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"modality '{self.name}': layout must be one of {LAYOUTS}, got {self.layout!r}")
        if bool(self.stored_parts) == bool(self.derived_from):
            raise ValueError(
                f"modality '{self.name}' must either read stored parts or be derived from "
                f"another modality (stored_parts={self.stored_parts!r}, derived_from={self.derived_from!r})"
            )
        if not self.display_name:
            object.__setattr__(self, "display_name", self.name.capitalize())
        if self.display_name.lower() != self.name.lower():  # tables parse display names back
            raise ValueError(f"modality '{self.name}': display name {self.display_name!r} must spell the name")

    @property
    def clip_source(self) -> str:
        """The modality whose worker-side clip this one starts from (itself unless derived)."""
        return self.derived_from or self.name


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
    return transforms.spectrogram_geometric(
        raw, generator, out_steps=data_cfg["spectrogram_steps"], expected_steps=raw.shape[-1]
    )


def _audio_present(raw, data_cfg):
    """No warp, no masks: the slice resampled to the network's number of steps."""
    fitted = F.interpolate(raw[None].float(), size=data_cfg["spectrogram_steps"], mode="linear", align_corners=False)
    return fitted  # (1, F, steps)


def _rgbdiff_finish(batch, params):
    """(B, 3, T, H, W) uint8 crops -> (B, 3, T-1, H, W) float consecutive-frame differences in
    [-1, 1] (full scale = 255). Computed from the geometric crop and flip, before any photometric
    jitter: the differences then carry motion, not colour noise (docs/adding_a_modality.md)."""
    frames = batch.float() / 255
    return frames[:, :, 1:] - frames[:, :, :-1]


def _flow_backbone_options(model_cfg, backbone: str):
    """S3D's 3-channel stem takes flow's 2 channels as ``model.flow_stem`` says."""
    return {"stem": model_cfg.flow_stem} if backbone == "s3d" else None


MODALITIES: dict[str, Modality] = {}


def register(modality: Modality) -> Modality:
    """Add a modality to the registry (from inside or outside the package); returns it.

    Raises ``ValueError`` if the name is taken or it is derived from an unregistered modality.
    """
    if modality.name in MODALITIES:
        raise ValueError(f"modality '{modality.name}' is registered twice")
    if modality.derived_from and modality.derived_from not in MODALITIES:
        raise ValueError(f"modality '{modality.name}' is derived from unregistered '{modality.derived_from}'")
    MODALITIES[modality.name] = modality
    return modality


def unregister(name: str) -> None:
    """Remove a modality added by ``register`` (tests, plugins); built-ins stay."""
    if name in BUILT_IN:
        raise ValueError(f"modality '{name}' is built in and cannot be removed")
    MODALITIES.pop(name, None)


register(
    Modality(
        name="rgb",
        layout="video",
        in_channels=3,
        default_backbone="s3d",
        stored_parts=("rgb",),
        display_name="RGB",
        read=_read_video("rgb"),
        augment=_rgb_augment,
        present=_rgb_present,
        sample_device_params=transforms.sample_photometric_params,
        finish_on_device=_rgb_finish,
        finish_eval=_rgb_finish_eval,
        eval_views=square_crops,
        sheet=sheet_video_frames,
    )
)
register(
    Modality(
        name="flow",
        layout="video",
        in_channels=2,
        default_backbone="s3d",
        stored_parts=("flow",),
        display_name="Flow",
        read=_read_video("flow"),
        augment=_flow_augment,
        present=_flow_present,
        available=_flow_available,
        finish_on_device=_flow_finish,
        eval_views=square_crops,
        backbone_options=_flow_backbone_options,
        draw=draw_vector_field,
        sheet=sheet_flow_colours,
    )
)
register(
    Modality(
        name="audio",
        layout="spectrogram",
        in_channels=1,
        default_backbone="resnet18",
        stored_parts=("audio",),
        display_name="Audio",
        read=_read_spectrogram,
        augment=_audio_augment,
        present=_audio_present,
        available=_audio_available,
        draw=draw_spectrogram,
        sheet=sheet_spectrogram,
    )
)
# Residual frames: derived from the RGB clip (no storage, no preparation step). On the workers it
# is the same crop and flip as the view's RGB clip (the same random stream); the differences are
# taken on the device, before photometric jitter.
register(
    Modality(
        name="rgbdiff",
        layout="video",
        in_channels=3,
        default_backbone="s3d",
        derived_from="rgb",
        display_name="RGBDiff",
        read=_read_video("rgb"),
        augment=_rgb_augment,
        present=_rgb_present,
        finish_on_device=_rgbdiff_finish,
        finish_eval=_rgbdiff_finish,
        eval_views=square_crops,
    )
)
BUILT_IN = frozenset(MODALITIES)


def get(name: str) -> Modality:
    """The registered modality ``name``; ``KeyError`` naming the registered ones otherwise."""
    try:
        return MODALITIES[name]
    except KeyError:
        raise KeyError(f"unknown modality '{name}'; registered: {sorted(MODALITIES)}") from None


def stored_parts_of(names) -> set[str]:
    """The store parts the modalities ``names`` read, derived ones through their source."""
    parts: set[str] = set()
    for name in names:
        modality = get(name)
        parts.update(modality.stored_parts or stored_parts_of([modality.derived_from]))
    return parts


def finish_for_eval(name: str, batch: torch.Tensor) -> torch.Tensor:
    """Device-side finish without randomness (evaluation), e.g. normalisation only."""
    return get(name).finish_eval(batch, None)
