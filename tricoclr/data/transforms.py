"""Per-modality augmentation of one clip (docs/design.md, "Augmentation"; paper, "Data
Augmentations"), split where it is cheapest:

- Worker side, per clip, on the CPU: the geometric part -- :func:`rgb_geometric`,
  :func:`flow_geometric`, :func:`spectrogram_geometric` -- and the *sampling* of the photometric
  parameters, :func:`sample_photometric_params`. Every random choice comes from the
  ``torch.Generator`` passed in (see ``sampling.sample_generator``), so the result depends only on
  (seed, epoch, video index, view, stream).
- Device side, batched, after the transfer: :func:`apply_photometric` (colour jitter, greyscale,
  blur with each clip's own parameters, then normalisation) and :func:`normalise_flow`. On a CPU,
  jitter and blur of 30 frames cost more than decoding them, so they do not belong in workers.

Defaults follow CoCLR (Han et al. 2020, ``main_coclr.py``), checked against its code:
random resized crop with area in (0.2, 1) and aspect ratio in (3/4, 4/3) (MoCo v2's crop for
small images), horizontal flip p 0.5, ColorJitter(0.4, 0.4, 0.4, 0.1) with p 0.8, greyscale
p 0.2, Gaussian blur with sigma in (0.1, 2.0) with p 0.5. Deviations, on purpose:

- CoCLR's "greyscale" copies one random colour channel; we use luminance greyscale
  (torchvision's ``rgb_to_grayscale``), as SimCLR/MoCo do.
- CoCLR resizes crops bicubically; we use bilinear with antialiasing (torchvision's default),
  the same for RGB and flow (bicubic overshoots, which would distort flow vectors).
- Flow gets no photometric change and its x component is negated by a flip (CoCLR shares the
  RGB augmentation with flow and does neither).
- The blur kernel is odd and ~10 % of the image side (13 px at 128, SimCLR's rule); CoCLR
  blurs with PIL, whose kernel follows sigma.
- One set of parameters per clip for all its frames; the two clips of a sample are independent.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as nnf
import torchaudio.functional as audio_f
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms.v2 import functional as tvf

from tricoclr.data.schema import FLOW_BOUND

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

CROP_SCALE = (0.2, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)

# Index of each colour-jitter operation in ``jitter_factors`` and ``jitter_order``.
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)


# ---- reproducible randomness for library code that draws from the global RNG ----------------

_GLOBAL_RNG_LOCK = threading.Lock()


@contextlib.contextmanager
def _global_rng_seeded_from(generator: torch.Generator) -> Iterator[None]:
    """Run library code that draws from torch's global CPU RNG reproducibly.

    torchvision's crop sampler and torchaudio's masks take no generator, so the global CPU
    generator is seeded from ``generator`` inside ``fork_rng``, which restores its state
    afterwards (the caller's global randomness is untouched). ``torch.default_generator`` is
    seeded rather than calling ``torch.manual_seed``, which would also reseed CUDA. The lock
    keeps concurrent threads of this module from interleaving; other code drawing from the
    global RNG in another thread at the same moment would still break reproducibility.
    """
    seed = int(torch.randint(2**62, (1,), generator=generator))
    with _GLOBAL_RNG_LOCK, torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield


def _uniform(generator: torch.Generator, low: float, high: float, shape: Sequence[int] = ()) -> torch.Tensor:
    """float32 samples uniform in [low, high)."""
    return low + (high - low) * torch.rand(shape, generator=generator)


# ---- RGB and flow: one random resized crop and flip per clip ---------------------------------


@dataclass(frozen=True)
class CropFlip:
    """A crop box in input pixels and whether to flip horizontally, shared by all frames."""

    top: int
    left: int
    height: int
    width: int
    flip: bool


def sample_crop_flip(
    generator: torch.Generator,
    height: int,
    width: int,
    scale: tuple[float, float] = CROP_SCALE,
    ratio: tuple[float, float] = CROP_RATIO,
    flip_p: float = 0.5,
) -> CropFlip:
    """Draw a random resized crop box (torchvision's sampler) and a flip for an HxW frame.

    RGB and flow both go through this function, so with generators in the same state and the
    same frame size they get the same box and flip.
    """
    with _global_rng_seeded_from(generator):
        # get_params only reads the frame size from its argument.
        top, left, box_h, box_w = RandomResizedCrop.get_params(torch.empty(0, height, width), list(scale), list(ratio))
    flip = bool(torch.rand((), generator=generator) < flip_p)
    return CropFlip(top, left, box_h, box_w, flip)


def _resizes_fastest_channels_last(clip: torch.Tensor) -> bool:
    """Whether ``clip`` is uint8 with 3 or 4 channels: torch's vectorised uint8 antialiased
    bilinear resize reads such clips channels-last as they are, and repacks any other layout
    pixel by pixel first (2-3x slower at 128 px); the values are the same."""
    return clip.dtype == torch.uint8 and clip.shape[-3] in (3, 4)


def rgb_resized_crop_flip(clip: torch.Tensor, box: CropFlip, size: int = 128) -> torch.Tensor:
    """Crop ``box`` out of every frame of a (T, C, H, W) clip, resize to size x size, flip.

    uint8 RGB is resized channels-last (the layout ``VideoRecord.frames_at`` returns; other
    layouts are converted first): the same values as any layout, 2-3x faster, and the result
    is channels-last too (``.contiguous()`` if you need the usual layout).
    """
    if _resizes_fastest_channels_last(clip):
        clip = clip.contiguous(memory_format=torch.channels_last)
    out = tvf.resized_crop(clip, box.top, box.left, box.height, box.width, [size, size], antialias=True)
    return tvf.horizontal_flip(out) if box.flip else out


def _resized_crop_two_channels(clip: torch.Tensor, box: CropFlip, size: int) -> torch.Tensor:
    """``rgb_resized_crop_flip`` for a (T, 2, H, W) uint8 clip, returned as (2, T, size, size)
    contiguous: the same values, ~2x faster.

    torch's vectorised uint8 resize works on 4 interleaved channels and repacks anything else
    into 4 channels first (2 of them wasted for flow). Every channel is resized on its own with
    the same weights, so the crop is packed as frame pairs, (T/2, 4, h, w) channels-last with
    channels (x, y) of frame 2k then of frame 2k + 1, resized in one call, and unpacked
    straight into the network's (2, T, size, size) layout. An odd T gets a zero pad frame.
    """
    frames, height, width = clip.shape[0], box.height, box.width
    if box.top < 0 or box.left < 0 or box.top + height > clip.shape[-2] or box.left + width > clip.shape[-1]:
        raise ValueError(f"crop {box} outside the {tuple(clip.shape[-2:])} frames")
    pairs = (frames + 1) // 2
    crop = clip[:, :, box.top : box.top + height, box.left : box.left + width]
    packed = torch.zeros((pairs * 2, 2, height, width), dtype=torch.uint8) if frames % 2 else None
    interleaved = torch.empty((pairs, height, width, 2, 2), dtype=torch.uint8)  # (k, row, col, pair, x/y)
    if packed is not None:
        packed[:frames] = crop
        crop = packed
    interleaved.copy_(crop.unflatten(0, (pairs, 2)).permute(0, 3, 4, 1, 2))
    resized = tvf.resize(interleaved.view(pairs, height, width, 4).permute(0, 3, 1, 2), [size, size], antialias=True)
    if box.flip:
        resized = tvf.horizontal_flip(resized)
    out = torch.empty((2, pairs * 2, size, size), dtype=torch.uint8)
    out.view(2, pairs, 2, size, size).copy_(resized.unflatten(1, (2, 2)).permute(2, 0, 1, 3, 4))
    return out[:, :frames].contiguous() if frames % 2 else out


def rgb_geometric(
    clip: torch.Tensor,
    generator: torch.Generator,
    size: int = 128,
    scale: tuple[float, float] = CROP_SCALE,
    ratio: tuple[float, float] = CROP_RATIO,
    flip_p: float = 0.5,
) -> torch.Tensor:
    """Worker-side RGB augmentation: (T, 3, H, W) uint8 -> (T, 3, size, size) uint8.

    One random resized crop and flip for all frames of the clip. The photometric part is
    drawn separately (:func:`sample_photometric_params`) and applied on the device.
    """
    box = sample_crop_flip(generator, clip.shape[-2], clip.shape[-1], scale, ratio, flip_p)
    return rgb_resized_crop_flip(clip, box, size)


def flow_crop_quantised(flow: torch.Tensor, box: CropFlip, size: int = 128, normalise: bool = False):
    """The geometric part of a flow clip, kept quantised: (T, 2, H, W) uint8 ->
    ((2, T, size, size) uint8, scale (2,), shift (2,)) such that ``q * scale + shift`` (per
    component) is the cropped, resized, flipped flow in px (divided by FLOW_BOUND with
    ``normalise``). Workers ship the uint8 clip (4x smaller than float32) and the device applies
    the affine.

    Flow vectors are displacements in pixels, so they change with the geometry: resizing a
    crop of width w to ``size`` stretches x displacements by size / w (y likewise by height),
    and a horizontal flip negates x. Dequantisation is affine and the bilinear weights sum to
    one, so resizing the quantised field before dequantising gives the same field, up to the
    rounding of the uint8 resize (at most half a quantisation step, 0.08 px, before the gain):
    resizing uint8 is ~2.5x faster than float32 on a CPU.
    """
    if flow.dtype == torch.uint8:
        quantised = _resized_crop_two_channels(flow, box, size)  # flipped: the gain's sign negates x
    else:
        quantised = rgb_resized_crop_flip(flow, box, size).permute(1, 0, 2, 3).contiguous()
    gain = torch.tensor([-size / box.width if box.flip else size / box.width, size / box.height])
    unit = 1.0 / FLOW_BOUND if normalise else 1.0
    # (q * 2B / 255 - B) * gain * unit: dequantise, scale and normalise as one affine.
    scale = gain * (2 * FLOW_BOUND / 255.0) * unit
    shift = -gain * FLOW_BOUND * unit
    return quantised, scale, shift


def apply_flow_affine(quantised: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """(..., 2, T, H, W) uint8 with per-component (..., 2) scale and shift -> float32 flow."""
    view = scale.shape + (1, 1, 1)
    # copy_ then in-place: ~6x faster on a CPU than one mixed-dtype addcmul
    out = torch.empty(quantised.shape, dtype=torch.float32, device=quantised.device)
    out.copy_(quantised)
    return out.mul_(scale.to(out.device).view(view)).add_(shift.to(out.device).view(view))


def flow_resized_crop_flip(
    flow: torch.Tensor, box: CropFlip, size: int = 128, normalise: bool = False, channels_first: bool = False
) -> torch.Tensor:
    """Crop, resize and flip a quantised (T, 2, H, W) uint8 flow clip -> float32 flow in px
    (divided by FLOW_BOUND with ``normalise``; laid out (2, T, size, size) with ``channels_first``).
    See :func:`flow_crop_quantised`."""
    quantised, scale, shift = flow_crop_quantised(flow, box, size, normalise)
    out = apply_flow_affine(quantised, scale, shift)
    return out if channels_first else out.permute(1, 0, 2, 3).contiguous()


def flow_geometric(
    flow: torch.Tensor,
    generator: torch.Generator,
    size: int = 128,
    scale: tuple[float, float] = CROP_SCALE,
    ratio: tuple[float, float] = CROP_RATIO,
    flip_p: float = 0.5,
    normalise: bool = False,
    channels_first: bool = False,
) -> torch.Tensor:
    """Worker-side flow augmentation: (T, 2, H, W) uint8 (``schema.quantise_flow``) ->
    (T, 2, size, size) float32 flow in px (x first). No photometric change.

    The values may exceed +-FLOW_BOUND after a zoom-in crop (up to ~2.2x at scale 0.2);
    :func:`normalise_flow` divides by FLOW_BOUND for the network.
    """
    box = sample_crop_flip(generator, flow.shape[-2], flow.shape[-1], scale, ratio, flip_p)
    return flow_resized_crop_flip(flow, box, size, normalise=normalise, channels_first=channels_first)


def normalise_flow(flow_px: torch.Tensor) -> torch.Tensor:
    """Flow in px -> network input: divide by FLOW_BOUND (the quantisation range is +-1)."""
    return flow_px / FLOW_BOUND


# ---- audio: time warp and masks of the spectrogram slice -------------------------------------

# Keeps the moved anchor off the ends of the clip, where a piece of the warp would have length 0.
_WARP_EDGE = 1e-3


def sample_time_warp(generator: torch.Generator, warp_fraction: float) -> tuple[float, float]:
    """SpecAugment-style warp parameters in normalised time [0, 1]: ``(anchor, destination)``.

    The anchor is uniform in [warp_fraction, 1 - warp_fraction] (shrunk by a tiny margin) and
    moves by a shift uniform in [-warp_fraction, warp_fraction], so the destination stays
    strictly inside (0, 1) and the warp monotonic. ``warp_fraction=0`` gives no warp.
    """
    if not 0.0 <= warp_fraction < 0.5 - _WARP_EDGE:
        raise ValueError(f"warp_fraction must be in [0, 0.5), got {warp_fraction}")
    margin = warp_fraction + _WARP_EDGE
    anchor = float(_uniform(generator, margin, 1.0 - margin))
    shift = float(_uniform(generator, -warp_fraction, warp_fraction))
    return anchor, anchor + shift


def time_warp(spec: torch.Tensor, anchor: float, destination: float, out_steps: int) -> torch.Tensor:
    """Dense warp of a (F, T) spectrogram along time -> (F, out_steps).

    The output time ``destination`` samples the input time ``anchor`` (normalised to [0, 1]);
    both halves are stretched linearly, so the map is piecewise linear, continuous and
    monotonic, and the ends stay fixed. ``anchor == destination`` is a plain linear resampling
    to ``out_steps`` (the identity when the lengths match). Bilinear ``grid_sample`` along time.
    """
    out_pos = torch.linspace(0.0, 1.0, out_steps)
    src_pos = torch.where(
        out_pos <= destination,
        out_pos * (anchor / destination),
        anchor + (out_pos - destination) * ((1.0 - anchor) / (1.0 - destination)),
    )
    # The mel bins are channels of a height-1 image, so all bins share one sampling grid.
    grid = torch.stack([src_pos * 2.0 - 1.0, torch.zeros(out_steps)], dim=-1).view(1, 1, out_steps, 2)
    warped = nnf.grid_sample(spec[None, :, None, :], grid, mode="bilinear", align_corners=True)
    return warped[0, :, 0, :]


def spectrogram_geometric(
    spec: torch.Tensor,
    generator: torch.Generator,
    out_steps: int = 128,
    expected_steps: int | None = None,
    warp_fraction: float = 0.1,
    time_mask: int = 32,
    freq_mask: int = 32,
    pad_value: float | None = None,
) -> torch.Tensor:
    """Worker-side audio augmentation of one clip's log-mel slice: (F, T) -> (1, F, out_steps)
    float32.

    1. A slice shorter than ``expected_steps`` (default ``out_steps``; the ``num_steps`` of
       ``sampling.spectrogram_span``) -- the end of a video, or audio shorter than the video --
       is padded at its end with ``pad_value``, by default the slice's minimum (the quietest
       level it has; pass the whole spectrogram's minimum if you have it). An empty slice needs
       ``pad_value``.
    2. A random dense time warp (:func:`time_warp`; the anchor moves by up to
       ``warp_fraction`` of the clip) that also resamples ``expected_steps`` to ``out_steps``.
    3. One time mask (width uniform in [0, time_mask) steps) and one frequency mask (width
       uniform in [0, freq_mask) bins), torchaudio's ``mask_along_axis``, filled with the mean of
       the warped spectrogram. Defaults: up to a quarter of a second and a quarter of the bins.
    """
    expected_steps = out_steps if expected_steps is None else expected_steps
    spec = spec.to(torch.float32)
    missing = expected_steps - spec.shape[-1]
    if missing > 0:
        if pad_value is None:
            if spec.shape[-1] == 0:
                raise ValueError("empty spectrogram slice: pass pad_value")
            pad_value = float(spec.min())
        spec = nnf.pad(spec, (0, missing), value=pad_value)
    spec = spec[:, :expected_steps]

    anchor, destination = sample_time_warp(generator, warp_fraction)
    warped = time_warp(spec, anchor, destination, out_steps)[None]

    fill = float(warped.mean())
    with _global_rng_seeded_from(generator):
        # Widths capped at the axis length: torchaudio would otherwise start a mask before 0.
        warped = audio_f.mask_along_axis(warped, min(time_mask, warped.shape[2]), fill, axis=2)
        warped = audio_f.mask_along_axis(warped, min(freq_mask, warped.shape[1]), fill, axis=1)
    return warped


# ---- photometric: parameters drawn in workers, applied batched on the device -----------------


def sample_photometric_params(
    generator: torch.Generator,
    p_jitter: float = 0.8,
    p_grey: float = 0.2,
    p_blur: float = 0.5,
    brightness: float = 0.4,
    contrast: float = 0.4,
    saturation: float = 0.4,
    hue: float = 0.1,
    sigma: tuple[float, float] = (0.1, 2.0),
) -> dict[str, torch.Tensor]:
    """One clip's photometric parameters as small fixed-shape tensors, so that the default
    collate stacks them into a batch for :func:`apply_photometric`.

    Keys: ``jitter_on`` (bool), ``jitter_factors`` (float32, 4: brightness, contrast,
    saturation factors uniform in [1 - x, 1 + x] and a hue shift uniform in [-hue, hue]),
    ``jitter_order`` (int64, a permutation of the four operations, as torchvision's
    ColorJitter), ``grey_on`` (bool), ``blur_on`` (bool), ``blur_sigma`` (float32). Every value
    is always drawn, so the stream of draws does not depend on earlier outcomes.
    """
    jitter_on = torch.rand((), generator=generator) < p_jitter
    low = torch.tensor([max(0.0, 1 - brightness), max(0.0, 1 - contrast), max(0.0, 1 - saturation), -hue])
    high = torch.tensor([1 + brightness, 1 + contrast, 1 + saturation, hue])
    factors = low + (high - low) * torch.rand(4, generator=generator)
    order = torch.randperm(4, generator=generator)
    grey_on = torch.rand((), generator=generator) < p_grey
    blur_on = torch.rand((), generator=generator) < p_blur
    blur_sigma = _uniform(generator, *sigma)
    return {
        "jitter_on": jitter_on,
        "jitter_factors": factors,
        "jitter_order": order,
        "grey_on": grey_on,
        "blur_on": blur_on,
        "blur_sigma": blur_sigma,
    }


def _per_clip(values: torch.Tensor) -> torch.Tensor:
    """(N,) per-clip values -> (N, 1, 1, 1, 1), to broadcast over (N, T, C, H, W) clips."""
    return values.view(-1, 1, 1, 1, 1)


def _jitter_slot(clips: torch.Tensor, ops: torch.Tensor, factors: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """One step of colour jitter for a batch of float (N, T, 3, H, W) clips, each clip doing
    its own operation ``ops[i]`` with its own factor.

    torchvision's brightness, contrast and saturation are all the same blend
    ``clamp(f * image + (1 - f) * other)``, with ``other`` black, the frame's mean grey level,
    or the greyscale image; so one blend does all three at once, with no per-clip indexing.
    Clips whose operation is hue, or that are not ``active``, get ``f = 1``: unchanged.
    """
    ops = _per_clip(ops)
    grey = tvf.rgb_to_grayscale(clips)
    other = torch.where(
        ops == BRIGHTNESS,
        torch.zeros((), device=clips.device),
        torch.where(ops == CONTRAST, grey.mean(dim=(-3, -2, -1), keepdim=True), grey),
    )
    ratio = _per_clip(factors.gather(1, ops.view(-1, 1)))
    ratio = torch.where(_per_clip(active) & (ops != HUE), ratio, torch.ones((), device=clips.device))
    # lerp(other, clips, f) = f * clips + (1 - f) * other in one kernel (equal up to rounding).
    return torch.lerp(other, clips, ratio).clamp_(0.0, 1.0)


def default_blur_kernel_size(image_size: int) -> int:
    """Odd kernel of about 10 % of the image side (SimCLR: 23 at 224; 13 at 128)."""
    return int(0.1 * image_size) | 1


def apply_photometric(
    clips: torch.Tensor,
    params: dict[str, torch.Tensor],
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    blur_kernel_size: int | None = None,
) -> torch.Tensor:
    """Device-side RGB augmentation of a batch: (B, 3, T, H, W) uint8 -> float32, normalised.

    Each clip gets its own parameters (``params``: the batched output of
    :func:`sample_photometric_params`), the same for all its frames: colour jitter in the
    clip's order, then greyscale, then Gaussian blur, then ``(x / 255 - mean) / std`` (ImageNet
    statistics by default). Brightness, contrast, saturation and greyscale run batched, with
    torchvision's formulas and per-clip factors; hue and blur call torchvision's functions clip
    by clip (each call covers all T frames). Runs on ``clips.device``; ``params`` may live on
    the CPU (best: no transfer back) or on the device.
    """
    # (N, T, 3, H, W): torchvision's layout, channels third from last.
    # Reorder while still uint8: a quarter of the bytes of a float copy.
    x = tvf.to_dtype(clips.permute(0, 2, 1, 3, 4).contiguous(), torch.float32, scale=True)
    # Per-clip decisions (hue, blur) are read from a CPU copy, so the loops never wait on the
    # device; the batched parts use a device copy (non_blocking: no stream sync).
    cpu = {key: value.detach().cpu() for key, value in params.items()}
    dev = {key: value.to(x.device, non_blocking=True) for key, value in params.items()}
    factors = dev["jitter_factors"].to(torch.float32)

    for slot in range(4):
        x = _jitter_slot(x, dev["jitter_order"][:, slot], factors, dev["jitter_on"])
        hue_clips = cpu["jitter_on"] & (cpu["jitter_order"][:, slot] == HUE)
        for i in hue_clips.nonzero().flatten().tolist():
            # adjust_hue's HSV round trip takes one scalar factor: clip by clip.
            x[i] = tvf.adjust_hue(x[i], float(cpu["jitter_factors"][i, HUE]))

    x = torch.where(_per_clip(dev["grey_on"]), tvf.rgb_to_grayscale(x, num_output_channels=3), x)

    kernel = blur_kernel_size or default_blur_kernel_size(min(x.shape[-2:]))
    for i in cpu["blur_on"].nonzero().flatten().tolist():
        sigma = float(cpu["blur_sigma"][i])
        x[i] = tvf.gaussian_blur(x[i], [kernel, kernel], [sigma, sigma])

    x = tvf.normalize(x, list(mean), list(std))
    return x.permute(0, 2, 1, 3, 4).contiguous()
