"""Choose between recipes on training videos only, with the real trainer (issue 15, section 7f).

The demo's figures are measured on its test videos, so a recipe must not be chosen by them. This
trains the demo's InfoNCE, CoCLR and TriCoCLR rows exactly as `tricoclr demo` does (its data,
`configs/small.yaml`, per-seed pre-training, RGB stage) once per ``--variant`` (config overrides;
the first variant is the baseline), on the demo's *training* videos alone, and evaluates each RGB
encoder with the demo's protocol inside them: the even-positioned training videos of each class
are the gallery (and the linear probe's training set), the odd-positioned ones the queries. The
test videos are never prepared or read. Paired intervals compare each variant's row with the
baseline's over the same query videos and seeds.

    python benchmarks/recipe_validation.py --out recipe_val \\
        --variant "crops-60-100=data.crop_scale=[0.6,1.0]" --variant "whole-frame=data.crop_scale=[1.0,1.0]"

Writes ``OUT/results.{json,md}``; a re-run skips what exists. ``--quick`` uses the quick demo's
data and schedule (a smoke run).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tricoclr import demo  # noqa: E402
from tricoclr.eval.report import markdown_table  # noqa: E402

ROWS = [row for row in demo.VARIANTS if row[0] in ("InfoNCE", "CoCLR", "TriCoCLR")]


def validation_lists(trainlist: Path) -> tuple[list[str], list[str]]:
    """(gallery, queries) lines of a UCF101-style train list: the even- and odd-positioned videos
    of each class, in list order, so both halves hold every class with more than one video.

    Raises ValueError on a line without a class index (a test list's format)."""
    position: dict[str, int] = {}
    gallery, queries = [], []
    for line in trainlist.read_text().splitlines():
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) < 2:
            raise ValueError(f"{trainlist}: {line!r} has no class index; a training list is needed")
        label = fields[-1]
        (queries if position.get(label, 0) % 2 else gallery).append(line)
        position[label] = position.get(label, 0) + 1
    return gallery, queries


def prepare(out: Path, preset: dict, workers: int) -> dict[str, Path]:
    """Synthesize the preset's data; prepare its training videos, and their two halves."""
    synth = out / "synth"
    if not (synth / "splits" / "trainlist01.txt").exists():
        demo.synthesize_data(synth, preset, workers)
    trainlist = synth / "splits" / "trainlist01.txt"
    gallery, queries = validation_lists(trainlist)
    lists = {"train": trainlist}
    for name, lines in (("gallery", gallery), ("queries", queries)):
        lists[name] = synth / "splits" / f"validation_{name}.txt"
        lists[name].write_text("".join(line + "\n" for line in lines))
    stores = {name: out / "prepared" / name for name in lists}
    for name, listing in lists.items():
        demo.prepare_store(synth, listing, stores[name], preset, workers)
    return stores


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument(
        "--variant",
        action="append",
        required=True,
        help="NAME=OVERRIDE[;OVERRIDE...] (config overrides; empty for the config as is); the first is the baseline",
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--config", default=str(demo.DEFAULT_CONFIG))
    parser.add_argument("--quick", action="store_true", help="the quick demo's data and schedule")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    base = demo.PRESETS["quick" if args.quick else "full"]
    if args.quick:  # the linear probe holds out part of its (gallery) videos: >= 4 per class
        base = dict(base, videos_per_class=16)
    stores = prepare(args.out, base, args.workers)
    variants = [spec.partition("=")[::2] for spec in args.variant]
    per_seed: dict[str, list[dict]] = {}
    for name, overrides in variants:
        preset = dict(base, overrides=[*base["overrides"], *filter(None, overrides.split(";"))])
        run_args = argparse.Namespace(**{**vars(args), "out": str(args.out / name)})  # evaluate caches there
        for seed in range(args.seeds):
            trained = demo.train_seed(args.out / name, seed, stores["train"], preset, run_args, variants=ROWS)
            encoders = {f"{row} ({name})": path for row, path in trained.items()}
            if name == variants[0][0]:
                encoders = {"random init": "random", **encoders}
            demo.evaluate_seed(per_seed, encoders, stores["gallery"], stores["queries"], run_args, seed)
    rows = demo.summarise(per_seed)
    baseline = variants[0][0]
    pairs = [
        (row, row.replace(f"({name})", f"({baseline})"))
        for name, _ in variants[1:]
        for row in per_seed
        if row.endswith(f"({name})")
    ]
    comparisons = [{"difference": f"{a} − {b}", **demo.paired_difference(per_seed, a, b)} for a, b in pairs]
    (args.out / "results.json").write_text(
        json.dumps({"variants": dict(variants), "rows": rows, "comparisons": comparisons})
    )
    table = markdown_table(rows, ["model", "R@1", "R@5", "R@10", "linear_top1"])
    difference = markdown_table(comparisons, ["difference", "R@1", "linear_top1"], signed=True)
    text = f"Training videos only: {args.seeds} seed(s)\n\n{table}\n{difference}"
    (args.out / "results.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
