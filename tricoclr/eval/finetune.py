"""Fine-tuning evaluation: the whole encoder trained end to end on the labelled training split.

Training: one clip per video per epoch (random position), the modality's training augmentation
(random resized crop, flip, and for RGB the photometric part on the device), cross-entropy on a
linear classifier over the backbone's pooled feature (dropout 0.5 before it, as CoCLR); Adam at
the config's learning rate, weight decay 1e-3 (CoCLR's fine-tuning value), constant schedule.
Only the backbone is trained: the projection head plays no part (DDP would also reject
parameters that never receive a gradient).

Scale: runs under Accelerate (``accelerate launch -m tricoclr.cli eval finetune ...``): mixed
precision and the number of ranks come from the launcher; batch statistics are global across
ranks when the config says ``method.batchnorm: global``, as in training. After every epoch an
atomic checkpoint (``<output_dir>/checkpoint``: weights, optimizer, RNG states, next epoch) is
written; a rerun with the same output dir continues from it, e.g. with more epochs. A checkpoint
of another encoder, store or setting is refused rather than silently continued.

Testing (main process): multi-clip x multi-crop (non-overlapping windows across the whole video x
three squares along the longer side of video frames, no flip or colour change); softmax averaged
per video; top-1.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from tricoclr.config import clip_settings
from tricoclr.data import modalities as registry
from tricoclr.data.dataset import EpochLoader, StageViews, finish_batch
from tricoclr.data.store import open_store
from tricoclr.distributed import convert_to_global_batchnorm
from tricoclr.eval.features import (
    EvalError,
    check_labelled,
    store_fingerprint,
    usable_videos,
    weights_fingerprint,
    window_clips,
)
from tricoclr.eval.stats import confidence_interval

FINETUNE_WEIGHT_DECAY = 1e-3  # CoCLR's fine-tuning value
DEFAULT_TEST_CLIPS = 10
CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "epoch.json"
LOG_FILE = "log.jsonl"


class Classifier(nn.Module):
    """The encoder's backbone, dropout, and a linear layer over the pooled feature."""

    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int, dropout: float = 0.5):
        super().__init__()
        self.backbone = backbone
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.backbone(x)))


# ---- testing ----------------------------------------------------------------------------------


def test_views(record, modality: str, data_cfg: dict, max_clips: int) -> torch.Tensor:
    """Every clip x crop of one video, presented for the network (video: 3 crops; audio: 1 view)."""
    entry = registry.get(modality)
    views = []
    for raw in window_clips(record, modality, data_cfg, max_clips):
        # The entry's evaluation windows (video: three squares); present() resizes each and,
        # for flow, scales the vectors with it.
        views.extend(entry.present(crop, data_cfg) for crop in entry.eval_views(raw))
    return torch.stack(views)


@torch.no_grad()
def multi_view_top1(
    model: nn.Module,
    modality: str,
    store_path,
    data_cfg: dict,
    device,
    max_clips: int = DEFAULT_TEST_CLIPS,
    batch_size: int = 16,
) -> dict:
    """Top-1 (%) with softmax averaged over clips x crops of each usable test video.

    Returns {"top1", "num_test", "excluded", "hits": (N,) bool per video in store order}.
    """
    store = open_store(store_path)
    metas = usable_videos(store, modality)
    check_labelled(metas, store.root)
    usable = {meta["id"] for meta in metas}
    model.eval()
    hits = []
    for record in store.iter_records():
        if record.id not in usable:
            continue
        views = test_views(record, modality, data_cfg, max_clips)
        probabilities = torch.cat(
            [
                model(registry.finish_for_eval(modality, chunk.to(device))).float().softmax(dim=1).cpu()
                for chunk in views.split(batch_size)
            ]
        )
        hits.append(int(probabilities.mean(dim=0).argmax()) == int(record.meta["label_index"]))
    hits = torch.tensor(hits, dtype=torch.bool)
    if hits.numel() == 0:
        raise EvalError(f"{store_path}: no test video usable by a {modality} encoder")
    return {
        "top1": float(hits.float().mean() * 100),
        "num_test": int(hits.numel()),
        "excluded": len(store.videos()) - int(hits.numel()),
        "hits": hits,
    }


# ---- training ---------------------------------------------------------------------------------


