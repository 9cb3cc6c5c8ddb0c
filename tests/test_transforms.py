"""Per-modality augmentation: consistency within a clip, independence between clips, flow
geometry, spectrogram warp and masks, batched photometric parameters, determinism."""

import pytest
import torch
from torch.utils.data import default_collate
from torchvision.transforms.v2 import functional as tvf

from tricoclr.data.sampling import sample_generator
from tricoclr.data.schema import FLOW_BOUND, dequantise_flow, quantise_flow
from tricoclr.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CropFlip,
    apply_photometric,
    default_blur_kernel_size,
    flow_crop_quantised,
    flow_geometric,
    flow_resized_crop_flip,
    normalise_flow,
    rgb_geometric,
    rgb_resized_crop_flip,
    sample_crop_flip,
    sample_photometric_params,
    sample_time_warp,
    spectrogram_geometric,
    time_warp,
)


def random_uint8(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def quantised_flow(
    vx: torch.Tensor | float, vy: torch.Tensor | float, t: int = 2, h: int = 24, w: int = 32
) -> torch.Tensor:
    """(t, 2, h, w) uint8 flow field from x and y components in px (scalars or (h, w))."""
    field = torch.stack([torch.as_tensor(vx).expand(h, w), torch.as_tensor(vy).expand(h, w)])
    return torch.from_numpy(quantise_flow(field.expand(t, 2, h, w).numpy()))


# ---- RGB geometric ------------------------------------------------------------------------


def test_rgb_geometric_shape_dtype_and_determinism():
    clip = random_uint8(6, 3, 40, 56)
    out = rgb_geometric(clip, sample_generator(0, 0, 5, 1, "rgb"), size=32)
    assert out.shape == (6, 3, 32, 32) and out.dtype == torch.uint8
    assert torch.equal(out, rgb_geometric(clip, sample_generator(0, 0, 5, 1, "rgb"), size=32))
    assert not torch.equal(out, rgb_geometric(clip, sample_generator(0, 1, 5, 1, "rgb"), size=32))


def test_rgb_geometric_one_crop_for_all_frames():
    clip = random_uint8(5, 3, 40, 56)
    for index in range(10):
        out = rgb_geometric(clip, sample_generator(0, 0, index, 1, "rgb"), size=24)
        for t in range(5):  # every frame gets exactly the crop and flip it would get alone
            alone = rgb_geometric(clip[t : t + 1], sample_generator(0, 0, index, 1, "rgb"), size=24)
            assert torch.equal(out[t], alone[0])
    identical = random_uint8(1, 3, 40, 56).expand(4, -1, -1, -1)
    out = rgb_geometric(identical, sample_generator(0, 0, 0, 1, "rgb"), size=24)
    assert all(torch.equal(out[0], frame) for frame in out)


def test_crop_boxes_respect_scale_and_ratio_and_flip_half_the_time():
    boxes = [sample_crop_flip(sample_generator(0, 0, i, 1, "rgb"), 100, 120) for i in range(300)]
    for box in boxes:
        assert 0 <= box.top and box.top + box.height <= 100 and 0 <= box.left and box.left + box.width <= 120
        assert 0.2 * 0.95 <= box.height * box.width / (100 * 120) <= 1.0
    assert 110 < sum(box.flip for box in boxes) < 190


def test_the_two_clips_of_a_sample_are_augmented_independently():
    different = 0
    for index in range(20):
        views = [sample_crop_flip(sample_generator(0, 0, index, view, "rgb"), 100, 120) for view in (1, 2)]
        different += views[0] != views[1]
    assert different >= 19
    photometric = [
        [sample_photometric_params(sample_generator(0, 0, i, view, "photometric"))["jitter_factors"] for view in (1, 2)]
        for i in range(20)
    ]
    assert all(not torch.equal(a, b) for a, b in photometric)


def test_modality_streams_do_not_share_randomness_but_rgb_and_flow_share_the_sampler():
    rgb_box = sample_crop_flip(sample_generator(0, 0, 1, 1, "rgb"), 40, 56)
    assert rgb_box == sample_crop_flip(sample_generator(0, 0, 1, 1, "rgb"), 40, 56)
    flow = quantised_flow(torch.rand(40, 56) * 10 - 5, torch.rand(40, 56) * 10 - 5, h=40, w=56)
    via_generator = flow_geometric(flow, sample_generator(0, 0, 1, 1, "rgb"), size=24)
    assert torch.equal(via_generator, flow_resized_crop_flip(flow, rgb_box, size=24))
    boxes = [
        sample_crop_flip(sample_generator(0, 0, i, 1, stream), 40, 56) for i in range(10) for stream in ("rgb", "flow")
    ]
    assert len(set(boxes)) > 15


def _reference_resized_crop_flip(clip: torch.Tensor, box: CropFlip, size: int) -> torch.Tensor:
    """The plain composition on a contiguous clip: what the layout-aware fast paths must equal."""
    out = tvf.resized_crop(clip.contiguous(), box.top, box.left, box.height, box.width, [size, size], antialias=True)
    return tvf.horizontal_flip(out) if box.flip else out


@pytest.mark.parametrize("frames", [1, 7, 30])
def test_resized_crops_equal_the_plain_composition_bit_for_bit(frames):
    """RGB resized channels-last and flow resized as interleaved frame pairs give exactly the
    values of torchvision's resized_crop on the contiguous clip: zoom in and out, crops the
    output's size (no resize), flips, odd frame counts, and a channels-last input."""
    h, w, size = 50, 66, 40
    rgb, flow = random_uint8(frames, 3, h, w, seed=frames), random_uint8(frames, 2, h, w, seed=frames + 1)
    boxes = [sample_crop_flip(sample_generator(3, 0, i, 1, "rgb"), h, w) for i in range(12)]
    boxes += [CropFlip(0, 0, h, w, True), CropFlip(5, 9, size, size, False), CropFlip(2, 1, size, size, True)]
    for box in boxes:
        expected_rgb = _reference_resized_crop_flip(rgb, box, size)
        assert torch.equal(rgb_resized_crop_flip(rgb, box, size), expected_rgb), box
        channels_last = rgb.contiguous(memory_format=torch.channels_last)
        assert torch.equal(rgb_resized_crop_flip(channels_last, box, size), expected_rgb), box
        quantised, _, _ = flow_crop_quantised(flow, box, size)
        assert quantised.is_contiguous() and quantised.shape == (2, frames, size, size)
        assert torch.equal(quantised, _reference_resized_crop_flip(flow, box, size).permute(1, 0, 2, 3)), box


# ---- flow geometric -------------------------------------------------------------------------


def test_flip_negation_is_exact_on_the_quantised_values():
    q = torch.arange(256, dtype=torch.uint8)
    assert torch.allclose(dequantise_flow((255 - q).float()), -dequantise_flow(q.float()), atol=1e-5)


@pytest.mark.parametrize("flip", [False, True])
def test_flow_vectors_scale_with_the_resize_and_flip_negates_x(flip):
    vx, vy = 3.0, -2.0
    flow = quantised_flow(vx, vy, h=24, w=32)
    qx, qy = dequantise_flow(flow[0, :, 0, 0].float()).tolist()  # the stored values
    box = CropFlip(top=4, left=8, height=12, width=16, flip=flip)  # resized to 32: x * 2, y * 8/3
    out = flow_resized_crop_flip(flow, box, size=32)
    assert out.shape == (2, 2, 32, 32) and out.dtype == torch.float32
    sign = -1.0 if flip else 1.0
    assert torch.allclose(out[:, 0], torch.full_like(out[:, 0], sign * qx * 2.0), atol=1e-4)
    assert torch.allclose(out[:, 1], torch.full_like(out[:, 1], qy * 32 / 12), atol=1e-4)


def test_flow_flip_mirrors_the_field_and_negates_only_x():
    h, w = 24, 32
    columns = torch.linspace(-8, 8, w).expand(h, w)
    rows = torch.linspace(-5, 5, h)[:, None].expand(h, w)
    flow = quantised_flow(columns, rows, h=h, w=w)
    box = CropFlip(top=2, left=3, height=20, width=20, flip=False)
    plain = flow_resized_crop_flip(flow, box, size=16)
    flipped = flow_resized_crop_flip(flow, CropFlip(2, 3, 20, 20, flip=True), size=16)
    assert torch.allclose(flipped[:, 0], -plain[:, 0].flip(-1), atol=1e-5)
    assert torch.allclose(flipped[:, 1], plain[:, 1].flip(-1), atol=1e-5)


def test_flow_geometric_scales_a_constant_field_by_its_crop_for_every_frame():
    flow = quantised_flow(2.5, 1.0, t=3, h=30, w=40)
    qx, qy = dequantise_flow(flow[0, :, 0, 0].float()).tolist()
    for index in range(5):
        box = sample_crop_flip(sample_generator(4, 0, index, 1, "flow"), 30, 40)
        out = flow_geometric(flow, sample_generator(4, 0, index, 1, "flow"), size=20)
        assert out.shape == (3, 2, 20, 20) and out.dtype == torch.float32
        sign = -1.0 if box.flip else 1.0
        assert torch.allclose(out[:, 0], torch.tensor(sign * qx * 20 / box.width), atol=1e-4)
        assert torch.allclose(out[:, 1], torch.tensor(qy * 20 / box.height), atol=1e-4)


def test_normalise_flow():
    assert torch.equal(normalise_flow(torch.tensor([FLOW_BOUND, -FLOW_BOUND / 2])), torch.tensor([1.0, -0.5]))


# ---- audio ----------------------------------------------------------------------------------


def test_identity_warp_and_resampling():
    spec = torch.randn(8, 50)
    assert torch.allclose(time_warp(spec, 0.4, 0.4, 50), spec, atol=1e-4)
    ramp = torch.arange(50.0).expand(8, 50)
    assert torch.allclose(time_warp(ramp, 0.4, 0.4, 99), torch.arange(99.0).expand(8, 99) / 2, atol=1e-4)


def test_warp_is_monotonic_keeps_ends_and_moves_the_anchor():
    ramp = torch.linspace(0.0, 1.0, 128).expand(4, 128)
    for index in range(20):
        anchor, destination = sample_time_warp(sample_generator(0, 0, index, 1, "audio"), 0.1)
        assert 0.1 <= anchor <= 0.9 and abs(destination - anchor) <= 0.1
        warped = time_warp(ramp, anchor, destination, 128)
        assert warped.shape == (4, 128)
        assert bool((warped.diff(dim=-1) >= -1e-6).all())
        assert abs(float(warped[0, 0])) < 1e-6 and abs(float(warped[0, -1]) - 1.0) < 1e-6
        step = round(destination * 127)  # the output sample nearest the destination shows the anchor
        assert abs(float(warped[0, step]) - anchor) <= abs(anchor / destination) / 127 + 1e-4


def test_spectrogram_shape_dtype_and_determinism():
    spec = torch.randn(128, 128).to(torch.float16)
    out = spectrogram_geometric(spec, sample_generator(0, 0, 3, 1, "audio"))
    assert out.shape == (1, 128, 128) and out.dtype == torch.float32
    assert torch.equal(out, spectrogram_geometric(spec, sample_generator(0, 0, 3, 1, "audio")))
    assert not torch.equal(out, spectrogram_geometric(spec, sample_generator(0, 1, 3, 1, "audio")))


def test_masks_are_one_time_band_and_one_frequency_band_filled_with_the_mean():
    spec = torch.randn(64, 96) * 3 + 5
    both_masks_seen = 0
    for index in range(20):
        make = lambda: sample_generator(1, 0, index, 2, "audio")  # noqa: E731
        unmasked = spectrogram_geometric(spec, make(), out_steps=96, time_mask=0, freq_mask=0)[0]
        masked = spectrogram_geometric(spec, make(), out_steps=96, time_mask=24, freq_mask=16)[0]
        changed = masked != unmasked
        if not changed.any():
            continue
        assert torch.allclose(masked[changed], unmasked.mean().expand(int(changed.sum())))
        time_band = changed.all(dim=0)  # columns masked in every bin
        freq_band = changed.all(dim=1)  # bins masked at every step
        assert bool((changed == (time_band[None, :] | freq_band[:, None])).all())
        for band, limit in ((time_band, 24), (freq_band, 16)):
            width = int(band.sum())
            assert width < limit
            if width:
                first = int(band.nonzero()[0])
                assert bool(band[first : first + width].all())  # one contiguous band
        both_masks_seen += bool(time_band.any() and freq_band.any())
    assert both_masks_seen >= 10


def test_short_slice_is_padded_with_its_minimum():
    spec = torch.randn(16, 100)
    out = spectrogram_geometric(
        spec, sample_generator(0, 0, 0, 1, "audio"), warp_fraction=0.0, time_mask=0, freq_mask=0
    )
    assert out.shape == (1, 16, 128)
    assert torch.allclose(out[0, :, :100], spec, atol=1e-4)  # float32 grid coordinates
    assert torch.allclose(out[0, :, 100:], spec.min().expand(16, 28))
    with pytest.raises(ValueError):
        spectrogram_geometric(torch.zeros(16, 0), sample_generator(0, 0, 0, 1, "audio"))
    padded = spectrogram_geometric(torch.zeros(16, 0), sample_generator(0, 0, 0, 1, "audio"), pad_value=-7.0)
    assert torch.equal(padded, torch.full((1, 16, 128), -7.0))


# ---- photometric ----------------------------------------------------------------------------


def test_photometric_params_are_fixed_shape_tensors_that_collate():
    params = [sample_photometric_params(sample_generator(0, 0, i, 1, "photometric")) for i in range(200)]
    batch = default_collate(params)
    assert batch["jitter_on"].shape == (200,) and batch["jitter_on"].dtype == torch.bool
    assert batch["jitter_factors"].shape == (200, 4) and batch["jitter_factors"].dtype == torch.float32
    assert batch["jitter_order"].shape == (200, 4)
    assert bool((batch["jitter_order"].sort(dim=1).values == torch.arange(4)).all())
    factors = batch["jitter_factors"]
    assert bool(((factors[:, :3] >= 0.6) & (factors[:, :3] <= 1.4)).all())
    assert bool((factors[:, 3].abs() <= 0.1).all())
    assert bool(((batch["blur_sigma"] >= 0.1) & (batch["blur_sigma"] <= 2.0)).all())
    rates = [float(batch[key].float().mean()) for key in ("jitter_on", "grey_on", "blur_on")]
    assert abs(rates[0] - 0.8) < 0.1 and abs(rates[1] - 0.2) < 0.1 and abs(rates[2] - 0.5) < 0.1


PARAMS = {
    "jitter_on": torch.tensor([True, True, True, True, False]),
    "jitter_factors": torch.tensor(
        [
            [1.3, 0.7, 1.2, 0.05],
            [0.8, 1.4, 0.6, -0.08],
            [1.1, 1.2, 1.35, 0.1],
            [0.65, 0.9, 0.7, -0.02],
            [1.4, 1.4, 1.4, 0.1],
        ]
    ),
    "jitter_order": torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2], [2, 0, 3, 1], [0, 1, 2, 3]]),
    "grey_on": torch.tensor([False, True, False, False, True]),
    "blur_on": torch.tensor([True, False, False, True, True]),
    "blur_sigma": torch.tensor([0.5, 1.0, 1.5, 1.9, 0.2]),
}
JITTER_FNS = [tvf.adjust_brightness, tvf.adjust_contrast, tvf.adjust_saturation, tvf.adjust_hue]


