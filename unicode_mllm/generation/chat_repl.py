"""The line-based chat loop behind `unicode-mllm chat`: commands in, streamed answers and saved drawings out.

Lines are read from any iterable (stdin in the CLI, a list in tests). A problem with one line (a bad
image, an empty message, a conversation too long for the LM) is reported as one `error:` line and the
loop goes on; only `/quit` or the end of input ends it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from unicode_mllm.errors import UserError
from unicode_mllm.generation.chat import ChatSession

CHAT_HELP = (
    "type a message to ask; /image PATH attaches an image to the next message; /draw TEXT (or draw: TEXT) "
    "draws an image; /reset forgets the conversation; /quit ends"
)
_IMAGE_NAME = re.compile(r"^image_(\d+)\.png$")

CommandKind = Literal["ask", "image", "draw", "reset", "quit", "help"]


@dataclass(frozen=True)
class ChatCommand:
    kind: CommandKind
    argument: str = ""


def parse_chat_line(line: str) -> ChatCommand | None:
    """One input line -> a command; None for a blank line. Raises UserError for an unknown /command."""
    text = line.strip()
    if not text:
        return None
    lowered = text.lower()
    if lowered.startswith("draw:") or lowered == "/draw" or lowered.startswith("/draw "):
        return ChatCommand("draw", text[len("/draw") :].strip())  # both prefixes are 5 characters
    if not text.startswith("/"):
        return ChatCommand("ask", text)
    name, _, argument = text.partition(" ")
    kinds: dict[str, CommandKind] = {
        "/image": "image",
        "/reset": "reset",
        "/quit": "quit",
        "/exit": "quit",
        "/help": "help",
    }
    if name.lower() not in kinds:
        raise UserError(f"unknown command {name!r}; {CHAT_HELP}")
    return ChatCommand(kinds[name.lower()], argument.strip())


def check_utf8(line: str, number: int) -> None:
    """Raise UserError for a line read with errors="surrogateescape" that held bytes that are not UTF-8."""
    try:
        line.encode("utf-8")
    except UnicodeEncodeError as exn:
        raise UserError(
            f"input line {number} is not UTF-8 text (at character {exn.start + 1}); type or pipe UTF-8 text"
        ) from None


def save_drawing(image, out_dir: Path) -> Path:
    """Save to the next image_NNN.png of out_dir; UserError (the session goes on) when it cannot be written."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        path = next_image_path(out_dir)
        image.save(path)
    except OSError as exn:
        raise UserError(
            f"cannot save the drawing in {out_dir} ({exn.strerror or exn}); choose another --out-dir"
        ) from None
    return path


def next_image_path(out_dir: Path) -> Path:
    """out_dir/image_NNN.png with NNN one past the highest already there (001 in an empty folder)."""
    taken = [int(m.group(1)) for p in out_dir.glob("image_*.png") if (m := _IMAGE_NAME.match(p.name))]
    return out_dir / f"image_{max(taken, default=0) + 1:03d}.png"


def _stream_answer(session: ChatSession, text: str, write: Callable[[str], None]) -> None:
    """Ask and print the reply as it is decoded, after an "assistant: " prefix that waits for the first
    piece, so that a refused prompt (its error goes to write_error) leaves no dangling prefix."""
    started = False

    def show(_index: int, piece: str) -> None:
        nonlocal started
        if not started:
            started = True
            write("assistant: ")
        write(piece)

    session.ask(text, stream=show)
    write("\n" if started else "assistant: \n")


def run_chat(
    session: ChatSession,
    lines: Iterable[str],
    out_dir: Path,
    write: Callable[[str], None],
    write_error: Callable[[str], None],
    prompt: Callable[[], None] | None = None,
) -> int:
    """Run the loop until /quit or the end of `lines`; returns the number of errors reported.

    write(text) prints to the user without adding a newline; write_error(line) prints one error line.
    prompt() is called before each line is read (the CLI shows "you> " on a terminal).
    """
    errors = 0
    if prompt is not None:
        prompt()
    for number, line in enumerate(lines, start=1):
        try:
            check_utf8(line, number)
            command = parse_chat_line(line)
            if command is None:
                pass
            elif command.kind == "quit":
                break
            elif command.kind == "help":
                write(CHAT_HELP + "\n")
            elif command.kind == "reset":
                session.reset()
                write("(conversation reset)\n")
            elif command.kind == "image":
                if not command.argument:
                    raise UserError("/image needs a path, e.g. /image photo.png")
                session.attach_image(Path(command.argument).expanduser())
                write(f"(image {command.argument} attached to the next message)\n")
            elif command.kind == "draw":
                drawing = session.draw(command.argument)
                path = save_drawing(drawing.images[0], out_dir)
                write(f"assistant: [image saved to {path}]\n")
            else:
                _stream_answer(session, command.argument, write)
        except UserError as exn:
            errors += 1
            write_error(f"error: {' '.join(str(exn).split())}")
        if prompt is not None:
            prompt()
    return errors
