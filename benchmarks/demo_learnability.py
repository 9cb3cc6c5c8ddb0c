"""Why the demo's table looks the way it does: how fast can the tiny RGB encoder learn the synthesized classes?

A diagnostic, not part of the pipeline: the synthesized videos are rendered straight into memory
(no encoding, no preparation: ~1 min for 600 videos) and a tiny 3D CNN is trained on them in a
plain loop, so one question takes seconds instead of a demo run. Two questions:

``supervised``   the ceiling: cross-entropy with the labels, one clip per video per epoch.
``contrastive``  the cooperative RGB stage with an *ideal* oracle: MoCo InfoNCE pre-training,
                 then the same number of steps either of InfoNCE again or of the multi-positive
                 loss (``tricoclr.losses.multi_positive_loss``) whose k mined positives are drawn
                 from the queue entries that share the given class factors (``--share motion`` is
                 a perfect flow oracle, ``--share motion,sound`` a perfect flow + audio oracle,
                 ``--share class`` the labels), with ``tricoclr.mining.mask_self_positive``.
                 Prints kNN R@1 of the RGB backbone (train videos as the gallery).

    python benchmarks/demo_learnability.py supervised --videos-per-class 60 --seconds 4 --size 32 --epochs 10
    python benchmarks/demo_learnability.py contrastive --size 32 --share motion,sound --mask-self 0.9 --seed 1

Options added for issue 15 (figures in docs/demo_data.md): ``--scenes N --camera --object-colour
video`` render synth's new default data (the defaults here stay the first generator's, so the
README's figures reproduce); ``--same-video negative|positive|drop`` says what other clips of the
query's video in the queue are during InfoNCE (the trainer: negative); ``--bg-mix P`` blends, with
probability P, one frame of another video of the batch into every frame of a clip (background
mixing); ``--knn-every N`` prints R@1 during training; ``--skip-stage`` stops after pre-training.
Each contrastive stage prints its loss, how often the key outranks every negative and the mean
query-queue cosine (near 1: the embedding has collapsed), over the first and last third of its
steps once the queue is full. Second round (section 7 of docs/demo_data.md): ``--key-bn
batch|shuffle|running`` (the key encoder's batch norm: the key batch's statistics, MoCo's
shuffled groups of ``--bn-groups``, or running statistics), ``--hue H --saturation S`` (colour
jitter), and ``supervised`` also prints the kNN R@1 of its backbone. Third round (section 9c):
``--precision P`` makes the oracle imperfect (each positive shares ``--share`` with probability P,
else it is another video's entry that does not) and ``--oracle-only`` skips the stage's InfoNCE run.
``--eval-on validation`` measures kNN R@1 within the training videos (alternate videos of each
class as queries and gallery), so that a recipe is chosen on training data only (section 7f).

Figures (README, "Why the demo looks like this") were measured with these commands on the 2-core
development machine. Clips: 8 frames at stride 2 from 30 fps; crops of the whole frame for the
supervised runs (``--crop-min 1``), 30-100 % of it plus flip, brightness/contrast and greyscale for
the contrastive ones (no blur or hue: this is a lower-cost stand-in for the trainer's pipeline).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data_tools import synth  # noqa: E402
from tricoclr.losses import multi_positive_loss  # noqa: E402
from tricoclr.mining import mask_self_positive  # noqa: E402
from tricoclr.models.encoder import Encoder  # noqa: E402

FPS, RENDER_SIZE, AUDIO_RATE = 30, 128, 16000
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1, 1) * 255
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1, 1) * 255
FACTOR_COLUMN = {"appearance": 0, "motion": 1, "sound": 2}


def render_video(
    classes: int,
    class_index: int,
    video: int,
    seconds: float,
    size: int,
    radius: tuple[float, float] | None,
    trace_depth: float,
    nuisance: dict,
    seed: int = 0,
) -> torch.Tensor:
    """(frames, 3, size, size) uint8: one synthesized video as `synth` draws it, area-downsampled."""
    job = synth.VideoJob(
        path="",
        classes=classes,
        class_index=class_index,
        video_index=video,
        seed=seed,
        seconds=seconds,
        fps=FPS,
        size=RENDER_SIZE,
        audio_rate=AUDIO_RATE,
        **nuisance,
    )
    _, _, pixels, _, _ = synth.make_video_content(job, trace_depth, radius)
    video_tensor = torch.from_numpy(np.stack(list(pixels))).permute(0, 3, 1, 2).float()
    return F.interpolate(video_tensor, size=(size, size), mode="area").round().clamp(0, 255).to(torch.uint8)


def make_dataset(args) -> dict:
    cache = Path(args.cache) if args.cache else None
    if cache is not None and cache.exists():
        return torch.load(cache, weights_only=True)
    videos, labels, is_train = [], [], []
    n_train = synth.train_count(args.videos_per_class, 0.5)
    for c in range(args.classes):
        for v in range(args.videos_per_class):
            videos.append(
                render_video(
                    args.classes,
                    c,
                    v,
                    args.seconds,
                    args.size,
                    args.radius,
                    args.trace_depth,
                    {"scenes": args.scenes, "camera": not args.static_camera, "colour": args.object_colour},
                    args.data_seed,
                )
            )
            labels.append(c)
            is_train.append(v < n_train)
    data = {"videos": torch.stack(videos), "labels": torch.tensor(labels), "train": torch.tensor(is_train)}
    if cache is not None:
        torch.save(data, cache)
    return data


class Clips:
    """Random (training) and evenly spaced (evaluation) clips of the in-memory videos."""

    def __init__(self, data: dict, args, generator: torch.Generator):
        self.videos, self.args, self.g = data["videos"], args, generator
        self.span = (args.frames - 1) * args.stride + 1
        self.size = self.videos.shape[-1]

    def _rand(self) -> float:
        return float(torch.rand((), generator=self.g))

    def random_start(self) -> int:
        return int(self._rand() * (self.videos.shape[1] - self.span + 1))

    def clip(
        self, index: int, start: int, augment: bool, photometric: bool = False, mix_from: int | None = None
    ) -> torch.Tensor:
        x = self.videos[index, start : start + self.span : self.args.stride].float()  # (T, C, H, W)
        if mix_from is not None and self._rand() < self.args.bg_mix:
            # background mixing: one frame of another video blended into every frame of the clip
            other = self.videos[mix_from, self.random_start()].float()
            weight = self.args.bg_mix_weight * self._rand()
            x = (1 - weight) * x + weight * other
        if augment:
            area = self.args.crop_min + (1 - self.args.crop_min) * self._rand()
            side = max(8, int(round(self.size * area**0.5)))
            top, left = int(self._rand() * (self.size - side + 1)), int(self._rand() * (self.size - side + 1))
            x = F.interpolate(
                x[:, :, top : top + side, left : left + side],
                size=(self.size, self.size),
                mode="bilinear",
                antialias=True,
            )
            if self._rand() < 0.5:
                x = x.flip(-1)
            if photometric and self._rand() < 0.8:
                brightness, contrast = 0.6 + 0.8 * self._rand(), 0.6 + 0.8 * self._rand()
                x = ((x - x.mean()) * contrast + x.mean()) * brightness
            if photometric and self.args.hue > 0 and self._rand() < 0.8:
                shift = self.args.hue * (2 * self._rand() - 1)
                saturation = 1 + self.args.saturation * (2 * self._rand() - 1)
                x = 255 * TF.adjust_saturation(TF.adjust_hue((x / 255).clamp(0, 1), shift), saturation)
            if photometric and self._rand() < 0.2:
                x = (0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:]).expand(-1, 3, -1, -1)
        return (x.clamp(0, 255).permute(1, 0, 2, 3) - MEAN) / STD

    def evaluation_clips(self, index: int, count: int = 4) -> torch.Tensor:
        starts = np.linspace(0, self.videos.shape[1] - self.span, count).astype(int)
        return torch.stack([self.clip(index, int(s), augment=False) for s in starts])


def supervised(args, data: dict) -> None:
    g = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    clips = Clips(data, args, g)
    encoder = Encoder("tiny3d", 3)
    model = nn.Sequential(encoder.backbone, nn.Dropout(0.5), nn.Linear(encoder.feature_dim, args.classes))
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=1e-3)
    labels, train = data["labels"], torch.nonzero(data["train"]).flatten()
    test = torch.nonzero(~data["train"]).flatten()

    @torch.no_grad()
    def top1(indices) -> float:
        model.eval()
        hits = sum(
            int(model(clips.evaluation_clips(int(i))).softmax(-1).mean(0).argmax() == labels[i]) for i in indices
        )
        model.train()
        return 100 * hits / len(indices)

    steps = 0
    for epoch in range(args.epochs):
        order = train[torch.randperm(len(train), generator=g)]
        for first in range(0, len(order), args.batch_size):
            batch = order[first : first + args.batch_size]
            x = torch.stack([clips.clip(int(i), clips.random_start(), augment=True) for i in batch])
            loss = F.cross_entropy(model(x), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            steps += 1
        if (epoch + 1) % 5 == 0 or epoch + 1 == args.epochs:
            print(
                f"epoch {epoch + 1} ({steps} steps): train top-1 {top1(train):.1f}  test top-1 {top1(test):.1f}",
                flush=True,
            )
    print(f"kNN R@1 of the supervised backbone's features: {knn_r1(encoder, clips, data):.1f}", flush=True)


def knn_r1(encoder: Encoder, clips: Clips, data: dict) -> float:
    encoder.eval()
    with torch.no_grad():

        def features(indices):
            return torch.stack(
                [F.normalize(encoder.features(clips.evaluation_clips(int(i))).mean(0), dim=0) for i in indices]
            )

        gallery, queries = evaluation_split(data, clips.args)
        nearest = (features(queries) @ features(gallery).t()).argmax(1)
    encoder.train()
    return 100 * float((data["labels"][gallery][nearest] == data["labels"][queries]).float().mean())


def evaluation_split(data: dict, args) -> tuple[torch.Tensor, torch.Tensor]:
    """(gallery, queries) video indices of the kNN R@1: train -> test videos, or with
    ``--eval-on validation`` alternate training videos of each class (training data only, so a
    recipe chosen on it is not chosen on the test videos)."""
    train = torch.nonzero(data["train"]).flatten()
    if args.eval_on == "test":
        return train, torch.nonzero(~data["train"]).flatten()
    odd = (train % args.videos_per_class) % 2 == 1  # videos are stored class by class
    return train[~odd], train[odd]


def batch_norm_groups(model: nn.Module, clips: torch.Tensor, groups: int, shuffle: torch.Tensor | None):
    """``model(clips)`` with batch norm over ``groups`` chunks of the batch, after ``shuffle``
    (a permutation, undone on the output): MoCo's shuffling BN emulated on one process."""
    if shuffle is None:
        return torch.cat([model(chunk) for chunk in clips.chunk(groups)])
    out = torch.cat([model(chunk) for chunk in clips[shuffle].chunk(groups)])
    return out[torch.argsort(shuffle)]


