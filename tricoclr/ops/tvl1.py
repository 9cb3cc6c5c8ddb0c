"""TV-L1 optical flow (Zach, Pock & Bischof 2007) in PyTorch: batched, on any device.

This replicates OpenCV's ``cv2.optflow.DualTVL1OpticalFlow`` (the CPU path of opencv_contrib's
``modules/optflow/src/tvl1flow.cpp``, itself after Sánchez, Meinhardt-Llopis & Facciolo 2013), step
by step, so that flow prepared here is interchangeable with flow prepared by OpenCV:

* intensities on a 0..255 scale (uint8 as is; float inputs are taken to be in [0, 1] and scaled
  by 255, as OpenCV does);
* a pyramid of ``nscales`` levels, each level the previous one resized by ``scale_step`` with
  bilinear interpolation (``cv::resize``, ``INTER_LINEAR``, replicated border), stopping before a
  side drops under 16 px;
* per level: centred-difference gradients of the second image; ``warps`` times: the second image
  and its gradients warped by the current flow with bicubic interpolation (``cv::remap``,
  ``INTER_CUBIC``, zero outside the image; at the exact coordinate as OpenCV 5, or rounded to
  1/32 px as OpenCV 4.x with ``remap_subpixel_steps=32``); then up to
  ``outer_iterations`` rounds of [``median_filtering``×``median_filtering`` median filter of the
  flow, up to ``inner_iterations`` primal-dual iterations], stopped once the squared change of the
  flow summed over the image falls to ``epsilon² · area`` or below;
* the flow resized to the next finer level (bilinear) and scaled by ``1 / scale_step``.

Batch elements never interact: each sample has its own convergence flag, so the flow of a pair
does not depend on which other pairs share its batch (``fixed_iterations`` runs every iteration,
as a check of that property and for reproducible timing).

Convention (OpenCV's): ``flow[:, 0]`` is x, ``flow[:, 1]`` is y, in pixels, and
``frame0(p) ≈ frame1(p + flow(p))``.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "TVL1Params",
    "tvl1_flow",
    "flow_for_frame_sequence",
    "create_opencv_tvl1",
    "pyramid_sizes",
    "median_blur",
]

# OpenCV's bicubic kernel parameter (Keys' a); torch's bicubic uses the same value.
_CUBIC_A = -0.75
# std::numeric_limits<float>::epsilon(): OpenCV's threshold for "no image gradient here".
_FLT_EPSILON = 1.1920928955078125e-07
# cv::calc stops building the pyramid before a level with a side under this many pixels.
_MIN_PYRAMID_SIDE = 16


@dataclass(frozen=True)
class TVL1Params:
    """Parameters of TV-L1 flow; names and defaults mirror OpenCV's ``DualTVL1OpticalFlow``.

    OpenCV name in brackets where it differs. The last four fields are extensions:
    ``fixed_iterations`` disables the epsilon stopping rule (every iteration runs);
    ``remap_subpixel_steps`` selects how the warp samples the image: 0 at the exact coordinate
    as OpenCV 5 does, 32 at coordinates rounded to 1/32 px as OpenCV 4.x does. ``check_every``
    (iterations between the host's checks of which samples converged; 0: 1 on CPU, 5 elsewhere)
    and ``median_chunk_pixels`` (temporary memory of the unfold median) change speed only.
    """

    tau: float = 0.25  # time step of the dual update
    lambda_: float = 0.15  # [lambda] weight of the data term: smaller gives smoother flow
    theta: float = 0.3  # coupling between the TV and the data sub-problems
    nscales: int = 5  # [scalesNumber] pyramid levels
    warps: int = 5  # [warpingsNumber] re-linearisations of the data term per level
    epsilon: float = 0.01  # stop when the root-mean-square change of the flow is at most this
    inner_iterations: int = 30  # [innerIterations] primal-dual iterations between median filters
    outer_iterations: int = 10  # [outerIterations] rounds of median filter + inner iterations
    scale_step: float = 0.8  # [scaleStep] size ratio between consecutive pyramid levels
    gamma: float = 0.0  # weight of the illumination-change term (0: none, as OpenCV's default)
    median_filtering: int = 5  # [medianFiltering] median kernel side; 1 or less: no filtering
    fixed_iterations: bool = False
    remap_subpixel_steps: int = 0
    check_every: int = 0
    median_chunk_pixels: int = 1 << 22

    def __post_init__(self) -> None:
        if self.nscales < 1 or self.warps < 1:
            raise ValueError("nscales and warps must be at least 1")
        if not 0.0 < self.scale_step < 1.0:
            raise ValueError("scale_step must be in (0, 1)")
        if self.median_filtering > 1 and self.median_filtering % 2 == 0:
            raise ValueError("median_filtering must be odd (OpenCV supports 3 and 5 for float)")
        if self.check_every < 0:
            raise ValueError("check_every must be non-negative")

    def replace(self, **changes) -> TVL1Params:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)


def create_opencv_tvl1(params: TVL1Params | None = None):
    """OpenCV's ``DualTVL1OpticalFlow`` with the same parameters (needs opencv-contrib)."""
    import cv2  # optional dependency: only the reference implementation needs it

    p = params or TVL1Params()
    return cv2.optflow.DualTVL1OpticalFlow_create(
        p.tau,
        p.lambda_,
        p.theta,
        p.nscales,
        p.warps,
        p.epsilon,
        p.inner_iterations,
        p.outer_iterations,
        p.scale_step,
        p.gamma,
        p.median_filtering,
        False,
    )


# --------------------------------------------------------------------------------------------
# Input handling and pyramid


def _as_intensity_batch(frames: torch.Tensor) -> torch.Tensor:
    """(B,H,W) or (B,1,H,W) uint8 / float in [0,1] -> (B,1,H,W) float32 on a 0..255 scale."""
    if frames.dim() == 3:
        frames = frames.unsqueeze(1)
    if frames.dim() != 4 or frames.shape[1] != 1:
        raise ValueError(f"expected grayscale frames (B,H,W) or (B,1,H,W), got {tuple(frames.shape)}")
    if frames.dtype == torch.uint8:
        return frames.float()
    if frames.is_floating_point():
        return frames.float() * 255.0  # OpenCV scales float input by 255 too
    raise TypeError(f"frames must be uint8 or floating point, not {frames.dtype}")


def _opencv_round(x: float) -> int:
    """cvRound of a double: round half to even, as Python's round."""
    return int(round(x))


def pyramid_sizes(height: int, width: int, nscales: int, scale_step: float) -> list[tuple[int, int]]:
    """Sizes (H, W) of the pyramid levels, finest first, as OpenCV's DualTVL1 builds them."""
    sizes = [(height, width)]
    for _ in range(1, nscales):
        h, w = sizes[-1]
        next_size = (_opencv_round(h * scale_step), _opencv_round(w * scale_step))
        if min(next_size) < _MIN_PYRAMID_SIDE:
            break
        sizes.append(next_size)
    return sizes


def _linear_taps(n_in: int, n_out: int, src_per_dst: float, device: torch.device):
    """Indices and weights of cv::resize INTER_LINEAR along one axis (border replicated).

    ``src_per_dst`` is OpenCV's ``scale_x``: 1/fx when the size comes from a scale factor,
    n_in/n_out when the output size is given.
    """
    dst = torch.arange(n_out, dtype=torch.float64)
    src = ((dst + 0.5) * src_per_dst - 0.5).float()  # OpenCV computes in double, stores float
    left = torch.floor(src)
    frac = src - left
    before_first = left < 0
    past_last = left >= n_in - 1
    left = torch.where(before_first, 0.0, torch.where(past_last, float(n_in - 1), left))
    frac = torch.where(before_first | past_last, 0.0, frac)
    left = left.long()
    right = (left + 1).clamp(max=n_in - 1)
    return left.to(device), right.to(device), (1.0 - frac).to(device), frac.to(device)


def _resize_bilinear(images: torch.Tensor, size: tuple[int, int], src_per_dst: tuple[float, float]) -> torch.Tensor:
    """cv::resize(INTER_LINEAR) of (B,C,H,W) float images: horizontal pass, then vertical."""
    _, _, height, width = images.shape
    x0, x1, wx0, wx1 = _linear_taps(width, size[1], src_per_dst[1], images.device)
    rows = images.index_select(3, x0) * wx0 + images.index_select(3, x1) * wx1
    y0, y1, wy0, wy1 = _linear_taps(height, size[0], src_per_dst[0], images.device)
    return rows.index_select(2, y0) * wy0[:, None] + rows.index_select(2, y1) * wy1[:, None]


def _downscale(images: torch.Tensor, size: tuple[int, int], scale_step: float) -> torch.Tensor:
    """One pyramid step: cv::resize(src, dst, Size(), scale_step, scale_step, INTER_LINEAR)."""
    return _resize_bilinear(images, size, (1.0 / scale_step, 1.0 / scale_step))


def _resize_to(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """cv::resize(src, dst, size, 0, 0, INTER_LINEAR): the scale follows from the two sizes."""
    height, width = images.shape[-2:]
    return _resize_bilinear(images, size, (1.0 / (size[0] / height), 1.0 / (size[1] / width)))


# --------------------------------------------------------------------------------------------
# Image operations used once per warp


def _centered_gradient(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Central differences; at the border OpenCV halves the one-sided difference, which is the
    central difference of the image with its border replicated."""
    padded = F.pad(images, (1, 1, 1, 1), mode="replicate")
    dx = 0.5 * (padded[..., 1:-1, 2:] - padded[..., 1:-1, :-2])
    dy = 0.5 * (padded[..., 2:, 1:-1] - padded[..., :-2, 1:-1])
    return dx, dy


def _cubic_coefficients(frac: torch.Tensor) -> list[torch.Tensor]:
    """OpenCV's interpolateCubic: weights of the taps at -1, 0, 1, 2 for a fraction in [0, 1)."""
    a = _CUBIC_A
    x1 = frac + 1.0
    c0 = ((a * x1 - 5.0 * a) * x1 + 8.0 * a) * x1 - 4.0 * a
    c1 = ((a + 2.0) * frac - (a + 3.0)) * frac * frac + 1.0
    rest = 1.0 - frac
    c2 = ((a + 2.0) * rest - (a + 3.0)) * rest * rest + 1.0
    return [c0, c1, c2, 1.0 - c0 - c1 - c2]


def _subpixel_split(coords: torch.Tensor, subpixel_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer part and fraction of sampling coordinates.

    OpenCV 5's remap interpolates at the exact float coordinate (``subpixel_steps=0``); OpenCV
    4.x rounds map coordinates to 1/32 px first (``subpixel_steps=32``).
    """
    # The clamp only keeps diverged coordinates from overflowing; they sample zeros anyway.
    coords = coords.clamp(-(1 << 20), 1 << 20)
    if subpixel_steps > 0:
        coords = torch.round(coords * subpixel_steps) / subpixel_steps
    whole = torch.floor(coords)
    return whole.long(), coords - whole


def remap_cubic(
    images: torch.Tensor, map_x: torch.Tensor, map_y: torch.Tensor, subpixel_steps: int = 0
) -> torch.Tensor:
    """cv::remap(images, map_x, map_y, INTER_CUBIC, BORDER_CONSTANT, 0) of (B,C,H,W) floats.

    Samples images at (map_x, map_y) (each (B,H,W), absolute pixel coordinates); taps outside
    the image count as zero.
    """
    batch, channels, height, width = images.shape
    x0, fx = _subpixel_split(map_x, subpixel_steps)
    y0, fy = _subpixel_split(map_y, subpixel_steps)
    wx = _cubic_coefficients(fx)
    wy = _cubic_coefficients(fy)
    flat = images.reshape(batch, channels, height * width)
    out = torch.zeros_like(flat)
    for i in range(4):
        row = y0 + (i - 1)
        row_ok = (row >= 0) & (row < height)
        row_offset = row.clamp(0, height - 1) * width
        for j in range(4):
            col = x0 + (j - 1)
            valid = row_ok & (col >= 0) & (col < width)
            index = (row_offset + col.clamp(0, width - 1)).reshape(batch, 1, -1)
            taps = flat.gather(2, index.expand(batch, channels, -1))
            weight = (wy[i] * wx[j] * valid).reshape(batch, 1, -1)
            out = out + taps * weight
    return out.reshape(batch, channels, height, width)


# --------------------------------------------------------------------------------------------
# Median filter


@functools.cache
def _median_selection_ops(count: int) -> tuple[tuple[str, int, int, int], ...]:
    """A min/max program that computes the median of ``count`` values (count odd).

    Batcher's odd-even merge sort on the next power of two, padded with +inf, keeping only the
    comparators (and of each only the min or max half) that the middle output depends on.
    Returns ops (kind, out, a, b): value[out] = kind(value[a], value[b]); values 0..count-1 are
    the inputs; the last op's out is the median.
    """
    size = 1
    while size < count:
        size *= 2
    comparators = []

    def merge(lo: int, n: int, r: int) -> None:
        step = r * 2
        if step < n:
            merge(lo, n, step)
            merge(lo + r, n, step)
            for i in range(lo + r, lo + n - r, step):
                comparators.append((i, i + r))
        else:
            comparators.append((lo, lo + r))

    def sort(lo: int, n: int) -> None:
        if n > 1:
            half = n // 2
            sort(lo, half)
            sort(lo + half, half)
            merge(lo, n, 1)

    sort(0, size)
    infinity = -1
    wires = list(range(count)) + [infinity] * (size - count)
    nodes: list[tuple[str, int, int]] = []  # symbolic values after the inputs
    for i, j in comparators:
        a, b = wires[i], wires[j]
        if b == infinity:
            continue  # min(a, inf) = a stays low, inf stays high
        if a == infinity:
            wires[i], wires[j] = b, a
            continue
        nodes.append(("min", a, b))
        wires[i] = count + len(nodes) - 1
        nodes.append(("max", a, b))
        wires[j] = count + len(nodes) - 1
    target = wires[count // 2]
    needed = {target}
    for index in range(len(nodes) - 1, -1, -1):
        if count + index in needed:
            needed.update(nodes[index][1:])
    return tuple((kind, count + index, a, b) for index, (kind, a, b) in enumerate(nodes) if count + index in needed)


def _median_blur_network(images: torch.Tensor, ksize: int, ops: tuple[tuple[str, int, int, int], ...]) -> torch.Tensor:
    """Median by a selection network (``ops`` from _median_selection_ops) of elementwise min/max
    on shifted views; under torch.compile this fuses into one kernel."""
    height, width = images.shape[-2:]
    radius = ksize // 2
    padded = F.pad(images, (radius, radius, radius, radius), mode="replicate")
    values: dict[int, torch.Tensor] = {}
    for dy in range(ksize):
        for dx in range(ksize):
            values[dy * ksize + dx] = padded[..., dy : dy + height, dx : dx + width]
    for kind, out, a, b in ops:
        values[out] = torch.minimum(values[a], values[b]) if kind == "min" else torch.maximum(values[a], values[b])
    return values[ops[-1][1]].contiguous() if ops else images.clone()


def _median_blur_unfold(images: torch.Tensor, ksize: int, chunk_pixels: int) -> torch.Tensor:
    """Median over ksize×ksize windows via unfold, in chunks of the batch to bound memory."""
    batch, channels, height, width = images.shape
    radius = ksize // 2
    per_sample = channels * height * width * ksize * ksize
    chunk = max(1, chunk_pixels * 8 // per_sample)  # about chunk_pixels*8 window values at a time
    outputs = []
    for start in range(0, batch, chunk):
        padded = F.pad(images[start : start + chunk], (radius, radius, radius, radius), mode="replicate")
        windows = padded.unfold(2, ksize, 1).unfold(3, ksize, 1)  # (b, C, H, W, k, k) view
        outputs.append(windows.reshape(*windows.shape[:4], ksize * ksize).median(dim=-1).values)
    return torch.cat(outputs)


def median_blur(images: torch.Tensor, ksize: int, method: str = "unfold", chunk_pixels: int = 1 << 22) -> torch.Tensor:
    """cv::medianBlur of float (B,C,H,W) images with an odd ``ksize``, border replicated.

    ``method``: "unfold" (gathers windows, torch.median) or "network" (min/max selection network).
    Both give identical results.
    """
    if ksize % 2 == 0 or ksize < 1:
        raise ValueError("ksize must be odd and positive")
    if ksize == 1:
        return images.clone()
    if method == "network":
        return _median_blur_network(images, ksize, _median_selection_ops(ksize * ksize))
    if method == "unfold":
        return _median_blur_unfold(images, ksize, chunk_pixels)
    raise ValueError(f"unknown median method {method!r}")


# --------------------------------------------------------------------------------------------
# The primal-dual iteration


def _forward_differences(field: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward differences with zero at the last column / row (OpenCV's forwardGradient)."""
    dx = F.pad(field[..., :, 1:] - field[..., :, :-1], (0, 1, 0, 0))
    dy = F.pad(field[..., 1:, :] - field[..., :-1, :], (0, 0, 0, 1))
    return dx, dy


def _divergence(px: torch.Tensor, py: torch.Tensor) -> torch.Tensor:
    """Backward-difference divergence, the dual field taken as zero before the first row/column
    (OpenCV's divergence)."""
    return px - F.pad(px[..., :, :-1], (1, 0, 0, 0)) + py - F.pad(py[..., :-1, :], (0, 0, 1, 0))


def primal_dual_step(
    u: torch.Tensor,
    p: torch.Tensor,
    image_grad: torch.Tensor,
    grad_sq: torch.Tensor,
    rho_c: torch.Tensor,
    active: torch.Tensor,
    l_t: float,
    theta: float,
    taut: float,
    scaled_epsilon: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One TV-L1 iteration (OpenCV's estimateV, divergence, estimateU, forwardGradient,
    estimateDualVariables), for the samples still ``active``.

    u: (B,K,H,W) flow components (K=3 with the illumination term); p: (B,K,2,H,W) dual fields;
    image_grad: (B,K,H,W) the warped image gradient (and gamma as third component);
    grad_sq, rho_c: (B,1,H,W); active: (B,) bool. Returns the new (u, p, active): a sample
    stays active while the squared change of its flow exceeds ``scaled_epsilon``.
    """
    # Thresholding step: the point-wise minimiser v of the linearised data term.
    rho = rho_c + (image_grad * u).sum(dim=1, keepdim=True)
    has_gradient = grad_sq > _FLT_EPSILON
    inside = -rho / torch.where(has_gradient, grad_sq, torch.ones_like(grad_sq))
    step = torch.where(
        rho < -l_t * grad_sq,
        l_t,
        torch.where(rho > l_t * grad_sq, -l_t, torch.where(has_gradient, inside, 0.0)),
    )
    v = u + step * image_grad

    # Primal step: u = v + theta * div(p).
    u_new = v + theta * _divergence(p[:, :, 0], p[:, :, 1])
    change = (u_new - u).square().flatten(1).sum(dim=1)

    # Dual step: projected gradient ascent on p.
    ux, uy = _forward_differences(u_new)
    norm = 1.0 + taut * torch.hypot(ux, uy)
    p_new = (p + taut * torch.stack((ux, uy), dim=2)) / norm.unsqueeze(2)

    keep = active.view(-1, 1, 1, 1)
    u_out = torch.where(keep, u_new, u)
    p_out = torch.where(keep.unsqueeze(-1), p_new, p)
    return u_out, p_out, active & (change > scaled_epsilon)


def primal_dual_steps(
    count: int,
    u: torch.Tensor,
    p: torch.Tensor,
    image_grad: torch.Tensor,
    grad_sq: torch.Tensor,
    rho_c: torch.Tensor,
    active: torch.Tensor,
    l_t: float,
    theta: float,
    taut: float,
    scaled_epsilon: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``count`` consecutive primal_dual_step calls (one compiled graph when compiled)."""
    for _ in range(count):
        u, p, active = primal_dual_step(u, p, image_grad, grad_sq, rho_c, active, l_t, theta, taut, scaled_epsilon)
    return u, p, active


@dataclass
class _Kernels:
    """The functions run per warp and per iteration, eager or through torch.compile."""

    steps: Callable  # see primal_dual_steps
    median: Callable  # (images, ksize) -> images
    data_term: Callable  # see _warped_data_term


@functools.cache
def _kernels(compiled: bool, median_method: str, iteration: str) -> _Kernels:
    if iteration == "triton":
        from tricoclr.ops.tvl1_triton import primal_dual_steps_triton as steps
    else:
        steps = primal_dual_steps
    if not compiled:
        return _Kernels(
            steps=steps,
            median=functools.partial(median_blur, method=median_method),
            data_term=_warped_data_term,
        )
    # Shapes change with the pyramid level and the working set: compile for symbolic shapes at
    # once rather than specialise first and recompile (each compilation costs seconds).
    compile_fn = functools.partial(torch.compile, dynamic=True, fullgraph=True)
    network = compile_fn(_median_blur_network)

    def median(images: torch.Tensor, ksize: int) -> torch.Tensor:
        return network(images, ksize, _median_selection_ops(ksize * ksize))

    if iteration == "torch":
        steps = compile_fn(primal_dual_steps)
    return _Kernels(steps=steps, median=median, data_term=compile_fn(_warped_data_term))


def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _triton_interpreting() -> bool:
    """Triton's CPU interpreter is on (it must be before tvl1_triton is imported)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _choose_iteration(iteration: str | None, device: torch.device, params: TVL1Params) -> str:
    """ "triton" or "torch": None picks Triton on CUDA where it can run (gamma = 0)."""
    if iteration is None:
        usable = device.type == "cuda" and params.gamma == 0.0 and _triton_installed()
        return "triton" if usable else "torch"
    if iteration not in ("torch", "triton"):
        raise ValueError(f"iteration must be 'torch' or 'triton', not {iteration!r}")
    if iteration == "triton":
        if params.gamma != 0.0:
            raise ValueError("the Triton iteration implements gamma = 0 only (OpenCV's default); use iteration='torch'")
        if not _triton_installed():
            raise RuntimeError("the Triton iteration needs Triton installed (it comes with torch's Linux wheels)")
        if device.type != "cuda" and not _triton_interpreting():
            raise RuntimeError(
                f"the Triton iteration runs on CUDA tensors, not {device.type} "
                "(set TRITON_INTERPRET=1 to interpret it on the CPU)"
            )
    return iteration


# --------------------------------------------------------------------------------------------
# One pyramid level


def _warped_data_term(I0: torch.Tensor, I1_and_grad: torch.Tensor, u: torch.Tensor, gamma: float, subpixel_steps: int):
    """Warp I1 and its gradient by the flow; return (image_grad, |grad|², rho_c) of the
    linearised data term rho(u) = rho_c + grad·u (OpenCV's remap + calcGradRho)."""
    batch, _, height, width = I0.shape
    ys = torch.arange(height, device=I0.device, dtype=torch.float32).view(1, height, 1)
    xs = torch.arange(width, device=I0.device, dtype=torch.float32).view(1, 1, width)
    warped = remap_cubic(I1_and_grad, xs + u[:, 0], ys + u[:, 1], subpixel_steps)
    I1w, I1wx, I1wy = warped[:, 0:1], warped[:, 1:2], warped[:, 2:3]
    grad_sq = I1wx * I1wx + I1wy * I1wy
    rho_c = I1w - I1wx * u[:, 0:1] - I1wy * u[:, 1:2] - I0
    parts = [I1wx, I1wy]
    if gamma != 0.0:
        parts.append(torch.full_like(I1wx, gamma))
    return torch.cat(parts, dim=1), grad_sq, rho_c


class _WorkingSet:
    """The samples of a batch still iterating within one warp, gathered into dense tensors.

    Converged samples are frozen by their flags anyway; dropping them from the tensors (when
    few enough remain) only saves the work of carrying them along. Results never depend on it.
    """

    def __init__(self, u: torch.Tensor, p: torch.Tensor, data_term: tuple[torch.Tensor, ...]):
        self.full_u, self.full_p = u, p
        self.index: torch.Tensor | None = None  # None: every sample of the batch
        self.u, self.p, self.data_term = u, p, data_term
        self.active = torch.ones(u.shape[0], dtype=torch.bool, device=u.device)

    def _write_back(self) -> None:
        if self.index is None:
            self.full_u, self.full_p = self.u, self.p
        else:
            self.full_u = self.full_u.index_copy(0, self.index, self.u)
            self.full_p = self.full_p.index_copy(0, self.index, self.p)

    def shrink(self) -> None:
        """Keep only the active samples (and a frozen one rather than a set of one: compiled
        code specialises on size-1 dimensions, which would cost a recompilation)."""
        self._write_back()
        keep = self.active.nonzero().squeeze(1)
        if keep.numel() == 1 and self.active.numel() > 1:
            keep = torch.cat((keep, (keep + 1) % self.active.numel()))
        self.index = keep if self.index is None else self.index[keep]
        self.u, self.p = self.u[keep], self.p[keep]
        self.data_term = tuple(t[keep] for t in self.data_term)
        self.active = self.active[keep]

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        self._write_back()
        return self.full_u, self.full_p


class _ActiveCount:
    """How many samples are still iterating, read by the host without stalling the device.

    Lagged (the default on CUDA): the count taken at a check is copied to pinned memory behind
    an event and read at the next check, by which time the device is already running the
    iterations queued since. Otherwise it is read at once. A count one check old is an upper
    bound of the current one, and acting on it late is still exact: converged samples are
    frozen by their own flags.
    """

    def __init__(self, device: torch.device, lagged: bool | None = None):
        self.cuda = device.type == "cuda"
        self.lagged = self.cuda if lagged is None else lagged
        self.pending: tuple[torch.Tensor, object] | None = None

    def _read_pending(self) -> int | None:
        if self.pending is None:
            return None
        value, event = self.pending
        if event is not None:
            event.synchronize()
        return int(value)

    def update(self, active: torch.Tensor) -> int | None:
        """Record the count of ``active``; return the count to act on (None: none yet)."""
        previous = self._read_pending() if self.lagged else None
        count = active.sum()
        if self.cuda:
            host = torch.empty((), dtype=count.dtype, pin_memory=True)
            host.copy_(count, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self.pending = (host, event)
        else:
            self.pending = (count, None)
        return previous if self.lagged else self._read_pending()


def _median_filter_active(u: torch.Tensor, active: torch.Tensor, ksize: int, kernels: _Kernels) -> torch.Tensor:
    """Median-filter the displacement components (not the illumination term, as OpenCV) of the
    active samples."""
    filtered = kernels.median(u[:, :2].contiguous(), ksize)
    filtered = torch.where(active.view(-1, 1, 1, 1), filtered, u[:, :2])
    return filtered if u.shape[1] == 2 else torch.cat((filtered, u[:, 2:]), dim=1)


def _solve_level(
    I0: torch.Tensor, I1: torch.Tensor, u: torch.Tensor, params: TVL1Params, kernels: _Kernels
) -> torch.Tensor:
    """Refine the flow u (B,K,H,W) at one pyramid level (OpenCV's procOneScale)."""
    batch, components, height, width = u.shape
    I1x, I1y = _centered_gradient(I1)
    I1_and_grad = torch.cat((I1, I1x, I1y), dim=1)
    # The dual fields persist across the warps of a level, as in OpenCV.
    p = torch.zeros(batch, components, 2, height, width, device=u.device, dtype=u.dtype)
    constants = dict(
        l_t=float(params.lambda_ * params.theta),
        theta=float(params.theta),
        taut=float(params.tau / params.theta),
        # OpenCV compares a float sum with float(epsilon² · area); -1: never converged.
        scaled_epsilon=-1.0
        if params.fixed_iterations
        else float(torch.tensor(params.epsilon**2 * height * width, dtype=torch.float32)),
    )
    check_every = params.check_every or (1 if u.device.type == "cpu" else 5)
    for _ in range(params.warps):
        data_term = kernels.data_term(I0, I1_and_grad, u, params.gamma, params.remap_subpixel_steps)
        work = _WorkingSet(u, p, data_term)
        counter = _ActiveCount(u.device)
        iterations = 0
        for _ in range(params.outer_iterations):
            if work.u.shape[0] == 0:
                break
            if params.median_filtering > 1:
                work.u = _median_filter_active(work.u, work.active, params.median_filtering, kernels)
            done = 0
            while done < params.inner_iterations:
                # Iterations run in chunks that end at the checks: one call, one compiled graph.
                count = min(check_every - iterations % check_every, params.inner_iterations - done)
                work.u, work.p, work.active = kernels.steps(
                    count, work.u, work.p, *work.data_term, work.active, **constants
                )
                done += count
                iterations += count
                if params.fixed_iterations or iterations % check_every:
                    continue
                # Drop converged samples once a quarter of them are; stop when none is left.
                remaining = counter.update(work.active)
                if remaining is not None and remaining <= 0.75 * work.u.shape[0]:
                    work.shrink()
                    if work.u.shape[0] == 0:
                        break
        u, p = work.result()
    return u


# --------------------------------------------------------------------------------------------
# Public entry points


def tvl1_flow(
    frame0: torch.Tensor,
    frame1: torch.Tensor,
    params: TVL1Params | None = None,
    *,
    compile: bool | None = None,
    median_method: str | None = None,
    iteration: str | None = None,
) -> torch.Tensor:
    """TV-L1 optical flow from frame0 to frame1 for a batch of grayscale pairs.

    frame0, frame1: (B,H,W) or (B,1,H,W), uint8 (0..255) or float (0..1, scaled by 255 as
    OpenCV does), on any device. Returns (B,2,H,W) float32 on the same device: x then y
    displacement in pixels with frame0(p) ≈ frame1(p + flow(p)).

    ``compile`` runs the warp, the iteration and the median filter through torch.compile: several
    times faster, after a one-off compilation of about a minute per process (Triton on GPU, a C++
    compiler on CPU); None (default) compiles on CUDA only. Compiled and eager results agree.
    ``median_method`` ("unfold" or "network") picks the eager median implementation; both are
    exact. ``iteration`` runs the primal-dual iteration as torch operations ("torch") or as one
    fused Triton kernel ("triton", ``tvl1_triton``: 2.2x the pairs/s on an H200; gamma = 0
    only); None (default) picks Triton on CUDA when it is installed. Both agree to float
    rounding.
    """
    params = params or TVL1Params()
    I0 = _as_intensity_batch(frame0)
    I1 = _as_intensity_batch(frame1.to(frame0.device))
    if I0.shape != I1.shape:
        raise ValueError(f"frame shapes differ: {tuple(I0.shape)} vs {tuple(I1.shape)}")
    batch, _, height, width = I0.shape
    if height < 3 or width < 3:
        raise ValueError("frames must be at least 3x3")
    if median_method is None:
        median_method = "network" if I0.device.type == "cuda" else "unfold"
    if compile is None:
        compile = I0.device.type == "cuda"
    kernels = _kernels(bool(compile), median_method, _choose_iteration(iteration, I0.device, params))
    components = 3 if params.gamma != 0.0 else 2

    with torch.no_grad():
        sizes = pyramid_sizes(height, width, params.nscales, params.scale_step)
        pyramid = [(I0, I1)]
        for size in sizes[1:]:
            prev0, prev1 = pyramid[-1]
            pyramid.append((_downscale(prev0, size, params.scale_step), _downscale(prev1, size, params.scale_step)))

        coarsest = sizes[-1]
        u = torch.zeros(batch, components, *coarsest, device=I0.device, dtype=torch.float32)
        for level in range(len(sizes) - 1, -1, -1):
            level0, level1 = pyramid[level]
            u = _solve_level(level0, level1, u, params, kernels)
            if level > 0:
                u = _resize_to(u, sizes[level - 1])
                # Displacements grow with the image; the illumination term (u3) does not.
                u = torch.cat((u[:, :2] * (1.0 / params.scale_step), u[:, 2:]), dim=1)
        return u[:, :2].contiguous()


def flow_for_frame_sequence(
    gray_frames: torch.Tensor,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
    params: TVL1Params | None = None,
    *,
    compile: bool | None = None,
) -> torch.Tensor:
    """TV-L1 flow between consecutive frames of one clip: N frames give N-1 fields.

    gray_frames: (N,H,W) uint8 on any device. Pairs (i, i+1) go through ``device`` in batches of
    ``batch_size`` pairs (``compile`` as in tvl1_flow). Returns (N-1,2,H,W) float32 on the CPU.
    """
    if gray_frames.dim() != 3:
        raise ValueError(f"expected (N,H,W) frames, got {tuple(gray_frames.shape)}")
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    count, height, width = gray_frames.shape
    pairs = max(count - 1, 0)
    out = torch.empty(pairs, 2, height, width, dtype=torch.float32)
    device = torch.device(device)
    for start in range(0, pairs, batch_size):
        stop = min(start + batch_size, pairs)
        # Frames start..stop travel once; pairs are views of them on the device.
        frames = gray_frames[start : stop + 1].to(device, non_blocking=True)
        out[start:stop] = tvl1_flow(frames[:-1], frames[1:], params, compile=compile).cpu()
    return out
