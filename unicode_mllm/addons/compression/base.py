"""The compressor contract, the name registry and the `identity` compressor.

A compressor maps the h*w aggregated code embeddings of one image, (b, h*w, c_in) in raster order on an
explicit grid (h, w), to the (b, n, c_out) embeddings the LLM reads, with c_out = the LLM width.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

from torch import Tensor, nn

from unicode_mllm.addons.compression.grid_layout import check_grid_hw, check_tokens
from unicode_mllm.errors import ConfigError
from unicode_mllm.registry import Registry


class CompressorOutput(NamedTuple):
    """tokens: (b, n, c_out); grid_hw: (h', w') when the n tokens are a raster grid, else None (resamplers).

    A NamedTuple, so `tokens, grid_hw = compressor(x, (h, w))` works.
    """

    tokens: Tensor
    grid_hw: tuple[int, int] | None


class Compressor(nn.Module):
    """Base class. Subclasses set `name` (via `register_compressor`) and implement `output_grid` and `_compress`.

    in_width: c_in of the tokens read; out_width: c_out written (the LLM width).
    """

    name: ClassVar[str] = ""

    def __init__(self, in_width: int, out_width: int):
        super().__init__()
        for label, value in (("input width", in_width), ("llm_width", out_width)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"compressor {self.name!r}: {label} must be a positive int, got {value!r}")
        self.in_width = in_width
        self.out_width = out_width

    @property
    def is_trainable(self) -> bool:
        """Whether the compressor has parameters (it then needs stage-2 training)."""
        return any(True for _ in self.parameters())

    def output_grid(self, h: int, w: int) -> tuple[int, int] | None:
        """The output raster grid for an (h, w) input, or None for a non-grid output.

        Raises ValueError for a grid the method cannot take (e.g. an odd side with odd_grid='error').
        """
        raise NotImplementedError

    def num_output_tokens(self, h: int, w: int) -> int:
        """How many tokens `forward` returns for an (h, w) input (sizes the `<img> ... </img>` span)."""
        grid = self.output_grid(*check_grid_hw((h, w)))
        assert grid is not None, f"{type(self).__name__} has no output grid and must override num_output_tokens"
        return grid[0] * grid[1]

    def forward(self, tokens: Tensor, grid_hw: tuple[int, int]) -> CompressorOutput:
        """(b, h*w, c_in) raster tokens on `grid_hw` -> CompressorOutput((b, n, c_out), grid or None).

        Raises ValueError when tokens.shape[1] != h*w, the width is not c_in, or the grid is unsupported.
        """
        h, w = check_tokens(tokens, grid_hw, self.in_width)
        out_grid = self.output_grid(h, w)
        out = self._compress(tokens, (h, w))
        expected = self.num_output_tokens(h, w)
        assert out.shape == (tokens.shape[0], expected, self.out_width), (
            f"{type(self).__name__} returned {tuple(out.shape)}, expected {(tokens.shape[0], expected, self.out_width)}"
        )
        return CompressorOutput(out, out_grid)

    def _compress(self, tokens: Tensor, grid_hw: tuple[int, int]) -> Tensor:
        """(b, h*w, c_in) -> (b, n, c_out); inputs already checked."""
        raise NotImplementedError


COMPRESSORS: Registry[type[Compressor]] = Registry("compressor", size_args=("llm_width",))


def register_compressor(name: str) -> Callable[[type[Compressor]], type[Compressor]]:
    """Class decorator: register a `Compressor` subclass under `name` (sets `cls.name`)."""
    return COMPRESSORS.register(name)


def compressor_option_names(name: str) -> tuple[str, ...]:
    """The keyword options compressor `name` accepts besides `llm_width`. Raises ConfigError for unknown names."""
    return COMPRESSORS.option_names(name)


def build_compressor(name: str, llm_width: int, **options: Any) -> Compressor:
    """Build the compressor registered as `name` for an LLM of width `llm_width`.

    Raises ConfigError for an unknown name or option (listing the valid ones) and for invalid values.
    """
    return COMPRESSORS.build(name, options, llm_width=llm_width)


@register_compressor("identity")
class IdentityCompressor(Compressor):
    """No compression: (b, h*w, c) -> the same tensor, same grid. c_in = c_out = llm_width."""

    def __init__(self, llm_width: int):
        super().__init__(llm_width, llm_width)

    def output_grid(self, h: int, w: int) -> tuple[int, int]:
        return (h, w)

    def _compress(self, tokens: Tensor, grid_hw: tuple[int, int]) -> Tensor:
        return tokens
