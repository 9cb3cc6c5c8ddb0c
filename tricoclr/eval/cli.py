"""Evaluate an encoder: `tricoclr eval retrieval|linear|finetune --encoder E --train T --test T --json OUT`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from tricoclr.config import load_config
from tricoclr.eval.features import EVAL_DATA_KEYS, extract_features

TASKS = ("retrieval", "linear", "finetune")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("task", choices=TASKS)
    parser.add_argument("--encoder", required=True,
                        help="an encoders/.../<modality>.safetensors file written by training, or 'random'")
    parser.add_argument("--train", required=True, help="prepared labelled training store (e.g. UCF101 trainlist01)")
    parser.add_argument("--test", required=True, help="prepared labelled test store (e.g. UCF101 testlist01)")
    parser.add_argument("--json", required=True, help="where to write the metrics (a .md table is written beside it)")
    parser.add_argument("--config", default="configs/tiny.yaml",
                        help="architecture and clip settings for --encoder random (default configs/tiny.yaml)")
    parser.add_argument("--modality", default="rgb", help="modality of a random encoder (default rgb)")
    parser.add_argument("--model-name", default=None, help="row name in the markdown table")
    parser.add_argument("--png", default=None, help="retrieval figure: queries and their top-5 neighbours")
    parser.add_argument("--projector", default=None, help="write the test embeddings to TensorBoard's projector here")
    parser.add_argument("--max-clips", type=int, default=None, help="at most this many clips per video")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random encoder and the probe")
    parser.add_argument("--no-cache", action="store_true", help="do not read or write the feature cache")
    parser.add_argument("--finetune-epochs", type=int, default=None, help="fine-tuning epochs (default from config)")
    parser.add_argument("--output-dir", default=None, help="fine-tuning checkpoints and logs (resumed when present)")


def load_encoder_for_eval(args) -> tuple[torch.nn.Module, str, dict, str]:
    """(encoder, modality, data settings, cache key): a trained file, or an untrained one."""
    from tricoclr.models.encoder import encoder_fingerprint, load_encoder

    if args.encoder == "random":
        from tricoclr.trainer import build_encoder

        config = load_config(args.config)
        torch.manual_seed(args.seed)
        encoder = build_encoder(config, args.modality)
        data_cfg = {**config["data"]}
        key = f"random:{json.dumps(encoder.architecture, sort_keys=True)}:{args.seed}"
        return encoder, args.modality, data_cfg, key
    encoder, metadata = load_encoder(args.encoder)
    data_cfg = dict(load_config(args.config)["data"]) if args.config and Path(args.config).exists() else dict(load_config()["data"])
    if "data" in metadata:  # the clip settings the encoder was trained with
        data_cfg.update({k: v for k, v in json.loads(metadata["data"]).items() if k in EVAL_DATA_KEYS})
    return encoder, metadata["modality"], data_cfg, encoder_fingerprint(args.encoder)


def check_label_agreement(train_store, test_store) -> None:
    """Train and test label indices must come from the same classInd.txt."""
    train_classes, test_classes = train_store.class_names(), test_store.class_names()
    if train_classes and test_classes and train_classes != test_classes:
        raise SystemExit(
            f"label mismatch: {train_store.root} and {test_store.root} were prepared with different class "
            f"lists ({len(train_classes)} vs {len(test_classes)} classes; first difference: "
            f"{next((a, b) for a, b in zip(train_classes, test_classes) if a != b) if len(train_classes) == len(test_classes) else 'count'}). "
            "Prepare both with the split files of one dataset (classInd.txt beside the lists)."
        )


def run(args) -> int:
    from tricoclr.data.store import open_store
    from tricoclr.eval.report import markdown_table

    train_store, test_store = open_store(args.train), open_store(args.test)
    check_label_agreement(train_store, test_store)
    encoder, modality, data_cfg, cache_key = load_encoder_for_eval(args)
    if args.task == "finetune":
        from tricoclr.eval.finetune import run_finetune

        metrics = run_finetune(args, encoder, modality, data_cfg)
    else:
        kwargs = dict(device=args.device, max_clips=args.max_clips,
                      cache_key=None if args.no_cache else cache_key)
        train = extract_features(encoder, modality, args.train, data_cfg, **kwargs)
        test = extract_features(encoder, modality, args.test, data_cfg, **kwargs)
        metrics = evaluate_features(args.task, train, test, args, train_store.class_names())
    metrics.update({"task": args.task, "encoder": args.encoder, "modality": modality})
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f:
        json.dump(metrics, f, indent=2)
    name = args.model_name or (Path(args.encoder).parent.name if args.encoder != "random" else "random init")
    columns = {"retrieval": ["R@1", "R@5", "R@10", "R@20", "R@50"], "linear": ["top1", "top5"], "finetune": ["top1"]}[args.task]
    table = markdown_table([{"model": name, "modalities": modality, **metrics}], ["model", "modalities", *columns])
    out.with_suffix(".md").write_text(table + "\n")
    print(table)
    return 0


def evaluate_features(task: str, train: dict, test: dict, args, class_names) -> dict:
    if (train["labels"] < 0).any() or (test["labels"] < 0).any():
        raise SystemExit("evaluation needs labelled stores: prepare them with --list and a classInd.txt")
    if task == "retrieval":
        from tricoclr.eval.retrieval import retrieval_metrics

        result = retrieval_metrics(train["features"], train["labels"], test["features"], test["labels"])
        neighbours = result.pop("neighbours")
        result.pop("hits", None)
        if args.png and train.get("thumbnails") is not None:
            write_retrieval_figure(args.png, train, test, neighbours, class_names)
        if args.projector:
            from tricoclr.eval.report import write_projector

            names = [class_names[i] if class_names else str(int(i)) for i in test["labels"]]
            write_projector(args.projector, test["features"], names, test.get("thumbnails"))
        return result
    from tricoclr.eval.linear_probe import evaluate_probe, train_linear_probe

    num_classes = int(max(train["labels"].max(), test["labels"].max())) + 1
    probe = train_linear_probe(train["features"], train["labels"], num_classes, seed=args.seed)
    result = evaluate_probe(probe, test["features"], test["labels"])
    result["selection"] = probe.selection
    result.update(num_train=len(train["ids"]), num_test=len(test["ids"]))
    return result


def write_retrieval_figure(path, train, test, neighbours, class_names, num_queries: int = 6) -> None:
    from tricoclr.eval.report import retrieval_figure

    step = max(1, len(test["ids"]) // num_queries)
    queries = list(range(0, len(test["ids"]), step))[:num_queries]
    name = (lambda i: class_names[int(i)]) if class_names else (lambda i: str(int(i)))
    retrieval_figure(
        [test["thumbnails"][q] for q in queries],
        [[train["thumbnails"][n] for n in neighbours[q][:5]] for q in queries],
        [name(test["labels"][q]) for q in queries],
        [[name(train["labels"][n]) for n in neighbours[q][:5]] for q in queries],
        path,
    )
