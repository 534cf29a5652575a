"""JSON-storable configs that rebuild a compressor or a view generator: a registered name plus its options.

    cfg = CompressorConfig(name="deco_avgpool", options={"target_grid": (4, 4), "mlp_layers": 2})
    compressor = cfg.build(llm_width=4096)
    assert CompressorConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg

Options are the keyword arguments of the registered class (`compressor_option_names(name)` lists them);
values are JSON scalars or (nested) sequences, stored as lists in JSON and as tuples in the config.
Sizes derived from the model (llm_width; for views the encoder's view_size, view_grid and width) are
passed to `build`, never stored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from unicode_mllm.compression.base import COMPRESSORS, Compressor, build_compressor
from unicode_mllm.compression.registry import ClassRegistry
from unicode_mllm.compression.views import VIEW_GENERATORS, ViewGenerator, build_view_generator
from unicode_mllm.errors import ConfigError

_SCALARS = (str, int, float, bool, type(None))


def _freeze(value: Any, key: str) -> Any:
    """JSON value -> config value (lists become tuples); raises ConfigError for anything else."""
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v, key) for v in value)
    if isinstance(value, _SCALARS):
        return value
    raise ConfigError(f"option {key!r} must be a JSON scalar or a list of them, got {type(value).__name__}")


def _thaw(value: Any) -> Any:
    """Config value -> JSON value (tuples become lists)."""
    return [_thaw(v) for v in value] if isinstance(value, tuple) else value


def _normalise_options(options: Any, owner: str) -> dict[str, Any]:
    if not isinstance(options, dict):
        raise ConfigError(f"{owner}: options must be a mapping, got {type(options).__name__}")
    return {str(k): _freeze(v, f"{owner}.{k}") for k, v in options.items()}


def _check_keys(data: Any, source: str) -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping with 'name' and 'options', got {type(data).__name__}")
    unknown = sorted(set(data) - {"name", "options"})
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {unknown}; valid keys are 'name' and 'options'")


_Choice = TypeVar("_Choice", bound="_RegisteredChoice")


@dataclass(frozen=True)
class _RegisteredChoice:
    """A registered class's name plus its options: what `CompressorConfig` and `ViewGeneratorConfig` share."""

    name: str
    options: dict[str, Any] = field(default_factory=dict, hash=False)

    registry: ClassVar[ClassRegistry]  # the family the name is looked up in
    default_source: ClassVar[str]  # how `from_dict` names the data in its errors

    def __post_init__(self) -> None:
        object.__setattr__(self, "options", _normalise_options(self.options, f"{self.registry.kind} {self.name!r}"))

    def validate(self) -> None:
        """Raises ConfigError for an unknown name or option name (values are checked by `build`)."""
        self.registry.check_options(self.name, self.options)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "options": {k: _thaw(v) for k, v in self.options.items()}}

    @classmethod
    def from_dict(cls: type[_Choice], data: dict[str, Any], source: str | None = None) -> _Choice:
        """The config `to_dict` wrote (a missing name is the default one). Raises ConfigError naming `source`."""
        source = cls.default_source if source is None else source
        _check_keys(data, source)
        try:
            default_name = cls.__dataclass_fields__["name"].default
            cfg = cls(name=data.get("name", default_name), options=dict(data.get("options") or {}))
            cfg.validate()
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        return cfg


@dataclass(frozen=True)
class CompressorConfig(_RegisteredChoice):
    """Which compressor sits between the code embeddings and the LLM, and its options.

    name: a registered compressor ('identity', 'pool2x', 'deco_avgpool', 'ldpv2', 'internvl_ps',
        'qwen2vl_merger', 'qformer', 'perceiver'); options: its keyword arguments (see each class).
    """

    name: str = "identity"

    registry: ClassVar[ClassRegistry] = COMPRESSORS
    default_source: ClassVar[str] = "compressor"

    def build(self, llm_width: int) -> Compressor:
        self.validate()
        return build_compressor(self.name, llm_width, **self.options)


@dataclass(frozen=True)
class ViewGeneratorConfig(_RegisteredChoice):
    """How a high-resolution image becomes encoder views: name ('single', 's2', 'inf_llava') and its options."""

    name: str = "single"

    registry: ClassVar[ClassRegistry] = VIEW_GENERATORS
    default_source: ClassVar[str] = "view_generator"

    def build(self, *, view_size: tuple[int, int], view_grid: tuple[int, int], width: int) -> ViewGenerator:
        self.validate()
        return build_view_generator(self.name, view_size=view_size, view_grid=view_grid, width=width, **self.options)
