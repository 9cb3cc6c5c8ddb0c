"""Evaluate an encoder: `tricoclr eval retrieval|linear|finetune --encoder E --train T --test T --json OUT`.

    tricoclr eval retrieval --encoder runs/x/encoders/cycle1-rgb/rgb.safetensors \\
        --train prepared/ucf101_train --test prepared/ucf101_test --json results/x_retrieval.json \\
        [--png retrieval.png] [--projector tb/projector]
    tricoclr eval linear   ... (same options)           -> top1, top5
    tricoclr eval finetune ... [--finetune-epochs N]    -> top1 (resumes from --output-dir)

``--encoder random`` evaluates an untrained encoder built from ``--config`` (default
configs/tiny.yaml, looked up in the working directory, then in the repository), ``--modality``
(default rgb) and ``--seed``: the floor every results table needs.

Outputs: the metrics as JSON at ``--json`` and, beside it, a markdown table in the paper's layout
(model, a check mark per modality the encoder was trained with, metrics with 95% bootstrap
intervals over test videos).

Fine-tuning at scale (mixed precision, many ranks, resume) runs under Accelerate; launch the
module, so the repository's package is what is imported:

    accelerate launch [--num_processes N] [--mixed_precision bf16] -m tricoclr.cli eval finetune ...

Retrieval and the linear probe run on one process: under a launch, ranks other than 0 return at once.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from tricoclr.config import CLIP_KEYS, Config, clip_settings, load_config
from tricoclr.data import modalities as registry
from tricoclr.data.store import open_store
from tricoclr.eval.features import EvalError, default_cache_dir, extract_features
from tricoclr.eval.finetune import run_finetune
from tricoclr.eval.linear_probe import evaluate_probe, per_item_correct, train_linear_probe
from tricoclr.eval.report import markdown_table, retrieval_figure, write_projector
from tricoclr.eval.retrieval import DEFAULT_KS, center_and_normalise, retrieval_metrics
from tricoclr.eval.stats import confidence_interval
from tricoclr.models import build_encoder, load_encoder

TASKS = ("retrieval", "linear", "finetune")
METRIC_COLUMNS = {
    "retrieval": ["R@1", "R@5", "R@10", "R@20", "R@50", "chance_R@1"],
    "linear": ["top1", "top5"],
    "finetune": ["top1"],
}
DEFAULT_CONFIG = "configs/tiny.yaml"
REPOSITORY = Path(__file__).resolve().parents[2]
RUN_CONFIG_FILE = "config.yaml"  # what the trainer writes into its output_dir
FIGURE_QUERIES = 6


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("task", choices=TASKS)
    parser.add_argument(
        "--encoder", required=True, help="an encoders/.../<modality>.safetensors file written by training, or 'random'"
    )
    parser.add_argument(
        "--train",
        required=True,
        help="prepared labelled training store (e.g. UCF101 trainlist01): a path, or the URL of a "
        "WebDataset store (docs/url_stores.md)",
    )
    parser.add_argument(
        "--test", required=True, help="prepared labelled test store (e.g. UCF101 testlist01): a path or a URL"
    )
    parser.add_argument("--json", required=True, help="where to write the metrics (a .md table is written beside it)")
    parser.add_argument(
        "--config",
        default=None,
        help=f"random encoder: its architecture and clip settings (default {DEFAULT_CONFIG}); "
        "trained encoder: the base for settings its file does not carry "
        "(default: the run's config.yaml beside the encoders)",
    )
    parser.add_argument("--modality", default=None, help="modality of a random encoder (default rgb)")
    parser.add_argument("--model-name", default=None, help="row name in the markdown table")
    parser.add_argument(
        "--modalities",
        default=None,
        help="table check marks, e.g. rgb+flow+audio (default: what the encoder was trained with)",
    )
    parser.add_argument("--png", default=None, help="retrieval figure: queries and their top-5 neighbours")
    parser.add_argument("--projector", default=None, help="write the test embeddings to TensorBoard's projector here")
    parser.add_argument(
        "--max-clips",
        type=int,
        default=None,
        help="at most this many clips per video, evenly spread (default: all; fine-tuning's test: 10)",
    )
    parser.add_argument("--batch-size", type=int, default=16, help="clips per forward pass when extracting features")
    parser.add_argument("--workers", type=int, default=None, help="data loader workers (default: the config's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random encoder, the probe and fine-tuning")
    parser.add_argument(
        "--cache-dir",
        default=None,
        help="feature cache (default $TRICOCLR_CACHE/features or ~/.cache/tricoclr/features)",
    )
    parser.add_argument("--no-cache", action="store_true", help="do not read or write the feature cache")
    parser.add_argument("--finetune-epochs", type=int, default=10, help="fine-tuning epochs in total (default 10)")
    parser.add_argument(
        "--finetune-batch-size",
        type=int,
        default=None,
        help="fine-tuning batch per rank (default: the config's batch_size)",
    )
    parser.add_argument(
        "--output-dir",
        default=None,
        help="fine-tuning checkpoint and log, resumed when present (default: <json stem>_finetune/)",
    )


# ---- the encoder under evaluation ---------------------------------------------------------------


@dataclass
class EvalEncoder:
    encoder: torch.nn.Module
    modality: str
    config: Config  # data settings as the encoder saw them in training; batch size and lr for fine-tuning
    name: str  # table row
    trained_with: list[str]  # modalities whose information shaped it (table check marks)


def resolve_config(path: str | None) -> Path:
    """A config path as given, else relative to the repository (so the default works anywhere)."""
    candidate = Path(path or DEFAULT_CONFIG)
    if candidate.exists():
        return candidate
    if not candidate.is_absolute() and (REPOSITORY / candidate).exists():
        return REPOSITORY / candidate
    raise EvalError(f"config {candidate} not found (in the working directory or {REPOSITORY})")


def find_run_config(encoder_path: Path) -> Path | None:
    """The training run's config.yaml: <output_dir>/encoders[/<stage>]/<modality>.safetensors."""
    for folder in list(encoder_path.resolve().parents)[:2]:
        if folder.name == "encoders" and (folder.parent / RUN_CONFIG_FILE).is_file():
            return folder.parent / RUN_CONFIG_FILE
    return None


