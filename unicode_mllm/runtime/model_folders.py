"""Recognising and checking local model folders before `from_pretrained` reads them.

Three kinds of folder are saved by this project, told apart by their files:

    UniCodeMLLM          unicode_mllm.json (+ lm/, visual_tokenizer/)       train-mllm's <out>/final
    visual tokenizer     config.json with model_type unicode_visual_tokenizer  train-tokenizer's <out>/final
    language model       config.json with any other model_type (llama, ...)  train-lm's <out>/model

Passing one kind where another is expected, a damaged file, or a path that does not exist used to end in a
randomly initialised model, an `internal error`, or a minute of Hugging Face hub retries. The `require_*`
functions check a folder up front and raise a one-line UserError that says what the folder is and what to pass.
They return the folder, or None for a hub id ("org/name" that is not a local path), which may go to the hub:
wrap the loading call in `hub_errors(name, what, folder)`, which also keeps transformers' many-line load report
off the terminal (it goes to the debug log; a one-line warning says that something differed).

A config.json whose sizes do not fit the weights (`check_weight_shapes`) is refused before loading, naming the
first tensor whose shape differs: transformers printed its load report and then failed, or ran on random weights.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from unicode_mllm.errors import UserError

log = logging.getLogger(__name__)

MLLM_CONFIG = "unicode_mllm.json"
HF_CONFIG = "config.json"
VISUAL_TOKENIZER_TYPE = "unicode_visual_tokenizer"  # VisualTokenizerConfig.model_type

MLLM, VISUAL_TOKENIZER, LANGUAGE_MODEL, TEXT_TOKENIZER, UNKNOWN = (
    "UniCodeMLLM",
    "visual tokenizer",
    "language model",
    "text tokenizer",
    "unknown",
)
# Where each kind is written, for the "pass ... instead" part of a message.
WHERE_SAVED = {
    MLLM: "a UniCodeMLLM folder (train-mllm writes <out>/final)",
    VISUAL_TOKENIZER: "a visual tokenizer folder (train-tokenizer writes <out>/final)",
    LANGUAGE_MODEL: "a language model folder (train-lm writes <out>/model)",
}
# Subfolders worth suggesting when a run folder or a UniCodeMLLM folder is passed instead of its part.
INNER_FOLDERS = ("final", "model", "lm", "visual_tokenizer")
# Small JSON files HF reads from an LM folder; a broken one otherwise surfaces as an internal error.
HF_JSON_FILES = (HF_CONFIG, "generation_config.json", "tokenizer_config.json", "special_tokens_map.json")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
# Files a text tokenizer can be rebuilt from (fast, sentencepiece, BPE/WordPiece vocab, tiktoken).
TOKENIZER_VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt")


# ----- paths ------------------------------------------------------------------------------------


def looks_local(name_or_path: str | Path) -> bool:
    """True unless the string can only be a hub id "org/name": a bare name, a leading . / ~, more than one
    separator, or an "org" that is a local folder all mean the user meant a path on this machine."""
    text = str(name_or_path)
    if isinstance(name_or_path, Path) or Path(text).exists() or "\\" in text or text.startswith((".", "/", "~")):
        return True
    parts = text.split("/")
    return len(parts) != 2 or not all(parts) or Path(parts[0]).exists()


def local_folder(name_or_path: str | Path, what: str) -> Path | None:
    """The folder, None for a hub id, or UserError for a local-looking path that is not a folder."""
    if not looks_local(name_or_path):
        return None
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        raise UserError(_not_a_folder(path, what, "hub ids have the form org/name"))
    return path


def _not_a_folder(path: Path, what: str, note: str) -> str:
    found = "is a file, not a folder" if path.exists() else f"is not a folder ({note})"
    return f"{what} {path} {found}; pass {WHERE_SAVED[what]}"


@contextmanager
def hub_errors(name: str | Path, what: str, folder: Path | None = None) -> Iterator[None]:
    """Turn the hub's OSError (unknown repo, no network) for a hub id into one line; a no-op when `folder`
    (what a `require_*` function returned) is a checked local folder."""
    with load_report_to_debug(str(name)):
        if folder is not None:
            yield
            return
        try:
            yield
        except OSError as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"{what} {name} is not a local folder and not reachable on the hub: {reason}") from None


# transformers logs its load report (a table of every missing, unexpected or resized tensor: often 60-120 lines)
# as one warning of this logger.
_HF_LOAD_LOGGER = "transformers.modeling_utils"
_REPORT_MARK = "LOAD REPORT"
_REPORT_STATUSES = ("MISSING", "UNEXPECTED", "MISMATCH")


class _LoadReportToDebug(logging.Filter):
    """Drops transformers' load report from its warning stream and logs it at DEBUG here, with one warning line."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.source = name

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if _REPORT_MARK not in text:
            return True
        rows = [line for line in text.splitlines() if "|" in line]
        counts = {s: sum(1 for row in rows if s in row) for s in _REPORT_STATUSES}
        found = ", ".join(f"{n} {s.lower()}" for s, n in counts.items() if n) or "see the report"
        log.warning("%s: the weights differ from the model (%s); --log-level DEBUG shows which", self.source, found)
        log.debug("%s", text)
        return False


