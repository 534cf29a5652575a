"""The quantizer's options, declared once: `QuantizerSettings`.

Three places read them and none re-declares them:

- stage 1's YAML section `codebook:` (`stages/tokenizer/config.py`'s `CodebookConfig` extends this dataclass,
  so `codebook.mode`, `codebook.decay`, ... are these fields);
- a saved tokenizer's config.json, as one nested entry `"quantizer": {...}` (`hf_auto.VisualTokenizerConfig`;
  folders saved before it, with the options at the top level, load through `split_flat_settings`);
- `StackedQuantizer` (`visual_tokenizer/quantizer.py`), which builds the quantizer from them.

Their checks live here too: the types, choices and ranges come from the annotations and `bounded` through the
project's config reader (`check_settings`), the cross-field rules from `QuantizerSettings.validate`.

Light on purpose (no torch): `hf_auto` imports it when transformers is imported.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, get_args

from unicode_mllm.config import bounded, config_from_dict
from unicode_mllm.errors import ConfigError

CodebookMode = Literal["language_driven", "frozen", "separate", "dual"]
NormMatching = Literal["running_ratio", "moments", "none"]
QuantizerBackend = Literal["library", "native"]
SearchDtype = Literal["fp32", "bf16", "auto"]
Stacking = Literal[
    "rq", "hq", "vq"
]  # how the quantizer is stacked into codes per position (visual_tokenizer/stacking.py)
CODEBOOK_MODES: tuple[str, ...] = get_args(CodebookMode)
NORM_MATCHINGS: tuple[str, ...] = get_args(NormMatching)
QUANTIZER_BACKENDS: tuple[str, ...] = get_args(QuantizerBackend)
SEARCH_DTYPES: tuple[str, ...] = get_args(SearchDtype)
STACKINGS: tuple[str, ...] = get_args(Stacking)

DEFAULT_CHUNK_SIZE = 2048  # native backend: rows per distance chunk: (2048, 32000) fp32 is 262 MB


@dataclass(frozen=True)
class QuantizerSettings:
    """The quantizer options a run chooses (the codebook size and width come from the LLM)."""

    # How error messages name the keys: 'quantizer.decay' here, 'codebook.decay' in the stage-1 config.
    key_prefix: ClassVar[str] = "quantizer."

    mode: CodebookMode = "language_driven"
    decay: float = bounded(0.99, min=0.0, max=1.0, help="EMA decay of the codebook statistics per training step")
    eps: float = bounded(1e-5, min=0.0, help="Laplace smoothing of the EMA cluster sizes")
    commitment_weight: float = bounded(0.25, min=0.0)
    norm_matching: NormMatching = "running_ratio"
    feature_norm_decay: float = bounded(
        0.99, min=0.0, max=1.0, help="momentum of the running feature norm used for norm matching"
    )
    target_norm: float = bounded(
        1.0, min=0.0, help="reference codebook norm before install(); install() replaces it with C_L's"
    )
    # native: chunked argmin + index_add_ EMA, 4-5x faster per step than the library at 512x64 and 32000x4096
    # (BENCHMARKS.md) with the same codes; "library" is vector-quantize-pytorch's ResidualVQ.
    backend: QuantizerBackend = "library"
    native_chunk_size: int = bounded(
        DEFAULT_CHUNK_SIZE, min=1, help="rows per distance chunk of the native backend (memory: rows x v fp32)"
    )
    # native only: choose codes in the span of C_L's `search_dim` leading principal directions (the full rows are
    # still what is summed and decoded); None searches the full LLM width. See native_quantizer.py.
    search_dim: int | None = bounded(
        None, min=1, help="native backend: nearest-code search in C_L's leading principal directions (None: full width)"
    )
    search_dtype: SearchDtype = "auto"  # native backend: distance matmul dtype; auto = bf16 on CUDA, fp32 on CPU
    native_code_chunk_size: int | None = bounded(
        None, min=1, help="native backend: codebook rows per distance block (None: all; memory rows x this fp32)"
    )

    def validate(self) -> None:
        """Raises ConfigError naming the bad key and its value."""
        p = self.key_prefix
        if self.mode not in CODEBOOK_MODES:
            raise ConfigError(f"{p}mode {self.mode!r} is unknown; choose one of {sorted(CODEBOOK_MODES)}")
        if self.norm_matching not in NORM_MATCHINGS:
            raise ConfigError(
                f"{p}norm_matching {self.norm_matching!r} is unknown; choose one of {sorted(NORM_MATCHINGS)}"
            )
        if not 0.0 < self.decay < 1.0:
            raise ConfigError(f"{p}decay must lie strictly between 0 and 1 (e.g. 0.99); got {self.decay}")
        if not 0.0 <= self.feature_norm_decay < 1.0:
            raise ConfigError(f"{p}feature_norm_decay must lie in [0, 1) (e.g. 0.99); got {self.feature_norm_decay}")
        if self.eps <= 0.0:
            raise ConfigError(f"{p}eps must be positive (e.g. 1e-5); got {self.eps}")
        if self.commitment_weight < 0.0:
            raise ConfigError(f"{p}commitment_weight must be >= 0 (e.g. 0.25); got {self.commitment_weight}")
        if self.target_norm <= 0.0:
            raise ConfigError(f"{p}target_norm must be positive; got {self.target_norm}")
        if self.backend not in QUANTIZER_BACKENDS:
            raise ConfigError(f"{p}backend {self.backend!r} is unknown; choose one of {sorted(QUANTIZER_BACKENDS)}")
        if self.native_chunk_size < 1:
            raise ConfigError(f"{p}native_chunk_size must be >= 1 (e.g. 2048); got {self.native_chunk_size}")
        if self.search_dtype not in SEARCH_DTYPES:
            raise ConfigError(f"{p}search_dtype {self.search_dtype!r} is unknown; choose one of {list(SEARCH_DTYPES)}")
        if self.search_dtype == "bf16" and self.backend != "native":
            raise ConfigError(
                f"{p}search_dtype='bf16' needs {p}backend='native' (vector-quantize-pytorch searches in the "
                f"input dtype); set {p}backend=native or use 'auto'"
            )
        if self.native_code_chunk_size is not None and self.native_code_chunk_size < 1:
            raise ConfigError(
                f"{p}native_code_chunk_size must be >= 1 (e.g. 8192) or unset; got {self.native_code_chunk_size}"
            )
        if self.search_dim is not None:
            if self.search_dim < 1:
                raise ConfigError(f"{p}search_dim must be >= 1 (e.g. 8) or unset; got {self.search_dim}")
            if self.backend != "native":
                raise ConfigError(
                    f"{p}search_dim={self.search_dim} needs {p}backend='native' (vector-quantize-pytorch searches "
                    f"the full width); set {p}backend=native or unset {p}search_dim"
                )

    @classmethod
    def of(cls, settings: QuantizerSettings) -> QuantizerSettings:
        """The plain settings of `settings` or of a config that extends them (stage 1's `CodebookConfig`)."""
        return cls(**{f.name: getattr(settings, f.name) for f in dataclasses.fields(cls)})

    def to_dict(self) -> dict[str, Any]:
        """config.json's nested `quantizer` entry."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(QuantizerSettings)}


def check_settings(data: QuantizerSettings | Mapping[str, Any], source: str = "quantizer") -> QuantizerSettings:
    """Settings from a mapping (config.json's `quantizer` entry) or an instance, with every key, type, choice and
    range checked (ConfigError naming the key), then `validate()`."""
    mapping = data.to_dict() if isinstance(data, QuantizerSettings) else data
    if not isinstance(mapping, Mapping):
        raise ConfigError(f"{source} must be a mapping of quantizer settings, got {mapping!r}")
    return config_from_dict(QuantizerSettings, mapping, source=source)


# ----- the code stack's shape (visual_tokenizer/stacking.py), checked here for the configs that choose it -----

HQ_CODE_DEPTH = 5  # 'hq': [top, b(0,0), b(0,1), b(1,0), b(1,1)] per top position


def stack_code_depth(stacking: str, depth: int | None, key_prefix: str = "") -> int:
    """Codes per position of `stacking` for the `depth` asked for (None: the stack's own; 'rq' needs one).
    ConfigError naming the keys (`key_prefix`: 'model.' in the stage-1 config) when the stack cannot have it."""
    p = key_prefix
    if stacking == "rq":
        if depth is None:
            raise ConfigError(f"{p}stacking 'rq' needs {p}depth (codes per position), e.g. depth=4")
        return depth
    if stacking == "vq":
        if depth not in (None, 1):
            raise ConfigError(f"{p}stacking 'vq' has depth 1; got {p}depth={depth} (use stacking 'rq' for more)")
        return 1
    if depth not in (None, HQ_CODE_DEPTH):
        raise ConfigError(
            f"{p}stacking 'hq' has {HQ_CODE_DEPTH} codes per top position (1 top + 4 bottom); got {p}depth={depth}: "
            f"leave {p}depth unset or set it to {HQ_CODE_DEPTH}"
        )
    return HQ_CODE_DEPTH


def check_latent_grid(image_size: int, ch_mult_len: int, stacking: str, key_prefix: str = "") -> None:
    """The encoder's grid (image_size / 2**(ch_mult_len - 1) per side) must be whole, and even for 'hq' (its top
    level takes 2x2 blocks). ConfigError naming the keys (`key_prefix` as for `stack_code_depth`)."""
    p, f = key_prefix, 2 ** (ch_mult_len - 1)
    if image_size % f:
        raise ConfigError(
            f"{p}image_size {image_size} must be divisible by the downsampling factor {f} (2**(len({p}ch_mult)-1))"
        )
    if stacking == "hq" and (image_size // f) % 2:
        raise ConfigError(f"{p}stacking 'hq' needs an even latent grid; {p}image_size {image_size} / {f} is odd")


# config.json before the nested entry kept the options at the top level, the codebook mode as `codebook_mode`.
_FLAT_NAMES = {"codebook_mode": "mode"}


def split_flat_settings(kwargs: MutableMapping[str, Any]) -> dict[str, Any]:
    """Remove the top-level (flat) quantizer options from `kwargs` (a config.json of the earlier layout, or the
    keyword arguments of `VisualTokenizerConfig`) and return them as a `quantizer` mapping."""
    names = {f.name for f in dataclasses.fields(QuantizerSettings)} - set(_FLAT_NAMES.values())
    flat = {}
    for key in [k for k in kwargs if k in names or k in _FLAT_NAMES]:
        flat[_FLAT_NAMES.get(key, key)] = kwargs.pop(key)
    return flat


def settings_from(value: QuantizerSettings | Mapping[str, Any] | None, flat: Mapping[str, Any]) -> QuantizerSettings:
    """The settings of a nested entry (`value`) updated by flat options; unknown keys raise ConfigError. Types are
    not checked here (`check_settings` does, when the config is checked)."""
    base = {} if value is None else (value.to_dict() if isinstance(value, QuantizerSettings) else dict(value))
    merged = {**base, **flat}
    names = {f.name for f in dataclasses.fields(QuantizerSettings)}
    unknown = sorted(set(merged) - names)
    if unknown:
        raise ConfigError(f"quantizer has unknown keys {unknown}; valid keys: {sorted(names)}")
    return QuantizerSettings(**merged)


__all__ = [
    "CODEBOOK_MODES",
    "DEFAULT_CHUNK_SIZE",
    "HQ_CODE_DEPTH",
    "NORM_MATCHINGS",
    "QUANTIZER_BACKENDS",
    "SEARCH_DTYPES",
    "STACKINGS",
    "CodebookMode",
    "NormMatching",
    "QuantizerBackend",
    "QuantizerSettings",
    "SearchDtype",
    "Stacking",
    "check_latent_grid",
    "check_settings",
    "settings_from",
    "split_flat_settings",
    "stack_code_depth",
]
