"""TV-L1 flow in PyTorch (tricoclr.ops.tvl1): agreement with OpenCV, known motions, batching."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tricoclr.ops import tvl1
from tricoclr.ops.tvl1 import TVL1Params, flow_for_frame_sequence, median_blur, pyramid_sizes, tvl1_flow

try:  # OpenCV is optional: the comparisons skip without it
    import cv2  # type: ignore[no-redef]

    HAVE_OPENCV_TVL1 = hasattr(cv2, "optflow")
except ImportError:  # pragma: no cover - the dev environment has it
    cv2 = None
    HAVE_OPENCV_TVL1 = False

needs_opencv = pytest.mark.skipif(cv2 is None, reason="OpenCV not installed")
needs_opencv_tvl1 = pytest.mark.skipif(not HAVE_OPENCV_TVL1, reason="opencv-contrib (cv2.optflow) not installed")
MEDIA = Path(__file__).resolve().parents[2] / "shared" / "media"

# Few iterations: enough to exercise every stage, cheap enough for exact comparisons.
SHORT = TVL1Params(nscales=3, warps=2, inner_iterations=6, outer_iterations=2)


def smooth_texture(size: int, seed: int, sigma: float = 2.0) -> torch.Tensor:
    """(1,1,size,size) Gaussian-blurred noise, mean 128, std 40."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(1, 1, size, size, generator=generator)
    radius = int(3 * sigma)
    kernel = torch.exp(-0.5 * (torch.arange(-radius, radius + 1.0) / sigma) ** 2)
    kernel = kernel / kernel.sum()
    blurred = F.conv2d(F.pad(noise, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
    blurred = F.conv2d(F.pad(blurred, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1))
    return (blurred - blurred.mean()) / blurred.std() * 40.0 + 128.0


def render_pair(size: int, flow: torch.Tensor, seed: int = 0, margin: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 frames (H,W) with frame0(p) = frame1(p + flow(p)), flow (2,H,W) in px; frame0 is
    sampled (bicubic) from a texture larger than the view so no content is invented."""
    big = size + 2 * margin
    texture = smooth_texture(big, seed)
    ys, xs = torch.meshgrid(
        torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij"
    )
    gx = (xs + flow[0] + margin) / (big - 1) * 2 - 1
    gy = (ys + flow[1] + margin) / (big - 1) * 2 - 1
    frame0 = F.grid_sample(texture, torch.stack((gx, gy), -1)[None], mode="bicubic", align_corners=True)[0, 0]
    frame1 = texture[0, 0, margin : margin + size, margin : margin + size]
    to_uint8 = lambda t: t.round().clamp(0, 255).to(torch.uint8)  # noqa: E731
    return to_uint8(frame0), to_uint8(frame1)


def rotation_flow(size: int, degrees: float) -> torch.Tensor:
    """Flow (2,H,W) of a rotation by ``degrees`` about the image centre."""
    ys, xs = torch.meshgrid(
        torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij"
    )
    c = (size - 1) / 2
    a = math.radians(degrees)
    dx, dy = xs - c, ys - c
    return torch.stack((math.cos(a) * dx - math.sin(a) * dy - dx, math.sin(a) * dx + math.cos(a) * dy - dy))


def constant_flow(size: int, fx: float, fy: float) -> torch.Tensor:
    return torch.stack((torch.full((size, size), fx), torch.full((size, size), fy)))


def opencv_flow(frame0: torch.Tensor, frame1: torch.Tensor, params: TVL1Params) -> np.ndarray:
    """OpenCV's DualTVL1 flow as (2,H,W)."""
    return tvl1.create_opencv_tvl1(params).calc(frame0.numpy(), frame1.numpy(), None).transpose(2, 0, 1)


def mean_epe(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b), axis=0).mean())


def interior(field: torch.Tensor | np.ndarray, border: int) -> torch.Tensor | np.ndarray:
    return field[..., border:-border, border:-border]


# ----------------------------------------------------------------------------------------------
# Parameters and building blocks against OpenCV


@needs_opencv_tvl1
def test_default_params_are_opencvs():
    algorithm = cv2.optflow.DualTVL1OpticalFlow_create()
    p = TVL1Params()
    assert (p.tau, p.lambda_, p.theta, p.epsilon, p.scale_step, p.gamma) == pytest.approx(
        (
            algorithm.getTau(),
            algorithm.getLambda(),
            algorithm.getTheta(),
            algorithm.getEpsilon(),
            algorithm.getScaleStep(),
            algorithm.getGamma(),
        )
    )
    assert (p.nscales, p.warps, p.inner_iterations, p.outer_iterations, p.median_filtering) == (
        algorithm.getScalesNumber(),
        algorithm.getWarpingsNumber(),
        algorithm.getInnerIterations(),
        algorithm.getOuterIterations(),
        algorithm.getMedianFiltering(),
    )


@needs_opencv
@pytest.mark.parametrize("height,width", [(37, 53), (128, 128), (20, 16)])
def test_pyramid_step_matches_cv_resize(height, width):
    image = np.random.default_rng(1).uniform(0, 255, (height, width)).astype(np.float32)
    expected = cv2.resize(image, None, fx=0.8, fy=0.8, interpolation=cv2.INTER_LINEAR)
    size = (round(height * 0.8), round(width * 0.8))
    got = tvl1._downscale(torch.from_numpy(image)[None, None], size, 0.8)[0, 0].numpy()
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-3)
    # upsampling to a given size (the flow between levels)
    expected_up = cv2.resize(image, (width + 13, height + 9), interpolation=cv2.INTER_LINEAR)
    got_up = tvl1._resize_to(torch.from_numpy(image)[None, None], (height + 9, width + 13))[0, 0].numpy()
    np.testing.assert_allclose(got_up, expected_up, atol=5e-3)


