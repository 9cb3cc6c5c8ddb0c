"""`tricoclr-data`: synthesize a dataset, prepare videos into shards, inspect a prepared store."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from data_tools import inspect_data, prepare, synth

    parser = argparse.ArgumentParser(
        prog="tricoclr-data",
        description="Data preparation for TriCoCLR: raw videos -> WebDataset shards or LMDB.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    commands = {
        "synth": (synth, "write the built-in labelled multimodal video dataset (H.264 + AAC)"),
        "prepare": (prepare, "decode videos once into RGB/flow/audio shards (webdataset or lmdb)"),
        "inspect": (inspect_data, "statistics and a contact sheet of a prepared dataset"),
    }
    for name, (module, help_text) in commands.items():
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(command_parser)
        command_parser.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
