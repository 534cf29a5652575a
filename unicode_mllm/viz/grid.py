"""A grid of images, each upscaled (nearest) with its caption wrapped below, in PIL's default font."""

from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (255, 255, 255)
TEXT_COLOUR = (0, 0, 0)


def _wrap(text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, width: int) -> list[str]:
    """Greedy word wrap to `width` pixels; a word longer than a line is cut by characters."""
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        line = ""
        for word in paragraph.split():
            candidate = f"{line} {word}" if line else word
            if font.getlength(candidate) <= width:
                line = candidate
                continue
            if line:
                lines.append(line)
            while font.getlength(word) > width and len(word) > 1:
                cut = len(word) - 1
                while cut > 1 and font.getlength(word[:cut]) > width:
                    cut -= 1
                lines.append(word[:cut])
                word = word[cut:]
            line = word
        lines.append(line)
    return lines


def caption_grid(
    images: list[Image.Image],
    captions: list[str],
    columns: int = 4,
    cell_size: int = 128,
    *,
    padding: int = 4,
    max_caption_lines: int = 4,
) -> Image.Image:
    """Lay out `images` in a grid, each scaled with nearest-neighbour to fit `cell_size` x `cell_size`
    (aspect kept, centred) with its caption wrapped below in PIL's default font.

    Captions longer than `max_caption_lines` lines end in "...". Returns an RGB image of width
    columns' * (cell_size + 2 * padding) and a height that fits the longest caption, where columns' =
    min(columns, len(images)). Raises ValueError when the lists differ in length or are empty, or when
    columns, cell_size or max_caption_lines is below 1.
    """
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions; give one caption per image")
    if not images:
        raise ValueError("caption_grid needs at least one image")
    if columns < 1 or cell_size < 1 or max_caption_lines < 1 or padding < 0:
        raise ValueError(
            f"columns, cell_size and max_caption_lines must be >= 1 and padding >= 0 (got columns={columns}, "
            f"cell_size={cell_size}, max_caption_lines={max_caption_lines}, padding={padding})"
        )
    font = ImageFont.load_default()
    ascent_box = font.getbbox("Ag")
    line_height = int(ascent_box[3] - min(0, ascent_box[1])) + 2
    wrapped = []
    for caption in captions:
        lines = _wrap(caption, font, cell_size)
        if len(lines) > max_caption_lines:
            lines = lines[:max_caption_lines]
            last = lines[-1]
            while last and font.getlength(last + "...") > cell_size:
                last = last[:-1]
            lines[-1] = last + "..."
        wrapped.append([line for line in lines if line] if any(lines) else [])
    caption_height = line_height * max((len(lines) for lines in wrapped), default=0)

    columns = min(columns, len(images))
    rows = -(-len(images) // columns)
    cell_w = cell_size + 2 * padding
    cell_h = cell_size + caption_height + 2 * padding + (padding if caption_height else 0)
    grid = Image.new("RGB", (columns * cell_w, rows * cell_h), BACKGROUND)
    draw = ImageDraw.Draw(grid)
    for i, (img, lines) in enumerate(zip(images, wrapped, strict=True)):
        x0, y0 = (i % columns) * cell_w + padding, (i // columns) * cell_h + padding
        scale = cell_size / max(img.width, img.height)
        w, h = max(1, round(img.width * scale)), max(1, round(img.height * scale))
        tile = img.convert("RGB").resize((w, h), Image.Resampling.NEAREST)
        grid.paste(tile, (x0 + (cell_size - w) // 2, y0 + (cell_size - h) // 2))
        for j, line in enumerate(lines):
            draw.text((x0, y0 + cell_size + padding + j * line_height), line, fill=TEXT_COLOUR, font=font)
    return grid