def reference_photometric(clip: torch.Tensor, params: dict, kernel: int) -> torch.Tensor:
    """One (3, T, H, W) clip through torchvision's own functions, operation by operation."""
    x = tvf.to_dtype(clip.transpose(0, 1), torch.float32, scale=True)
    if params["jitter_on"]:
        for op in params["jitter_order"].tolist():
            x = JITTER_FNS[op](x, float(params["jitter_factors"][op]))
    if params["grey_on"]:
        x = tvf.rgb_to_grayscale(x, num_output_channels=3)
    if params["blur_on"]:
        sigma = float(params["blur_sigma"])
        x = tvf.gaussian_blur(x, [kernel, kernel], [sigma, sigma])
    return tvf.normalize(x, list(IMAGENET_MEAN), list(IMAGENET_STD)).transpose(0, 1)


def test_apply_photometric_matches_torchvision_clip_by_clip():
    clips = random_uint8(5, 3, 4, 16, 20)
    out = apply_photometric(clips, PARAMS, blur_kernel_size=5)
    assert out.shape == (5, 3, 4, 16, 20) and out.dtype == torch.float32
    for i in range(5):
        params = {key: value[i] for key, value in PARAMS.items()}
        assert torch.allclose(out[i], reference_photometric(clips[i], params, kernel=5), atol=1e-5)
        # A clip's result does not depend on the rest of the batch.
        alone = apply_photometric(
            clips[i : i + 1], {key: value[i : i + 1] for key, value in PARAMS.items()}, blur_kernel_size=5
        )
        assert torch.allclose(out[i], alone[0], atol=1e-6)


