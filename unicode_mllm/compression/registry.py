"""A registry of classes by name, built from the name plus keyword options (LLaVA's projector builder).

Compressors and view generators are both chosen this way: a string key and its options come from the
config, the sizes that follow from the model (LLM width; view size, grid and width) are passed by the
caller and never stored. A class's options are its constructor's other keyword arguments.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar

from unicode_mllm.errors import ConfigError

T = TypeVar("T", bound=type)


class ClassRegistry(dict[str, T], Generic[T]):
    """name -> class. `kind` names the family in messages; `size_args` are the constructor arguments that
    `build` receives from the model and that are therefore not options."""

    def __init__(self, kind: str, size_args: tuple[str, ...]):
        super().__init__()
        self.kind = kind
        self.size_args = size_args

    def register(self, name: str) -> Callable[[T], T]:
        """Class decorator: register a class under `name` (sets `cls.name`). Raises ValueError for a taken name."""

        def decorate(cls: T) -> T:
            if name in self:
                raise ValueError(f"{self.kind} {name!r} is already registered by {self[name].__name__}")
            cls.name = name
            self[name] = cls
            return cls

        return decorate

    def option_names(self, name: str) -> tuple[str, ...]:
        """The keyword options class `name` accepts besides `size_args`. Raises ConfigError for unknown names."""
        if name not in self:
            raise ConfigError(f"{self.kind} {name!r} is unknown; choose one of {sorted(self)}")
        params = inspect.signature(self[name].__init__).parameters
        return tuple(p for p in params if p not in ("self", *self.size_args))

    def check_options(self, name: str, options: Iterable[str]) -> None:
        """Raises ConfigError for an unknown name or option name, listing the valid ones."""
        accepted = self.option_names(name)
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            raise ConfigError(
                f"{self.kind} {name!r} has no option(s) {unknown}; its options are {list(accepted) or 'none'}"
            )

    def build(self, name: str, options: dict[str, Any], **sizes: Any) -> Any:
        """An instance of class `name` with the model-given `sizes` and the config's `options`.

        Raises ConfigError for an unknown name or option (listing the valid ones); invalid values raise in
        the class's constructor.
        """
        self.check_options(name, options)
        return self[name](**sizes, **options)
