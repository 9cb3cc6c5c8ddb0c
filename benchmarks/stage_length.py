"""Is the demo's TriCoCLR − CoCLR gap limited by the RGB stage's length? (issue 15's measurement)

`benchmarks/demo_learnability.py` showed that even *ideal* oracles give the sound almost nothing
over the motion for the RGB encoder within ~1000 RGB steps, and +3.3 / +4.0 after 3000 only with
a visual trace 2.7 times deeper than the generator ships (docs/demo_data.md, section 9). This runs the same question through the real trainer: the demo's
rows InfoNCE, CoCLR and TriCoCLR with the RGB stage ``--epochs`` long instead of
``configs/small.yaml``'s ``stage_epochs``, everything else as the demo (its data, config,
pre-trained encoders, evaluation and paired intervals). It reuses a finished demo's prepared
stores and per-seed pre-training (``--demo-out``), so only the longer stages are trained:

    tricoclr demo --out demo_out
    python benchmarks/stage_length.py --demo-out demo_out --epochs 144 --seeds 1

Writes ``DEMO_OUT/stage_length_E<epochs>/results.{json,md}``; a re-run skips what exists.
``--quick`` reads a ``tricoclr demo --quick`` folder (its preset; the test suite runs it so).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tricoclr import demo  # noqa: E402
from tricoclr.eval.report import markdown_table  # noqa: E402

ROWS = [row for row in demo.VARIANTS if row[0] in ("InfoNCE", "CoCLR", "TriCoCLR")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo-out", required=True, type=Path, help="a finished `tricoclr demo --out` folder")
    parser.add_argument("--epochs", type=int, required=True, help="the RGB stage's epochs (the demo: stage_epochs)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--config", default=str(demo.DEFAULT_CONFIG))
    parser.add_argument("--quick", action="store_true", help="the folder is a `tricoclr demo --quick` one")
    args = parser.parse_args()
    out = args.demo_out / f"stage_length_E{args.epochs}"
    args.out = str(out)  # demo.evaluate caches features there
    preset = demo.PRESETS["quick" if args.quick else "full"]
    preset = dict(preset, overrides=[*preset["overrides"], f"schedule.stage_epochs={args.epochs}"])
    train_store, test_store = (args.demo_out / "prepared" / split for split in ("train", "test"))
    per_seed: dict[str, list[dict]] = {}
    for seed in range(args.seeds):
        for pretrain in ("pretrain", "pretrain_oracles"):  # the demo's own pre-training, reused
            source, target = (root / "runs" / f"seed{seed}" / pretrain for root in (args.demo_out, out))
            if not target.exists():
                shutil.copytree(source, target)
        encoders = demo.train_seed(out, seed, train_store, preset, args, variants=ROWS)
        demo.evaluate_seed(per_seed, {"random init": "random", **encoders}, train_store, test_store, args, seed)
    rows, comparisons = demo.summarise(per_seed), demo.compare(per_seed)
    (out / "results.json").write_text(json.dumps({"epochs": args.epochs, "rows": rows, "comparisons": comparisons}))
    table = markdown_table(rows, ["model", "R@1", "R@5", "R@10", "linear_top1"])
    text = f"RGB stage {args.epochs} epochs, {args.seeds} seed(s)\n\n{table}\n{demo.comparison_table(comparisons)}\n"
    (out / "results.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
