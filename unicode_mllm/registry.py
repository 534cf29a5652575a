"""The project's one registry style: implementations (classes, or functions) by name, built from the name plus
keyword options (LLaVA's projector builder), and `RegisteredChoice`, the JSON-storable (name, options) config
that rebuilds one.

Every implementation chosen by a config string is registered this way: compressors (`addons/compression/`),
view generators (`addons/highres/`), vision-stage reductions and in-LM pruners (`addons/token_reduction/`),
quantizer stacks (`visual_tokenizer/stacking.py`). The string key and its options come from the config;
the sizes that follow from the model (LLM width; view size, grid and width) are passed by the caller and
never stored. A class's options are its constructor's other keyword arguments.

    cfg = CompressorConfig(name="deco_avgpool", options={"target_grid": (4, 4), "mlp_layers": 2})
    compressor = cfg.build(llm_width=4096)
    assert CompressorConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg

Option values are JSON scalars or (nested) sequences, stored as lists in JSON and as tuples in the config.
No project imports beyond `errors`: this module sits at the bottom layer.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

from unicode_mllm.errors import ConfigError

T = TypeVar("T", bound=Callable[..., Any])


class Registry(dict[str, T], Generic[T]):
    """name -> class (or function). `kind` names the family in messages; `size_args` are the arguments that
    `build` receives from the caller (model sizes, the data to work on) and that are therefore not options."""

    def __init__(self, kind: str, size_args: tuple[str, ...]):
        super().__init__()
        self.kind = kind
        self.size_args = size_args

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: register a class or function under `name` (sets its `name`); ValueError for a taken name."""

        def decorate(cls: T) -> T:
            if name in self:
                raise ValueError(f"{self.kind} {name!r} is already registered by {self[name].__name__}")
            cls.name = name
            self[name] = cls
            return cls

        return decorate

    def option_names(self, name: str) -> tuple[str, ...]:
        """The keyword options `name` accepts besides `size_args`. Raises ConfigError for unknown names."""
        if name not in self:
            raise ConfigError(f"{self.kind} {name!r} is unknown; choose one of {sorted(self)}")
        return tuple(p for p in inspect.signature(self[name]).parameters if p not in self.size_args)

    def check_options(self, name: str, options: Iterable[str]) -> None:
        """Raises ConfigError for an unknown name or option name, listing the valid ones."""
        accepted = self.option_names(name)
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            raise ConfigError(
                f"{self.kind} {name!r} has no option(s) {unknown}; its options are {list(accepted) or 'none'}"
            )

    def build(self, name: str, options: dict[str, Any], **sizes: Any) -> Any:
        """`name` called with the caller-given `sizes` and the config's `options` (an instance, for a class).

        Raises ConfigError for an unknown name or option (listing the valid ones); invalid values raise in
        the class's constructor.
        """
        self.check_options(name, options)
        return self[name](**sizes, **options)


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


_Choice = TypeVar("_Choice", bound="RegisteredChoice")


@dataclass(frozen=True)
class RegisteredChoice:
    """A registered class's name plus its options; a subclass sets `name`'s default, `registry` and
    `default_source`, and adds a `build` that passes the model-given sizes."""

    name: str
    options: dict[str, Any] = field(default_factory=dict, hash=False)

    registry: ClassVar[Registry]  # the family the name is looked up in
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
