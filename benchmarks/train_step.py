"""Training-step throughput of a cooperative stage: each speed option vs plain fp32 eager, one run.

A cooperative RGB stage step = query forward/backward of the trained encoder, key forward of its
momentum copy, oracle forwards of the frozen samplers (flow S3D, audio ResNet-18), multi-positive
loss with top-k mining against a full queue, optimizer step, EMA update and enqueue. Inputs are
random tensors of the configured shapes, so this measures compute only; ``--data`` adds the share
of step time spent waiting for the real loader (tiny shapes, on a prepared store).

Variants, timed one after the other in the same process: ``fp32_eager`` (the baseline), each option
alone (``bf16``, ``channels_last``, ``fused_adam``, ``compile``), ``amp`` (all but compile) and
``optimized`` (all of them). Each also reports kernels launched and host synchronisations in one
step (``count_step``); ``--shapes paper-small`` counts the paper's backbones cheaply on a CPU.

    python benchmarks/train_step.py --shapes demo --device cpu --json out.json
    python benchmarks/train_step.py --shapes paper --device cuda --batch-size 32 --seconds 4 --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tricoclr.config import COMPILE_MODES, load_config  # noqa: E402
from tricoclr.method import StagePlan, StepPrecision, build_stage  # noqa: E402
from tricoclr.models import build_encoder  # noqa: E402
from tricoclr.models.memory_format import to_channels_last  # noqa: E402
from tricoclr.trainer import Trainer  # noqa: E402

SHAPES = {
    # name: (backbones, clip frames, size, spectrogram steps)
    "paper": ({"rgb": "s3d", "flow": "s3d", "audio": "resnet18"}, 30, 128, 128),
    # the paper's backbones on small inputs: the same kernels per step as "paper", for counting on a CPU
    "paper-small": ({"rgb": "s3d", "flow": "s3d", "audio": "resnet18"}, 8, 64, 64),
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


# Speed options, each also a config key (docs/workflow.md): bf16 = mixed_precision bf16,
# channels_last = model.channels_last, fused_adam = the trainer's fused Adam on CUDA,
# compile = model.compile (trained encoder forward/backward + the no-grad part as one graph).
OPTIONS = ("bf16", "channels_last", "fused_adam", "compile")
# A variant is a set of options; "optimized" is all of them (compile on CUDA, or with --compile).
# The default run times every variant; --variants picks some (the GPU check: fp32_eager,amp,optimized).
VARIANTS = {
    "fp32_eager": (),
    "bf16": ("bf16",),
    "channels_last": ("channels_last",),
    "fused_adam": ("fused_adam",),
    "compile": ("compile",),
    "amp": ("bf16", "channels_last", "fused_adam"),  # the optimized path before compile
    "optimized": OPTIONS,
}


def variant_options(variant: str, args, device) -> tuple[str, ...]:
    options = VARIANTS[variant]
    if variant == "optimized" and not compile_by_default(args, device):
        options = tuple(o for o in options if o != "compile")
    return options


def compile_by_default(args, device) -> bool:
    """torch.compile joins the optimized path on CUDA, and on CPU with --compile (slow to compile)."""
    return bool(getattr(args, "compile", False)) or device.type == "cuda"


def build(shapes: str, device, options: tuple[str, ...], queue_size: int, compile_mode: str = "default"):
    backbones, frames, size, steps = SHAPES[shapes]
    config = load_config(
        overrides=[
            f"model.backbones={json.dumps(backbones)}",
            "method.batchnorm=local",
            f"method.queue_size={queue_size}",
        ]
    )
    torch.manual_seed(0)
    encoders = {m: build_encoder(config, m).to(device) for m in ("rgb", "flow", "audio")}
    if "channels_last" in options:
        for module in encoders.values():
            to_channels_last(module)
    plan = StagePlan("cycle1-rgb", "rgb", ("flow", "audio"), 1)
    stage = build_stage(plan, encoders, config.method).to(device)
    stage.queue.num_filled.fill_(queue_size)  # a full queue: mining runs every step
    encoder = encoders["rgb"].train()
    fused = {"fused": True} if "fused_adam" in options else {}
    optimizer = torch.optim.Adam(encoder.parameters(), lr=1e-3, weight_decay=1e-5, **fused)
    forward = encoder
    if "compile" in options:
        forward = torch.compile(encoder, mode=compile_mode)
        stage.compile_frozen(compile_mode)
    dtype = torch.bfloat16 if "bf16" in options else None

    def autocast():
        return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

    stage.bind(forward, StepPrecision(autocast, autocast))
    return encoder, stage, optimizer, (frames, size, steps)


def step_fn(encoder, stage, optimizer, batch):
    """One optimizer step through the stage's own step (as the trainer runs it, with its snapshot of
    the batch-norm statistics for a skipped step)."""
    stage.buffers_snapshot(encoder)
    loss, _ = stage.training_step(batch)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    stage.after_optimizer_step(encoder, 0, 1)
    return loss


# Ops that make the host wait for the device: reading a value (.item(), bool(), int(), float())
# or an output whose shape depends on the data (nonzero, boolean-mask indexing, unique).
HOST_SYNC_OPS = {
    "aten::_local_scalar_dense",
    "aten::nonzero",
    "aten::masked_select",
    "aten::_unique2",
    "aten::unique_dim",
    "aten::unique_consecutive",
    "aten::nonzero_static",
}
# Indexing with a bool mask finds the mask's True entries first (a nonzero inside the kernel).
MASK_INDEX_OPS = {"aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_"}
NO_KERNEL_OPS = {"aten::empty", "aten::empty_strided", "aten::empty_like", "aten::lift_fresh", "aten::set_"}


class StepOpCounter(TorchDispatchMode):
    """Counts, while active, the aten ops that compute (a kernel each on a GPU: views and bare
    allocations left out) and the ops that wait on the device (``HOST_SYNC_OPS``), with where in
    the project each sync came from. Runs on any device, so a CPU run counts what a GPU step
    would launch and wait for; ops inside torch.compile'd code are not seen (fused kernels)."""

    def __init__(self):
        super().__init__()
        self.kernels = 0
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name in HOST_SYNC_OPS or (name in MASK_INDEX_OPS and has_bool_index(args)):
            where = project_caller()
            if where is not None:
                self.syncs.append(f"{name} at {where}")
        returns = func._schema.returns
        is_view = any(r.alias_info is not None and not r.alias_info.is_write for r in returns)
        if not is_view and name not in NO_KERNEL_OPS:
            self.kernels += 1
        return func(*args, **(kwargs or {}))


