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

from tricoclr import trainer as trainer_module  # noqa: E402
from tricoclr.config import load_config  # noqa: E402
from tricoclr.method import CooperativeStage  # noqa: E402
from tricoclr.trainer import PreemptionRequested, Trainer  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--dump", required=True, type=Path)
    parser.add_argument("--bn-eval", action="store_true",
                        help="keep every batch norm in eval mode (running statistics): a micro-batch's "
                             "outputs then do not depend on the other samples of its batch")
    parser.add_argument("--count-allreduce", action="store_true",
                        help="DDP comm hook that logs each gradient all-reduce and the micro-step it ran in")
    parser.add_argument("--record-grads", action="store_true")
    parser.add_argument("--print-steps", action="store_true", help="print 'STEP n rank r pid p' per step")
    parser.add_argument("--nan-steps", default="", help="comma-separated global steps whose loss is NaN")
    parser.add_argument("--nan-from", type=int, default=None, help="every step from this one has a NaN loss")
    parser.add_argument("--nan-rank", type=int, default=None, help="only this rank sees the NaN loss")
    parser.add_argument("--crash-in-checkpoint", type=int, default=None,
                        help="SIGKILL this process half-way through writing the checkpoint of this step")
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


class ProbedTrainer(Trainer):
    def __init__(self, config, args):
        super().__init__(config)
        self.args = args
        self.rank = self.accelerator.process_index
        self.out = args.dump / f"rank{self.rank}"
        self.out.mkdir(parents=True, exist_ok=True)
        self.losses: dict[int, float] = {}
        self.comm_calls: list[dict] = []
        self.micro_steps = 0
        self.grads: dict[str, torch.Tensor] = {}

    def _build_encoders(self) -> None:
        super()._build_encoders()
        if self.args.bn_eval:
            for encoder in self.encoders.values():
                freeze_batchnorm(encoder)

    def _prepare(self, encoder, optimizer):
        model, optimizer = super()._prepare(encoder, optimizer)
        if self.args.count_allreduce:
            from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

            assert isinstance(model, torch.nn.parallel.DistributedDataParallel), type(model)
            acc = self.accelerator

            def counting_allreduce(state, bucket):
                # Called by DDP for each gradient bucket it all-reduces.
                self.comm_calls.append({"step": self.global_step + 1, "sync_gradients": acc.sync_gradients,
                                        "micro_step_counter": acc.step})
                return default_hooks.allreduce_hook(None, bucket)

            model.register_comm_hook(None, counting_allreduce)
        if self.args.record_grads:
            def record(opt, args, kwargs):
                grads = [p.grad.detach().flatten() for group in opt.param_groups for p in group["params"]]
                self.grads[f"step{self.global_step + 1}"] = torch.cat(grads).cpu().clone()

            optimizer.optimizer.register_step_pre_hook(record)
        return model, optimizer

    def _log_step(self, plan, value, stats, scheduler, stage, window, progress) -> None:
        super()._log_step(plan, value, stats, scheduler, stage, window, progress)
        self.losses[self.global_step] = value
        if self.args.print_steps:
            print(f"STEP {self.global_step} rank {self.rank} pid {os.getpid()}", flush=True)

    def _finish_stage(self, plan, model, stage) -> None:
        tensors = {f"queue.{k}": v.detach().cpu().contiguous() for k, v in stage.queue.state_dict().items()}
        tensors.update({f"momentum.{k}": v.detach().cpu().contiguous()
                        for k, v in stage.momentum_encoder.state_dict().items()})
        tensors.update({f"encoder.{k}": v.detach().cpu().contiguous()
                        for k, v in self.encoders[plan.trained].state_dict().items()})
        save_file(tensors, str(self.out / f"{plan.name}.safetensors"))
        super()._finish_stage(plan, model, stage)

    def write_summary(self) -> None:
        summary = {"losses": self.losses, "global_step": self.global_step, "comm_calls": self.comm_calls,
                   "world_size": self.accelerator.num_processes,
                   "distributed_type": str(self.accelerator.distributed_type.value)}
        (self.out / "summary.json").write_text(json.dumps(summary))
        if self.grads:
            save_file(self.grads, str(self.out / "grads.safetensors"))


def inject_nan(trainer: ProbedTrainer, steps: set[int], from_step: int | None, rank: int | None):
    """Make the loss NaN at the given global steps (on one rank, or all); returns the undo."""
    original = CooperativeStage.loss

    def loss(self, *args, **kwargs):
        value, stats = original(self, *args, **kwargs)
        step = trainer.global_step + 1
        if (step in steps or (from_step is not None and step >= from_step)) and rank in (None, trainer.rank):
            value = value * float("nan")
        return value, stats

    CooperativeStage.loss = loss
    return lambda: setattr(CooperativeStage, "loss", original)


def crash_in_checkpoint(step: int):
    """SIGKILL right after stage.safetensors of that step's checkpoint is written into its temporary
    folder, i.e. after Accelerate's files and before trainer_state.json and the rename."""
    original = trainer_module.save_file

    def save_then_die(tensors, path, *args, **kwargs):
        original(tensors, path, *args, **kwargs)
        if Path(path).parent.name == f".tmp-step-{step:08d}":
            os.kill(os.getpid(), signal.SIGKILL)

    trainer_module.save_file = save_then_die
    return lambda: setattr(trainer_module, "save_file", original)


def main(argv=None) -> int:
    """Also callable in the test process (``main([...])``): the patches are undone on return."""
    args = parse_args(argv)
    config = load_config(REPO / "configs" / "tiny.yaml", args.overrides)
    trainer = ProbedTrainer(config, args)
    undo = []
    nan_steps = {int(s) for s in args.nan_steps.split(",") if s}
    if nan_steps or args.nan_from is not None:
        undo.append(inject_nan(trainer, nan_steps, args.nan_from, args.nan_rank))
    if args.crash_in_checkpoint is not None:
        undo.append(crash_in_checkpoint(args.crash_in_checkpoint))
    try:
        trainer.run()
    except PreemptionRequested as stop:
        print(f"preempted: {stop}", file=sys.stderr, flush=True)
    finally:
        trainer.write_summary()
        for step in undo:
            step()
    return 0


# ---- for the tests -------------------------------------------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_command(num_processes: int, port: int, args: list[str], num_machines: int = 1,
                       machine_rank: int = 0, script: str = "tests/scale_helpers.py") -> list[str]:
    """``accelerate launch`` of ``script`` on CPU processes (with ``cpu_env()``: ACCELERATE_USE_CPU=1
    is what makes --multi_gpu start CPU processes with gloo)."""
    launcher = str(Path(sys.executable).parent / "accelerate")
    command = [launcher, "launch", "--multi_gpu", "--num_processes", str(num_processes),
               "--num_machines", str(num_machines), "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(port)]
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
