"""What the web demo's tabs do, without the web page: answer, draw, reconstruct, picture code ids, chat.

Gradio-free, so tests call it directly and `web_demo.py` only lays out widgets and shows errors. Each
function takes the loaded UniCodeMLLM, reuses the library's own answering, drawing and reconstruction, and
raises UserError (one line naming the thing and the fix) for anything the user can correct.
"""

from __future__ import annotations

import colorsys
import json
import queue
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from unicode_mllm.data.image_io import pil_to_tensor
from unicode_mllm.errors import UserError
from unicode_mllm.evaluation.code_usage import CodeUsage
from unicode_mllm.generation import ChatSession, ChatSettings, ImageGeneration, generate_images, stream_answer
from unicode_mllm.generation.chat_repl import parse_chat_line
from unicode_mllm.generation.image_generation import DEFAULT_BATCH_SIZE
from unicode_mllm.image_metrics import psnr
from unicode_mllm.visual_tokenizer.reconstruct import fit_square, reconstruct_batch, side_by_side
from unicode_mllm.viz import caption_grid

if TYPE_CHECKING:
    from unicode_mllm.model.mllm import UniCodeMLLM

MAX_IMAGES = 8  # per Draw request: more would hold the one model lock for minutes on a CPU
WEB_CHAT_HELP = (
    "type a message and press Send to ask (about the image in the box, if any); Draw (or draw: TEXT) draws; "
    "/reset forgets the conversation"
)

StepCallback = Callable[[int, int], None]  # (LM forwards done, LM forwards in all)


def answer_stream(
    model: UniCodeMLLM, image: Image.Image | None, question: str, *, max_new_tokens: int = 64, temperature: float = 0.0
) -> Iterator[str]:
    """The answer so far, growing piece by piece as it is decoded (the CLI's `ask` with the same settings)."""
    text = None
    for piece in stream_answer(model, image, question, max_new_tokens=max_new_tokens, temperature=temperature):
        text = (text or "") + piece
        yield text
    if text is None:  # a reply of no text still clears the answer box
        yield ""


def _check_count(num_images: int) -> int:
    if not 1 <= num_images <= MAX_IMAGES:
        raise UserError(f"number of images must lie in 1..{MAX_IMAGES}, got {num_images}; draw more in another request")
    return int(num_images)


