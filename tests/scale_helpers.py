"""A training run with probes, for the multi-process, resume and fault tests.

Run as a script, directly or under ``accelerate launch``:

    python tests/scale_helpers.py --dump DIR [probe options] -- dotted.key=value ...

It trains like ``tricoclr/train.py`` with ``configs/tiny.yaml`` and the given overrides, and each
rank writes what the tests compare into ``DIR/rank<r>/``: ``summary.json`` (losses per step,
comm-hook calls, the final global step), ``<stage>.safetensors`` at the end of every stage (trained
encoder, momentum copy, queues as this rank holds them) and ``grads.safetensors`` (the flattened
gradient at each optimizer step, when asked). Probes change nothing the trainer computes, except
the fault injections (``--nan-steps``, ``--crash-in-checkpoint``), which are what their tests test.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

# Fixed threads: bit-identical resumes need the same reduction order in every run.
torch.set_num_threads(1)

from torch.distributed.algorithms.ddp_comm_hooks import default_hooks  # noqa: E402

from tricoclr import checkpoint as checkpoint_module  # noqa: E402
from tricoclr.config import load_config  # noqa: E402
from tricoclr.method import InfoNCEStage  # noqa: E402
from tricoclr.trainer import PreemptionRequested, Trainer, TrainerHooks  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--dump", required=True, type=Path)
    parser.add_argument(
        "--bn-eval",
        action="store_true",
        help="keep every batch norm in eval mode (running statistics): a micro-batch's "
        "outputs then do not depend on the other samples of its batch",
    )
    parser.add_argument(
        "--count-allreduce",
        action="store_true",
        help="DDP comm hook that logs each gradient all-reduce and the micro-step it ran in",
    )
    parser.add_argument("--record-grads", action="store_true")
    parser.add_argument("--print-steps", action="store_true", help="print 'STEP n rank r pid p' per step")
    parser.add_argument("--nan-steps", default="", help="comma-separated global steps whose loss is NaN")
    parser.add_argument("--nan-from", type=int, default=None, help="every step from this one has a NaN loss")
    parser.add_argument("--nan-rank", type=int, default=None, help="only this rank sees the NaN loss")
    parser.add_argument(
        "--crash-in-checkpoint",
        type=int,
        default=None,
        help="SIGKILL this process half-way through writing the checkpoint of this step",
    )
    parser.add_argument("overrides", nargs="*")
    return parser.parse_args(argv)


def freeze_batchnorm(module: torch.nn.Module) -> None:
    """BN layers stay in eval mode whatever ``train()`` asks (also in deep copies of the module)."""

    def stay_in_eval(self, mode=True):
        return torch.nn.Module.train(self, False)

    for child in module.modules():
        if isinstance(child, torch.nn.modules.batchnorm._BatchNorm):
            child.train = types.MethodType(stay_in_eval, child)
            child.train(False)


class Probe(TrainerHooks):
    """Records what the tests compare, through the trainer's hooks (``trainer`` is set once built)."""

    def __init__(self, args):
        self.args = args
        self.trainer: Trainer | None = None
        self.losses: dict[int, float] = {}
        self.comm_calls: list[dict] = []
        self.grads: dict[str, torch.Tensor] = {}

    @property
    def rank(self) -> int:
        return self.trainer.accelerator.process_index

    @property
    def out(self) -> Path:
        out = self.args.dump / f"rank{self.rank}"
        out.mkdir(parents=True, exist_ok=True)
        return out

    def encoders_built(self, encoders) -> None:
        if self.args.bn_eval:
            for encoder in encoders.values():
                freeze_batchnorm(encoder)

    def prepared(self, model, optimizer) -> None:
        trainer = self.trainer
        if self.args.count_allreduce:
            assert isinstance(model, torch.nn.parallel.DistributedDataParallel), type(model)
            acc = trainer.accelerator

            def counting_allreduce(state, bucket):
                # Called by DDP for each gradient bucket it all-reduces.
                self.comm_calls.append(
                    {
                        "step": trainer.global_step + 1,
                        "sync_gradients": acc.sync_gradients,
                        "micro_step_counter": acc.step,
                    }
                )
                return default_hooks.allreduce_hook(None, bucket)

            model.register_comm_hook(None, counting_allreduce)
        if self.args.record_grads:

            def record(opt, args, kwargs):
                grads = [p.grad.detach().flatten() for group in opt.param_groups for p in group["params"]]
                self.grads[f"step{trainer.global_step + 1}"] = torch.cat(grads).cpu().clone()

            optimizer.optimizer.register_step_pre_hook(record)

    def step_logged(self, global_step, loss) -> None:
        self.losses[global_step] = loss
        if self.args.print_steps:
            print(f"STEP {global_step} rank {self.rank} pid {os.getpid()}", flush=True)

    def stage_finished(self, plan, stage, encoders) -> None:
        tensors = {f"queue.{k}": v.detach().cpu().contiguous() for k, v in stage.queue.state_dict().items()}
        tensors.update(
            {f"momentum.{k}": v.detach().cpu().contiguous() for k, v in stage.momentum_encoder.state_dict().items()}
        )
        tensors.update(
            {f"encoder.{k}": v.detach().cpu().contiguous() for k, v in encoders[plan.trained].state_dict().items()}
        )
        save_file(tensors, str(self.out / f"{plan.name}.safetensors"))

    def write_summary(self) -> None:
        acc = self.trainer.accelerator
        summary = {
            "losses": self.losses,
            "global_step": self.trainer.global_step,
            "comm_calls": self.comm_calls,
            "world_size": acc.num_processes,
            "distributed_type": str(acc.distributed_type.value),
        }
        (self.out / "summary.json").write_text(json.dumps(summary))
        if self.grads:
            save_file(self.grads, str(self.out / "grads.safetensors"))


