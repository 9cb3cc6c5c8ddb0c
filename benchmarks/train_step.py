"""Training-step throughput of a cooperative stage: optimized path vs plain fp32 eager, one run.

A cooperative RGB stage step = query forward/backward of the trained encoder, key forward of its
momentum copy, oracle forwards of the frozen samplers (flow S3D, audio ResNet-18), multi-positive
loss with top-k mining against a full queue, optimizer step, EMA update and enqueue. Inputs are
random tensors of the configured shapes, so this measures compute only; ``--data`` adds the share
of step time spent waiting for the real loader (tiny shapes, on a prepared store).

    python benchmarks/train_step.py --shapes demo --device cpu --json out.json
    python benchmarks/train_step.py --shapes paper --device cuda --batch-size 32 --compile --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tricoclr.config import load_config  # noqa: E402
from tricoclr.method import StagePlan, StepPrecision, build_stage  # noqa: E402
from tricoclr.models import build_encoder  # noqa: E402
from tricoclr.trainer import Trainer  # noqa: E402

SHAPES = {
    # name: (backbones, clip frames, size, spectrogram steps)
    "paper": ({"rgb": "s3d", "flow": "s3d", "audio": "resnet18"}, 30, 128, 128),
    # the demo's RGB stage: 8 frames cropped to 32x32, 64 spectrogram steps (docs/demo.md)
    "demo": ({"rgb": "tiny3d", "flow": "tiny3d", "audio": "tiny2d"}, 8, 32, 64),
}


def make_batch(batch_size: int, frames: int, size: int, steps: int, device) -> dict:
    g = torch.Generator().manual_seed(0)
    batch = {
        "rgb.view1": torch.randn(batch_size, 3, frames, size, size, generator=g),
        "rgb.view2": torch.randn(batch_size, 3, frames, size, size, generator=g),
        "flow.view2": torch.randn(batch_size, 2, frames, size, size, generator=g),
        "audio.view2": torch.randn(batch_size, 1, 128, steps, generator=g),
        "video_index": torch.arange(batch_size),
        "label": torch.zeros(batch_size, dtype=torch.long),
    }
    return {k: v.to(device) for k, v in batch.items()}


def build(shapes: str, device, optimized: bool, compile_model: bool, queue_size: int):
    backbones, frames, size, steps = SHAPES[shapes]
    config = load_config(overrides=[f"model.backbones={json.dumps(backbones)}", "method.batchnorm=local",
                                    f"method.queue_size={queue_size}"])
    torch.manual_seed(0)
    encoders = {m: build_encoder(config, m).to(device) for m in ("rgb", "flow", "audio")}
    plan = StagePlan("cycle1-rgb", "rgb", ("flow", "audio"), 1)
    stage = build_stage(plan, encoders, config.method).to(device)
    stage.queue.num_filled.fill_(queue_size)  # a full queue: mining runs every step
    encoder = encoders["rgb"].train()
    if optimized and device.type == "cuda":
        for module in [encoder, stage.momentum_encoder, *stage.samplers.values()]:
            module.to(memory_format=torch.channels_last_3d) if any(p.dim() == 5 for p in module.parameters()) else None
    fused = {"fused": True} if optimized and device.type == "cuda" else {}
    optimizer = torch.optim.Adam(encoder.parameters(), lr=1e-3, weight_decay=1e-5, **fused)
    forward = torch.compile(encoder) if compile_model else encoder
    device_type = device.type
    if optimized:
        def autocast():
            return torch.autocast(device_type, dtype=torch.bfloat16)
    else:
        def autocast():
            return torch.autocast(device_type, enabled=False)
    stage.bind(forward, StepPrecision(autocast, autocast))
    return encoder, stage, optimizer, (frames, size, steps)


def step_fn(encoder, stage, optimizer, batch):
    """One optimizer step through the stage's own step (as the trainer runs it)."""
    loss, _ = stage.training_step(batch)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    stage.after_optimizer_step(encoder, 0, 1)
    return loss


def measure(variant: str, args, device) -> dict:
    optimized = variant == "optimized"
    encoder, stage, optimizer, (frames, size, steps) = build(
        args.shapes, device, optimized, optimized and args.compile, args.queue_size)
    batch = make_batch(args.batch_size, frames, size, steps, device)
    if optimized and device.type == "cuda":
        for key in ("rgb.view1", "rgb.view2", "flow.view2"):
            batch[key] = batch[key].contiguous(memory_format=torch.channels_last_3d)
    for _ in range(args.warmup):
        step_fn(encoder, stage, optimizer, batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start, count = time.perf_counter(), 0
    while count < args.min_steps or time.perf_counter() - start < args.seconds:
        step_fn(encoder, stage, optimizer, batch)
        count += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return {"steps": count, "seconds_per_step": elapsed / count, "samples_per_s": count * args.batch_size / elapsed}


def data_wait_share(args) -> dict | None:
    """Share of a real tiny cooperative stage's step time spent waiting for the loader."""
    if not args.data:
        return None
    import tempfile

    with tempfile.TemporaryDirectory() as out:
        config = load_config("configs/tiny.yaml", [f"data.path={args.data}", f"output_dir={out}",
                                                    "schedule.start_stage=cycle1-rgb", "max_steps=20",
                                                    "log_every_steps=1", f"data.workers={args.workers}"])
        trainer = Trainer(config)
        trainer.run()
    rows = [h for h in trainer.history if "data_wait_fraction" in h][2:]  # skip worker start-up
    return {
        "steps": len(rows),
        "data_wait_fraction": sum(r["data_wait_fraction"] for r in rows) / max(1, len(rows)),
        "samples_per_s": sum(r["samples_per_s"] for r in rows) / max(1, len(rows)),
        "workers": args.workers,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="demo")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--queue-size", type=int, default=2048)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--min-steps", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--compile", action="store_true", help="torch.compile the trained encoder (optimized path)")
    parser.add_argument("--data", default=None, help="a prepared store: also measure the data-wait share (tiny run)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    result = {
        "shapes": args.shapes, "device": str(device), "batch_size": args.batch_size,
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None},
    }
    for variant in ("fp32_eager", "optimized"):
        result[variant] = measure(variant, args, device)
        print(variant, result[variant], flush=True)
    result["speedup"] = result["optimized"]["samples_per_s"] / result["fp32_eager"]["samples_per_s"]
    result["data_wait"] = data_wait_share(args)
    result["optimized_path"] = ("bf16 autocast" + (", channels-last 3D, fused Adam" if device.type == "cuda" else "")
                                + (", torch.compile" if args.compile else ""))
    print(f"speedup (optimized / fp32 eager): {result['speedup']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