def load_eval_encoder(args) -> EvalEncoder:
    if args.encoder == "random":
        return random_encoder(args)
    return trained_encoder(args)


def random_encoder(args) -> EvalEncoder:
    config = load_config(resolve_config(args.config))
    modality = args.modality or registry.DEFAULT_EVAL_MODALITY
    if modality not in registry.MODALITIES:
        raise EvalError(f"unknown modality {modality!r}; registered: {sorted(registry.MODALITIES)}")
    torch.manual_seed(args.seed)
    encoder = build_encoder(config, modality).eval()
    return EvalEncoder(encoder, modality, config, "random init", [modality])


def trained_encoder(args) -> EvalEncoder:
    path = Path(args.encoder)
    if not path.is_file():
        raise EvalError(f"encoder {path} not found: pass an encoders/.../<modality>.safetensors file or 'random'")
    encoder, metadata = load_encoder(path)
    modality = metadata["modality"]
    if args.modality and args.modality != modality:
        raise EvalError(f"{path} is a {modality} encoder, not {args.modality}")
    run_config_path = find_run_config(path)
    run_config = load_config(run_config_path) if run_config_path else None
    config = load_config(resolve_config(args.config)) if args.config else run_config or load_config()
    if "data" in metadata:  # the clip settings it was trained with win over any config
        saved = json.loads(metadata["data"])  # older encoders lack some keys: those keep the config's
        config = config.replace(data={k: v for k, v in saved.items() if k in CLIP_KEYS})
    stage = metadata.get("stage")
    # A pre-training stage saw its own modality only; a cooperative stage saw the run's modalities.
    pretraining = run_config is None or (stage or "").startswith("pretrain")
    trained_with = [modality] if pretraining else list(run_config.modalities)
    run_name = run_config_path.parent.name if run_config_path else path.parent.name
    name = f"{run_name} ({stage})" if stage else run_name
    return EvalEncoder(encoder, modality, config, name, trained_with)


# ---- data -------------------------------------------------------------------------------------


def check_label_agreement(train_store, test_store) -> list[str]:
    """The shared class list; train and test label indices must come from the same classInd.txt."""
    train_names, test_names = train_store.class_names(), test_store.class_names()
    for store, names in ((train_store, train_names), (test_store, test_names)):
        if not names:
            raise EvalError(f"{store.root} has no labels: prepare it with --list (a split file) and its classInd.txt")
    if train_names != test_names:
        raise EvalError(
            f"label mismatch: {train_store.root} and {test_store.root} were prepared with different class lists "
            f"({describe_class_difference(train_names, test_names)}), so their label indices disagree. "
            "Prepare both with the split files of one dataset (one classInd.txt, or --class-index)."
        )
    return train_names


def describe_class_difference(train_names: list[str], test_names: list[str]) -> str:
    only_train = sorted(set(train_names) - set(test_names))
    only_test = sorted(set(test_names) - set(train_names))
    if only_train or only_test:
        return (
            f"{len(train_names)} vs {len(test_names)} classes; only in train: {only_train[:3]}, "
            f"only in test: {only_test[:3]}"
        )
    index = next(i for i, (a, b) in enumerate(zip(train_names, test_names)) if a != b)
    return (
        f"the same {len(train_names)} classes in another order: index {index} is {train_names[index]!r} "
        f"in train, {test_names[index]!r} in test"
    )


def extract_split(loaded: EvalEncoder, store_path, args, num_classes: int) -> dict:
    cache_dir = None if args.no_cache else Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    workers = args.workers if args.workers is not None else loaded.config.data.workers
    result = extract_features(
        loaded.encoder,
        loaded.modality,
        store_path,
        loaded.config.data,
        device=args.device,
        batch_size=args.batch_size,
        max_clips=args.max_clips,
        cache_dir=cache_dir,
        workers=workers,
    )
    if not result["ids"]:
        raise EvalError(f"{store_path}: no video usable by a {loaded.modality} encoder ({result['excluded']} excluded)")
    if int(result["labels"].max()) >= num_classes:
        raise EvalError(f"{store_path}: label index {int(result['labels'].max())} outside its {num_classes} classes")
    return result


