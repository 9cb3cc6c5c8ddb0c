"""What the demo's frozen oracles mine: how often the top-k share the anchor's motion, sound, class.

A diagnostic, not part of the pipeline. It reads a finished demo folder (``tricoclr demo --out
DIR``) or a finished ``benchmarks/rgbdiff_oracle.py --out DIR`` folder: the prepared train store
and, per seed, the InfoNCE-pre-trained oracle encoders the folder holds (the demo: flow and audio;
the rgbdiff benchmark: flow and rgbdiff, RGB difference's top-k sharing the anchor's motion). Each train video is embedded by each oracle
(projection-head output, the vector the oracle concatenates, averaged over the video's evaluation
windows and L2-normalised); then every video is an anchor against all the other train videos as
the "queue", and ``tricoclr.mining.mine_positives`` picks its top-k with each oracle alone and with
flow + audio under both ``method.oracle_similarity`` settings. Agreement is the fraction of mined
videos whose class shares the anchor's motion / sound / class (from ``data_tools.synth``'s class
table). Also printed: the spread of each oracle's cosines (mean +- standard deviation over pairs).

    python benchmarks/oracle_agreement.py --demo-out demo_out [--level clip]
    python benchmarks/oracle_agreement.py --demo-out rgbdiff_out      # flow vs rgbdiff oracles

Video level by default; ``--level clip`` makes every evaluation window its own entry (the queue
holds clips, not videos), still un-augmented. Not the training queue's augmented clips: it measures the oracles, not a training run
(``train/mined_precision`` in TensorBoard is the in-training class precision: printed last, as its
mean over each cooperative row's logged steps, per seed).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data_tools import synth  # noqa: E402
from tricoclr.config import load_config  # noqa: E402
from tricoclr.data import modalities as registry  # noqa: E402
from tricoclr.data.store import open_store  # noqa: E402
from tricoclr.demo import DEFAULT_CONFIG, VARIANTS, slug  # noqa: E402
from tricoclr.eval.features import present_clips  # noqa: E402
from tricoclr.mining import mine_positives  # noqa: E402
from tricoclr.models.encoder import load_encoder  # noqa: E402

ORACLES = ("flow", "audio", "rgbdiff")  # those whose pre-trained encoders the folder holds are measured


def oracle_encoder_path(out: Path, seed: int, modality: str) -> Path:
    """The InfoNCE-pre-trained oracle: the demo's layout (flow and audio pre-trained in one run), or
    benchmarks/rgbdiff_oracle.py's (one run per modality: flow and rgbdiff)."""
    runs = out / "runs" / f"seed{seed}"
    for run in ("pretrain_oracles", f"pretrain_{modality}"):
        path = runs / run / "encoders" / f"pretrain-{modality}" / f"{modality}.safetensors"
        if path.exists():
            return path
    return runs / "pretrain_oracles" / "encoders" / f"pretrain-{modality}" / f"{modality}.safetensors"


def read_clips(
    store_path: Path, data_cfg: dict, oracles
) -> tuple[list[str], torch.Tensor, dict[str, list[torch.Tensor]]]:
    store = open_store(store_path)
    ids, labels, clips = [], [], {m: [] for m in oracles}
    for record in store.iter_records():
        ids.append(record.id)
        labels.append(int(record.meta["label_index"]))
        for modality in oracles:
            clips[modality].append(present_clips(record, modality, data_cfg, None))
    return ids, torch.tensor(labels), clips


@torch.no_grad()
def embed(encoder, modality: str, clips: list[torch.Tensor], level: str) -> torch.Tensor:
    """One row per video (mean over its windows) or, ``level="clip"``, one row per window."""
    encoder.eval()
    per_video = [encoder(registry.finish_for_eval(modality, video_clips)).float() for video_clips in clips]
    rows = torch.stack([e.mean(0) for e in per_video]) if level == "video" else torch.cat(per_video)
    return F.normalize(rows, dim=1)


def mine_and_score(
    oracle: torch.Tensor,
    video_ids: torch.Tensor,
    keys: dict[str, torch.Tensor],
    topk: int,
    queue: int,
    similarity: str,
    oracle_dims,
) -> dict[str, float]:
    """% of the mined entries (other videos only) sharing the anchor's motion / sound / class.

    ``queue`` 0: every anchor ranks all entries; else each batch of 16 anchors ranks a random
    ``queue`` entries, as the training queue holds only that many."""
    generator = torch.Generator().manual_seed(0)
    hits = {name: 0 for name in keys}
    total = 0
    for start in range(0, len(oracle), 16):
        anchors = torch.arange(start, min(start + 16, len(oracle)))
        pool = torch.randperm(len(oracle), generator=generator)[:queue] if queue else torch.arange(len(oracle))
        mask = mine_positives(
            oracle[anchors],
            oracle[pool],
            topk,
            video_ids=video_ids[anchors],
            queue_video_ids=video_ids[pool],
            same_video_positives=True,
            similarity=similarity,
            oracle_dims=oracle_dims,
        )
        mined = mask[:, 1:] & (video_ids[anchors][:, None] != video_ids[pool][None, :])  # same-video: positives anyway
        total += int(mined.sum())
        for name, key in keys.items():
            hits[name] += int(((key[anchors][:, None] == key[pool][None, :]) & mined).sum())
    return {name: 100 * hits[name] / max(total, 1) for name in keys}


