"""``tricoclr-data inspect``: a prepared dataset's statistics and a contact sheet to eyeball it.

The statistics come from the manifests (every part of the dataset); the contact sheet reads a
few samples through the same reader API as training (tricoclr.data.store), so a sheet that
looks right means the stored data decodes right. Each modality of the registry draws its own row
(``Modality.sheet``): RGB frames, flow in the usual colour coding (hue = direction, brightness =
magnitude) and the log-mel spectrogram (low frequencies at the bottom).
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from tricoclr.data import modalities as registry
from tricoclr.data import schema
from tricoclr.data.store import VideoRecord, VideoStore, open_store

TILE_HEIGHT = 96
STRIP_HEIGHT = 64  # a spectrogram-like modality's row
MARGIN = 4
TEXT_HEIGHT = 14


# ---- statistics -------------------------------------------------------------------------------


def statistics_from_entries(entries: list[dict]) -> dict:
    """Counts, durations and storage cost of a dataset from its manifest entries.

    ``bytes_per_second[m]`` divides modality m's bytes by the seconds of the videos that have
    it (audio: videos with audio), i.e. the storage cost of one second of video.
    """
    kept = [e for e in entries if e["status"] in schema.KEPT_STATUSES]
    status = collections.Counter(e["status"] for e in entries)
    bytes_by_modality: collections.Counter = collections.Counter()
    seconds_by_modality: collections.Counter = collections.Counter()
    for entry in kept:
        seconds = entry.get("seconds", 0.0)
        for modality, size in entry.get("bytes_by_modality", {}).items():
            bytes_by_modality[modality] += size
            seconds_by_modality[modality] += seconds
    seconds = sum(e.get("seconds", 0.0) for e in kept)
    return {
        "entries": len(entries),
        "videos": len(kept),
        "ok": status[schema.STATUS_OK],
        "partial": status[schema.STATUS_PARTIAL],
        "failed": status[schema.STATUS_FAILED],
        "seconds": round(seconds, 3),
        "hours": round(seconds / 3600, 4),
        "frames": sum(e.get("frames", 0) for e in kept),
        "with_audio": sum(bool(e.get("has_audio")) for e in kept),
        "silent_audio": sum(bool(e.get("audio_silent")) for e in kept),
        "bytes": sum(bytes_by_modality.values()),
        "bytes_by_modality": dict(sorted(bytes_by_modality.items())),
        "bytes_per_second": {
            m: round(bytes_by_modality[m] / seconds_by_modality[m], 1)
            for m in sorted(bytes_by_modality)
            if seconds_by_modality[m] > 0
        },
        "flags": dict(collections.Counter(f for e in kept for f in e.get("flags", [])).most_common()),
        "labels": dict(sorted(collections.Counter(e["label"] for e in kept if e.get("label") is not None).items())),
        "failures": [
            {"id": e["id"], "source": e["source"], "reason": e.get("reason")}
            for e in entries
            if e["status"] == schema.STATUS_FAILED
        ][:50],
        "partials": [
            {"id": e["id"], "source": e["source"], "reason": e.get("reason")}
            for e in entries
            if e["status"] == schema.STATUS_PARTIAL
        ][:50],
        # bugs rather than bad input (the entry's ``internal_error`` names the exception type)
        "internal_errors": {
            "count": sum(bool(e.get("internal_error")) for e in entries),
            "examples": [f"{e['source']}: {e['internal_error']}" for e in entries if e.get("internal_error")][:20],
        },
    }


def format_statistics(stats: dict, title: str = "dataset") -> str:
    """A short human-readable report of ``statistics_from_entries``."""
    lines = [
        f"{title}:",
        f"  videos kept {stats['videos']} (ok {stats['ok']}, partial {stats['partial']}), failed {stats['failed']}",
        f"  {stats['hours']:.3f} h of video ({stats['seconds']:.1f} s, {stats['frames']} frames), "
        f"{stats['with_audio']} with audio ({stats['silent_audio']} silent)",
        f"  stored {_human_bytes(stats['bytes'])}; bytes per video-second: "
        + ", ".join(f"{m} {v:,.0f}" for m, v in stats["bytes_per_second"].items()),
    ]
    if stats["labels"]:
        lines.append(f"  {len(stats['labels'])} labels")
    if stats["flags"]:
        lines.append("  flags: " + ", ".join(f"{k} {v}" for k, v in stats["flags"].items()))
    for kind in ("failures", "partials"):
        for item in stats[kind][:5]:
            lines.append(f"  {kind[:-1]}: {item['source']}: {item['reason']}")
    internal = stats.get("internal_errors", {}).get("count", 0)
    if internal:
        lines.append(
            f"  internal error: {internal} video(s) hit an unexpected error, not a fault of the input "
            f"(e.g. {', '.join(stats['internal_errors']['examples'][:3])}); please report it"
        )
    return "\n".join(lines)


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


# ---- contact sheet ----------------------------------------------------------------------------


def _sample_rows(record: VideoRecord, frames_per_row: int) -> list[Image.Image]:
    """Rows of one video: one per registered modality that declares a ``sheet`` drawing and that
    the video can serve (``available``), in registry order (RGB frames, their flow, the
    spectrogram). A "video" layout's images are tiles of TILE_HEIGHT rows, one per sampled
    frame; a "spectrogram" layout's one image is stretched to the row's width, STRIP_HEIGHT rows.
    """
    meta = record.meta
    indices = np.linspace(0, meta["frames"] - 1, num=min(frames_per_row, meta["frames"])).round().astype(int)
    scale = TILE_HEIGHT / meta["height"]
    tile_size = (max(1, int(meta["width"] * scale)), TILE_HEIGHT)
    row_width = len(indices) * tile_size[0] + MARGIN * (len(indices) - 1)
    rows = []
    for modality in registry.MODALITIES.values():
        if modality.sheet is None or not modality.available(meta):
            continue
        images = [Image.fromarray(image.permute(1, 2, 0).numpy()) for image in modality.sheet(record, indices.tolist())]
        if modality.layout == "video":
            rows.append(_row([image.resize(tile_size) for image in images]))
        else:
            rows.append(images[0].resize((row_width, STRIP_HEIGHT), Image.BILINEAR))
    return rows


def _row(tiles: list[Image.Image]) -> Image.Image:
    width = sum(t.width for t in tiles) + MARGIN * (len(tiles) - 1)
    row = Image.new("RGB", (width, tiles[0].height), "white")
    x = 0
    for tile in tiles:
        row.paste(tile, (x, 0))
        x += tile.width + MARGIN
    return row


def _records_for_sheet(store: VideoStore, samples: int) -> list[VideoRecord]:
    """A few videos spread over the dataset (LMDB), or the first few (WebDataset, sequential)."""
    if store.format == "lmdb":
        videos = store.videos()
        if not videos:
            return []
        picks = np.unique(np.linspace(0, len(videos) - 1, num=min(samples, len(videos))).round().astype(int))
        return [store.record(videos[i]["id"]) for i in picks]
    records = []
    for record in store.iter_records():
        records.append(record)
        if len(records) == samples:
            break
    return records


def contact_sheet(store: VideoStore, samples: int = 4, frames_per_row: int = 6) -> Image.Image:
    """One block per sampled video: a caption, then a row per modality it has (``_sample_rows``)."""
    blocks = []
    for record in _records_for_sheet(store, samples):
        meta = record.meta
        caption = (
            f"{meta['source']}  label={meta.get('label')}  {meta['frames']} frames @ {meta['fps']:g} fps  "
            f"{meta['width']}x{meta['height']}  flow={meta.get('flow_method')}  "
            f"audio={'yes' if meta.get('has_audio') else 'no'}  {meta.get('status')}"
        )
        blocks.append((caption, _sample_rows(record, frames_per_row)))
    if not blocks:
        sheet = Image.new("RGB", (400, 40), "white")
        ImageDraw.Draw(sheet).text((MARGIN, MARGIN), "no videos to show", fill="black")
        return sheet
    width = max(max(r.width for r in rows) for _, rows in blocks) + 2 * MARGIN
    height = sum(TEXT_HEIGHT + sum(r.height + MARGIN for r in rows) + MARGIN for _, rows in blocks) + MARGIN
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    y = MARGIN
    for caption, rows in blocks:
        draw.text((MARGIN, y), caption, fill="black")
        y += TEXT_HEIGHT
        for row in rows:
            sheet.paste(row, (MARGIN, y))
            y += row.height + MARGIN
        y += MARGIN
    return sheet


# ---- command ----------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``tricoclr-data inspect``."""
    parser.add_argument(
        "dir",
        metavar="DIR",
        help="a prepared dataset (or a folder of its part-* folders), or the "
        "URL of a WebDataset store (docs/url_stores.md)",
    )
    parser.add_argument("--json", metavar="FILE", help="also write the statistics as JSON")
    parser.add_argument("--png", metavar="FILE", help="write a contact sheet of a few samples")
    parser.add_argument("--samples", type=int, default=4, help="videos on the contact sheet")
    parser.add_argument("--frames", type=int, default=6, help="frames per video on the contact sheet")


def store_statistics(store: VideoStore) -> dict:
    """Statistics of a prepared dataset (all parts), with its format, parts and class count."""
    stats = statistics_from_entries(store.manifest())
    classes = store.class_names()
    stats.update(format=store.format, parts=len(store.parts), classes=len(classes) if classes else 0)
    if store.format == "webdataset":
        stats["shards"] = len(store.shard_paths())
    return stats


def run(args: argparse.Namespace) -> int:
    try:
        store = open_store(args.dir)
    except (FileNotFoundError, ValueError) as exc:
        print(f"tricoclr-data inspect: error: {exc}", file=sys.stderr)
        return 2
    stats = store_statistics(store)
    print(format_statistics(stats, title=f"{args.dir} ({stats['format']}, {stats['parts']} part(s))"))
    if args.json:
        Path(args.json).write_text(json.dumps(stats, indent=2, sort_keys=True) + "\n")
    if args.png:
        contact_sheet(store, args.samples, args.frames).save(args.png)
        print(f"contact sheet: {args.png}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tricoclr-data inspect", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