def test_pyramid_sizes_stop_before_16px():
    assert pyramid_sizes(128, 128, 5, 0.8) == [(128, 128), (102, 102), (82, 82), (66, 66), (53, 53)]
    assert pyramid_sizes(32, 40, 5, 0.8) == [(32, 40), (26, 32), (21, 26), (17, 21)]  # next: 14 rows


@needs_opencv
@pytest.mark.parametrize("subpixel_steps", [0, 32])
def test_bicubic_warp_matches_cv_remap(subpixel_steps):
    rng = np.random.default_rng(2)
    image = rng.uniform(0, 255, (40, 50)).astype(np.float32)
    map_x = rng.uniform(-5, 55, (40, 50)).astype(np.float32)  # some samples leave the image
    map_y = rng.uniform(-5, 45, (40, 50)).astype(np.float32)
    got = tvl1.remap_cubic(
        torch.from_numpy(image)[None, None],
        torch.from_numpy(map_x)[None],
        torch.from_numpy(map_y)[None],
        subpixel_steps,
    )[0, 0].numpy()
    if subpixel_steps == 0:  # OpenCV 5 samples at the exact coordinate
        expected = cv2.remap(image, map_x, map_y, cv2.INTER_CUBIC)
    else:  # OpenCV 4's fixed-point maps: integer part and fraction in 1/32 px
        fixed = np.round(map_x * 32).astype(np.int32), np.round(map_y * 32).astype(np.int32)
        exact_x = (fixed[0] >> 5) + (fixed[0] & 31) / 32
        exact_y = (fixed[1] >> 5) + (fixed[1] & 31) / 32
        expected = cv2.remap(image, exact_x.astype(np.float32), exact_y.astype(np.float32), cv2.INTER_CUBIC)
    np.testing.assert_allclose(got, expected, atol=2e-3)


@needs_opencv
@pytest.mark.parametrize("ksize", [3, 5])
@pytest.mark.parametrize("method", ["unfold", "network"])
def test_median_matches_cv_median_blur(ksize, method):
    field = np.random.default_rng(3).normal(0, 3, (2, 23, 31)).astype(np.float32)
    got = median_blur(torch.from_numpy(field)[None], ksize, method=method)[0].numpy()
    for channel in range(2):
        np.testing.assert_array_equal(got[channel], cv2.medianBlur(field[channel], ksize))


@pytest.mark.parametrize("ksize", [3, 5, 7])
def test_median_network_equals_torch_median(ksize):
    images = torch.randn(3, 2, 17, 19, generator=torch.Generator().manual_seed(ksize))
    images[0, 0, :5, :5] = 1.0  # ties
    assert torch.equal(
        median_blur(images, ksize, method="network"), median_blur(images, ksize, method="unfold", chunk_pixels=100)
    )


# ----------------------------------------------------------------------------------------------
# Whole algorithm against OpenCV


