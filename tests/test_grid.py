"""caption_grid: layout, nearest upscaling, captions drawn and wrapped."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from unicode_mllm.viz import caption_grid

QUADRANTS = [[(255, 0, 0), (0, 255, 0)], [(0, 0, 255), (255, 255, 0)]]


def _quadrant_image() -> Image.Image:
    return Image.fromarray(np.array(QUADRANTS, dtype=np.uint8))  # 2x2 pixels, one colour each


def test_layout_size_and_nearest_upscaling():
    images = [_quadrant_image() for _ in range(5)]
    grid = caption_grid(images, ["one"] * 5, columns=3, cell_size=32, padding=4)
    arr = np.asarray(grid)
    cell_w = 32 + 2 * 4
    assert grid.mode == "RGB" and grid.width == 3 * cell_w
    cell_h = grid.height // 2
    assert grid.height == 2 * cell_h and cell_h > 32 + 2 * 4  # room for a caption line
    for index in (0, 4):  # first and last cell
        x0, y0 = (index % 3) * cell_w + 4, (index // 3) * cell_h + 4
        tile = arr[y0 : y0 + 32, x0 : x0 + 32]
        for r in range(2):
            for c in range(2):
                block = tile[r * 16 : (r + 1) * 16, c * 16 : (c + 1) * 16]
                assert (block == QUADRANTS[r][c]).all()  # nearest: flat 16x16 blocks, no blending
    assert (arr[cell_h + 4 : cell_h + 36, cell_w * 2 :] == 255).all()  # the sixth cell stays empty


def test_captions_are_drawn_below_each_image():
    images = [Image.new("RGB", (4, 4), (200, 200, 200))] * 2
    arr = np.asarray(caption_grid(images, ["hello world", ""], columns=2, cell_size=64, padding=2))
    caption_rows = arr[2 + 64 :]
    assert (caption_rows[:, : 64 + 4] < 128).any()  # text in the first cell's caption area
    assert (caption_rows[:, 64 + 4 :] == 255).all()  # nothing under the empty caption


def test_long_caption_is_wrapped_and_capped():
    image = [Image.new("RGB", (4, 4))]
    short = caption_grid(image, ["word"], cell_size=48, max_caption_lines=3)
    long = caption_grid(image, ["word " * 60], cell_size=48, max_caption_lines=3)
    longer = caption_grid(image, ["word " * 200], cell_size=48, max_caption_lines=3)
    assert long.width == short.width == 48 + 8
    assert long.height > short.height and longer.height == long.height  # 3 lines at most
    unbroken = caption_grid(image, ["x" * 80], cell_size=48, max_caption_lines=10)
    assert unbroken.width == 56 and unbroken.height > short.height  # a long word is cut, not overflowing


def test_bad_arguments():
    with pytest.raises(ValueError, match="2 images but 1 captions"):
        caption_grid([_quadrant_image()] * 2, ["a"])
    with pytest.raises(ValueError, match="at least one image"):
        caption_grid([], [])
    with pytest.raises(ValueError, match="columns=0"):
        caption_grid([_quadrant_image()], ["a"], columns=0)
