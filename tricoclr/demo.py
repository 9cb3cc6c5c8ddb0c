"""The whole method on the built-in data, in minutes on a CPU (`tricoclr demo --out DIR`).

synthesize -> prepare (RGB, Farneback flow, audio) -> InfoNCE pre-training of each modality ->
cooperative stages -> evaluation of the RGB encoder, for the paper's ablation in miniature:

    random init      the untrained encoder (random conv features already see colour/texture)
    InfoNCE          RGB alone, as many RGB optimizer steps as TriCoCLR gives RGB
    CoCLR            RGB + flow
    TriCoCLR         RGB + flow + audio
    TriCoCLR, no self-positive mask
                     the same without CoCLR's self-positive masking (its issue #43), which the
                     demo turns on for the cooperative rows: this row measures what it does
    TriCoCLR, standardized oracle
                     the same as TriCoCLR but mining with ``method.oracle_similarity=standardized``
                     (each oracle's cosines z-scored over the queue before summing, instead of the
                     paper's plain sum, where the audio oracle's wider-spread cosines decide alone)

The InfoNCE pre-training is shared within a seed (RGB in one run, the flow and audio oracles in
another), and each row continues from those encoders, so the rows differ only in what the
ablation varies. Every step is skipped when its output exists, so a second run reuses what is
done (and an interrupted one resumes).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from data_tools.cli import main as data_main
from tricoclr.config import load_config
from tricoclr.data import modalities as registry
from tricoclr.data.store import open_store
from tricoclr.eval.cli import display_name
from tricoclr.eval.features import extract_features
from tricoclr.eval.linear_probe import evaluate_probe, per_item_correct, train_linear_probe
from tricoclr.eval.report import markdown_table, retrieval_figure
from tricoclr.eval.retrieval import retrieval_metrics
from tricoclr.eval.stats import bootstrap_ci
from tricoclr.models import build_encoder, encoder_fingerprint, load_encoder

VARIANTS = [
    # name, modalities, extra overrides
    ("InfoNCE", ["rgb"], []),
    ("CoCLR", ["rgb", "flow"], []),
    ("TriCoCLR", ["rgb", "flow", "audio"], []),
    ("TriCoCLR, no self-positive mask", ["rgb", "flow", "audio"], ["method.mask_self_positive=false"]),
    ("TriCoCLR, standardized oracle", ["rgb", "flow", "audio"], ["method.oracle_similarity=standardized"]),
]

# Resolved from the package, not the working directory, so `tricoclr demo` runs from anywhere. The
# demo trains with the small-dataset recipe as shipped (backbones, clips, crops, queue, masking,
# schedule); it adds only its data settings (path, workers, seed) and, for --quick, the schedule
# overrides below.
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "small.yaml"

PRESETS = {
    # the synthesized data (classes, videos per class, train share, seconds, prepared size) and seeds
    "full": dict(classes=10, videos_per_class=60, train_fraction=0.5, seconds=4.0, size=64, seeds=3, overrides=[]),
    # quick: a shorter schedule and the queue a few steps can fill (it runs in the test suite)
    "quick": dict(
        classes=6,
        videos_per_class=8,
        train_fraction=0.5,
        seconds=6.0,
        size=64,
        seeds=1,
        overrides=[
            "schedule.pretrain_epochs={rgb: 3, flow: 3, audio: 3}",
            "schedule.stage_epochs=3",
            "method.queue_size=128",
        ],
    ),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="everything goes here (data, runs, results.json/.md, figure, tb/)")
    parser.add_argument("--quick", action="store_true", help="a smaller, one-seed variant in a few minutes")
    parser.add_argument("--seeds", type=int, default=None, help="number of training seeds (default 3, quick 1)")
    parser.add_argument("--workers", type=int, default=2, help="data workers (preparation and loading)")
    parser.add_argument(
        "--config",
        default=str(DEFAULT_CONFIG),
        help="the base training config (default: the repository's configs/small.yaml, wherever the demo runs from)",
    )


def _say(text: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {text}", flush=True)


def _data_cli(argv: list[str]) -> None:
    code = data_main(argv)
    if code != 0:
        raise SystemExit(f"tricoclr-data {' '.join(argv)} failed with exit code {code}")


def synthesize_data(synth: Path, preset: dict, workers: int) -> None:
    """The preset's synthesized videos and split lists under ``synth`` (``tricoclr-data synth``)."""
    _say(f"synthesizing {preset['classes']} classes x {preset['videos_per_class']} videos x {preset['seconds']} s")
    _data_cli(
        [
            "synth",
            "--out",
            str(synth),
            "--classes",
            str(preset["classes"]),
            "--videos-per-class",
            str(preset["videos_per_class"]),
            "--seconds",
            str(preset["seconds"]),
            "--train-fraction",
            str(preset["train_fraction"]),
            "--workers",
            str(workers),
        ]
    )


