"""Hugging Face Auto classes for this project's two model folders, registered on `import unicode_mllm`.

After `import unicode_mllm`, `transformers.AutoConfig` / `AutoModel` load both kinds of saved folder:

    a visual tokenizer (train-tokenizer's <out>/final)   config.json model_type "unicode_visual_tokenizer"
                                                         -> `VisualTokenizer` (AutoModel)
    a UniCodeMLLM (train-mllm's <out>/final)             config.json model_type "unicode_mllm"
                                                         -> `UniCodeMLLM` (AutoModel, AutoModelForCausalLM)

The HF configs live here, the one definition of each: `VisualTokenizerConfig` (everything that rebuilds the
tokenizer; `visual_tokenizer/modeling.py` re-exports it) and `UniCodeMLLMHFConfig`, which is only the Auto classes'
entry to a UniCodeMLLM folder: the model's settings stay in its `unicode_mllm.json` (`model/mllm.py`'s
`UniCodeMLLMConfig`, the one definition of those), which config.json names (`mllm_config`). A UniCodeMLLM folder
saved before config.json existed loads as before through `UniCodeMLLM.from_pretrained` (the Auto classes need the
config.json, which re-saving the model writes).

Both folders' config.json also carry `auto_map`, and each folder holds a small `modeling_unicode_mllm.py` that
imports this module: `AutoModel.from_pretrained(folder, trust_remote_code=True)` then works without
`import unicode_mllm` (offline: the file imports the installed package; nothing is downloaded).

`import unicode_mllm` must stay light (the CLI's `--help`): this module needs only transformers' config classes,
and the model classes registered here are stand-ins (`_Deferred`) that import the real ones on first use
(`visual_tokenizer/modeling.py` replaces its stand-in when it is imported). `unicode_mllm/__init__.py` imports
this module once transformers is imported, whether before or after unicode_mllm.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PretrainedConfig

from unicode_mllm.errors import ConfigError
from unicode_mllm.quantizer_settings import (
    STACKINGS,
    QuantizerSettings,
    check_latent_grid,
    check_settings,
    settings_from,
    split_flat_settings,
)

MLLM_MODEL_TYPE = "unicode_mllm"
VISUAL_TOKENIZER_MODEL_TYPE = "unicode_visual_tokenizer"  # runtime/model_folders.VISUAL_TOKENIZER_TYPE
AUTO_MODULE = "modeling_unicode_mllm"  # the loader file written into each saved folder (trust_remote_code)
_AUTO_FILE = (
    '"""Loader for transformers\' trust_remote_code=True: the installed unicode-mllm package provides the classes\n'
    'and importing it registers them with the Auto classes. Nothing is downloaded."""\n\n'
    "from unicode_mllm.hf_auto import (  # noqa: F401\n"
    "    UniCodeMLLMAuto,\n    UniCodeMLLMHFConfig,\n    VisualTokenizerAuto,\n    VisualTokenizerConfig,\n)\n\n"
    '__all__ = ["UniCodeMLLMAuto", "UniCodeMLLMHFConfig", "VisualTokenizerAuto", "VisualTokenizerConfig"]\n'
)


