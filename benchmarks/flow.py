"""Benchmark of optical flow for data preparation: TV-L1 in PyTorch against OpenCV.

Measures, at each size (square frames):
* pairs per second: OpenCV DualTVL1 and Farneback on one CPU core, tricoclr's TV-L1 on the CPU
  (eager, torch's thread count) and on CUDA when available (large batches, after warm-up);
* agreement with OpenCV DualTVL1 (same, default parameters) at 128x128 on real clips: mean
  end-point difference and the fraction of pixels differing by more than 1 px;
* error against ground truth on synthesized motion (known flow) for both implementations.

    python benchmarks/flow.py --json out/flow.json                      # CPU machine
    python benchmarks/flow.py --json out/flow.json --reference-out out/flow_ref.npz
    python benchmarks/flow.py --json gpu.json --device cuda --reference out/flow_ref.npz

Where OpenCV or PyAV is missing (a GPU machine, say), ``--reference FILE`` supplies the frames,
OpenCV's flows and OpenCV's timings saved by ``--reference-out`` on a machine that has them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tricoclr.ops.tvl1 import TVL1Params, create_opencv_tvl1, tvl1_flow  # noqa: E402

CLIPS = ("bigbuckbunny.mp4", "bikes.mp4", "cityCC0.mpg", "sample.oggtheora")
EPE_SIZE = 128
EPE_START_FRAME = 30  # past fades and titles
EPE_PAIRS_PER_CLIP = 5
TIMING_FRAMES_PER_CLIP = 48
GT_BORDER = 10  # px excluded from ground-truth errors: content there enters from outside the view


try:  # optional: absent on accelerator machines
    import cv2
except ImportError:  # pragma: no cover - depends on the machine
    cv2 = None
try:
    import av
except ImportError:  # pragma: no cover
    av = None


def has_opencv_tvl1() -> bool:
    return cv2 is not None and hasattr(cv2, "optflow")


# ---------------------------------------------------------------------------------------------
# Data


def decode_gray(path: Path, size: int, start: int, count: int) -> np.ndarray:
    """``count`` consecutive frames from ``start`` as (count, size, size) uint8, squashed to a
    square (as the paper's 128x128) by the decoder's scaler."""
    frames = []
    with av.open(str(path)) as container:
        for index, frame in enumerate(container.decode(video=0)):
            if index < start:
                continue
            frames.append(frame.reformat(width=size, height=size, format="gray").to_ndarray())
            if len(frames) == count:
                break
    if len(frames) < count:  # short clip: take its last frames instead
        return decode_gray(path, size, max(0, start - (count - len(frames))), count)
    return np.stack(frames)


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B,1,H,W), reflected border."""
    radius = int(math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = (kernel / kernel.sum()).float()
    images = F.conv2d(F.pad(images, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
    return F.conv2d(F.pad(images, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1))


def synthetic_motions(size: int) -> list[tuple[str, torch.Tensor]]:
    """Known flow fields (2,H,W): translations, rotation, zoom, an affine mix, a smooth field."""
    ys, xs = torch.meshgrid(
        torch.arange(size, dtype=torch.float64), torch.arange(size, dtype=torch.float64), indexing="ij"
    )
    c = (size - 1) / 2.0
    dx, dy = xs - c, ys - c

    def affine(a11, a12, a21, a22, tx, ty):
        return torch.stack((a11 * dx + a12 * dy + tx - dx, a21 * dx + a22 * dy + ty - dy))

    angle = math.radians(4.0)
    cos, sin = math.cos(angle), math.sin(angle)
    generator = torch.Generator().manual_seed(7)
    field = gaussian_blur(torch.randn(2, 1, size, size, generator=generator), sigma=size / 6.0)[:, 0].double()
    field = field * (3.0 / field.abs().max())
    return [
        ("translate_small", affine(1, 0, 0, 1, 2.3, -1.4)),
        ("translate_large", affine(1, 0, 0, 1, -6.5, 4.0)),
        ("rotate_4deg", affine(cos, -sin, sin, cos, 0, 0)),
        ("zoom_1.05", affine(1.05, 0, 0, 1.05, 0, 0)),
        ("affine_mix", affine(1.02, 0.03, -0.02, 0.99, 1.5, 1.0)),
        ("smooth_field_3px", field),
    ]


def synthesize_pairs(size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Frame pairs with known flow: frame1 is a smooth random texture, frame0(p) = frame1(p +
    flow(p)) sampled (bicubic) from a texture larger than the view. Returns uint8 frame0,
    frame1 (N,H,W), float32 flow (N,2,H,W) and the motion names."""
    margin = 16
    motions = synthetic_motions(size)
    generator = torch.Generator().manual_seed(seed)
    frames0, frames1, flows = [], [], []
    big = size + 2 * margin
    for _, flow in motions:
        noise = torch.randn(1, 1, big, big, generator=generator)
        # Fine and coarse structure: coarse enough for the pyramid to catch the large motions.
        texture = gaussian_blur(noise, 2.5) + 0.5 * gaussian_blur(torch.randn(1, 1, big, big, generator=generator), 6.0)
        texture = (texture - texture.mean()) / texture.std() * 40.0 + 128.0
        ys, xs = torch.meshgrid(
            torch.arange(size, dtype=torch.float64), torch.arange(size, dtype=torch.float64), indexing="ij"
        )
        sample_x = xs + flow[0] + margin
        sample_y = ys + flow[1] + margin
        grid = torch.stack((sample_x / (big - 1) * 2 - 1, sample_y / (big - 1) * 2 - 1), dim=-1)[None].float()
        frame0 = F.grid_sample(texture, grid, mode="bicubic", align_corners=True)[0, 0]
        frame1 = texture[0, 0, margin : margin + size, margin : margin + size]
        frames0.append(frame0.round().clamp(0, 255).to(torch.uint8).numpy())
        frames1.append(frame1.round().clamp(0, 255).to(torch.uint8).numpy())
        flows.append(flow.float().numpy())
    return np.stack(frames0), np.stack(frames1), np.stack(flows), [name for name, _ in motions]


def timing_pairs(frames_by_clip: list[np.ndarray], count: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` distinct-ish real pairs: consecutive frames of each clip, and as many flipped and
    transposed copies as needed (they converge differently, as distinct videos would)."""
    first = np.concatenate([clip[:-1] for clip in frames_by_clip])
    second = np.concatenate([clip[1:] for clip in frames_by_clip])
    variants = [lambda a: a, lambda a: a[:, :, ::-1], lambda a: a[:, ::-1, :], lambda a: a.transpose(0, 2, 1)]
    f0 = np.concatenate([v(first) for v in variants])
    f1 = np.concatenate([v(second) for v in variants])
    repeats = -(-count // len(f0))
    return np.ascontiguousarray(np.tile(f0, (repeats, 1, 1))[:count]), np.ascontiguousarray(
        np.tile(f1, (repeats, 1, 1))[:count]
    )


# ---------------------------------------------------------------------------------------------
# Flow methods


def opencv_tvl1(frames0: np.ndarray, frames1: np.ndarray, params: TVL1Params) -> np.ndarray:
    """OpenCV DualTVL1 flows (N,2,H,W), one pair at a time on the calling thread."""
    algorithm = create_opencv_tvl1(params)
    return np.stack([algorithm.calc(a, b, None).transpose(2, 0, 1) for a, b in zip(frames0, frames1)])


def opencv_farneback(frame0: np.ndarray, frame1: np.ndarray) -> np.ndarray:
    """Farneback with the parameters of OpenCV's own sample (pyr 0.5, 3 levels, window 15)."""
    return cv2.calcOpticalFlowFarneback(frame0, frame1, None, 0.5, 3, 15, 3, 5, 1.2, 0)


def torch_tvl1(
    frames0: np.ndarray,
    frames1: np.ndarray,
    device: str,
    params: TVL1Params,
    batch: int,
    compile: bool | None,
    iteration: str | None = None,
) -> np.ndarray:
    """tricoclr's TV-L1 flows (N,2,H,W) computed on ``device`` in batches."""
    out = []
    for start in range(0, len(frames0), batch):
        f0 = torch.from_numpy(frames0[start : start + batch]).to(device)
        f1 = torch.from_numpy(frames1[start : start + batch]).to(device)
        out.append(tvl1_flow(f0, f1, params, compile=compile, iteration=iteration).cpu().numpy())
    return np.concatenate(out)


def end_point_error(a: np.ndarray, b: np.ndarray, border: int = 0) -> np.ndarray:
    """Per-pixel end-point distance of (N,2,H,W) fields, optionally without a border."""
    distance = np.linalg.norm(a - b, axis=1)
    return distance[:, border : distance.shape[1] - border, border : distance.shape[2] - border] if border else distance


def pairs_per_second(run_one, seconds: float, min_runs: int = 2) -> float:
    """Calls run_one() (returning how many pairs it did) until ``seconds`` pass; pairs/s."""
    pairs, start = 0, time.perf_counter()
    runs = 0
    while runs < min_runs or time.perf_counter() - start < seconds:
        pairs += run_one()
        runs += 1
    return pairs / (time.perf_counter() - start)


def time_torch_cuda(
    frames0: np.ndarray,
    frames1: np.ndarray,
    params: TVL1Params,
    batch: int,
    seconds: float,
    compile: bool,
    iteration: str | None = None,
) -> dict:
    """pairs/s of batched TV-L1 on CUDA: frames resident on the device, one warm-up batch (and
    compilation) excluded, the clock read after synchronising."""
    f0 = torch.from_numpy(frames0).cuda()
    f1 = torch.from_numpy(frames1).cuda()
    n = len(f0)
    warm = time.perf_counter()
    tvl1_flow(f0[:batch], f1[:batch], params, compile=compile, iteration=iteration)
    torch.cuda.synchronize()
    warm_s = time.perf_counter() - warm
    offset = [0]

    def one_batch() -> int:
        start = offset[0] % n
        index = torch.arange(start, start + batch, device="cuda") % n
        tvl1_flow(f0[index], f1[index], params, compile=compile, iteration=iteration)
        offset[0] += batch
        torch.cuda.synchronize()
        return batch

    torch.cuda.synchronize()
    rate = pairs_per_second(one_batch, seconds, min_runs=2)
    return {
        "pairs_per_s": rate,
        "batch": batch,
        "warmup_s": warm_s,
        "compile": compile,
        "iteration": iteration or "default",
        "max_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
    }


# ---------------------------------------------------------------------------------------------
# Machine


def machine_details() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    details = {
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "opencv": getattr(cv2, "__version__", None),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return details


# ---------------------------------------------------------------------------------------------
# Main


def gather_data(args) -> dict:
    """Frames (and OpenCV flows where known) for every measurement, from a reference file or
    made here."""
    if args.reference:
        with np.load(args.reference, allow_pickle=False) as ref:
            data = {key: ref[key] for key in ref.files}
        data["source"] = f"reference file {args.reference}"
        return data
    if av is None:
        raise SystemExit("PyAV is missing: pass --reference FILE made by --reference-out on another machine")
    media = Path(args.media)
    data: dict = {"source": f"decoded from {media}"}
    clips = [c for c in CLIPS if (media / c).exists()]
    data["clip_names"] = np.array(clips)
    epe_frames = [decode_gray(media / c, EPE_SIZE, EPE_START_FRAME, EPE_PAIRS_PER_CLIP + 1) for c in clips]
    data["epe_frames0"] = np.concatenate([f[:-1] for f in epe_frames])
    data["epe_frames1"] = np.concatenate([f[1:] for f in epe_frames])
    for size in args.sizes:
        frames = [decode_gray(media / c, size, 0, TIMING_FRAMES_PER_CLIP) for c in clips]
        data[f"timing_frames_{size}"] = np.stack(frames)
    data["synth_frames0"], data["synth_frames1"], data["synth_flow"], names = synthesize_pairs(EPE_SIZE)
    data["synth_names"] = np.array(names)
    return data


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", required=True, help="write results here")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--pairs", type=int, default=0, help="pairs per CUDA batch (0: 2048 at 128, scaled by area)")
    parser.add_argument("--seconds", type=float, default=8.0, help="time per throughput measurement")
    parser.add_argument("--cpu-batch", type=int, default=8, help="pairs per call of the torch CPU run")
    parser.add_argument("--media", default=str(REPO.parent / "shared" / "media"))
    parser.add_argument("--reference", help="npz with frames, OpenCV flows and timings (from --reference-out)")
    parser.add_argument("--reference-out", help="save frames, OpenCV flows and timings for a machine without OpenCV")
    parser.add_argument("--no-compile", action="store_true", help="CUDA: eager only (no torch.compile)")
    parser.add_argument("--eager-too", action="store_true", help="CUDA: also time the eager path")
    parser.add_argument(
        "--iteration",
        choices=["torch", "triton"],
        help="CUDA: how the primal-dual iteration runs (default: Triton where installed)",
    )
    parser.add_argument(
        "--torch-iteration-too",
        action="store_true",
        help="CUDA: also time the compiled torch iteration, as torch_tvl1_cuda_torch_iteration_SIZE",
    )
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")

    params = TVL1Params()
    data = gather_data(args)
    results: dict = {
        "machine": machine_details(),
        "params": {k: v for k, v in vars(params).items()},
        "data": data["source"],
        "notes": [],
        "pairs_per_s": {},
    }
    notes = results["notes"]
    have_cv = has_opencv_tvl1()
    if not have_cv:
        notes.append(
            "OpenCV (contrib) not importable here: OpenCV flows and timings come from the reference file"
            if args.reference
            else "OpenCV (contrib) not importable and no reference file: OpenCV parts skipped"
        )
    cpu_light = args.device == "cuda"  # keep the CPU part short on an accelerator machine
    torch_device = args.device

    # --- Agreement with OpenCV on real clips at 128x128 --------------------------------------
    f0, f1 = data["epe_frames0"], data["epe_frames1"]
    if have_cv:
        cv2.setNumThreads(1)
        data["epe_opencv"] = opencv_tvl1(f0, f1, params)
    mine = torch_tvl1(f0, f1, torch_device, params, batch=len(f0), compile=None, iteration=args.iteration)
    if "epe_opencv" in data:
        epe = end_point_error(mine, data["epe_opencv"])
        results["epe_vs_opencv"] = float(epe.mean())
        results["frac_over_1px"] = float((epe > 1.0).mean())
        results["epe_vs_opencv_per_clip"] = {
            str(name): float(epe[i * EPE_PAIRS_PER_CLIP : (i + 1) * EPE_PAIRS_PER_CLIP].mean())
            for i, name in enumerate(data["clip_names"])
        }
        results["mean_opencv_flow_magnitude"] = float(np.linalg.norm(data["epe_opencv"], axis=1).mean())
        results["epe_pairs"] = int(len(f0))

    # --- Ground truth on synthesized motion ---------------------------------------------------
    s0, s1, gt = data["synth_frames0"], data["synth_frames1"], data["synth_flow"]
    if have_cv:
        data["synth_opencv"] = opencv_tvl1(s0, s1, params)
    synth_mine = torch_tvl1(s0, s1, torch_device, params, batch=len(s0), compile=None, iteration=args.iteration)
    gt_results = {
        "border_excluded_px": GT_BORDER,
        "torch_tvl1": float(end_point_error(synth_mine, gt, GT_BORDER).mean()),
        "per_motion": {},
    }
    for i, name in enumerate(data["synth_names"]):
        gt_results["per_motion"][str(name)] = {
            "torch_tvl1": float(end_point_error(synth_mine[i : i + 1], gt[i : i + 1], GT_BORDER).mean())
        }
    if "synth_opencv" in data:
        gt_results["opencv_tvl1"] = float(end_point_error(data["synth_opencv"], gt, GT_BORDER).mean())
        gt_results["torch_vs_opencv"] = float(end_point_error(synth_mine, data["synth_opencv"]).mean())
        for i, name in enumerate(data["synth_names"]):
            gt_results["per_motion"][str(name)]["opencv_tvl1"] = float(
                end_point_error(data["synth_opencv"][i : i + 1], gt[i : i + 1], GT_BORDER).mean()
            )
    results["gt_epe"] = gt_results

    # --- Throughput -----------------------------------------------------------------------------
    rates = results["pairs_per_s"]
    seconds_cpu = min(args.seconds, 3.0) if cpu_light else args.seconds
    for size in args.sizes:
        clip_frames = list(data[f"timing_frames_{size}"])
        t0, t1 = timing_pairs(clip_frames, max(args.cpu_batch, 64))
        if have_cv:
            cv2.setNumThreads(1)
            tvl1 = create_opencv_tvl1(params)
            index = [0]

            def one_opencv(fn):
                def run() -> int:
                    i = index[0] % len(t0)
                    fn(t0[i], t1[i])
                    index[0] += 1
                    return 1

                return run

            rates[f"opencv_tvl1_cpu_{size}"] = pairs_per_second(
                one_opencv(lambda a, b: tvl1.calc(a, b, None)), seconds_cpu
            )
            rates[f"opencv_farneback_cpu_{size}"] = pairs_per_second(one_opencv(opencv_farneback), seconds_cpu)
        elif f"opencv_tvl1_cpu_{size}" in data:
            for key in ("opencv_tvl1_cpu", "opencv_farneback_cpu"):
                rates[f"{key}_{size}"] = float(data[f"{key}_{size}"])
            notes.append(
                f"opencv_*_cpu_{size}: measured on the reference machine ({data.get('reference_cpu', 'unknown CPU')})"
            )
        if not cpu_light:
            offset = [0]

            def one_torch_cpu() -> int:
                i = offset[0] % (len(t0) - args.cpu_batch + 1)
                offset[0] += args.cpu_batch
                tvl1_flow(
                    torch.from_numpy(t0[i : i + args.cpu_batch]),
                    torch.from_numpy(t1[i : i + args.cpu_batch]),
                    params,
                    compile=False,
                )
                return args.cpu_batch

            rates[f"torch_tvl1_cpu_{size}"] = pairs_per_second(one_torch_cpu, args.seconds, min_runs=1)
            results["torch_cpu_batch"] = args.cpu_batch
        if args.device == "cuda":
            # Large batches amortise the per-iteration launch latency (see the README section).
            batch = args.pairs or max(64, int(2048 * (128 / size) ** 2))
            c0, c1 = timing_pairs(clip_frames, max(batch * 2, 1024))
            variants = [("torch_tvl1_cuda", not args.no_compile, args.iteration)]
            if args.eager_too and not args.no_compile:
                variants.append(("torch_tvl1_cuda_eager", False, args.iteration))
            if args.torch_iteration_too and args.iteration != "torch":
                variants.append(("torch_tvl1_cuda_torch_iteration", not args.no_compile, "torch"))
            for key, compiled, iteration in variants:
                try:
                    timing = time_torch_cuda(c0, c1, params, batch, args.seconds, compiled, iteration)
                except Exception as error:  # e.g. torch.compile unavailable: fall back to eager
                    if not compiled:
                        raise
                    notes.append(f"{key}_{size}: torch.compile failed ({type(error).__name__}: {error}); timed eager")
                    timing = time_torch_cuda(c0, c1, params, batch, args.seconds, False, iteration)
                rates[f"{key}_{size}"] = timing.pop("pairs_per_s")
                results.setdefault("cuda_timing", {})[f"{key}_{size}"] = timing

    if args.reference_out:
        saved = {k: v for k, v in data.items() if isinstance(v, np.ndarray)}
        for key, value in rates.items():
            if key.startswith("opencv_"):
                saved[key] = np.array(value)
        saved["reference_cpu"] = np.array(results["machine"]["cpu"])
        Path(args.reference_out).parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(args.reference_out, **saved)
        notes.append(f"reference saved to {args.reference_out}")

    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print_summary(results)
    return 0


def print_summary(results: dict) -> None:
    m = results["machine"]
    print(
        f"machine: {m['cpu']} ({m['cpu_cores']} cores), torch {m['torch']} ({m['torch_threads']} threads), "
        f"OpenCV {m['opencv']}, GPU {m['gpu']}"
    )
    if "epe_vs_opencv" in results:
        print(
            f"TV-L1 torch vs OpenCV, real clips at {EPE_SIZE}x{EPE_SIZE} ({results['epe_pairs']} pairs): "
            f"mean EPE {results['epe_vs_opencv']:.4f} px, >1 px on {100 * results['frac_over_1px']:.3f}% of pixels "
            f"(mean OpenCV flow {results['mean_opencv_flow_magnitude']:.3f} px)"
        )
    gt = results["gt_epe"]
    print(
        f"ground truth, synthesized motion (border {gt['border_excluded_px']} px excluded): torch {gt['torch_tvl1']:.4f} px"
        + (f", OpenCV {gt['opencv_tvl1']:.4f} px" if "opencv_tvl1" in gt else "")
    )
    print("pairs per second:")
    for key, value in results["pairs_per_s"].items():
        print(f"  {key:32s} {value:10.2f}")
    for note in results["notes"]:
        print("note:", note)


if __name__ == "__main__":
    sys.exit(main())
