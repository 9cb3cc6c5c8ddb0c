"""``tricoclr-data inspect``: statistics (text and JSON) and the contact sheet."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from video_factory import make_video, run_prepare, tone

from data_tools import inspect_data
from data_tools.inspect_data import flow_to_rgb


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    src = tmp_path_factory.mktemp("inspect_src")
    make_video(src / "Wave" / "a.mp4", seconds=2.0, width=64, height=48, audio=tone(600, 2.0, 16000))
    make_video(src / "Wave" / "b.mp4", seconds=1.0, width=64, height=48, dx=2)
    make_video(src / "Clap" / "c.mp4", seconds=1.0, width=64, height=48, audio=tone(1200, 1.0, 22050), audio_rate=22050)
    (src / "Clap" / "bad.mp4").write_bytes(b"not a video")
    out = tmp_path_factory.mktemp("inspect_parts")
    for index in range(2):
        run_prepare(src, out, "--size", "48", "--shard-index", str(index), "--num-shards", "2", fmt="lmdb")
    return out


def test_json_statistics_cover_all_parts(prepared, tmp_path, capsys):
    json_path, png_path = tmp_path / "stats.json", tmp_path / "sheet.png"
    assert inspect_data.main([str(prepared), "--json", str(json_path), "--png", str(png_path)]) == 0
    stats = json.loads(json_path.read_text())
    assert stats["videos"] == 3 and stats["failed"] == 1 and stats["parts"] == 2
    assert stats["seconds"] == pytest.approx(4.0)
    assert set(stats["bytes_per_second"]) >= {"rgb", "flow", "audio"}
    assert all(v > 0 for v in stats["bytes_per_second"].values())
    assert stats["labels"] == {"Clap": 1, "Wave": 2} and stats["classes"] == 2
    assert stats["with_audio"] == 2
    printed = capsys.readouterr().out
    assert "videos kept 3" in printed and "failed 1" in printed and "bad.mp4" in printed


def test_contact_sheet_is_written(prepared, tmp_path):
    png_path = tmp_path / "sheet.png"
    assert inspect_data.main([str(prepared), "--png", str(png_path), "--samples", "3", "--frames", "4"]) == 0
    sheet = Image.open(png_path)
    assert sheet.mode == "RGB" and sheet.width > 4 * 64 and sheet.height > 3 * 2 * 96
    pixels = np.asarray(sheet)
    assert pixels.std() > 10  # frames, flow colours and spectrograms, not a blank page


def test_flow_colour_coding():
    right = np.zeros((2, 4, 4), np.float32)
    right[0] = 5.0
    left = -right
    down = np.zeros((2, 4, 4), np.float32)
    down[1] = 5.0
    assert tuple(flow_to_rgb(right, 5.0)[0, 0]) == (255, 0, 0)  # hue 0: rightward is red
    # the opposite direction has the opposite hue: cyan (hue quantised to 8 bits)
    assert np.abs(flow_to_rgb(left, 5.0)[0, 0].astype(int) - (0, 255, 255)).max() <= 5
    assert not np.array_equal(flow_to_rgb(down, 5.0)[0, 0], flow_to_rgb(right, 5.0)[0, 0])
    assert flow_to_rgb(np.zeros((2, 4, 4), np.float32), 5.0).max() == 0  # no motion is black
    assert flow_to_rgb(right * 0.5, 5.0)[0, 0, 0] == pytest.approx(128, abs=2)  # brightness = magnitude


def test_missing_dataset_is_a_clear_error(tmp_path, capsys):
    assert inspect_data.main([str(tmp_path)]) == 2
    assert "not a prepared dataset" in capsys.readouterr().err