def prepare_store(synth: Path, listing: Path, store: Path, preset: dict, workers: int) -> None:
    """Prepare the synthesized videos of one split list into an LMDB store (RGB, Farneback flow,
    log-mel audio) with ``tricoclr-data prepare``, which resumes a store it finds there."""
    _say(f"preparing {listing.name} -> {store} (lmdb, Farneback flow, log-mel audio)")
    _data_cli(
        [
            "prepare",
            str(synth / "videos"),
            "--out",
            str(store),
            "--format",
            "lmdb",
            "--list",
            str(listing),
            "--flow",
            "farneback",
            "--size",
            str(preset["size"]),
            "--workers",
            str(workers),
        ]
    )


def prepare_data(out: Path, preset: dict, workers: int) -> tuple[Path, Path, Path]:
    synth = out / "synth"
    if not (synth / "splits" / "testlist01.txt").exists():
        synthesize_data(synth, preset, workers)
    stores = {}
    for split in ("train", "test"):
        stores[split] = out / "prepared" / split
        prepare_store(synth, synth / "splits" / f"{split}list01.txt", stores[split], preset, workers)
    return synth, stores["train"], stores["test"]


def _train(config_path: str, overrides: list[str]) -> None:
    # Imported here: `tricoclr` builds this module's parser for every command, and the trainer
    # loads Accelerate, which `tricoclr eval` must not pay for.
    from tricoclr.trainer import Trainer

    config = load_config(config_path, overrides)
    Trainer(config).run()


def rgb_stage_encoder(run_dir: Path, mods: list[str]) -> Path:
    """Where a compared row's RGB encoder lands: InfoNCE continues pre-training, the others a cycle."""
    stage = "pretrain-rgb" if mods == ["rgb"] else "cycle1-rgb"
    return run_dir / "encoders" / stage / "rgb.safetensors"


def train_rgb_stage(
    config_path: str, overrides: list[str], run_dir: Path, mods: list[str], start: dict[str, Path], epochs: int
) -> Path:
    """Train one compared row's RGB stage for ``epochs`` from the pre-trained encoders ``start``
    (one file per modality in ``mods``); returns the RGB encoder's file. ``overrides`` are the
    row's config overrides (seed, data, its own method settings)."""
    stage = rgb_stage_encoder(run_dir, mods).parent.name
    (run_dir / "encoders").mkdir(parents=True, exist_ok=True)
    if not (run_dir / "checkpoints").exists():  # a fresh run starts from the shared pre-trained encoders
        for mod in mods:
            shutil.copy(start[mod], run_dir / "encoders" / f"{mod}.safetensors")
    # Each row trains RGB only after pre-training: within one cycle the flow and audio stages come
    # after RGB's and could only change the oracles of a later cycle. InfoNCE continues RGB alone
    # for as many epochs as the cooperative RGB stage gets.
    _train(
        config_path,
        overrides
        + [
            f"output_dir={run_dir}",
            f"modalities=[{','.join(mods)}]",
            f"schedule.start_stage={stage}",
            "schedule.cycles=1",
            "schedule.order=[rgb]",
            f"schedule.pretrain_epochs={epochs}",
        ],
    )
    return rgb_stage_encoder(run_dir, mods)


def seed_overrides(preset: dict, seed: int, train_store: Path, workers: int) -> list[str]:
    """The config overrides every training run of one seed shares: the preset's, seed, data, resume."""
    return [*preset["overrides"], f"seed={seed}", f"data.path={train_store}", f"data.workers={workers}", "resume=true"]


