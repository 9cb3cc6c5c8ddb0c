"""Markdown tables, the retrieval figure and the projector files."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from tricoclr.eval.report import (
    QUERY_COLOUR,
    RIGHT_COLOUR,
    WRONG_COLOUR,
    _projector_thumbnails,
    markdown_table,
    retrieval_figure,
    write_projector,
)


def test_markdown_table_with_modality_checks_and_ci():
    rows = [
        {"model": "CoCLR", "modalities": "RGB+Flow", "R@1": 44.5, "R@5": 60.6},
        {
            "model": "TriCoCLR",
            "modalities": ["rgb", "flow", "audio"],
            "R@1": 45.93,
            "R@1_ci": (44.21, 47.6),
            "R@5": 64.1,
            "R@5_ci": 1.25,
        },
    ]
    table = markdown_table(
        rows, ["model", "modalities", "R@1", "R@5", "num_test"], modality_columns=["RGB", "Flow", "Audio"]
    )
    assert table == (
        "| model | RGB | Flow | Audio | R@1 | R@5 | num_test |\n"
        "| --- | :---: | :---: | :---: | ---: | ---: | --- |\n"
        "| CoCLR | ✓ | ✓ |  | 44.5 | 60.6 | – |\n"
        "| TriCoCLR | ✓ | ✓ | ✓ | 45.9 [44.2, 47.6] | 64.1 ± 1.2 | – |\n"
    )


def test_markdown_table_plain_columns_and_ints():
    table = markdown_table([{"model": "a|b", "top1": 76.54, "num_test": 3783}], ["model", "top1", "num_test"])
    assert table.splitlines() == [
        "| model | top1 | num_test |",
        "| --- | ---: | ---: |",
        "| a\\|b | 76.5 | 3783 |",
    ]


def test_markdown_table_signed_for_differences():
    rows = [
        {"difference": "A − B", "R@1": 2.25, "R@1_ci": [-0.04, 4.4]},
        {"difference": "C − D", "R@1": -1.6, "R@1_ci": [-3.1, 0.0]},
    ]
    table = markdown_table(rows, ["difference", "R@1"], signed=True)
    assert table.splitlines() == [
        "| difference | R@1 |",
        "| --- | ---: |",
        "| A − B | +2.2 [-0.0, +4.4] |",
        "| C − D | -1.6 [-3.1, +0.0] |",
    ]
    assert "| 2.2 [-0.0, 4.4] |" in markdown_table(rows, ["difference", "R@1"])  # unsigned by default


def test_markdown_table_rejects_unknown_modality():
    with pytest.raises(ValueError, match="unknown modality"):
        markdown_table(
            [{"model": "x", "modalities": "RGB+Depth"}],
            ["model", "modalities"],
            modality_columns=["RGB", "Flow", "Audio"],
        )


def test_retrieval_figure_size_and_border_colours(tmp_path):
    tile, border, pad, caption, gap = 32, 3, 4, 12, 8
    frame_colour = (10, 200, 30)
    frame = np.zeros((20, 24, 3), dtype=np.uint8)
    frame[:] = frame_colour
    chw_float = torch.tensor(frame_colour, dtype=torch.float32).div(255).view(3, 1, 1).expand(3, 16, 16)
    neighbours = [[frame, chw_float, frame, frame, frame]] * 2
    neighbour_labels = [[1, 0, 1, 2, 1], [0, 0, 0, 0, 0]]
    path = tmp_path / "figs" / "retrieval.png"
    retrieval_figure(
        [frame, frame],
        neighbours,
        [1, 0],
        neighbour_labels,
        path,
        class_names=["Archery", "Basketball", "a very long class name indeed"],
        tile=tile,
        border=border,
        pad=pad,
        caption_height=caption,
        query_gap=gap,
    )

    with Image.open(path) as png:
        image = np.asarray(png.convert("RGB"))
    cell = tile + 2 * border
    assert image.shape == (pad + 2 * (cell + caption + pad), pad + 6 * (cell + pad) + gap, 3)

    def pixel(x, y):
        return tuple(int(v) for v in image[y, x])

    top = pad
    assert pixel(pad, top) == QUERY_COLOUR
    assert pixel(pad + border + tile // 2, top + border + tile // 2) == frame_colour
    # Row 0 (query label 1): labels 1, 0, 1, 2, 1 -> right, wrong, right, wrong, right.
    expected = [RIGHT_COLOUR, WRONG_COLOUR, RIGHT_COLOUR, WRONG_COLOUR, RIGHT_COLOUR]
    for column, colour in enumerate(expected):
        left = pad + (column + 1) * (cell + pad) + gap
        assert pixel(left + 1, top + 1) == colour
        assert pixel(left + border + tile // 2, top + border + tile // 2) == frame_colour
    # Row 1: every neighbour shares the query's label.
    second_top = pad + cell + caption + pad
    assert pixel(pad + cell + pad + gap + 1, second_top + 1) == RIGHT_COLOUR
    # Captions are drawn in black below the tiles.
    assert (image[top + cell : top + cell + caption, pad : pad + cell] < 100).all(axis=2).any()


def test_write_projector_writes_all_files(tmp_path):
    num_items, dim = 10, 4
    features = torch.arange(num_items * dim, dtype=torch.float32).view(num_items, dim)
    labels = [f"class\t{i % 3}" for i in range(num_items)]
    thumbnails = torch.randint(0, 256, (num_items, 3, 8, 8), dtype=torch.uint8)
    write_projector(tmp_path, features, labels, thumbnails, tag="rgb")

    embedding_dir = tmp_path / "00000" / "rgb"
    config = (tmp_path / "projector_config.pbtxt").read_text()
    assert "rgb:00000" in config and "sprite.png" in config
    assert (embedding_dir / "metadata.tsv").read_text().splitlines() == [f"class {i % 3}" for i in range(num_items)]
    rows = (embedding_dir / "tensors.tsv").read_text().splitlines()
    assert len(rows) == num_items
    assert [float(v) for v in rows[1].split("\t")] == [4.0, 5.0, 6.0, 7.0]
    side = math.ceil(math.sqrt(num_items)) * 8
    with Image.open(embedding_dir / "sprite.png") as sprite:
        assert sprite.size == (side, side)


def test_projector_thumbnails_shrink_to_the_sprite_limit():
    tall = torch.ones(1, 3, 9000, 10)
    shrunk = _projector_thumbnails(tall, 1)
    assert shrunk.shape == (1, 3, 8192, 9)
    assert shrunk.max() <= 1.0
