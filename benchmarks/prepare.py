"""Preparation throughput by flow method, and storage against CoCLR's layout.

    python benchmarks/prepare.py --json prepare.json [--videos 4 --seconds 10 --size 128]

For each flow method (tvl1 = OpenCV DualTVL1, farneback, none): `tricoclr-data prepare` with one
worker on synthesized 10-second videos; reports video-seconds prepared per second per worker, and
the stored bytes per video-second of each modality. CoCLR's layout (one JPEG file per RGB frame and
one 3-channel JPEG per flow field, x, y and a constant channel) is measured on the same frames.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_tools.cli import main as data_cli  # noqa: E402
from tricoclr.data.schema import quantise_flow  # noqa: E402
from tricoclr.data.store import open_store  # noqa: E402


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration, subprocess.SubprocessError):
        return platform.processor() or platform.machine()


def coclr_bytes_per_second(store_path: Path, quality: int = 95, max_videos: int = 2) -> dict:
    """CoCLR's layout on the same frames: one RGB JPEG per frame, one 3-channel flow JPEG per field."""
    import cv2

    store = open_store(store_path)
    rgb_bytes = flow_bytes = seconds = 0.0
    for meta in store.videos()[:max_videos]:
        record = store.record(meta["id"])
        frames = record.frames("rgb", 0, int(meta["frames"]))
        for frame in frames:
            ok, buf = cv2.imencode(
                ".jpg", frame.permute(1, 2, 0).numpy()[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality]
            )
            rgb_bytes += len(buf)
        if meta.get("flow_method", "none") != "none":
            flows = record.frames("flow", 0, int(meta["frames"]))
            for field in flows:
                xy = field.permute(1, 2, 0).numpy()
                three = np.concatenate([xy, np.full_like(xy[:, :, :1], quantise_flow(np.zeros(1))[0])], axis=2)
                ok, buf = cv2.imencode(".jpg", three, [cv2.IMWRITE_JPEG_QUALITY, quality])
                flow_bytes += len(buf)
        seconds += int(meta["frames"]) / float(meta["fps"])
    return {"rgb": rgb_bytes / seconds, "flow": flow_bytes / seconds if flow_bytes else None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=4)
    parser.add_argument("--tvl1-videos", type=int, default=1, help="TV-L1 is ~0.2 s per pair: fewer videos")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--methods", nargs="+", default=["none", "farneback", "tvl1"])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    results = {
        "machine": {"cpu": cpu_model(), "workers": 1},
        "seconds_per_video": args.seconds,
        "size": args.size,
        "methods": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data_cli(
            [
                "synth",
                "--out",
                str(tmp / "synth"),
                "--classes",
                "2",
                "--videos-per-class",
                str(max(1, args.videos // 2)),
                "--seconds",
                str(args.seconds),
                "--size",
                str(args.size * 4 // 3),
            ]
        )
        videos = sorted((tmp / "synth" / "videos").rglob("*.mp4"))
        for method in args.methods:
            count = args.tvl1_videos if method == "tvl1" else len(videos)
            source = tmp / f"src_{method}"
            source.mkdir()
            for video in videos[:count]:
                (source / video.name).symlink_to(video)
            out = tmp / f"prepared_{method}"
            start = time.perf_counter()
            code = data_cli(
                [
                    "prepare",
                    str(source),
                    "--out",
                    str(out),
                    "--format",
                    "lmdb",
                    "--flow",
                    method,
                    "--size",
                    str(args.size),
                    "--workers",
                    "1",
                    "--no-progress",
                ]
            )
            elapsed = time.perf_counter() - start
            if code != 0:
                raise SystemExit(f"prepare --flow {method} failed")
            summary = json.loads((out / "summary.json").read_text())
            results["methods"][method] = {
                "videos": count,
                "video_seconds_per_s_per_worker": summary["seconds"] / elapsed,
                "bytes_per_video_second": summary["bytes_per_second"],
            }
            if method != "none":
                results["methods"][method]["coclr_layout_bytes_per_video_second"] = coclr_bytes_per_second(out)
            print(method, json.dumps(results["methods"][method]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