def train_seed(out: Path, seed: int, train_store: Path, preset: dict, args, variants=VARIANTS) -> dict[str, Path]:
    """Pre-train every modality once, then each variant's cooperative (or continued) stages.

    ``variants``: (name, modalities, extra overrides) rows, the demo's ``VARIANTS`` by default.
    Every step whose encoder exists is skipped (a re-run resumes)."""
    runs = out / "runs" / f"seed{seed}"
    common = seed_overrides(preset, seed, train_store, args.workers)
    schedule = load_config(args.config, preset["overrides"])["schedule"]
    stage_epochs = schedule["stage_epochs"]
    # InfoNCE pre-training is per modality and independent, so RGB and the two future oracles are
    # pre-trained in separate runs: the oracles get more epochs (cheap: flow and audio steps cost a
    # fraction of an RGB step) because the cooperative stages are only as good as their mining.
    pretrain_dirs = {"rgb": runs / "pretrain", "flow": runs / "pretrain_oracles", "audio": runs / "pretrain_oracles"}
    for mods in (["rgb"], ["flow", "audio"]):
        run_dir = pretrain_dirs[mods[0]]
        if not all((run_dir / "encoders" / f"pretrain-{mod}" / f"{mod}.safetensors").exists() for mod in mods):
            _say(f"seed {seed}: InfoNCE pre-training of {' and '.join(mods)} ({schedule['pretrain_epochs']} epochs)")
            _train(
                args.config, common + [f"output_dir={run_dir}", f"modalities=[{','.join(mods)}]", "schedule.cycles=0"]
            )
    pretrained = {mod: run_dir / "encoders" / f"{mod}.safetensors" for mod, run_dir in pretrain_dirs.items()}
    encoders = {}
    for name, mods, extra in variants:
        run_dir = runs / slug(name)
        encoders[name] = rgb_stage_encoder(run_dir, mods)
        if not encoders[name].exists():
            _say(f"seed {seed}: {name} ({'+'.join(mods)}): {encoders[name].parent.name} for {stage_epochs} epochs")
            train_rgb_stage(args.config, common + list(extra), run_dir, mods, pretrained, stage_epochs)
    encoders["InfoNCE (pre-training only)"] = pretrained["rgb"]
    return encoders


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")


def evaluate(encoder_path, train_store: Path, test_store: Path, args, seed: int) -> dict:
    config = load_config(args.config)
    if encoder_path == "random":
        torch.manual_seed(seed)
        encoder, key = build_encoder(config, "rgb"), f"random-demo-{seed}"
    else:
        encoder, _ = load_encoder(encoder_path)
        key = encoder_fingerprint(encoder_path)
    data_cfg = config["data"]
    train = extract_features(encoder, "rgb", train_store, data_cfg, cache_key=key, cache_dir=Path(args.out) / "cache")
    test = extract_features(encoder, "rgb", test_store, data_cfg, cache_key=key, cache_dir=Path(args.out) / "cache")
    retrieval = retrieval_metrics(train["features"], train["labels"], test["features"], test["labels"], ks=(1, 5, 10))
    num_classes = int(train["labels"].max()) + 1
    probe = train_linear_probe(train["features"], train["labels"], num_classes, seed=seed)
    linear = evaluate_probe(probe, test["features"], test["labels"])
    logits = probe.logits(test["features"])
    return {
        "R@1": retrieval["R@1"],
        "R@5": retrieval["R@5"],
        "R@10": retrieval["R@10"],
        "chance_R@1": retrieval["chance_R@1"],
        "linear_top1": linear["top1"],
        "hits": retrieval["hits"].float().tolist(),
        "linear_hits": per_item_correct(logits, test["labels"], ks=(1,))[:, 0].float().tolist(),
        "neighbours": retrieval["neighbours"].tolist(),
        "train": train,
        "test": test,
    }


def evaluate_seed(
    per_seed: dict[str, list[dict]], encoders: dict, train_store: Path, test_store: Path, args, seed: int
):
    """Evaluate one seed's encoders (name -> file, or "random") and append each result to its row."""
    for name, path in encoders.items():
        per_seed.setdefault(name, []).append(evaluate(path, train_store, test_store, args, seed))


def percent_outcomes(results: list[dict], key: str) -> torch.Tensor:
    """(seeds, N[, ks]) per-test-video outcomes (0 or 100) of one row, for the bootstraps."""
    return torch.tensor([r[key] for r in results]) * 100


def summarise(per_seed: dict[str, list[dict]]) -> list[dict]:
    rows = []
    for name, results in per_seed.items():
        row = {"model": name, "modalities": MODALITIES_OF.get(name, "RGB"), "seeds": len(results)}
        hits = percent_outcomes(results, "hits")  # (seeds, N, len(ks))
        for column, metric in enumerate(("R@1", "R@5", "R@10")):
            mean, low, high = bootstrap_ci(hits[:, :, column])
            row[metric], row[f"{metric}_ci"] = mean, [low, high]
        mean, low, high = bootstrap_ci(percent_outcomes(results, "linear_hits"))
        row["linear_top1"], row["linear_top1_ci"] = mean, [low, high]
        row["chance_R@1"] = sum(r["chance_R@1"] for r in results) / len(results)
        row["per_seed"] = [{k: r[k] for k in ("R@1", "R@5", "R@10", "linear_top1")} for r in results]
        rows.append(row)
    return rows


# The ablation's claims, each a paired difference (first row minus second) of R@1 and linear top-1.
COMPARISONS = [
    ("InfoNCE", "random init"),
    ("CoCLR", "InfoNCE"),
    ("TriCoCLR", "CoCLR"),
    ("TriCoCLR", "InfoNCE"),
    ("TriCoCLR", "TriCoCLR, no self-positive mask"),
    ("TriCoCLR, standardized oracle", "TriCoCLR"),
    ("TriCoCLR", "random init"),
]


