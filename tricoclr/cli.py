"""`tricoclr`: train, evaluate, export and run the demo."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

import tricoclr.eval.cli as eval_cli
import tricoclr.eval.export as export_cli
from tricoclr.config import ConfigError, load_config


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config (e.g. configs/tiny.yaml); defaults otherwise")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="dotted.key=value",
        help="config overrides, e.g. batch_size=16 modalities=[rgb,flow]",
    )


def train_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tricoclr/train.py", description="Train TriCoCLR encoders (the whole stage schedule)."
    )
    add_train_arguments(parser)
    return run_train(parser.parse_args(argv))


def run_train(args) -> int:
    # Imported here: the trainer loads Accelerate (and DeepSpeed's hooks), which the other
    # commands (eval, export) must not pay for at start-up.
    from tricoclr.trainer import PreemptionRequested, Trainer

    try:
        config = load_config(args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as error:  # a wrong key or value: the message says which
        print(f"tricoclr/train.py: error: {error}", file=sys.stderr)
        return 2
    try:
        Trainer(config).run()
    except PreemptionRequested as stop:
        # Exit cleanly (a non-zero rank exit would make the launcher report a failure); the
        # PREEMPTED marker the trainer wrote tells the SLURM script to requeue.
        print(f"preempted: {stop}; rerun the same command to resume", file=sys.stderr)
    except ConfigError as error:  # found once the store is open (e.g. a modality it cannot serve)
        print(f"tricoclr/train.py: error: {error}", file=sys.stderr)
        return 2
    except FloatingPointError as stop:
        # Repeated non-finite losses: the message says where the last good checkpoint is.
        print(f"training stopped: {stop}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tricoclr", description="TriCoCLR: cooperative contrastive video learning.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train (same as tricoclr/train.py)")
    add_train_arguments(train)
    train.set_defaults(run=run_train)
    commands = {"eval": eval_cli, "export": export_cli}
    # The demo is optional (a trimmed install may leave it out); when present, its errors surface.
    if importlib.util.find_spec("tricoclr.demo") is not None:
        commands["demo"] = importlib.import_module("tricoclr.demo")
    for name, module in commands.items():
        command = sub.add_parser(name, help=module.__doc__.splitlines()[0] if module.__doc__ else None)
        module.add_arguments(command)
        command.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
