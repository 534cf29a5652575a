"""`unicode-mllm serve`: a gradio page over a loaded UniCodeMLLM with Ask, Draw, Reconstruct and Chat tabs.

The page only lays out widgets; `web_demo_actions.py` does the work. gradio is the optional `[demo]` extra:
`require_gradio` turns its absence into one UserError line. Nothing phones home: analytics off, no share link,
no server-side rendering, and a theme of local fonts (the default one loads Google Fonts in the browser).
A problem the user can fix is shown in the page as the CLI's one-line `error: ...` message.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import shutil
import signal
import socket
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from unicode_mllm.environment_errors import environment_message
from unicode_mllm.errors import UserError

if TYPE_CHECKING:
    import gradio as gr

    from unicode_mllm.model.mllm import UniCodeMLLM

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'unicode-mllm[demo]'"
# Images of the tokenizer's size (32 px for the tiny models) fill their box, blocky rather than blurred.
PAGE_CSS = """
img { image-rendering: pixelated; }
.pixels .image-frame { width: 100%; height: 100%; }
.pixels .image-frame img { width: 100%; height: 100%; object-fit: contain; }
"""


def require_gradio() -> ModuleType:
    """The gradio module, imported with analytics off; UserError naming the extra when it is not installed."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # read when gradio is imported
    try:
        import gradio
    except ImportError as exn:
        raise UserError(f"the web demo needs gradio, which is not installed ({exn}); {INSTALL_HINT}") from None
    return gradio


def error_line(exn: BaseException) -> str:
    """The CLI's one-line message for an exception (user, environment or internal error)."""
    if isinstance(exn, UserError):
        text = str(exn)
    elif (message := environment_message(exn)) is not None:
        text = message
    else:
        text = f"internal error ({type(exn).__name__}: {exn}); the server's log has the traceback"
    text = " ".join(text.split())
    return "error: " + (text if len(text) <= 500 else text[:497] + "...")