def compare(per_seed: dict[str, list[dict]]) -> list[dict]:
    """Paired differences between rows: every row is evaluated on the same test videos (and seeds),
    so the bootstrap resamples test videos once for both and the interval is that of the
    difference, much narrower than comparing the two rows' own intervals."""
    return [
        {"a": first, "b": second, **paired_difference(per_seed, first, second)}
        for first, second in COMPARISONS
        if first in per_seed and second in per_seed
    ]


def paired_difference(per_seed: dict[str, list[dict]], first: str, second: str) -> dict:
    """R@1 and linear top-1 of row ``first`` minus row ``second`` (percentage points), each with
    the 95 % bootstrap interval of the difference over the same test videos and seeds."""
    entry = {}
    for metric, key, column in (("R@1", "hits", 0), ("linear_top1", "linear_hits", None)):
        a, b = (percent_outcomes(per_seed[name], key) for name in (first, second))
        if column is not None:
            a, b = a[..., column], b[..., column]
        mean, low, high = bootstrap_ci(a - b)
        entry[metric], entry[f"{metric}_ci"] = mean, [low, high]
    return entry


def comparison_table(comparisons: list[dict]) -> str:
    rows = [
        {"difference": f"{c['a']} − {c['b']}", **{k: v for k, v in c.items() if k not in ("a", "b")}}
        for c in comparisons
    ]
    return markdown_table(rows, ["difference", "R@1", "linear_top1"], signed=True).rstrip("\n")


# The table's "modalities" of each row, from the variant list itself (rows not listed are RGB only).
MODALITIES_OF = {name: "+".join(display_name(mod) for mod in mods) for name, mods, _ in VARIANTS}


def run(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    preset = dict(PRESETS["quick" if args.quick else "full"])
    if args.seeds:
        preset["seeds"] = args.seeds
    args.out = str(out)
    _say(
        f"settings: {json.dumps(preset)}; config {args.config} "
        f"(small 3D CNN, 8-frame clips prepared at {preset['size']}^2, Farneback flow); "
        f"{torch.get_num_threads()} threads"
    )
    started = time.time()
    synth, train_store, test_store = prepare_data(out, preset, args.workers)
    per_seed: dict[str, list[dict]] = {}
    for seed in range(preset["seeds"]):
        encoders = train_seed(out, seed, train_store, preset, args)
        evaluate_seed(per_seed, {"random init": "random", **encoders}, train_store, test_store, args, seed)
    rows = summarise(per_seed)
    tri = per_seed["TriCoCLR"][0]
    _retrieval_figure(out / "retrieval.png", tri, train_store)
    comparisons = compare(per_seed)
    results = {
        "rows": [{k: v for k, v in r.items()} for r in rows],
        "comparisons": comparisons,
        "settings": preset,
        "num_test": len(tri["test"]["ids"]),
        "num_train": len(tri["train"]["ids"]),
        "minutes": (time.time() - started) / 60,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    table = markdown_table(
        rows,
        ["model", "modalities", "R@1", "R@5", "R@10", "linear_top1"],
        modality_columns=[display_name(mod) for mod in registry.MODALITIES],
    )
    header = (
        f"RGB-encoder evaluation on the synthesized test split ({results['num_test']} videos; "
        f"mean over {preset['seeds']} seed(s), 95% bootstrap CI over test videos)\n\n"
    )
    paired = (
        "\n\nPaired differences (first row minus second; 95% bootstrap CI over the same test videos, "
        "seeds averaged):\n\n" + comparison_table(comparisons)
    )
    (out / "results.md").write_text(header + table + paired + "\n")
    print(header + table + paired)
    _say(
        f"done in {results['minutes']:.1f} min; results in {out / 'results.json'}, figure {out / 'retrieval.png'}, "
        f"TensorBoard: tensorboard --logdir {out / 'runs'}"
    )
    return 0


def _retrieval_figure(path: Path, result: dict, train_store: Path, num_queries: int = 6) -> None:
    """The paper's Figures 4-6 in miniature: test queries and their top-5 train neighbours."""
    train, test = result["train"], result["test"]
    step = max(1, len(test["ids"]) // num_queries)
    queries = list(range(0, len(test["ids"]), step))[:num_queries]
    neighbours = [result["neighbours"][q][:5] for q in queries]
    retrieval_figure(
        [test["thumbnails"][q] for q in queries],
        [[train["thumbnails"][n] for n in row] for row in neighbours],
        [int(test["labels"][q]) for q in queries],
        [[int(train["labels"][n]) for n in row] for row in neighbours],
        path,
        class_names=open_store(train_store).class_names(),
    )