@contextmanager
def load_report_to_debug(name: str) -> Iterator[None]:
    """While loading `name`, transformers' load report goes to the debug log instead of the terminal."""
    hf_logger = logging.getLogger(_HF_LOAD_LOGGER)
    report_filter = _LoadReportToDebug(name)
    hf_logger.addFilter(report_filter)
    try:
        yield
    finally:
        hf_logger.removeFilter(report_filter)


# ----- files ------------------------------------------------------------------------------------


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON object from a model file; UserError naming the file when it is unreadable or not an object."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path} cannot be read ({e}); re-copy the model or fix its permissions") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e}); re-save or re-copy the model") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} holds a JSON {type(data).__name__}, not an object; re-save or re-copy the model")
    return data


def check_safetensors(path: Path) -> None:
    """Open the header (cheap, no tensors read): a truncated or garbage file fails here, not mid-load."""
    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path} is damaged ({type(e).__name__}: {e}); re-copy or re-save the model") from None


def check_weights(folder: Path) -> None:
    """The folder holds weights, every listed shard exists, and every safetensors file is intact."""
    safetensors = sorted(folder.glob("*.safetensors"))
    for index in (folder / name for name in WEIGHT_INDEXES):
        if index.is_file():
            shards = set(read_json_object(index).get("weight_map", {}).values())
            missing = sorted(s for s in shards if not (folder / str(s)).is_file())
            if missing:
                raise UserError(f"{index} lists missing shards {missing[:3]}; re-copy the model")
    if not safetensors and not any(folder.glob("*.bin")):
        raise UserError(f"{folder} holds no weights (model.safetensors); re-copy or re-save the model")
    for path in safetensors:
        check_safetensors(path)


def check_weight_shapes(folder: Path, expected: Mapping[str, tuple[int, ...]]) -> None:
    """Every tensor of the safetensors files that the model built from config.json also has (`expected`: name ->
    shape) has that shape; only the headers are read. UserError naming the first tensor that differs."""
    stored: dict[str, tuple[tuple[int, ...], str]] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            names = f.keys()  # safe_open is not iterable
            for key in names:
                stored[key] = (tuple(f.get_slice(key).get_shape()), path.name)
    for key, shape in expected.items():
        if key in stored and stored[key][0] != tuple(shape):
            saved, file = stored[key]
            raise UserError(
                f"{folder}: {HF_CONFIG} does not fit the weights: tensor {key} is {list(saved)} in {file} but "
                f"{HF_CONFIG} needs {list(shape)}; restore the {HF_CONFIG} saved with these weights"
            )