def has_bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else ()
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices)


def project_caller() -> str | None:
    """file:line of the innermost frame in this project's package (where a sync comes from); None
    inside ``torch.optim``: a non-fused Adam reads its step counters, which live on the CPU also
    when the parameters are on a GPU, so that read is no device sync there."""
    import traceback

    for frame in reversed(traceback.extract_stack()):
        if "/torch/optim/" in frame.filename:
            return None
        if "/tricoclr/" in frame.filename:
            return f"{Path(frame.filename).name}:{frame.lineno}"
    return "outside tricoclr"


def count_step(encoder, stage, optimizer, batch, device) -> dict:
    """Kernels launched and host syncs of one step. On CUDA: kernels from the torch profiler,
    syncs from CUDA's sync debug mode (every real wait, compiled code included); on CPU: the
    dispatched ops (``StepOpCounter``; not inside compiled code, reported as null there)."""
    if device.type == "cuda":
        import warnings

        from torch.profiler import ProfilerActivity, profile

        torch.cuda.synchronize()
        with (
            profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof,
            warnings.catch_warnings(record=True) as caught,
        ):
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                step_fn(encoder, stage, optimizer, batch)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            torch.cuda.synchronize()
        kernels = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
        syncs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]
        return {"kernels_per_step": kernels, "host_syncs_per_step": len(syncs), "host_syncs": syncs[:20]}
    counter = StepOpCounter()
    with counter:
        step_fn(encoder, stage, optimizer, batch)
    compiled = stage.frozen_compiled
    return {
        "kernels_per_step": None if compiled else counter.kernels,
        "host_syncs_per_step": len(counter.syncs),
        "host_syncs": counter.syncs[:20],
    }