@needs_opencv_tvl1
def test_short_run_matches_opencv_to_float_rounding():
    """Every stage, few iterations: the two implementations agree to float rounding."""
    frame0, frame1 = render_pair(48, rotation_flow(48, 3.0) + constant_flow(48, 1.0, -0.5))
    params = SHORT.replace(epsilon=0.0)
    ours = tvl1_flow(frame0[None], frame1[None], params)[0].numpy()
    assert mean_epe(ours, opencv_flow(frame0, frame1, params)) < 1e-3


@needs_opencv_tvl1
def test_default_params_agree_with_opencv_on_synthetic_motion():
    frame0, frame1 = render_pair(64, rotation_flow(64, 4.0) + constant_flow(64, 1.5, 0.5), seed=4)
    params = TVL1Params()
    ours = tvl1_flow(frame0[None], frame1[None], params)[0].numpy()
    theirs = opencv_flow(frame0, frame1, params)
    epe = np.linalg.norm(ours - theirs, axis=0)
    assert epe.mean() < 0.05
    assert (epe > 1.0).mean() < 0.01


@needs_opencv_tvl1
def test_illumination_term_matches_opencv():
    frame0, frame1 = render_pair(40, constant_flow(40, 1.0, 1.0), seed=5)
    params = SHORT.replace(gamma=0.5, epsilon=0.0)
    ours = tvl1_flow(frame0[None], frame1[None], params)[0].numpy()
    assert mean_epe(ours, opencv_flow(frame0, frame1, params)) < 1e-3


@needs_opencv_tvl1
@pytest.mark.skipif(not (MEDIA / "bikes.mp4").exists(), reason="real clips not present")
def test_real_pair_agrees_with_opencv():
    av = pytest.importorskip("av")
    frames = []
    with av.open(str(MEDIA / "bikes.mp4")) as container:
        for index, frame in enumerate(container.decode(video=0)):
            if index >= 40:
                frames.append(torch.from_numpy(frame.reformat(width=64, height=64, format="gray").to_ndarray()))
            if len(frames) == 2:
                break
    params = TVL1Params()
    ours = tvl1_flow(frames[0][None], frames[1][None], params)[0].numpy()
    theirs = opencv_flow(frames[0], frames[1], params)
    assert np.linalg.norm(theirs, axis=0).mean() > 0.2  # real motion, not a still
    epe = np.linalg.norm(ours - theirs, axis=0)
    assert epe.mean() < 0.1
    assert (epe > 1.0).mean() < 0.01


# ----------------------------------------------------------------------------------------------
# Known motion


def test_translation_recovered():
    truth = constant_flow(64, 2.0, -1.0)
    frame0, frame1 = render_pair(64, truth, seed=6)
    flow = tvl1_flow(frame0[None], frame1[None])[0]
    mean = interior(flow, 8).mean(dim=(1, 2))
    assert mean.tolist() == pytest.approx([2.0, -1.0], abs=0.05)
    assert interior((flow - truth).norm(dim=0), 8).mean() < 0.1


def test_rotation_recovered():
    truth = rotation_flow(64, 3.0)  # up to 2.3 px at the corners
    frame0, frame1 = render_pair(64, truth, seed=7)
    flow = tvl1_flow(frame0[None], frame1[None])[0]
    assert interior((flow - truth).norm(dim=0), 8).mean() < 0.1
    # the flow turns: x flow grows downwards, y flow grows rightwards
    assert interior(flow[0], 8)[-5:].mean() < -0.5 < 0.5 < interior(flow[0], 8)[:5].mean()


# ----------------------------------------------------------------------------------------------
# Batching, inputs, sequences


def three_pairs(size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = [
        render_pair(size, constant_flow(size, 1.5, -0.5), seed=10),
        render_pair(size, rotation_flow(size, 5.0), seed=11),
        render_pair(size, constant_flow(size, -0.7, 2.2), seed=12),
    ]
    return torch.stack([a for a, _ in pairs]), torch.stack([b for _, b in pairs])


@pytest.mark.parametrize(
    "params",
    [SHORT.replace(fixed_iterations=True), SHORT.replace(epsilon=0.05), TVL1Params(nscales=2, warps=2, epsilon=0.1)],
    ids=["fixed_iterations", "early_stop_short", "early_stop_default_iterations"],
)
def test_batch_equals_one_by_one(params):
    frames0, frames1 = three_pairs()
    batched = tvl1_flow(frames0, frames1, params)
    single = torch.cat([tvl1_flow(frames0[i : i + 1], frames1[i : i + 1], params) for i in range(3)])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=0)