def run_finetune(args, loaded, num_classes: int) -> dict | None:
    """Fine-tune ``loaded.encoder`` on ``args.train``, test on ``args.test``; None on ranks other than 0."""
    from accelerate import Accelerator  # here, not at the top: `tricoclr eval` retrieval/linear never load it

    config, modality = loaded.config, loaded.modality
    data_cfg = dict(config["data"])
    if args.workers is not None:
        data_cfg["workers"] = args.workers
    batch_size = args.finetune_batch_size or config["batch_size"]
    output_dir = Path(args.output_dir or Path(args.json).with_suffix("").as_posix() + "_finetune")
    accelerator = Accelerator()

    train_store = open_store(args.train)
    check_labelled(usable_videos(train_store, modality), train_store.root)
    identity = {
        "encoder": weights_fingerprint(loaded.encoder),
        "train": store_fingerprint(train_store),
        "modality": modality,
        "num_classes": num_classes,
        "seed": args.seed,
        "batch_size": batch_size,
        "world_size": accelerator.num_processes,
        "lr": config["optim"]["lr"],
        "data": clip_settings(data_cfg),
    }

    backbone = loaded.encoder.backbone
    if config["method"]["batchnorm"] == "global":
        backbone = convert_to_global_batchnorm(backbone)
    torch.manual_seed(args.seed)
    model = Classifier(backbone, loaded.encoder.feature_dim, num_classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=config["optim"]["lr"], weight_decay=FINETUNE_WEIGHT_DECAY)
    views = StageViews(both_views=(), view2_only=(modality,))
    try:
        loader = EpochLoader(
            args.train,
            views,
            data_cfg,
            args.seed,
            batch_size,
            rank=accelerator.process_index,
            world_size=accelerator.num_processes,
        )
    except ValueError as error:
        raise EvalError(f"fine-tuning data: {error} (see --finetune-batch-size)") from None
    model, optimizer = accelerator.prepare(model, optimizer)

    checkpoint = output_dir / CHECKPOINT_DIR
    start_epoch = resume(accelerator, checkpoint, identity)
    for epoch in range(start_epoch, args.finetune_epochs):
        loss = train_epoch(accelerator, model, optimizer, loader, views, modality, epoch)
        save_checkpoint(accelerator, checkpoint, identity, epoch + 1)
        if accelerator.is_main_process:
            with open(output_dir / LOG_FILE, "a") as log:
                log.write(json.dumps({"epoch": epoch + 1, "loss": loss, "steps": len(loader)}) + "\n")

    result = None
    if accelerator.is_main_process:
        result = multi_view_top1(
            accelerator.unwrap_model(model),
            modality,
            args.test,
            data_cfg,
            accelerator.device,
            max_clips=args.max_clips or DEFAULT_TEST_CLIPS,
            batch_size=args.batch_size,
        )
        result["top1_ci"] = confidence_interval(result.pop("hits"))
        result.update(
            epochs=max(args.finetune_epochs, start_epoch),
            resumed_from_epoch=start_epoch,
            num_train=loader.num_videos,
            checkpoint=str(checkpoint),
            excluded={"train": len(train_store.videos()) - loader.num_videos, "test": result.pop("excluded")},
        )
    accelerator.wait_for_everyone()
    return result


def train_epoch(accelerator, model, optimizer, loader, views: StageViews, modality: str, epoch: int) -> float:
    """One pass over the training split; returns the mean loss of this rank."""
    model.train()
    loader.set_epoch(epoch)
    total, steps = 0.0, 0
    for cpu_batch in loader:
        batch = finish_batch(cpu_batch, views, accelerator.device)
        with accelerator.autocast():
            logits = model(batch[f"{modality}.view2"])
        loss = F.cross_entropy(logits.float(), batch["label"])
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        total, steps = total + float(loss.detach()), steps + 1
    return total / max(1, steps)


def resume(accelerator, checkpoint: Path, identity: dict) -> int:
    """The epoch to start from: 0, or the next epoch of a matching checkpoint (whose state is loaded)."""
    state_file = checkpoint / STATE_FILE
    if not state_file.exists():
        return 0
    state = json.loads(state_file.read_text())
    if state.get("identity") != identity:
        differing = sorted(k for k in identity if state.get("identity", {}).get(k) != identity[k])
        raise EvalError(
            f"{checkpoint} belongs to another fine-tuning run (differs in {differing}); "
            "pass another --output-dir or delete it"
        )
    accelerator.load_state(str(checkpoint))
    return int(state["next_epoch"])


def save_checkpoint(accelerator, checkpoint: Path, identity: dict, next_epoch: int) -> None:
    """Atomic: write into a temporary folder, then swap it in (a crash keeps the previous one)."""
    tmp = checkpoint.with_name(checkpoint.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps({"next_epoch": next_epoch, "identity": identity}, indent=2))
        old = checkpoint.with_name(checkpoint.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if checkpoint.exists():
            os.replace(checkpoint, old)
        os.replace(tmp, checkpoint)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