def inject_nan(probe: Probe, steps: set[int], from_step: int | None, rank: int | None):
    """Make the loss NaN at the given global steps (on one rank, or all); returns the undo."""
    original = InfoNCEStage.loss

    def loss(self, *args, **kwargs):
        value, stats = original(self, *args, **kwargs)
        step = probe.trainer.global_step + 1
        if (step in steps or (from_step is not None and step >= from_step)) and rank in (None, probe.rank):
            value = value * float("nan")
        return value, stats

    InfoNCEStage.loss = loss
    return lambda: setattr(InfoNCEStage, "loss", original)


def crash_in_checkpoint(step: int):
    """SIGKILL right after stage.safetensors of that step's checkpoint is written into its temporary
    folder, i.e. after Accelerate's files and before trainer_state.json and the rename."""
    original = checkpoint_module.save_file

    def save_then_die(tensors, path, *args, **kwargs):
        original(tensors, path, *args, **kwargs)
        if Path(path).parent.name == f".tmp-step-{step:08d}":
            os.kill(os.getpid(), signal.SIGKILL)

    checkpoint_module.save_file = save_then_die
    return lambda: setattr(checkpoint_module, "save_file", original)


def main(argv=None) -> int:
    """Also callable in the test process (``main([...])``): the patches are undone on return."""
    args = parse_args(argv)
    config = load_config(REPO / "configs" / "tiny.yaml", args.overrides)
    probe = Probe(args)
    trainer = probe.trainer = Trainer(config, hooks=probe)
    undo = []
    nan_steps = {int(s) for s in args.nan_steps.split(",") if s}
    if nan_steps or args.nan_from is not None:
        undo.append(inject_nan(probe, nan_steps, args.nan_from, args.nan_rank))
    if args.crash_in_checkpoint is not None:
        undo.append(crash_in_checkpoint(args.crash_in_checkpoint))
    try:
        trainer.run()
    except PreemptionRequested as stop:
        print(f"preempted: {stop}", file=sys.stderr, flush=True)
    finally:
        probe.write_summary()
        for step in undo:
            step()
    return 0


# ---- for the tests -------------------------------------------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_command(
    num_processes: int,
    port: int,
    args: list[str],
    num_machines: int = 1,
    machine_rank: int = 0,
    script: str = "tests/scale_helpers.py",
) -> list[str]:
    """``accelerate launch`` of ``script`` on CPU processes (with ``cpu_env()``: ACCELERATE_USE_CPU=1
    is what makes --multi_gpu start CPU processes with gloo)."""
    launcher = str(Path(sys.executable).parent / "accelerate")
    command = [
        launcher,
        "launch",
        "--multi_gpu",
        "--num_processes",
        str(num_processes),
        "--num_machines",
        str(num_machines),
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(port),
    ]
    if num_machines > 1:
        command += ["--machine_rank", str(machine_rank), "--main_process_ip", "127.0.0.1"]
    return command + [script, *args]


def cpu_env(**extra) -> dict:
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def load_dump(dump: Path, rank: int, stage: str) -> dict:
    from safetensors.torch import load_file

    return load_file(str(dump / f"rank{rank}" / f"{stage}.safetensors"))


def load_summary(dump: Path, rank: int = 0) -> dict:
    summary = json.loads((dump / f"rank{rank}" / "summary.json").read_text())
    summary["losses"] = {int(k): v for k, v in summary["losses"].items()}
    return summary


if __name__ == "__main__":
    sys.exit(main())
