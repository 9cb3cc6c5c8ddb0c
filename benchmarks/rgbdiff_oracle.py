"""Is RGB difference a motion oracle that costs no optical flow? (issue 16's measurement)

On the demo's synthesized data and settings (``tricoclr.demo``: its presets, config and overrides),
per seed: InfoNCE pre-training of RGB and of each oracle (flow; rgbdiff), then the RGB stage of

    InfoNCE         RGB alone, continued for as many epochs as the cooperative RGB stage gets
    CoCLR, flow     modalities=[rgb,flow]     (the demo's CoCLR row)
    CoCLR, rgbdiff  modalities=[rgb,rgbdiff]  (RGB difference as the motion oracle)

and the RGB encoder of each evaluated as the demo does (kNN retrieval and a linear probe on the
test split), 3 seeds by default, with paired bootstrap intervals over the same test videos.

Wall time per row includes preparation: the train and test splits are prepared once with
Farneback flow (every row trains on that store: a stage reads only the parts its modalities
need, so the rgbdiff rows read exactly what a flow-less store holds) and once more with
``--flow none``, only to time what a user without flow pays; a row's time is its preparation
(with flow for rows using flow, without otherwise) plus the training runs it needs (shared
pre-training counted in full for every row that uses it) plus its evaluation.

    python benchmarks/rgbdiff_oracle.py --out rgbdiff_out [--seeds 3] [--quick] [--config configs/tiny.yaml]

(``--smoke``: a one-minute plumbing check with meaningless figures.) Synthesis is timed apart and
counted in no row.

Writes ``results.json`` and ``results.md`` (table, paired differences, wall times) under ``--out``;
every step is skipped when its output exists (timings then come from ``timings.json``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tricoclr import demo  # noqa: E402
from tricoclr.config import load_config, pretrain_epochs  # noqa: E402
from tricoclr.eval.report import markdown_table  # noqa: E402

# name, modalities of the RGB stage, the oracle pre-trained for it (None: InfoNCE)
ROWS = [
    ("InfoNCE", ["rgb"], None),
    ("CoCLR, flow", ["rgb", "flow"], "flow"),
    ("CoCLR, rgbdiff", ["rgb", "rgbdiff"], "rgbdiff"),
]
COMPARISONS = [("CoCLR, rgbdiff", "InfoNCE"), ("CoCLR, flow", "InfoNCE"), ("CoCLR, rgbdiff", "CoCLR, flow")]
SMOKE = dict(
    classes=4,
    videos_per_class=8,
    train_fraction=0.5,
    seconds=2.0,
    size=64,
    seeds=1,
    overrides=["schedule.pretrain_epochs=1", "schedule.stage_epochs=1", "method.queue_size=128"],
)
# The demo's tiny config names no backbone for rgbdiff (its registry default is S3D): the demo's.
OVERRIDES = ["model.backbones.rgbdiff=tiny3d"]


class Timings:
    """Seconds per named step, kept in ``timings.json`` so a rerun that skips a step keeps its time."""

    def __init__(self, path: Path):
        self.path = path
        self.values = json.loads(path.read_text()) if path.exists() else {}

    def run(self, key: str, done: bool, action) -> float:
        if not done or key not in self.values:
            started = time.time()
            action()
            self.values[key] = time.time() - started
            self.path.write_text(json.dumps(self.values, indent=2))
        return self.values[key]


def prepare(out: Path, preset: dict, workers: int, timings: Timings) -> tuple[Path, Path]:
    """The demo's stores (with flow), timed; and a flow-less preparation of the same videos, timed."""
    synth = out / "synth"
    timings.run(
        "synthesize",
        (synth / "splits" / "testlist01.txt").exists(),
        lambda: demo.synthesize_data(synth, preset, workers),
    )
    stores = {}
    timings.run(
        "prepare_with_flow",
        (out / "prepared" / "test" / "summary.json").exists(),
        lambda: stores.update(zip(("synth", "train", "test"), demo.prepare_data(out, preset, workers))),
    )
    if not stores:
        stores = {"synth": out / "synth", "train": out / "prepared" / "train", "test": out / "prepared" / "test"}

    def without_flow():
        for split in ("train", "test"):
            demo._data_cli(
                [
                    "prepare",
                    str(stores["synth"] / "videos"),
                    "--out",
                    str(out / "prepared_noflow" / split),
                    "--format",
                    "lmdb",
                    "--list",
                    str(stores["synth"] / "splits" / f"{split}list01.txt"),
                    "--flow",
                    "none",
                    "--size",
                    str(preset["size"]),
                    "--workers",
                    str(workers),
                ]
            )

    timings.run("prepare_without_flow", (out / "prepared_noflow" / "test" / "summary.json").exists(), without_flow)
    return stores["train"], stores["test"]


