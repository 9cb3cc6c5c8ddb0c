"""``tricoclr-data inspect``: statistics (text and JSON) and the contact sheet, whose rows the
modality registry draws (a modality registered from a test gets its own row)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from video_factory import make_video, run_prepare, tone

from data_tools import inspect_data
from tricoclr.data import modalities as registry
from tricoclr.data.modalities import flow_to_rgb
from tricoclr.data.store import open_store


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


def _records_by_source(prepared) -> dict:
    return {record.meta["source"]: record for record in inspect_data._records_for_sheet(open_store(prepared), 3)}


def test_contact_sheet_rows_are_rgb_flow_and_audio_as_stored(prepared):
    """Per video: a row of RGB tiles (TILE_HEIGHT), a row of flow tiles, and the spectrogram
    stretched across the row (STRIP_HEIGHT) only for videos with audio; the RGB tiles are the
    stored frames at evenly spaced indices."""
    records = _records_by_source(prepared)
    assert sorted(records) == ["Clap/c.mp4", "Wave/a.mp4", "Wave/b.mp4"]
    for source, record in records.items():
        meta = record.meta
        tile_width = int(meta["width"] * inspect_data.TILE_HEIGHT / meta["height"])
        width = 4 * tile_width + 3 * inspect_data.MARGIN
        rows = inspect_data._sample_rows(record, 4)
        expected = [(width, inspect_data.TILE_HEIGHT)] * 2 + [(width, inspect_data.STRIP_HEIGHT)] * meta["has_audio"]
        assert [row.size for row in rows] == expected, source
        last = meta["frames"] - 1
        first_tile = np.asarray(rows[0].crop((0, 0, tile_width, inspect_data.TILE_HEIGHT)))
        stored = Image.fromarray(record.frames("rgb", 0, 1)[0].permute(1, 2, 0).numpy())
        assert np.array_equal(first_tile, np.asarray(stored.resize((tile_width, inspect_data.TILE_HEIGHT))))
        last_tile = rows[0].crop((width - tile_width, 0, width, inspect_data.TILE_HEIGHT))
        stored = Image.fromarray(record.frames("rgb", last, 1)[0].permute(1, 2, 0).numpy())
        assert np.array_equal(np.asarray(last_tile), np.asarray(stored.resize(last_tile.size)))


def _mean_grey_tiles(record, indices: list[int]) -> torch.Tensor:
    """The toy's sheet drawing: one flat grey tile per frame, at the frame's mean brightness."""
    means = record.frames_at("rgb", indices).float().mean(dim=(1, 2, 3)).round().to(torch.uint8)
    return means.view(-1, 1, 1, 1).expand(-1, 3, 8, 8).contiguous()


@pytest.fixture
def greylevel():
    """A toy modality registered by the test (no package file knows it), drawn on the sheet as
    flat grey tiles, served only by videos with audio; removed after the test."""
    registry.register(
        registry.Modality(
            name="greylevel",
            layout="video",
            in_channels=1,
            default_backbone="s3d",
            stored_parts=("rgb",),
            read=lambda record, clip, data_cfg: None,
            augment=lambda raw, generator, data_cfg: raw,
            present=lambda raw, data_cfg: raw,
            available=lambda meta: bool(meta.get("has_audio")),
            sheet=_mean_grey_tiles,
        )
    )
    yield "greylevel"
    registry.unregister("greylevel")


def test_a_registered_modality_draws_its_own_contact_sheet_row(prepared, greylevel, tmp_path):
    records = _records_by_source(prepared)
    for source, record in records.items():
        rows = inspect_data._sample_rows(record, 4)
        assert len(rows) == 2 + 2 * record.meta["has_audio"], source  # rgb, flow (+ audio, greylevel)
        if not record.meta["has_audio"]:
            continue
        toy, rgb = np.asarray(rows[-1]), np.asarray(rows[0])
        assert toy.shape == rgb.shape  # a video layout: tiles of the RGB row's size, after the audio row
        indices = np.linspace(0, record.meta["frames"] - 1, num=4).round().astype(int)
        tile_width = (rows[-1].width - 3 * inspect_data.MARGIN) // 4
        for slot, index in enumerate(indices):
            left = slot * (tile_width + inspect_data.MARGIN)
            mean = round(float(record.frames("rgb", int(index), 1).float().mean()))
            assert (toy[:, left : left + tile_width] == mean).all(), (source, slot)
    png_path = tmp_path / "sheet.png"
    assert inspect_data.main([str(prepared), "--png", str(png_path), "--samples", "3", "--frames", "4"]) == 0
    with_toy = Image.open(png_path).height
    registry.unregister(greylevel)
    assert inspect_data.main([str(prepared), "--png", str(png_path), "--samples", "3", "--frames", "4"]) == 0
    toy_rows = sum(record.meta["has_audio"] for record in records.values())
    row_height = inspect_data.TILE_HEIGHT + inspect_data.MARGIN
    assert with_toy - Image.open(png_path).height == toy_rows * row_height


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
