"""Fine-tuning evaluation: the whole encoder trained end to end on the labelled training split.

Training: one clip per video per epoch (random position), the modality's training augmentation
(random resized crop, flip, and for RGB the photometric part on the device), cross-entropy on a
linear classifier over the backbone's pooled feature (dropout 0.5 before it, as CoCLR). Runs under
Accelerate (mixed precision, many ranks) and resumes from its newest epoch checkpoint.
Testing: multi-clip x multi-crop (non-overlapping windows across the whole video x three square
crops along the longer side, no flip or colour change); softmax averaged per video; top-1.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from tricoclr import modalities as registry
from tricoclr.data.dataset import EpochLoader, StageViews, finish_batch
from tricoclr.data.sampling import ClipSpec
from tricoclr.data.store import open_store
from tricoclr.eval.features import window_starts


class Classifier(nn.Module):
    def __init__(self, encoder: nn.Module, num_classes: int, dropout: float = 0.5):
        super().__init__()
        self.encoder = encoder
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(encoder.architecture["feature_dim"], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.encoder.features(x)))


def three_crops(frames: torch.Tensor, size: int) -> list[torch.Tensor]:
    """(T,C,H,W) -> three (T,C,size,size) squares: start, centre and end of the longer side."""
    _, _, h, w = frames.shape
    side = min(h, w)
    crops = []
    for fraction in (0.0, 0.5, 1.0):
        top = int(round((h - side) * fraction))
        left = int(round((w - side) * fraction))
        square = frames[:, :, top : top + side, left : left + side].float()
        crops.append(F.interpolate(square, size=(size, size), mode="bilinear", align_corners=False, antialias=True))
    return crops


@torch.no_grad()
def multi_view_top1(model: Classifier, modality: str, store_path, data_cfg: dict, device, max_clips: int = 10) -> dict:
    """Top-1 (%) with softmax averaged over clips x crops of each test video."""
    entry = registry.get(modality)
    spec = ClipSpec(frames=data_cfg["clip_frames"], stride=data_cfg["clip_stride"])
    model.eval()
    correct = total = 0
    per_video = []
    for record in open_store(store_path).iter_records():
        meta = record.meta
        if not entry.available(meta) or meta.get("label_index") is None:
            continue
        probs = []
        for start in window_starts(int(meta["frames"]), spec, max_clips):
            clip = registry.ClipRequest(start, spec, float(meta["fps"]), int(meta["frames"]))
            raw = entry.read(record, clip, data_cfg)
            if raw.dim() == 4 and raw.dtype == torch.uint8 and raw.shape[1] == 3:
                views = [c.round().clamp(0, 255).to(torch.uint8).permute(1, 0, 2, 3) for c in three_crops(raw, data_cfg["size"])]
            else:
                views = [entry.present(raw, data_cfg)]
            batch = registry.finish_for_eval(modality, torch.stack(views).to(device))
            probs.append(model(batch).float().softmax(dim=1).mean(dim=0))
        prediction = int(torch.stack(probs).mean(dim=0).argmax())
        hit = prediction == int(meta["label_index"])
        per_video.append(hit)
        correct += hit
        total += 1
    return {"top1": 100.0 * correct / max(1, total), "num_test": total, "hits": per_video}


def run_finetune(args, encoder, modality: str, data_cfg: dict) -> dict:
    from accelerate import Accelerator

    from tricoclr.config import load_config

    config = load_config(args.config) if args.config and Path(args.config).exists() else load_config()
    epochs = args.finetune_epochs or 10
    output_dir = Path(args.output_dir or Path(args.json).with_suffix("").as_posix() + "_finetune")
    accelerator = Accelerator()
    classes = open_store(args.train).class_names()
    train_labels = [m.get("label_index") for m in open_store(args.train).videos()]
    num_classes = len(classes) if classes else int(max(l for l in train_labels if l is not None)) + 1
    torch.manual_seed(args.seed)
    model = Classifier(encoder, num_classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=config["optim"]["lr"], weight_decay=1e-3)
    views = StageViews(both_views=(), view2_only=(modality,))
    loader = EpochLoader(args.train, views, data_cfg, args.seed, config["batch_size"],
                         rank=accelerator.process_index, world_size=accelerator.num_processes)
    model, optimizer = accelerator.prepare(model, optimizer)
    start_epoch = 0
    ckpt = output_dir / "checkpoint"
    if (ckpt / "epoch.json").exists():
        accelerator.load_state(str(ckpt))
        start_epoch = json.loads((ckpt / "epoch.json").read_text())["next_epoch"]
    for epoch in range(start_epoch, epochs):
        model.train()
        loader.set_epoch(epoch)
        for cpu_batch in loader:
            batch = finish_batch(cpu_batch, views, accelerator.device)
            with accelerator.autocast():
                logits = model(batch[f"{modality}.view2"])
            loss = F.cross_entropy(logits.float(), batch["label"])
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        _save_epoch(accelerator, ckpt, epoch + 1)
    result = {}
    if accelerator.is_main_process:
        result = multi_view_top1(accelerator.unwrap_model(model), modality, args.test, data_cfg, accelerator.device)
        result.pop("hits")
        result["epochs"] = epochs
    accelerator.wait_for_everyone()
    return result


def _save_epoch(accelerator, ckpt: Path, next_epoch: int) -> None:
    """Atomic: write into a temporary folder, then swap it in."""
    tmp = ckpt.with_name(ckpt.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        (tmp / "epoch.json").write_text(json.dumps({"next_epoch": next_epoch}))
        old = ckpt.with_name(ckpt.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if ckpt.exists():
            os.replace(ckpt, old)
        os.replace(tmp, ckpt)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