def language_model_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """name -> shape of the causal LM that config.json describes, built on the meta device (no memory, no
    weights); {} for a config this transformers cannot build (loading it reports that) or a quantized one
    (its tensors are stored packed, in other shapes)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(folder))
        if getattr(config, "quantization_config", None):
            return {}
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as e:  # an unknown or custom architecture: from_pretrained says what is wrong
        log.debug("no shape check for %s: %s", folder, e)
        return {}
    return {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}


def check_text_tokenizer(folder: Path) -> None:
    """A text tokenizer can be rebuilt: without its vocabulary file HF blames sentencepiece/tiktoken instead."""
    names = {p.name for p in folder.iterdir()}
    if names & set(TOKENIZER_VOCAB_FILES) or any(n.endswith(".tiktoken") for n in names):
        return
    found = "tokenizer_config.json but no tokenizer.json" if "tokenizer_config.json" in names else "no text tokenizer"
    raise UserError(f"{folder} holds {found}; re-copy the model, or re-save the text tokenizer into it")


# ----- kinds ------------------------------------------------------------------------------------


def folder_kind(folder: Path) -> tuple[str, dict[str, Any]]:
    """(kind, the parsed config.json or {}) from the files present; UserError for a broken config.json."""
    if (folder / MLLM_CONFIG).is_file():
        return MLLM, {}
    if (folder / HF_CONFIG).is_file():
        config = read_json_object(folder / HF_CONFIG)
        model_type = config.get("model_type")
        if model_type == VISUAL_TOKENIZER_TYPE:
            return VISUAL_TOKENIZER, config
        return (LANGUAGE_MODEL if isinstance(model_type, str) else UNKNOWN), config
    names = {p.name for p in folder.iterdir()}
    if names & {"tokenizer.json", "tokenizer_config.json"}:
        return TEXT_TOKENIZER, {}
    return UNKNOWN, {}


def describe(kind: str, config: dict[str, Any]) -> str:
    if kind == LANGUAGE_MODEL:
        return f"a language model folder ({config['model_type']})"
    if kind == UNKNOWN and config:
        return f"a folder whose {HF_CONFIG} has no model_type"
    if kind == UNKNOWN:
        return f"a folder with no model files ({MLLM_CONFIG}, {HF_CONFIG} or tokenizer files)"
    return f"a {kind} folder"


def _suggestion(folder: Path, kind: str, config: dict[str, Any], wanted: str) -> str:
    """What to pass instead: a matching subfolder when there is one, else where that kind is written."""
    for name in INNER_FOLDERS:
        inner = folder / name
        if inner.is_dir() and _quiet_kind(inner) == wanted:
            return f"pass {inner}"
    source = config.get("llm_name_or_path")
    if kind == VISUAL_TOKENIZER and wanted == LANGUAGE_MODEL and isinstance(source, str) and source:
        return f"pass the language model it was built from ({source}) or {WHERE_SAVED[wanted]}"
    return f"pass {WHERE_SAVED[wanted]}"


def _quiet_kind(folder: Path) -> str:
    try:
        return folder_kind(folder)[0]
    except UserError:  # a broken subfolder is no suggestion
        return UNKNOWN


def require_kind(folder: Path, wanted: str, accept_untyped: bool = False) -> dict[str, Any]:
    """UserError naming what `folder` is unless it is `wanted`; returns its config.json ({} if none).

    accept_untyped: a config.json without model_type passes (HF loads it by class; its values are checked there).
    """
    kind, config = folder_kind(folder)
    if kind == wanted or (accept_untyped and kind == UNKNOWN and config):
        return config
    hint = _suggestion(folder, kind, config, wanted)
    if wanted == MLLM:  # keeps the wording users (and scripts) know from earlier versions
        raise UserError(
            f"{folder} holds no {MLLM_CONFIG}; it is not a saved UniCodeMLLM but {describe(kind, config)}; {hint}"
        )
    raise UserError(f"{folder} is {describe(kind, config)}, not a {wanted}; {hint}")


# ----- the checks each loader runs --------------------------------------------------------------


def require_visual_tokenizer(name_or_path: str | Path) -> Path | None:
    """A visual tokenizer folder with intact weights (None for a hub id)."""
    folder = local_folder(name_or_path, VISUAL_TOKENIZER)
    if folder is not None:
        require_kind(folder, VISUAL_TOKENIZER, accept_untyped=True)
        check_weights(folder)
    return folder


def require_language_model(name_or_path: str | Path, text_tokenizer: bool = True) -> Path | None:
    """A HF language model folder with readable JSON files, intact weights and (text_tokenizer) its text
    tokenizer (None for a hub id)."""
    folder = local_folder(name_or_path, LANGUAGE_MODEL)
    if folder is None:
        return None
    require_kind(folder, LANGUAGE_MODEL)
    for name in HF_JSON_FILES:
        if (folder / name).is_file():
            read_json_object(folder / name)
    check_weights(folder)
    check_weight_shapes(folder, language_model_shapes(folder))
    if text_tokenizer:
        check_text_tokenizer(folder)
    return folder


def require_mllm(path: str | Path) -> Path:
    """A UniCodeMLLM folder (its parts are checked as they load); its safetensors files are intact."""
    folder = Path(path).expanduser()
    if not folder.is_dir():  # saved UniCodeMLLMs are local only, never a hub id
        raise UserError(_not_a_folder(folder, MLLM, "it is not a saved UniCodeMLLM"))
    require_kind(folder, MLLM)
    for weights in sorted(folder.glob("*.safetensors")):
        check_safetensors(weights)
    return folder