def training_precision(out: Path, seeds: int) -> None:
    """Mean ``train/mined_precision`` of each demo row's cooperative RGB stage, per seed."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    print("train/mined_precision, mean over the stage's logged steps, per seed:")
    for name, mods, _ in VARIANTS:
        if len(mods) == 1:
            continue
        means = []
        for seed in range(seeds):
            values = []
            for events in sorted((out / "runs" / f"seed{seed}" / slug(name) / "tb").rglob("events.out.tfevents.*")):
                accumulator = EventAccumulator(str(events))
                accumulator.Reload()
                if "train/mined_precision" in accumulator.Tags()["scalars"]:
                    values += [event.value for event in accumulator.Scalars("train/mined_precision")]
            means.append(f"{sum(values) / len(values):.3f}" if values else "-")
        print(f"  {name:34s} {' / '.join(means)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo-out", required=True, help="a finished `tricoclr demo --out` folder")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--topk", type=int, default=5)
    parser.add_argument(
        "--queue",
        type=int,
        default=0,
        help="rank a random QUEUE entries per batch of 16 anchors (the demo's queue: 128); 0: all",
    )
    parser.add_argument(
        "--level",
        choices=["video", "clip"],
        default="video",
        help="entries are videos (mean over their evaluation windows) or single windows "
        "(closer to the training queue's clips; un-augmented)",
    )
    args = parser.parse_args()
    started = time.time()
    out = Path(args.demo_out)
    data_cfg = load_config(DEFAULT_CONFIG)["data"]
    oracles = [m for m in ORACLES if oracle_encoder_path(out, 0, m).exists()]
    if not oracles:
        raise SystemExit(f"no pre-trained oracle encoders under {out / 'runs' / 'seed0'}")
    ids, labels, clips = read_clips(out / "prepared" / "train", data_cfg, oracles)
    windows = torch.tensor([len(c) for c in clips[oracles[0]]])
    if args.level == "clip" and any(
        not torch.equal(windows, torch.tensor([len(c) for c in clips[m]])) for m in oracles
    ):
        raise SystemExit(f"{', '.join(oracles)} have different window counts per video: use --level video")
    video_ids = torch.arange(len(ids)) if args.level == "video" else torch.arange(len(ids)).repeat_interleave(windows)
    entry_labels = labels[video_ids]
    table = torch.tensor(synth.factor_indices(int(labels.max()) + 1))
    keys = {"motion": table[entry_labels, 1], "sound": table[entry_labels, 2], "class": entry_labels}
    print(
        f"{len(ids)} train videos ({len(video_ids)} {args.level} entries) read in {time.time() - started:.0f} s; "
        f"top-{args.topk} among {args.queue or 'all'} entries of other videos; agreement % (motion / sound / class)",
        flush=True,
    )
    for seed in range(args.seeds):
        encoders = {m: load_encoder(oracle_encoder_path(out, seed, m))[0] for m in oracles}
        parts = {m: embed(encoders[m], m, clips[m], args.level) for m in oracles}
        off_diagonal = video_ids[:, None] != video_ids[None, :]
        spreads = {m: (parts[m] @ parts[m].t())[off_diagonal] for m in oracles}
        print(f"seed {seed}: cosine " + ", ".join(f"{m} {c.mean():.2f} +- {c.std():.2f}" for m, c in spreads.items()))
        runs = {f"{m} alone": (parts[m], "cosine_sum", None) for m in oracles}
        if "flow" in parts and "audio" in parts:
            both = torch.cat([parts["flow"], parts["audio"]], dim=1)
            dims = (parts["flow"].shape[1], parts["audio"].shape[1])
            runs["flow+audio, cosine_sum"] = (both, "cosine_sum", dims)
            runs["flow+audio, standardized"] = (both, "standardized", dims)
        for name, (oracle, similarity, oracle_dims) in runs.items():
            scores = mine_and_score(oracle, video_ids, keys, args.topk, args.queue, similarity, oracle_dims)
            print(f"  {name:26s} " + " / ".join(f"{scores[k]:5.1f}" for k in ("motion", "sound", "class")), flush=True)
    training_precision(out, args.seeds)
    print(f"done in {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