def oracle_positives(
    shares: torch.Tensor, other_video: torch.Tensor, k: int, precision: float, g: torch.Generator
) -> torch.Tensor:
    """Indices of up to ``k`` queue entries an oracle of the given precision mines.

    shares, other_video: (Q,) bool, whether an entry shares the anchor's key and comes from another
    video. Each positive is drawn from the sharing entries with probability ``precision`` and
    from the others (a wrong positive) otherwise; 1.0 is the ideal oracle.
    """
    right = torch.nonzero(shares & other_video).flatten()
    wrong = torch.nonzero(~shares & other_video).flatten()
    right = right[torch.randperm(len(right), generator=g)]
    wrong = wrong[torch.randperm(len(wrong), generator=g)]
    n_right = int((torch.rand(k, generator=g) < precision).sum()) if precision < 1 else k
    return torch.cat([right[:n_right], wrong[: k - n_right]])


def contrastive_stage(encoder: Encoder, clips: Clips, data: dict, args, steps: int, share_key) -> None:
    """MoCo steps; with ``share_key`` (class -> key), k positives among queue entries sharing the key."""
    momentum_encoder = copy.deepcopy(encoder).requires_grad_(False)
    optimizer = torch.optim.Adam(encoder.parameters(), lr=args.lr, weight_decay=1e-5)
    queue = torch.zeros(0, encoder.embed_dim)
    queue_labels = torch.zeros(0, dtype=torch.long)
    queue_videos = torch.zeros(0, dtype=torch.long)
    train, labels = torch.nonzero(data["train"]).flatten(), data["labels"]
    losses, ranks, cosines = [], [], []
    for step in range(steps):
        if args.knn_every and step and step % args.knn_every == 0:
            print(f"    step {step}: R@1 {knn_r1(encoder, clips, data):.1f}", flush=True)
        batch = train[torch.randint(0, len(train), (args.batch_size,), generator=clips.g)]
        others = batch.roll(1)
        views = [
            torch.stack(
                [
                    clips.clip(
                        int(i),
                        clips.random_start(),
                        True,
                        photometric=True,
                        mix_from=int(o) if args.bg_mix > 0 else None,
                    )
                    for i, o in zip(batch, others)
                ]
            )
            for _ in range(2)
        ]
        query = batch_norm_groups(encoder, views[0], args.bn_groups, None)
        with torch.no_grad():
            for key_param, param in zip(momentum_encoder.parameters(), encoder.parameters()):
                key_param.mul_(0.99).add_(param.detach(), alpha=0.01)
            for key_buffer, buffer in zip(momentum_encoder.buffers(), encoder.buffers()):
                key_buffer.copy_(buffer)
            momentum_encoder.train(args.key_bn != "running")
            shuffle = torch.randperm(len(batch), generator=clips.g) if args.key_bn == "shuffle" else None
            key = batch_norm_groups(momentum_encoder, views[1], args.bn_groups, shuffle)
        logits = torch.cat([(query * key).sum(1, keepdim=True), query @ queue.t()], 1) / args.temperature
        mask = torch.zeros_like(logits, dtype=torch.bool)
        mask[:, 0] = True
        if share_key is not None or args.same_video == "positive":
            mask[:, 1:] = queue_videos[None, :] == batch[:, None]  # same-video entries positives
        elif args.same_video == "drop":  # neither positive nor negative
            logits = logits.masked_fill(
                torch.cat(
                    [torch.zeros_like(batch[:, None], dtype=torch.bool), queue_videos[None, :] == batch[:, None]], 1
                ),
                float("-inf"),
            )
        if share_key is not None and len(queue):
            for row, video in enumerate(batch):
                shares = share_key[queue_labels] == share_key[labels[video]]
                pick = oracle_positives(shares, queue_videos != video, args.topk, args.precision, clips.g)
                mask[row, 1 + pick] = True
            mask = mask_self_positive(mask, args.mask_self, clips.g)
        loss = multi_positive_loss(logits, mask)
        if len(queue) == args.queue:  # the pretext task's progress once the queue is full
            losses.append(float(loss.detach()))
            cosines.append(float((query.detach() @ queue.t()).mean()))
            ranks.append(
                float((logits[:, 0:1] >= logits[:, 1:].masked_fill(mask[:, 1:], float("-inf"))).all(1).float().mean())
            )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        queue = torch.cat([key, queue])[: args.queue]
        queue_labels = torch.cat([labels[batch], queue_labels])[: args.queue]
        queue_videos = torch.cat([batch, queue_videos])[: args.queue]
    if losses:
        third = max(1, len(losses) // 3)
        print(
            f"    loss once the queue is full (chance ln {args.queue + 1} = {np.log(args.queue + 1):.2f}): "
            f"first third {np.mean(losses[:third]):.2f}, last third {np.mean(losses[-third:]):.2f}; "
            f"key ranked first {100 * np.mean(ranks[:third]):.0f} -> {100 * np.mean(ranks[-third:]):.0f} %; "
            f"mean query-queue cosine {np.mean(cosines[:third]):.2f} -> {np.mean(cosines[-third:]):.2f}",
            flush=True,
        )


def contrastive(args, data: dict) -> None:
    g = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    clips = Clips(data, args, g)
    table = torch.tensor(synth.factor_indices(args.classes))
    if args.share == "class":
        share_key = torch.arange(args.classes)
    else:
        columns = [FACTOR_COLUMN[name] for name in args.share.split(",")]
        _, share_key = torch.unique(table[:, columns], dim=0, return_inverse=True)
    encoder = Encoder("tiny3d", 3)
    print(f"random init: R@1 {knn_r1(encoder, clips, data):.1f}", flush=True)
    contrastive_stage(encoder, clips, data, args, args.pretrain_steps, None)
    print(f"InfoNCE {args.pretrain_steps} steps: R@1 {knn_r1(encoder, clips, data):.1f}", flush=True)
    if args.skip_stage:
        return
    if not args.oracle_only:
        pretrained = copy.deepcopy(encoder.state_dict())
        contrastive_stage(encoder, clips, data, args, args.stage_steps, None)
        print(f"  + InfoNCE {args.stage_steps} steps: R@1 {knn_r1(encoder, clips, data):.1f}", flush=True)
        encoder.load_state_dict(pretrained)
    contrastive_stage(encoder, clips, data, args, args.stage_steps, share_key)
    print(
        f"  + oracle sharing {args.share} at precision {args.precision}, {args.stage_steps} steps (self-positive mask "
        f"{args.mask_self}): R@1 {knn_r1(encoder, clips, data):.1f}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("question", choices=["supervised", "contrastive"])
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--videos-per-class", type=int, default=60)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--size", type=int, default=32, help="clip side (frames rendered at 128 and downsampled)")
    parser.add_argument("--radius", type=float, nargs=2, default=None, help="override the object radius range")
    parser.add_argument("--trace-depth", type=float, default=synth.TRACE_DEPTH)
    parser.add_argument("--scenes", type=int, default=0, help="synth's --scenes (0: the old per-video backdrops)")
    parser.add_argument("--static-camera", action="store_true", help="synth's --static-camera")
    parser.add_argument("--camera", dest="static_camera", action="store_false", help="a panning camera")
    parser.set_defaults(static_camera=True)  # the old generator unless asked
    parser.add_argument("--object-colour", choices=synth.OBJECT_COLOURS, default="class")
    parser.add_argument("--data-seed", type=int, default=0, help="synth's --seed")
    parser.add_argument("--cache", default=None, help="keep the rendered videos here (.pt) for later runs")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--stride", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument(
        "--crop-min", type=float, default=None, help="smallest crop area (default: 1 supervised, 0.3 contrastive)"
    )
    parser.add_argument("--epochs", type=int, default=10, help="supervised epochs")
    parser.add_argument("--pretrain-steps", type=int, default=144)
    parser.add_argument("--stage-steps", type=int, default=400)
    parser.add_argument(
        "--share", default="motion,sound", help="class factors the ideal oracle's positives share, or 'class'"
    )
    parser.add_argument(
        "--precision",
        type=float,
        default=1.0,
        help="share of the oracle's positives that share --share (the rest: random other entries)",
    )
    parser.add_argument("--oracle-only", action="store_true", help="skip the stage's InfoNCE comparison")
    parser.add_argument(
        "--eval-on",
        choices=["test", "validation"],
        default="test",
        help="kNN R@1 of test videos against the training ones, or of half the training videos against the other half",
    )
    parser.add_argument("--mask-self", type=float, default=0.9)
    parser.add_argument("--topk", type=int, default=5)
    parser.add_argument("--queue", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.07)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--same-video",
        choices=["negative", "positive", "drop"],
        default="negative",
        help="other clips of the query's video in the queue during InfoNCE (the trainer: negative)",
    )
    parser.add_argument(
        "--bg-mix",
        type=float,
        default=0.0,
        help="probability of background mixing (a frame of another video blended into the clip)",
    )
    parser.add_argument("--bg-mix-weight", type=float, default=0.5, help="largest weight of the mixed-in frame")
    parser.add_argument(
        "--key-bn",
        choices=["batch", "shuffle", "running"],
        default="batch",
        help="the momentum encoder's batch norm: batch statistics of the key batch, of shuffled groups, or running",
    )
    parser.add_argument("--bn-groups", type=int, default=1, help="batch-norm groups of query and key forwards")
    parser.add_argument("--hue", type=float, default=0.0, help="hue jitter: a shift uniform in [-hue, hue] (p 0.8)")
    parser.add_argument("--saturation", type=float, default=0.0, help="saturation jitter with --hue")
    parser.add_argument("--knn-every", type=int, default=0, help="print kNN R@1 every this many steps")
    parser.add_argument("--skip-stage", action="store_true", help="InfoNCE pre-training only")
    args = parser.parse_args()
    if args.crop_min is None:
        args.crop_min = 1.0 if args.question == "supervised" else 0.3
    started = time.time()
    data = make_dataset(args)
    print(
        f"{len(data['labels'])} videos {tuple(data['videos'].shape[1:])} ready in {time.time() - started:.0f} s",
        flush=True,
    )
    (supervised if args.question == "supervised" else contrastive)(args, data)
    print(f"done in {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