def train_seed(out: Path, seed: int, train_store: Path, preset: dict, args, timings: Timings) -> dict[str, Path]:
    """Pre-train RGB and each oracle alone, then each row's RGB stage from those encoders."""
    runs = out / "runs" / f"seed{seed}"
    common = [*demo.seed_overrides(preset, seed, train_store, args.workers), *OVERRIDES]
    config = load_config(args.config, common)
    schedule = config["schedule"]
    # The recipe's epochs (configs/small.yaml): RGB's own, and the flow oracle's for both oracles.
    pretrain = {mod: pretrain_epochs(config, mod) for mod in ("rgb", "flow")}
    pretrained = {}
    for mod, epochs in (("rgb", pretrain["rgb"]), ("flow", pretrain["flow"]), ("rgbdiff", pretrain["flow"])):
        run_dir = runs / f"pretrain_{mod}"
        pretrained[mod] = run_dir / "encoders" / f"{mod}.safetensors"
        timings.run(
            f"seed{seed}/pretrain_{mod}",
            pretrained[mod].exists(),
            lambda: demo._train(
                args.config,
                common
                + [
                    f"output_dir={run_dir}",
                    f"modalities=[{mod}]",
                    "schedule.cycles=0",
                    f"schedule.pretrain_epochs={epochs}",
                ],
            ),
        )
    encoders = {}
    for name, mods, _ in ROWS:
        run_dir = runs / demo.slug(name)
        encoders[name] = demo.rgb_stage_encoder(run_dir, mods)
        timings.run(
            f"seed{seed}/{demo.slug(name)}",
            encoders[name].exists(),
            lambda run_dir=run_dir, mods=mods: demo.train_rgb_stage(
                args.config, common, run_dir, mods, pretrained, schedule["stage_epochs"]
            ),
        )
    return encoders


def wall_times(timings: dict, seeds: int) -> list[dict]:
    """Minutes per row and seed: preparation + the pre-training it needs + its stage + evaluation."""
    rows = []
    for name, mods, oracle in ROWS:
        prep = timings["prepare_with_flow" if "flow" in mods else "prepare_without_flow"]
        per_seed = [
            sum(
                timings[f"seed{s}/{key}"]
                for key in (
                    "pretrain_rgb",
                    *([f"pretrain_{oracle}"] if oracle else []),
                    demo.slug(name),
                    f"eval/{demo.slug(name)}",
                )
            )
            for s in range(seeds)
        ]
        rows.append(
            {
                "model": name,
                "preparation_min": prep / 60,
                "training_and_eval_min_per_seed": sum(per_seed) / len(per_seed) / 60,
                "total_min_one_seed": (prep + sum(per_seed) / len(per_seed)) / 60,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--quick", action="store_true", help="the demo's quick preset (one seed unless --seeds)")
    parser.add_argument("--smoke", action="store_true", help="a plumbing check in a minute, meaningless figures")
    parser.add_argument("--seeds", type=int, default=None, help="default: the preset's (full: 3)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--config", default=str(demo.DEFAULT_CONFIG))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    args.out = str(out)
    preset = dict(SMOKE if args.smoke else demo.PRESETS["quick" if args.quick else "full"])
    preset["seeds"] = args.seeds or preset["seeds"]
    timings = Timings(out / "timings.json")
    train_store, test_store = prepare(out, preset, args.workers, timings)
    per_seed: dict[str, list[dict]] = {}
    for seed in range(preset["seeds"]):
        encoders = train_seed(out, seed, train_store, preset, args, timings)
        for name, path in encoders.items():
            result = {}
            timings.run(
                f"seed{seed}/eval/{demo.slug(name)}",
                False,
                lambda: result.update(demo.evaluate(path, train_store, test_store, args, seed)),
            )
            per_seed.setdefault(name, []).append(result)
    write_results(out, preset, per_seed, timings.values)


def write_results(out: Path, preset: dict, per_seed: dict, timings: dict) -> None:
    demo_comparisons, demo.COMPARISONS = demo.COMPARISONS, COMPARISONS
    try:
        rows, comparisons = demo.summarise(per_seed), demo.compare(per_seed)
    finally:
        demo.COMPARISONS = demo_comparisons
    for row, (_, mods, _) in zip(rows, ROWS):
        row["modalities"] = "+".join(demo.display_name(m) for m in mods)
    times = wall_times(timings, preset["seeds"])
    results = {"rows": rows, "comparisons": comparisons, "wall_times": times, "settings": preset, "timings_s": timings}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    text = (
        f"RGB encoder on the synthesized test split (mean over {preset['seeds']} seed(s), 95% bootstrap CI "
        "over test videos)\n\n"
        + markdown_table(rows, ["model", "modalities", "R@1", "R@5", "linear_top1"])
        + "\nPaired differences (first minus second, 95% bootstrap CI):\n\n"
        + demo.comparison_table(comparisons)
        + "\n\nWall time (minutes; preparation once, training and evaluation per seed):\n\n"
        + markdown_table(times, ["model", "preparation_min", "training_and_eval_min_per_seed", "total_min_one_seed"])
    )
    (out / "results.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