def draw(
    model: UniCodeMLLM,
    instruction: str,
    *,
    num_images: int = 1,
    cfg_scale: float = 1.0,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int | None = None,
    on_step: StepCallback | None = None,
) -> ImageGeneration:
    """`generate_images` (the CLI's `generate`: the same seed gives the same images), reporting progress.

    on_step counts the LM's forward passes, one per code written (prefill included) and batch, through a
    forward hook: the generation loop itself has no progress callback, and the hook changes none of its tokens.
    """
    num_images = _check_count(num_images)
    handle = None
    if on_step is not None:
        total = -(-num_images // DEFAULT_BATCH_SIZE) * model.num_write_tokens
        done = [0]

        def count(_module: torch.nn.Module, _inputs: Any, _output: Any) -> None:
            done[0] += 1
            on_step(min(done[0], total), total)

        handle = model.lm.register_forward_hook(count)
    try:
        return generate_images(
            model,
            [instruction],
            num_images_per_prompt=num_images,
            temperature=temperature,
            top_k=top_k or None,
            cfg_scale=cfg_scale,
            seed=seed,
            batch_size=DEFAULT_BATCH_SIZE,  # images do not depend on it (a seed per image); the progress total does
        )
    finally:
        if handle is not None:
            handle.remove()


def save_drawings(model: UniCodeMLLM, generation: ImageGeneration, out_dir: Path) -> list[tuple[Path, Path]]:
    """image_N.png and image_N.json (prompt, settings, seeds, LLM token ids and codebook codes) per drawing."""
    out_dir.mkdir(parents=True, exist_ok=True)
    codes = model.visual_tokenizer.token_ids_to_codes(generation.token_ids.cpu())  # (n, h, w, d)
    saved = []
    for i, image in enumerate(generation.images):
        png, record = out_dir / f"image_{i}.png", out_dir / f"image_{i}.json"
        image.save(png)
        data = {
            "prompt": generation.prompts[i],
            "settings": generation.settings,
            "image_seed": None if generation.seeds is None else generation.seeds[i],
            "code_shape": list(model.code_shape),  # (h, w, d): ids are listed row by row, depth innermost
            "token_ids": generation.token_ids[i].tolist(),
            "codes": codes[i].tolist(),
        }
        record.write_text(json.dumps(data) + "\n")
        saved.append((png, record))
    return saved


@dataclass
class Reconstructed:
    """pair: original | reconstruction at the tokenizer's size; codes: (h, w, d) codebook indices."""

    pair: Image.Image
    psnr: float
    codes: Tensor


def reconstruct(model: UniCodeMLLM, image: Image.Image | None) -> Reconstructed:
    """An uploaded image through the model's visual tokenizer, prepared as `unicode-mllm reconstruct` does."""
    if image is None:
        raise UserError("no image to reconstruct; upload one first")
    tokenizer = model.visual_tokenizer
    square = fit_square(image.convert("RGB"), tokenizer.config.image_size)
    x = pil_to_tensor(square)[None].to(next(tokenizer.parameters()).device)
    codes, rec = reconstruct_batch(tokenizer, x)
    return Reconstructed(side_by_side(square, rec[0]), float(psnr(x, rec)[0]), codes[0].cpu())


def _code_colour(code: int) -> tuple[int, int, int]:
    """A light colour per code: golden-ratio hues keep neighbouring ids apart; dark text stays readable."""
    r, g, b = colorsys.hsv_to_rgb((code * 0.6180339887) % 1.0, 0.45, 0.97)
    return round(r * 255), round(g * 255), round(b * 255)


def code_id_picture(codes: Tensor, num_codes: int) -> tuple[Image.Image, str]:
    """(h, w, d) codebook indices -> (one panel per depth, each position's id on its code's colour; a summary).

    The summary gives the distinct codes and the perplexity per depth (`evaluation.code_usage.CodeUsage`).
    """
    if codes.ndim != 3:
        raise ValueError(f"codes must be (h, w, d), got {tuple(codes.shape)}")
    h, w, depth = codes.shape
    font = ImageFont.load_default()
    cell = max(14, int(font.getlength(str(max(int(codes.max()), 0)))) + 6)
    panels = []
    for k in range(depth):
        panel = Image.new("RGB", (w * cell, h * cell), (255, 255, 255))
        pen = ImageDraw.Draw(panel)
        for y in range(h):
            for x in range(w):
                code = int(codes[y, x, k])
                box = (x * cell, y * cell, (x + 1) * cell - 1, (y + 1) * cell - 1)
                pen.rectangle(box, fill=_code_colour(code), outline=(255, 255, 255))
                centre = (x * cell + cell / 2, y * cell + cell / 2)
                pen.text(centre, str(code), fill=(0, 0, 0), font=font, anchor="mm")
        panels.append(panel)
    usage = CodeUsage(num_codes, depth)
    usage.add(codes)
    stats = list(zip(usage.distinct_per_depth(), usage.perplexity_per_depth(), strict=True))
    captions = [f"depth {k}: {n} distinct codes" for k, (n, _) in enumerate(stats)]
    summary = "; ".join(f"depth {k}: {n} distinct, perplexity {p:.1f}" for k, (n, p) in enumerate(stats))
    side = max(w, h) * cell
    return caption_grid(panels, captions, columns=min(depth, 4), cell_size=side), summary


@dataclass
class WebChat:
    """One browser tab's conversation: the `ChatSession` and the messages the page shows (role, content).

    The page's messages are kept here rather than read back from the chat widget, so an image the model
    drew is a file path this server wrote, never a path a client sent.
    """

    session: ChatSession
    image_dir: Path
    messages: list[dict[str, Any]] = field(default_factory=list)
    files: int = 0  # images this conversation wrote, for unique names

    @classmethod
    def start(cls, model: UniCodeMLLM, root: Path, settings: ChatSettings | None = None) -> WebChat:
        """A new conversation whose images go to a fresh folder under `root`."""
        root.mkdir(parents=True, exist_ok=True)
        return cls(ChatSession(model, settings), Path(tempfile.mkdtemp(prefix="chat_", dir=root)))

    def send(self, text: str, image: Image.Image | None, *, draw_it: bool = False) -> Iterator[list[dict[str, Any]]]:
        """One message: the CLI's chat line syntax (draw: TEXT, /draw TEXT, /reset, /help), or a drawing when
        `draw_it`. Yields the messages as the reply grows; UserError leaves the conversation as it was."""
        command = parse_chat_line(f"/draw {text}" if draw_it else text)
        if command is None:
            raise UserError("the message is empty; type a question, or draw: TEXT")
        if command.kind == "image":
            raise UserError("/image reads files on the server; put the image in the image box instead")
        if command.kind == "quit":
            raise UserError("/quit ends the command-line chat; here close the tab, or /reset to start over")
        if command.kind == "help":
            self.messages.append({"role": "assistant", "content": WEB_CHAT_HELP})
            yield self.messages
            return
        if command.kind == "reset":
            self.session.reset()
            self.messages = []
            yield self.messages
            return
        if image is not None:
            self.session.attach_image(image.convert("RGB"))  # UserError for a bad image, before any turn
        try:
            if command.kind == "draw":
                yield from self._draw(command.argument, image)
            else:
                yield from self._ask(command.argument, image)
        finally:
            self.session.pending_image = None  # a refused message does not carry its image to the next one

    def _user_messages(self, text: str, image: Image.Image | None, prefix: str = "") -> list[dict[str, Any]]:
        shown: list[dict[str, Any]] = []
        if image is not None:
            self.files += 1
            path = self.image_dir / f"{self.files:03d}_upload.png"
            image.convert("RGB").save(path)
            shown.append({"role": "user", "content": {"path": str(path)}})
        shown.append({"role": "user", "content": prefix + text})
        return shown

    def _ask(self, text: str, image: Image.Image | None) -> Iterator[list[dict[str, Any]]]:
        # ChatSession.ask streams through a callback: run it in a thread and hand its pieces on as they come.
        pieces: queue.Queue[str | None] = queue.Queue()
        outcome: list[BaseException | None] = [None]

        def run() -> None:
            try:
                self.session.ask(text, stream=lambda _i, piece: pieces.put(piece))
            except BaseException as exn:  # handed to the caller's thread below
                outcome[0] = exn
            finally:
                pieces.put(None)

        worker = threading.Thread(target=run, name="web-chat-answer", daemon=True)
        worker.start()
        base = [*self.messages, *self._user_messages(text, image)]
        reply = ""
        try:
            while (piece := pieces.get()) is not None:
                reply += piece
                yield [*base, {"role": "assistant", "content": reply}]
        finally:
            worker.join()  # a page closed mid-answer: the model stays busy (and locked) until the answer ends
        if outcome[0] is not None:
            raise outcome[0]
        self.messages = [*base, {"role": "assistant", "content": reply}]
        yield self.messages

    def _draw(self, text: str, image: Image.Image | None) -> Iterator[list[dict[str, Any]]]:
        drawing = self.session.draw(text)
        self.files += 1
        path = self.image_dir / f"{self.files:03d}_drawing.png"
        drawing.images[0].save(path)
        reply = {"role": "assistant", "content": {"path": str(path), "alt_text": text}}
        self.messages = [*self.messages, *self._user_messages(text, image, prefix="draw: "), reply]
        yield self.messages