def test_apply_photometric_is_the_same_for_every_frame_of_a_clip():
    frame = random_uint8(5, 3, 1, 16, 16)
    out = apply_photometric(frame.expand(-1, -1, 4, -1, -1), PARAMS, blur_kernel_size=5)
    assert all(torch.equal(out[:, :, 0], out[:, :, t]) for t in range(4))


def test_apply_photometric_with_everything_off_only_normalises():
    clips = random_uint8(2, 3, 2, 8, 8)
    off = {key: (torch.zeros_like(value) if value.dtype == torch.bool else value)[:2] for key, value in PARAMS.items()}
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1, 1)
    assert torch.allclose(apply_photometric(clips, off), (clips / 255.0 - mean) / std, atol=1e-6)


def test_default_blur_kernel_size():
    assert default_blur_kernel_size(128) == 13
    assert default_blur_kernel_size(224) == 23


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_apply_photometric_on_the_device_matches_the_cpu():
    clips = random_uint8(5, 3, 4, 16, 20)
    on_cpu = apply_photometric(clips, PARAMS, blur_kernel_size=5)
    on_gpu = apply_photometric(clips.cuda(), {key: value.cuda() for key, value in PARAMS.items()}, blur_kernel_size=5)
    assert on_gpu.device.type == "cuda"
    assert torch.allclose(on_gpu.cpu(), on_cpu, atol=1e-4)