# ---- the command ------------------------------------------------------------------------------


def run(args) -> int:
    try:
        metrics, loaded = evaluate(args)
    except (EvalError, FileNotFoundError) as error:
        raise SystemExit(f"tricoclr eval {args.task}: error: {error}") from None
    if metrics is not None:  # None: a rank other than the one that reports
        write_outputs(args, metrics, loaded)
    return 0


def evaluate(args) -> tuple[dict | None, EvalEncoder]:
    train_store, test_store = open_store(args.train), open_store(args.test)
    class_names = check_label_agreement(train_store, test_store)
    loaded = load_eval_encoder(args)
    if args.task == "finetune":
        return run_finetune(args, loaded, len(class_names)), loaded
    if int(os.environ.get("RANK", "0")) != 0:
        return None, loaded
    train = extract_split(loaded, args.train, args, len(class_names))
    test = extract_split(loaded, args.test, args, len(class_names))
    if args.task == "retrieval":
        metrics = retrieval(train, test, class_names, args)
    else:
        metrics = linear(train, test, len(class_names), args)
    metrics["excluded"] = {"train": train["excluded"], "test": test["excluded"]}
    return metrics, loaded


def retrieval(train: dict, test: dict, class_names: list[str], args) -> dict:
    result = retrieval_metrics(
        train["features"], train["labels"], test["features"], test["labels"], chance_seed=args.seed
    )
    neighbours, hits = result.pop("neighbours"), result.pop("hits")
    for column, k in enumerate(DEFAULT_KS):
        result[f"R@{k}_ci"] = confidence_interval(hits[:, column])
    if args.png:
        write_retrieval_figure(args.png, train, test, neighbours, class_names)
    if args.projector:
        _, test_normalised = center_and_normalise(train["features"], test["features"])
        names = [class_names[int(label)] for label in test["labels"]]
        write_projector(args.projector, test_normalised, names, test["thumbnails"])
    return result


def linear(train: dict, test: dict, num_classes: int, args) -> dict:
    # Selection sees the training split only; the test split enters after every choice is made.
    probe = train_linear_probe(train["features"], train["labels"], num_classes, seed=args.seed)
    result = evaluate_probe(probe, test["features"], test["labels"])
    correct = per_item_correct(probe.logits(test["features"]), test["labels"], ks=(1, 5))
    result.update({"top1_ci": confidence_interval(correct[:, 0]), "top5_ci": confidence_interval(correct[:, 1])})
    result.update(selection=probe.selection, num_train=len(train["ids"]), num_test=len(test["ids"]))
    return result


# ---- outputs ----------------------------------------------------------------------------------


def display_name(modality: str) -> str:
    """The modality's name in tables and figures (the registry's ``display_name``)."""
    return registry.get(modality).display_name


def write_outputs(args, metrics: dict, loaded: EvalEncoder) -> None:
    trained_with = args.modalities.replace(",", "+").split("+") if args.modalities else loaded.trained_with
    name = args.model_name or loaded.name
    if loaded.modality != registry.DEFAULT_EVAL_MODALITY and not args.model_name:
        name += f" [{loaded.modality} encoder]"
    metrics = {
        "task": args.task,
        "model": name,
        "encoder": args.encoder,
        "modality": loaded.modality,
        "trained_with": trained_with,
        "data": clip_settings(loaded.config.data),
        **metrics,
    }
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(metrics, indent=2) + "\n")
    row = {**metrics, "modalities": "+".join(trained_with)}
    table = markdown_table(
        [row],
        ["model", "modalities", *METRIC_COLUMNS[args.task]],
        modality_columns=[display_name(m) for m in registry.MODALITIES],
    )
    out.with_suffix(".md").write_text(table)
    print(table, end="")


def figure_queries(test_labels: torch.Tensor, count: int = FIGURE_QUERIES) -> list[int]:
    """The first test video of each class, for up to ``count`` classes (a varied figure)."""
    first_of_class: dict[int, int] = {}
    for index, label in enumerate(test_labels.tolist()):
        first_of_class.setdefault(label, index)
    return [first_of_class[label] for label in sorted(first_of_class)][:count]


def write_retrieval_figure(path, train: dict, test: dict, neighbours: torch.Tensor, class_names: list[str]) -> None:
    queries = figure_queries(test["labels"])
    retrieval_figure(
        [test["thumbnails"][q] for q in queries],
        [[train["thumbnails"][n] for n in neighbours[q]] for q in queries],
        [int(test["labels"][q]) for q in queries],
        [[int(train["labels"][n]) for n in neighbours[q]] for q in queries],
        path,
        class_names=class_names,
    )
