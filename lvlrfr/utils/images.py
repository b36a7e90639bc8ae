"""Sample grids: rows of image batches laid out as one labelled PIL image, and atomic PNG writes."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw
from torch import Tensor

from lvlrfr.data.image import to_uint8

PADDING = 2
BACKGROUND = (32, 32, 32)
LABEL_COLOUR = (235, 235, 235)


def make_grid_image(rows: Sequence[Tensor], row_names: Sequence[str], cell_size: int | None = None) -> Image.Image:
    """Lay out image batches as a grid with one labelled row per batch and one column per image.

    Args:
        rows: batches ``(B, 3, H, W)`` in [-1, 1], all with the same ``B``. Sizes may differ between rows.
        row_names: one label per row, drawn to the left of the row.
        cell_size: side of each grid cell in pixels; defaults to the largest image side among the rows.

    Every image is resized to ``cell_size``: up with nearest-neighbour, so the pixels of a low-resolution
    face stay visible as blocks, and down with box (area) filtering.
    """
    if len(rows) != len(row_names):
        raise ValueError(f"got {len(rows)} rows but {len(row_names)} row names")
    if not rows:
        raise ValueError("make_grid_image needs at least one row")
    counts = {len(row) for row in rows}
    if len(counts) != 1:
        raise ValueError(f"every row needs the same number of images, got {[len(row) for row in rows]}")
    for name, row in zip(row_names, rows):
        if row.ndim != 4 or row.shape[1] != 3:
            raise ValueError(f"row {name!r} must have shape (B, 3, H, W), got {tuple(row.shape)}")
    columns = counts.pop()
    if cell_size is None:
        cell_size = max(max(row.shape[-2:]) for row in rows)

    draw_probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_width = max(draw_probe.textbbox((0, 0), name)[2] for name in row_names) + 2 * PADDING
    width = label_width + columns * (cell_size + PADDING) + PADDING
    height = len(rows) * (cell_size + PADDING) + PADDING
    grid = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(grid)

    for row_index, (name, row) in enumerate(zip(row_names, rows)):
        top = PADDING + row_index * (cell_size + PADDING)
        draw.text((PADDING, top + cell_size // 2), name, fill=LABEL_COLOUR, anchor="lm")
        for column in range(columns):
            image = Image.fromarray(to_uint8(row[column]))
            if image.size != (cell_size, cell_size):
                growing = max(image.size) < cell_size
                image = image.resize((cell_size, cell_size), Image.NEAREST if growing else Image.BOX)
            grid.paste(image, (label_width + PADDING + column * (cell_size + PADDING), top))
    return grid


def save_png_atomic(image: Image.Image, path: str | Path) -> Path:
    """Write ``image`` as PNG to ``path`` through a temporary file in the same folder and a rename.

    A reader (a file browser, a logger syncing the folder) never reads a half-written file. Parent
    folders are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The process id keeps concurrent writers (one per rank or run) off each other's temporary file.
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        image.save(temporary, format="PNG")
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path
