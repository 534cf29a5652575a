"""`ReadHook`: the one place where the model meets its add-ons when it reads an image.

`UniCodeMLLM` builds one hook from the `compressor` and `token_reduction` entries of its config and calls it; it
knows nothing of compressor or reduction specifics. The hook holds

- the visual-token compressor (`addons/compression/`) between the h*w summed code embeddings and the LM: it
  sizes a read span (`tokens_per_image`), names the span's grid (`read_grid_hw`) and applies it (`read`);
- the inference-time token reduction of text answers (`addons/token_reduction/`), a `TokenReductionConfig`
  checked against the model whenever it is set (`generation/reduced_decoding.py` runs it);
- their part of a saved model folder: the `compressor` and `token_reduction` entries of `unicode_mllm.json`
  (`AddonsConfig`) and `compressor.safetensors` (only when the compressor has parameters).

The add-ons' checks live here too: a compressor other than `identity` needs `aggregated` reading and must take
the code grid; a reduction must fit the reading mode, the LM's layers and the compressor's output grid.
High-resolution views (`addons/highres/`) read through the same compressor (`evaluation/highres.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from unicode_mllm.addons.compression import Compressor, CompressorConfig
from unicode_mllm.addons.token_reduction.config import TokenReductionConfig
from unicode_mllm.errors import ConfigError, UserError

COMPRESSOR_WEIGHTS = "compressor.safetensors"


@dataclass(frozen=True)
class AddonsConfig:
    """The add-ons of image reads: a compressor (default `identity`) and token reduction (default off).

    Stored as two entries of `unicode_mllm.json`, `compressor` and `token_reduction`; files written before either
    existed load with the default.
    """

    compressor: CompressorConfig = field(default_factory=CompressorConfig)
    token_reduction: TokenReductionConfig = field(default_factory=TokenReductionConfig)

    def to_dict(self) -> dict[str, Any]:
        return {"compressor": self.compressor.to_dict(), "token_reduction": self.token_reduction.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str) -> AddonsConfig:
        """The entries of a whole `unicode_mllm.json` dict; ConfigError naming the key for a bad one."""
        return cls(
            compressor=CompressorConfig.from_dict(data.get("compressor", {}), source=f"{source}: compressor"),
            token_reduction=TokenReductionConfig.from_dict(
                data.get("token_reduction", {}), source=f"{source}: token_reduction"
            ),
        )


class ReadHook:
    """The add-ons of one model's image reads, built from its `AddonsConfig`.

    reading: the model's reading mode; grid_hw: its code grid (h, w); uncompressed_tokens: embeddings of an
    uncompressed read (h*w aggregated, h*w*d interleaved); width: the LM's embedding width; num_layers: the LM's
    decoder layers (None when unknown; pruning layers are then not checked against it).
    Raises UserError for a compressor with `interleaved` reading, ConfigError for one that cannot take the grid
    or a token reduction that does not fit the model.
    """

    def __init__(
        self,
        config: AddonsConfig,
        *,
        reading: str,
        grid_hw: tuple[int, int],
        uncompressed_tokens: int,
        width: int,
        num_layers: int | None,
    ):
        name = config.compressor.name
        if reading != "aggregated" and name != "identity":
            raise UserError(
                f"compressor {name!r} needs reading='aggregated' (it merges the h*w summed code "
                f"embeddings); reading={reading!r} can only use compressor 'identity'"
            )
        self.reading = reading
        self.grid_hw = grid_hw
        self.uncompressed_tokens = uncompressed_tokens
        self.num_layers = num_layers
        self.compressor_config = config.compressor
        self.compressor: Compressor = config.compressor.build(width)
        try:  # now, not at the first image
            self.compressor.num_output_tokens(*grid_hw)
        except ValueError as e:
            raise ConfigError(f"compressor {name!r} cannot read the {grid_hw[0]}x{grid_hw[1]} code grid: {e}") from None
        self.token_reduction = config.token_reduction

    @property
    def config(self) -> AddonsConfig:
        return AddonsConfig(compressor=self.compressor_config, token_reduction=self.token_reduction)

    def modules(self) -> dict[str, nn.Module]:
        """The modules the model holds as its submodules, by name: their parameters train (stage 2) and checkpoint
        with it (`compressor.*` in its state dict)."""
        return {"compressor": self.compressor}

    # ----- the read span -----------------------------------------------------------------------------

    @property
    def compresses(self) -> bool:
        """Whether image reads go through a compressor other than `identity`."""
        return self.compressor_config.name != "identity"

    @property
    def tokens_per_image(self) -> int:
        """Embeddings one read image takes: the compressor's `num_output_tokens(h, w)` (h*w for `identity`)
        with aggregated reading, the uncompressed h*w*d with interleaved."""
        if self.reading != "aggregated":
            return self.uncompressed_tokens
        return self.compressor.num_output_tokens(*self.grid_hw)

    @property
    def read_grid_hw(self) -> tuple[int, int] | None:
        """The raster grid of one read image's embeddings (the compressor's output grid), None when they are
        no grid (resamplers, interleaved reading)."""
        if self.reading != "aggregated":
            return None
        return self.compressor.output_grid(*self.grid_hw)

    def read(self, embeds: Tensor, image_is_uncompressed: Tensor | None = None) -> Tensor | list[Tensor]:
        """(n, s, c) embedded images -> what the LM reads for them: (n, tokens_per_image, c), or a list of n
        (s_i, c) tensors when `image_is_uncompressed` (n,) bool marks some, not all, images to be read
        uncompressed (decompression samples). Without a compressor `embeds` itself."""
        if not self.compresses:
            return embeds
        n = embeds.shape[0]
        if image_is_uncompressed is None:
            is_full = torch.zeros(n, dtype=torch.bool, device=embeds.device)
        else:
            is_full = image_is_uncompressed.to(device=embeds.device, dtype=torch.bool)
            if tuple(is_full.shape) != (n,):
                raise ValueError(f"image_is_uncompressed {tuple(is_full.shape)} must hold one flag per image ({n})")
        if bool(is_full.all()):
            return embeds
        params = next(self.compressor.parameters(), None)
        picked = embeds[~is_full] if bool(is_full.any()) else embeds
        dtype = params.dtype if params is not None else picked.dtype
        compressed = self.compressor(picked.to(dtype), self.grid_hw).tokens  # (n', s, c)
        if not bool(is_full.any()):
            return compressed
        rest = iter(compressed)
        return [embeds[i] if full else next(rest) for i, full in enumerate(is_full.tolist())]

    # ----- token reduction of text answers ----------------------------------------------------------

    @property
    def token_reduction(self) -> TokenReductionConfig:
        """Inference-time token reduction of text answers (`TokenReductionConfig()` = off)."""
        return self._token_reduction

    @token_reduction.setter
    def token_reduction(self, config: TokenReductionConfig) -> None:
        self._token_reduction = self._checked_token_reduction(config)

    def _checked_token_reduction(self, config: TokenReductionConfig) -> TokenReductionConfig:
        if not isinstance(config, TokenReductionConfig):
            raise UserError(f"token_reduction must be a TokenReductionConfig, got {type(config).__name__}")
        if not config.enabled:
            return config
        try:
            config.validate(num_layers=self.num_layers)
        except ValueError as e:
            raise ConfigError(f"token_reduction: {e}") from None
        if self.reading != "aggregated":
            raise ConfigError(f"token reduction needs reading='aggregated', this model reads {self.reading!r}")
        if config.vision != "none" and self.read_grid_hw is None:
            raise ConfigError(
                f"token_reduction.vision={config.vision!r} works on a token grid, but compressor "
                f"{self.compressor_config.name!r} returns no grid; use vision='none' with an llm-stage reduction"
            )
        return config

    # ----- the saved folder --------------------------------------------------------------------------

    def save(self, folder: Path) -> None:
        """Write `compressor.safetensors` for a compressor with parameters (else remove a stale one)."""
        weights = folder / COMPRESSOR_WEIGHTS
        if self.compressor.is_trainable:
            save_file({k: v.detach().contiguous().cpu() for k, v in self.compressor.state_dict().items()}, weights)
        elif weights.exists():
            weights.unlink()  # a stale file from an earlier save would contradict the config

    def load(self, folder: Path) -> None:
        """Load `compressor.safetensors` into a compressor with parameters; UserError when missing or mismatched."""
        if not self.compressor.is_trainable:
            return
        weights = folder / COMPRESSOR_WEIGHTS
        if not weights.is_file():
            raise UserError(
                f"{folder}: compressor {self.compressor_config.name!r} has parameters but {weights.name} is "
                "missing; the folder was not written by save_pretrained"
            )
        device = next(self.compressor.parameters()).device
        try:
            self.compressor.load_state_dict(load_file(str(weights), device=str(device)))
        except RuntimeError as e:
            raise UserError(f"{weights}: does not fit compressor {self.compressor_config.to_dict()}: {e}") from None
