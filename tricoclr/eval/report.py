"""Human-readable outputs of an evaluation: markdown tables, retrieval figures, projector files.

- :func:`markdown_table`: the paper's Tables 1-3 layout (model, a check mark per modality,
  metrics to one decimal, optionally with a confidence interval).
- :func:`retrieval_figure`: the paper's Figures 4-6 layout: per row, a test video's middle
  frame followed by its top-k retrieved training videos, each captioned with its class and
  framed green (same class as the query) or red (different class).
- :func:`write_projector`: features, labels and thumbnails for TensorBoard's projector.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

CHECK_MARK = "✓"
MISSING = "–"
# Frame colours of the retrieval figure (RGB).
QUERY_COLOUR = (40, 90, 220)
RIGHT_COLOUR = (0, 170, 0)
WRONG_COLOUR = (220, 0, 0)
BACKGROUND_COLOUR = (255, 255, 255)
TEXT_COLOUR = (0, 0, 0)
# TensorBoard's projector rejects sprite images larger than this on a side.
MAX_SPRITE_SIDE = 8192


# --------------------------------------------------------------------------- tables


def markdown_table(
    rows: list[dict],
    columns: list[str],
    *,
    modality_columns: Sequence[str] | None = None,
    modalities_key: str = "modalities",
    decimals: int = 1,
    signed: bool = False,
) -> str:
    """Render result rows as a GitHub-flavoured markdown table.

    Args:
        rows: one dict per model, e.g. ``{"model": "TriCoCLR", "modalities": "RGB+Flow+Audio",
            "R@1": 45.9, "R@1_ci": (44.3, 47.5)}``.
        columns: keys to show, in order. A missing key shows as "–".
        modality_columns: if given (e.g. ``["RGB", "Flow", "Audio"]``), the ``modalities_key``
            column is replaced by one column per modality holding a check mark when the row
            uses it; a row's modalities are a "+"/","-separated string or a list of names
            (case-insensitive; an unknown name is an error, it is most likely a typo).
        decimals: digits after the point for floats (ints are shown as they are).
        signed: floats and their intervals always carry a sign ("+2.2 [-0.0, +4.4]"), for
            tables of differences.

    Cell formatting: floats to ``decimals`` places; if the row also has ``"<column>_ci"``,
    a number is shown as "± half-width" and a (low, high) pair as "[low, high]". Numeric
    columns are right-aligned, check-mark columns centred, text left-aligned.
    """
    if modality_columns is not None and modalities_key not in columns:
        raise ValueError(f"modality_columns given but {modalities_key!r} is not among the columns")
    header: list[str] = []
    cells_by_row: list[list[str]] = [[] for _ in rows]
    alignment: list[str] = []
    for column in columns:
        if modality_columns is not None and column == modalities_key:
            used = [_parse_modalities(row.get(modalities_key), modality_columns) for row in rows]
            for modality in modality_columns:
                header.append(modality)
                alignment.append(":---:")
                for cells, row_modalities in zip(cells_by_row, used):
                    cells.append(CHECK_MARK if modality in row_modalities else "")
            continue
        header.append(column)
        is_numeric = any(_is_number(row.get(column)) for row in rows)
        alignment.append("---:" if is_numeric else "---")
        for cells, row in zip(cells_by_row, rows):
            cells.append(_format_cell(row.get(column), row.get(f"{column}_ci"), decimals, signed))
    lines = [_markdown_row(header), _markdown_row(alignment)]
    lines += [_markdown_row(cells) for cells in cells_by_row]
    return "\n".join(lines) + "\n"


def _parse_modalities(value, modality_columns: Sequence[str]) -> set[str]:
    """The canonical modality names a row uses, from "RGB+Flow" or ["rgb", "flow"]."""
    if value is None:
        return set()
    names = value.replace(",", "+").split("+") if isinstance(value, str) else list(value)
    canonical = {name.lower(): name for name in modality_columns}
    used = set()
    for name in (str(n).strip() for n in names):
        if not name:
            continue
        if name.lower() not in canonical:
            raise ValueError(f"unknown modality {name!r}; expected one of {list(modality_columns)}")
        used.add(canonical[name.lower()])
    return used


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _format_cell(value, ci, decimals: int, signed: bool = False) -> str:
    """One table cell: floats rounded (with a sign if ``signed``), optional CI, text with '|' escaped."""
    if value is None:
        return MISSING
    if isinstance(value, bool):
        return CHECK_MARK if value else ""
    if isinstance(value, int):
        text = str(value)
    elif isinstance(value, float):
        text = f"{value:{'+' if signed else ''}.{decimals}f}"
    else:
        return str(value).replace("|", "\\|")
    if ci is None:
        return text
    if _is_number(ci):
        return f"{text} ± {ci:.{decimals}f}"
    low, high = ci
    sign = "+" if signed else ""
    return f"{text} [{low:{sign}.{decimals}f}, {high:{sign}.{decimals}f}]"


def _markdown_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


# --------------------------------------------------------------------------- figure


def retrieval_figure(
    query_frames: Sequence,
    neighbour_frames: Sequence[Sequence],
    query_labels: Sequence[int],
    neighbour_labels: Sequence[Sequence[int]],
    path: str | os.PathLike,
    class_names: Sequence[str] | None = None,
    *,
    tile: int = 112,
    border: int = 4,
    pad: int = 6,
    caption_height: int = 16,
    query_gap: int = 12,
) -> Image.Image:
    """Draw the qualitative retrieval grid and save it as a PNG at ``path``.

    One row per query: the query's middle frame (blue frame), a gap of ``query_gap`` pixels,
    then its neighbours in retrieval order, each framed green if its label equals the
    query's and red otherwise. Every frame is resized to ``tile`` x ``tile`` and captioned
    below with its class name (``class_names[label]``, or the label number).

    Frames may be uint8 or float-in-[0, 1] arrays/tensors, H x W x 3 (or 3 x H x W tensors,
    or H x W grey). With K the longest neighbour list and R the number of queries, the image
    is ``pad + (K + 1) * (tile + 2 * border + pad) + query_gap`` pixels wide and
    ``pad + R * (tile + 2 * border + caption_height + pad)`` high.

    Returns:
        The PIL image that was saved.
    """
    num_rows = len(query_frames)
    if not (len(neighbour_frames) == len(query_labels) == len(neighbour_labels) == num_rows):
        raise ValueError(
            "query_frames, neighbour_frames, query_labels and neighbour_labels must have one entry per query"
        )
    if num_rows == 0:
        raise ValueError("the figure needs at least one query")
    for frames, labels in zip(neighbour_frames, neighbour_labels):
        if len(frames) != len(labels):
            raise ValueError("each query needs one label per neighbour frame")

    cell = tile + 2 * border
    max_neighbours = max(len(frames) for frames in neighbour_frames)
    width = pad + (max_neighbours + 1) * (cell + pad) + query_gap
    height = pad + num_rows * (cell + caption_height + pad)
    canvas = Image.new("RGB", (width, height), BACKGROUND_COLOUR)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()

    def name_of(label) -> str:
        label = int(label)
        return str(class_names[label]) if class_names is not None else str(label)

    for row in range(num_rows):
        top = pad + row * (cell + caption_height + pad)
        query_label = int(query_labels[row])
        _draw_tile(canvas, draw, font, query_frames[row], (pad, top), QUERY_COLOUR, name_of(query_label), tile, border)
        for column, (frame, label) in enumerate(zip(neighbour_frames[row], neighbour_labels[row])):
            left = pad + (column + 1) * (cell + pad) + query_gap
            colour = RIGHT_COLOUR if int(label) == query_label else WRONG_COLOUR
            _draw_tile(canvas, draw, font, frame, (left, top), colour, name_of(label), tile, border)

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, format="PNG")
    return canvas


def _draw_tile(canvas, draw, font, frame, corner, colour, caption, tile, border) -> None:
    """Paste one frame with a coloured frame around it and a caption underneath."""
    left, top = corner
    cell = tile + 2 * border
    draw.rectangle([left, top, left + cell - 1, top + cell - 1], fill=colour)
    canvas.paste(_to_pil_rgb(frame).resize((tile, tile), Image.Resampling.BILINEAR), (left + border, top + border))
    draw.text((left, top + cell + 1), _fit_text(draw, font, caption, cell), fill=TEXT_COLOUR, font=font)


def _fit_text(draw, font, text: str, max_width: int) -> str:
    """Shorten ``text`` with a trailing '..' until it fits ``max_width`` pixels."""
    if draw.textlength(text, font=font) <= max_width:
        return text
    while text and draw.textlength(text + "..", font=font) > max_width:
        text = text[:-1]
    return text + ".."


def _to_pil_rgb(frame) -> Image.Image:
    """A frame (uint8 or [0, 1] float; HWC, CHW tensor or HW) as an RGB PIL image."""
    if isinstance(frame, Image.Image):
        return frame.convert("RGB")
    if isinstance(frame, torch.Tensor):
        if frame.dim() == 3 and frame.shape[0] in (1, 3) and frame.shape[-1] not in (1, 3):
            frame = frame.permute(1, 2, 0)  # CHW -> HWC
        frame = frame.detach().cpu().numpy()
    array = np.asarray(frame)
    if array.dtype != np.uint8:
        array = (np.clip(array.astype(np.float64), 0.0, 1.0) * 255.0).round().astype(np.uint8)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=2)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"a frame must be H x W x 3, got shape {array.shape}")
    return Image.fromarray(np.ascontiguousarray(array))


# --------------------------------------------------------------------------- projector


def write_projector(
    logdir: str | os.PathLike,
    features: torch.Tensor,
    labels: Sequence[str],
    thumbnails: torch.Tensor | None = None,
    tag: str = "embeddings",
    *,
    global_step: int = 0,
) -> Path:
    """Write embeddings for TensorBoard's projector (``tensorboard --logdir <logdir>``).

    Args:
        logdir: TensorBoard log directory; ``projector_config.pbtxt`` goes there and
            ``tensors.tsv``, ``metadata.tsv`` and ``sprite.png`` into
            ``<logdir>/<global_step:05d>/<tag>/``.
        features: (N, D) features, one per video.
        labels: N class names (tabs and newlines become spaces, they would break the TSV).
            The projector colours by at most 50 distinct labels.
        thumbnails: optional (N, 3, h, w) uint8 or [0, 1] float images for the sprite; scaled
            down when the sprite (ceil(sqrt(N)) thumbnails a side) would exceed 8192 pixels.
        tag: name of the embedding in the projector.

    Returns:
        ``Path(logdir)``.
    """
    from torch.utils.tensorboard import SummaryWriter  # imported lazily: tensorboard is slow to import

    features = torch.as_tensor(features).detach().float().cpu()
    if features.dim() != 2 or len(labels) != features.shape[0]:
        raise ValueError("features must be (N, D) with one label per row")
    metadata = [str(label).replace("\t", " ").replace("\n", " ") for label in labels]
    label_img = None if thumbnails is None else _projector_thumbnails(thumbnails, features.shape[0])

    writer = SummaryWriter(log_dir=str(logdir))
    try:
        writer.add_embedding(features, metadata=metadata, label_img=label_img, global_step=global_step, tag=tag)
    finally:
        writer.close()
    return Path(logdir)


def _projector_thumbnails(thumbnails: torch.Tensor, num_items: int) -> torch.Tensor:
    """(N, 3, h, w) float in [0, 1], shrunk so the square sprite stays within 8192 pixels."""
    images = torch.as_tensor(thumbnails).detach().cpu()
    if images.dim() != 4 or images.shape[0] != num_items or images.shape[1] != 3:
        raise ValueError("thumbnails must be (N, 3, h, w) with one image per feature row")
    images = images.float() / 255.0 if images.dtype == torch.uint8 else images.float().clamp(0.0, 1.0)
    per_side = math.ceil(math.sqrt(num_items))
    largest = max(images.shape[2], images.shape[3])
    if per_side * largest > MAX_SPRITE_SIDE:
        scale = (MAX_SPRITE_SIDE // per_side) / largest
        size = (max(1, int(images.shape[2] * scale)), max(1, int(images.shape[3] * scale)))
        images = F.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False)
        images = images.clamp(0.0, 1.0)
    return images