class VisualTokenizerConfig(PretrainedConfig):
    """Everything that rebuilds the architecture, plus the code -> LLM token id map."""

    model_type = "unicode_visual_tokenizer"

    def __init__(
        self,
        image_size: int = 64,
        ch: int = 64,
        ch_mult: tuple[int, ...] | list[int] = (1, 2, 2),
        num_res_blocks: int = 1,
        attn_resolutions: tuple[int, ...] | list[int] = (),
        z_channels: int = 64,
        dropout: float = 0.0,
        stacking: str = "rq",
        depth: int | None = 2,
        llm_width: int = 64,
        num_codes: int = 256,
        code_to_token_id: list[int] | None = None,
        llm_vocab_size: int | None = None,
        llm_name_or_path: str = "",
        quantizer: QuantizerSettings | dict[str, Any] | None = None,
        **kwargs,
    ):
        self.image_size = image_size
        self.ch = ch
        self.ch_mult = list(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.attn_resolutions = list(attn_resolutions)
        self.z_channels = z_channels
        self.dropout = dropout
        self.stacking = stacking
        self.depth = depth
        self.llm_width = llm_width
        self.num_codes = num_codes
        self.code_to_token_id = list(code_to_token_id) if code_to_token_id is not None else list(range(num_codes))
        self.llm_vocab_size = llm_vocab_size if llm_vocab_size is not None else max(self.code_to_token_id) + 1
        self.llm_name_or_path = llm_name_or_path
        # The quantizer's options, one nested entry (quantizer_settings.py declares them). A config.json saved
        # before it kept them at the top level (`codebook_mode`, `decay`, ...): they are read from there too.
        self.quantizer = settings_from(quantizer, split_flat_settings(kwargs))
        super().__init__(**kwargs)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    def check(self) -> None:
        """Type and cross-field checks; ConfigError names the keys and values."""
        self._check_types()
        self.quantizer = check_settings(self.quantizer, source="quantizer")
        if self.stacking not in STACKINGS:
            raise ConfigError(f"stacking {self.stacking!r} is unknown; choose one of {sorted(STACKINGS)}")
        check_latent_grid(self.image_size, len(self.ch_mult), self.stacking)
        if len(self.code_to_token_id) != self.num_codes:
            raise ConfigError(
                f"code_to_token_id has {len(self.code_to_token_id)} ids but num_codes is {self.num_codes}"
            )
        if len(set(self.code_to_token_id)) != self.num_codes:
            raise ConfigError("code_to_token_id has repeated token ids; each code needs its own LLM token id")

    def _check_types(self) -> None:
        # A hand-edited config.json ({"image_size": "big"}) otherwise fails deep inside the model as a TypeError.
        for key, kinds in _FIELD_TYPES.items():
            value = getattr(self, key)
            bad = [v for v in value if not _is_type(v, kinds)] if isinstance(value, list) else [value]
            if bad and not _is_type(bad[0], kinds):
                raise ConfigError(f"{key} must be {' or '.join(k.__name__ for k in kinds)}, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        output["quantizer"] = self.quantizer.to_dict()
        return output


# Allowed types per field; list fields are checked item by item, None only where the field is optional. The quantizer's
# options are checked by `check_settings` from their one declaration.
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    **dict.fromkeys(
        ("image_size", "ch", "num_res_blocks", "z_channels", "llm_width", "num_codes", "llm_vocab_size"), (int,)
    ),
    **dict.fromkeys(("ch_mult", "attn_resolutions", "code_to_token_id"), (int,)),
    "depth": (int, type(None)),
    "dropout": (float, int),
    **dict.fromkeys(("stacking", "llm_name_or_path"), (str,)),
}


def _is_type(value: object, kinds: tuple[type, ...]) -> bool:
    return isinstance(value, kinds) and not isinstance(value, bool)


class UniCodeMLLMHFConfig(PretrainedConfig):
    """config.json of a UniCodeMLLM folder: the Auto classes' entry. The model's settings are in the file it names
    (`mllm_config`, unicode_mllm.json: `UniCodeMLLMConfig` in model/mllm.py)."""

    model_type = MLLM_MODEL_TYPE

    def __init__(self, mllm_config: str = "unicode_mllm.json", **kwargs: Any) -> None:
        self.mllm_config = mllm_config
        super().__init__(**kwargs)


class _Deferred:
    """A stand-in model class for the Auto mappings: `from_pretrained` imports the real class (`target`,
    'module:Class') and calls its own, so registering costs no torch import."""

    target = ""

    @classmethod
    def model_class(cls) -> Any:
        module, name = cls.target.split(":")
        return getattr(importlib.import_module(module), name)

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        return cls.model_class().from_pretrained(*args, **kwargs)


class UniCodeMLLMAuto(_Deferred):
    config_class = UniCodeMLLMHFConfig
    target = "unicode_mllm.model.mllm:UniCodeMLLM"


class VisualTokenizerAuto(_Deferred):
    config_class = VisualTokenizerConfig
    target = "unicode_mllm.visual_tokenizer.modeling:VisualTokenizer"


def auto_map(kind: str) -> dict[str, str]:
    """config.json's auto_map for 'mllm' or 'visual_tokenizer' (classes of the folder's loader file)."""
    if kind == "mllm":
        return {
            "AutoConfig": f"{AUTO_MODULE}.UniCodeMLLMHFConfig",
            "AutoModel": f"{AUTO_MODULE}.UniCodeMLLMAuto",
            "AutoModelForCausalLM": f"{AUTO_MODULE}.UniCodeMLLMAuto",
        }
    return {"AutoConfig": f"{AUTO_MODULE}.VisualTokenizerConfig", "AutoModel": f"{AUTO_MODULE}.VisualTokenizerAuto"}


def write_auto_file(folder: str | Path) -> None:
    """The loader file `auto_map` names (trust_remote_code=True without `import unicode_mllm`)."""
    from unicode_mllm.runtime.checkpoint import atomic_write_text

    atomic_write_text(Path(folder) / f"{AUTO_MODULE}.py", _AUTO_FILE)


def register() -> None:
    """Register both configs and models with the Auto classes (idempotent)."""
    AutoConfig.register(MLLM_MODEL_TYPE, UniCodeMLLMHFConfig, exist_ok=True)
    AutoConfig.register(VISUAL_TOKENIZER_MODEL_TYPE, VisualTokenizerConfig, exist_ok=True)
    AutoModel.register(UniCodeMLLMHFConfig, UniCodeMLLMAuto, exist_ok=True)
    AutoModelForCausalLM.register(UniCodeMLLMHFConfig, UniCodeMLLMAuto, exist_ok=True)
    if VisualTokenizerConfig not in AutoModel._model_mapping._extra_content:  # modeling.py registers the real one
        AutoModel.register(VisualTokenizerConfig, VisualTokenizerAuto, exist_ok=True)


register()