def _shown(gr: ModuleType, lock: threading.Lock, fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` run under the model lock (one request at a time on the model) with errors shown as `error_line`.

    A generator stays a generator, so gradio streams it; `functools.wraps` keeps the signature gradio reads.
    """

    def shown(exn: Exception) -> Exception:
        internal = not isinstance(exn, UserError) and environment_message(exn) is None
        if internal:
            log.error("web demo request failed", exc_info=exn)
        return gr.Error(error_line(exn), duration=None, print_exception=False)

    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def stream(*args: Any, **kwargs: Any) -> Any:
            with lock:
                try:
                    yield from fn(*args, **kwargs)
                except gr.Error:
                    raise
                except Exception as exn:
                    raise shown(exn) from None

        return stream

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        with lock:
            try:
                return fn(*args, **kwargs)
            except gr.Error:
                raise
            except Exception as exn:
                raise shown(exn) from None

    return call


def _whole_number(value: float | str | None, name: str, *, empty: int | None) -> int | None:
    """A number box's value as an int >= 0 (`empty` for a blank box); UserError naming the box otherwise."""
    text = "" if value is None else str(value).strip()
    if not text:
        return empty
    try:
        number = float(text)
    except ValueError:
        number = -1.0
    if not number.is_integer() or number < 0:
        raise UserError(f"{name} must be a whole number >= 0, got {text!r}")
    return int(number)


def build_app(model: UniCodeMLLM, work_dir: Path) -> gr.Blocks:
    """The page over `model`; drawings and chat images are written under `work_dir`."""
    page = _Page(require_gradio(), model, work_dir)
    gr = page.gr
    with gr.Blocks(title="UniCode MLLM", analytics_enabled=False) as blocks:
        gr.Markdown("## UniCode MLLM\nOne codebook for words and pictures: ask about an image, draw, reconstruct.")
        with gr.Tab("Ask", id="ask"):
            _ask_tab(page)
        with gr.Tab("Draw", id="draw"):
            _draw_tab(page)
        with gr.Tab("Reconstruct", id="reconstruct"):
            _reconstruct_tab(page)
        with gr.Tab("Chat", id="chat"):
            _chat_tab(page)
    return blocks


@dataclass
class _Page:
    """What every tab uses: gradio, the model (one request at a time on it: `lock`) and where files are written."""

    gr: ModuleType
    model: UniCodeMLLM
    work_dir: Path
    lock: threading.Lock = field(default_factory=threading.Lock)

    def shown(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """`fn` as a request handler: under the lock, its errors shown as one line (`_shown`)."""
        return _shown(self.gr, self.lock, fn)

    def image_input(self, **box: Any) -> Any:
        """An image box taking RGB uploads and pastes, drawn pixelated (`PAGE_CSS`)."""
        return self.gr.Image(
            type="pil", image_mode="RGB", sources=["upload", "clipboard"], elem_classes=["pixels"], **box
        )


def _ask_tab(page: _Page) -> None:
    """An image and a question; the answer streams in as it is decoded."""
    from unicode_mllm import web_demo_actions as actions

    gr, model = page.gr, page.model

    def ask(image: Any, question: str, max_new_tokens: float, temperature: float) -> Any:
        yield from actions.answer_stream(
            model, image, question, max_new_tokens=int(max_new_tokens), temperature=float(temperature)
        )

    with gr.Row():
        ask_image = page.image_input(label="image", elem_id="ask-image", height=280)
        with gr.Column():
            question = gr.Textbox(label="question", placeholder="what is in the picture?", elem_id="question")
            with gr.Accordion("settings", open=False):
                ask_tokens = gr.Slider(1, 256, value=64, step=1, label="max new tokens")
                ask_temperature = gr.Slider(0, 2, value=0, step=0.05, label="temperature (0 = greedy)")
            ask_button = gr.Button("Ask", variant="primary", elem_id="ask-button")
            answer = gr.Textbox(label="answer", lines=4, interactive=False, elem_id="answer")
    ask_fn = page.shown(ask)
    ask_inputs = [ask_image, question, ask_tokens, ask_temperature]
    ask_button.click(ask_fn, ask_inputs, answer)
    question.submit(ask_fn, ask_inputs, answer)


def _draw_tab(page: _Page) -> None:
    """An instruction and the sampling settings; the drawings, their files (PNG + code ids) and the seed."""
    from unicode_mllm import web_demo_actions as actions

    gr, model = page.gr, page.model

    def draw(
        instruction: str,
        cfg_scale: float,
        temperature: float,
        top_k: float | None,
        seed: str | None,
        num_images: float,
        progress: Any = gr.Progress(),
    ) -> tuple[list[tuple[str, str]], list[str], str]:
        progress(0, desc="drawing")
        last = [0.0]

        def on_step(done: int, total: int) -> None:
            if done == total or done / total - last[0] >= 0.02:  # a few dozen updates, not one per code
                last[0] = done / total
                progress((done, total), desc="drawing", unit="steps")

        result = actions.draw(
            model,
            instruction,
            num_images=int(num_images),
            cfg_scale=float(cfg_scale),
            temperature=float(temperature),
            top_k=_whole_number(top_k, "top-k", empty=0),
            seed=_whole_number(seed, "seed", empty=None),
            on_step=on_step,
        )
        saved = actions.save_drawings(model, result, Path(tempfile.mkdtemp(prefix="draw_", dir=page.work_dir)))
        gallery = [(str(png), f"#{i}") for i, (png, _) in enumerate(saved)]  # image_i.json holds its seed and ids
        files = [str(path) for pair in saved for path in pair]
        note = f"seed {result.seed}: `unicode-mllm generate --seed {result.seed}` with these settings redraws them"
        return gallery, files, note if result.seed is not None else "greedy (temperature 0): no seed involved"

    with gr.Row():
        with gr.Column():
            instruction = gr.Textbox(label="instruction", placeholder="a red circle", elem_id="instruction")
            with gr.Row():
                cfg_scale = gr.Slider(1, 10, value=1, step=0.5, label="CFG scale (1 = no guidance)")
                draw_temperature = gr.Slider(0, 2, value=1, step=0.05, label="temperature")
            with gr.Row():
                top_k = gr.Number(value=0, precision=0, minimum=0, label="top-k (0 = off)")
                seed = gr.Textbox(value="", label="seed (empty = random)", elem_id="seed")  # Number sends 0
            num_images = gr.Slider(1, actions.MAX_IMAGES, value=4, step=1, label="number of images")
            draw_button = gr.Button("Draw", variant="primary", elem_id="draw-button")
        with gr.Column():
            gallery = gr.Gallery(label="drawings", columns=4, height=300, elem_id="gallery", buttons=["download"])
            seed_note = gr.Markdown(elem_id="draw-seed")
            downloads = gr.File(
                label="images and their code ids (JSON)",
                file_count="multiple",
                elem_id="draw-files",
                interactive=False,
            )
    draw_inputs = [instruction, cfg_scale, draw_temperature, top_k, seed, num_images]
    draw_button.click(page.shown(draw), draw_inputs, [gallery, downloads, seed_note])


def _reconstruct_tab(page: _Page) -> None:
    """An image through the visual tokenizer: original | reconstruction, PSNR, and the code ids per depth."""
    from unicode_mllm import web_demo_actions as actions

    gr, model = page.gr, page.model

    def reconstruct(image: Any) -> tuple[Any, str, Any, str]:
        result = actions.reconstruct(model, image)
        picture, summary = actions.code_id_picture(result.codes, model.visual_tokenizer.config.num_codes)
        return result.pair, f"PSNR {result.psnr:.2f} dB", picture, summary

    with gr.Row():
        rec_input = page.image_input(label="image", elem_id="rec-image", height=280)
        with gr.Column():
            rec_button = gr.Button("Reconstruct", variant="primary", elem_id="rec-button")
            rec_pair = gr.Image(
                label="original | reconstruction", interactive=False, height=240, elem_classes=["pixels"]
            )
            rec_psnr = gr.Textbox(label="PSNR", interactive=False, elem_id="rec-psnr")
    code_picture = gr.Image(label="code id at each position, one panel per depth", interactive=False)
    code_summary = gr.Textbox(label="code usage", interactive=False)
    rec_button.click(page.shown(reconstruct), rec_input, [rec_pair, rec_psnr, code_picture, code_summary])


def _chat_tab(page: _Page) -> None:
    """A conversation: messages with an optional image; Draw asks for a drawing in reply."""
    from unicode_mllm import web_demo_actions as actions

    gr, model = page.gr, page.model

    def chat(state: Any, text: str, image: Any, draw_it: bool = False) -> Any:
        if state is None:
            state = actions.WebChat.start(model, page.work_dir)
        try:
            for messages in state.send(text, image, draw_it=draw_it):
                yield state, messages, gr.update(), gr.update()
        except UserError as exn:  # as in the CLI's chat: one error line, and the conversation goes on
            state.messages = [*state.messages, {"role": "assistant", "content": error_line(exn)}]
            yield state, state.messages, gr.update(), gr.update()
            return
        yield state, state.messages, "", None  # the message was taken: clear the boxes

    def chat_draw(state: Any, text: str, image: Any) -> Any:
        yield from chat(state, text, image, draw_it=True)

    state = gr.State(None)
    chatbot = gr.Chatbot(label="conversation", height=420, elem_id="chatbot", group_consecutive_messages=False)
    with gr.Row():
        chat_image = page.image_input(label="image for the next message", elem_id="chat-image", height=160)
        with gr.Column(scale=3):
            message = gr.Textbox(label="message", placeholder=actions.WEB_CHAT_HELP, elem_id="message")
            with gr.Row():
                send_button = gr.Button("Send", variant="primary", elem_id="send-button")
                chat_draw_button = gr.Button("Draw", elem_id="chat-draw-button")
    chat_outputs = [state, chatbot, message, chat_image]
    chat_fn = page.shown(chat)
    send_button.click(chat_fn, [state, message, chat_image], chat_outputs)
    message.submit(chat_fn, [state, message, chat_image], chat_outputs)
    chat_draw_button.click(page.shown(chat_draw), [state, message, chat_image], chat_outputs)


def page_style(gr: ModuleType) -> dict[str, Any]:
    """launch()'s theme and CSS (gradio 6 takes them there): system fonts, so the browser fetches no web font."""
    theme = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    return {"theme": theme, "css": PAGE_CSS}


def check_port_free(host: str, port: int) -> None:
    """UserError naming --port when the address cannot be bound (gradio's own message names an env variable)."""
    if not 1 <= port <= 65535:
        raise UserError(f"--port must lie in 1..65535, got {port}")
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(
                socket.SOL_SOCKET, socket.SO_REUSEADDR, 1
            )  # as uvicorn: a just-closed server's port is free
            probe.bind((host, port))
    except OSError as exn:
        raise UserError(
            f"cannot listen on {host}:{port} ({exn.strerror or exn}); pick another --port or --host"
        ) from None


def _stop(_signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt


def serve(model: UniCodeMLLM, host: str = "127.0.0.1", port: int = 7860, *, block: bool = True) -> Any:
    """Serve the page on http://host:port until interrupted (block=False: return the gradio app running)."""
    check_port_free(host, port)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # gradio's own start-up requests, one INFO line each
    work_dir = Path(tempfile.mkdtemp(prefix="unicode_mllm_web_"))
    page = build_app(model, work_dir)
    page.queue(default_concurrency_limit=1)
    if block and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _stop)  # `kill` stops the server as Ctrl+C does, closing it cleanly
    try:
        page.launch(
            server_name=host,
            server_port=port,
            share=False,
            ssr_mode=False,
            mcp_server=False,
            prevent_thread_lock=not block,
            allowed_paths=[str(work_dir)],
            footer_links=[],
            **page_style(require_gradio()),
        )
    finally:
        if block:  # stopped (Ctrl+C): the drawings of this run go with it
            shutil.rmtree(work_dir, ignore_errors=True)
    return page