def test_early_stop_is_per_sample():
    """A pair that converges at once (identical frames) must not change a slow one's result."""
    frames0, frames1 = three_pairs()
    still = frames1[:1]
    params = TVL1Params(nscales=2, warps=2, epsilon=0.05, check_every=3)
    mixed = tvl1_flow(torch.cat((still, frames0[1:2])), torch.cat((still, frames1[1:2])), params)
    alone = tvl1_flow(frames0[1:2], frames1[1:2], params)
    assert mixed[0].abs().max() == 0  # no motion found in a still pair
    torch.testing.assert_close(mixed[1:], alone, atol=1e-5, rtol=0)


def test_input_forms_and_output():
    frames0, frames1 = three_pairs()
    flow_u8 = tvl1_flow(frames0, frames1, SHORT)
    assert flow_u8.shape == (3, 2, 32, 32) and flow_u8.dtype == torch.float32 and flow_u8.device.type == "cpu"
    # (B,1,H,W) floats in [0, 1] are OpenCV's float convention: the same intensities x 255
    flow_float = tvl1_flow(frames0[:, None].double() / 255, frames1[:, None].float() / 255, SHORT)
    torch.testing.assert_close(flow_float, flow_u8, atol=1e-3, rtol=0)
    with pytest.raises(ValueError):
        tvl1_flow(frames0, frames1[:, :16], SHORT)
    with pytest.raises(ValueError):
        tvl1_flow(frames0[0], frames1[0], SHORT)  # (H,W): missing batch dimension
    with pytest.raises(TypeError):
        tvl1_flow(frames0.int(), frames1.int(), SHORT)


def test_non_square_and_small_frames():
    frame0, frame1 = render_pair(40, constant_flow(40, 1.0, 0.0), seed=13)
    flow = tvl1_flow(frame0[None, :24], frame1[None, :24], SHORT.replace(nscales=5))  # 24x40: 3 levels
    assert flow.shape == (1, 2, 24, 40) and torch.isfinite(flow).all()


def test_flow_for_frame_sequence():
    truth = constant_flow(32, 1.0, 0.5)
    frames = [render_pair(32, truth * k, seed=20)[0] for k in range(5)]  # frame k moved by k·truth
    clip = torch.stack(frames)
    flows = flow_for_frame_sequence(clip, "cpu", batch_size=3, params=SHORT)
    assert flows.shape == (4, 2, 32, 32) and flows.dtype == torch.float32
    torch.testing.assert_close(flows, tvl1_flow(clip[:-1], clip[1:], SHORT), atol=1e-5, rtol=0)
    assert flow_for_frame_sequence(clip[:1], "cpu", 4, SHORT).shape == (0, 2, 32, 32)


def test_params_validation():
    with pytest.raises(ValueError):
        TVL1Params(median_filtering=4)
    with pytest.raises(ValueError):
        TVL1Params(scale_step=1.0)
    assert TVL1Params().replace(warps=3).warps == 3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("compile,iteration", [(False, "torch"), (False, "triton"), (True, "triton")])
def test_cuda_matches_cpu(compile, iteration):
    frames0, frames1 = three_pairs(48)
    params = TVL1Params(nscales=3)
    cpu = tvl1_flow(frames0, frames1, params, compile=False)
    cuda = tvl1_flow(frames0.cuda(), frames1.cuda(), params, compile=compile, iteration=iteration)
    assert cuda.device.type == "cuda"
    # Float operation order differs (fused kernels): ~0.01 px mean was seen on real 128² pairs.
    assert (cuda.cpu() - cpu).norm(dim=1).mean() < 0.05


def test_lagged_convergence_checks_do_not_change_results(monkeypatch):
    """CUDA reads the count of converged samples one check late; emulate that on the CPU."""
    frames0, frames1 = three_pairs()
    params = TVL1Params(nscales=2, warps=2, epsilon=0.05, check_every=2)
    prompt = tvl1_flow(frames0, frames1, params)

    class Lagged(tvl1._ActiveCount):
        def __init__(self, device):
            super().__init__(device, lagged=True)

    monkeypatch.setattr(tvl1, "_ActiveCount", Lagged)
    torch.testing.assert_close(tvl1_flow(frames0, frames1, params), prompt, atol=1e-5, rtol=0)