def measure(variant: str, args, device) -> dict:
    options = variant_options(variant, args, device)
    encoder, stage, optimizer, (frames, size, steps) = build(
        args.shapes, device, options, args.queue_size, getattr(args, "compile_mode", "default")
    )
    batch = make_batch(args.batch_size, frames, size, steps, device)
    if "channels_last" in options:
        for key in ("rgb.view1", "rgb.view2", "flow.view2"):
            batch[key] = batch[key].contiguous(memory_format=torch.channels_last_3d)
    warmup = args.warmup + (2 if "compile" in options else 0)  # compiling, then CUDA-graph recording
    for _ in range(warmup):
        step_fn(encoder, stage, optimizer, batch)
    counts = count_step(encoder, stage, optimizer, batch, device) if getattr(args, "profile", True) else {}
    if device.type == "cuda":
        torch.cuda.synchronize()
    start, count = time.perf_counter(), 0
    while count < args.min_steps or time.perf_counter() - start < args.seconds:
        step_fn(encoder, stage, optimizer, batch)
        count += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return {
        "options": list(options),
        "steps": count,
        "seconds_per_step": elapsed / count,
        "samples_per_s": count * args.batch_size / elapsed,
        **counts,
    }


def data_wait_share(args) -> dict | None:
    """Share of a real tiny cooperative stage's step time spent waiting for the loader."""
    if not args.data:
        return None
    import tempfile

    with tempfile.TemporaryDirectory() as out:
        config = load_config(
            "configs/tiny.yaml",
            [
                f"data.path={args.data}",
                f"output_dir={out}",
                "schedule.start_stage=cycle1-rgb",
                "max_steps=20",
                "log_every_steps=1",
                f"data.workers={args.workers}",
            ],
        )
        trainer = Trainer(config)
        trainer.run()
    rows = [h for h in trainer.history if "data_wait_fraction" in h][2:]  # skip worker start-up
    return {
        "steps": len(rows),
        "data_wait_fraction": sum(r["data_wait_fraction"] for r in rows) / max(1, len(rows)),
        "samples_per_s": sum(r["samples_per_s"] for r in rows) / max(1, len(rows)),
        "workers": args.workers,
    }


def selected_variants(args, device, parser) -> list[str]:
    """--variants, or every variant (the compile one on CUDA or with --compile); fp32_eager first."""
    if args.variants:
        names = [v.strip() for v in args.variants.split(",") if v.strip()]
        unknown = [v for v in names if v not in VARIANTS]
        if unknown:
            parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    else:
        names = [v for v in VARIANTS if v != "compile" or compile_by_default(args, device)]
    return ["fp32_eager", *[v for v in names if v != "fp32_eager"]]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="demo")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--queue-size", type=int, default=2048)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--min-steps", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument(
        "--compile", action="store_true", help="on CPU: torch.compile in the optimized path too (always there on CUDA)"
    )
    parser.add_argument(
        "--compile-mode",
        default="default",
        choices=COMPILE_MODES,
        help="torch.compile's mode (model.compile_mode); reduce-overhead = CUDA graphs",
    )
    parser.add_argument(
        "--variants",
        default=None,
        help=f"comma-separated, from {','.join(VARIANTS)}; default: all (compile on CUDA or with --compile)",
    )
    parser.add_argument(
        "--no-profile", dest="profile", action="store_false", help="skip counting kernels and host syncs per step"
    )
    parser.add_argument("--data", default=None, help="a prepared store: also measure the data-wait share (tiny run)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    variants = selected_variants(args, device, parser)
    result = {
        "shapes": args.shapes,
        "device": str(device),
        "batch_size": args.batch_size,
        "compile_mode": args.compile_mode,
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
        },
    }
    for variant in variants:
        result[variant] = measure(variant, args, device)
        print(variant, result[variant], flush=True)
    base = result["fp32_eager"]["samples_per_s"]
    result["speedups"] = {v: result[v]["samples_per_s"] / base for v in variants}
    result["speedup"] = result["speedups"].get("optimized")
    result["data_wait"] = data_wait_share(args)
    if "optimized" in variants:
        result["optimized_path"] = ", ".join(variant_options("optimized", args, device))
    for variant in variants:
        print(
            f"{variant:>14}: {result[variant]['samples_per_s']:9.2f} samples/s, "
            f"{result['speedups'][variant]:.2f}x fp32 eager, kernels/step {result[variant].get('kernels_per_step')}, "
            f"host syncs/step {result[variant].get('host_syncs_per_step')}"
        )
    if result["speedup"] is not None:
        print(f"speedup (optimized / fp32 eager): {result['speedup']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
