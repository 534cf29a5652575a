"""The three ways to stack codes over one shared LLM codebook: `rq`, `hq` and `vq`.

Each stack maps encoder features z (b, c, h, w) to a decoder input z_q (b, c_dec, h, w) and to codes
(b, h_code, w_code, d) laid out as `code_shape((h, w)) = (h_code, w_code, d)`. Codes are rows of the
visual codebook; `LanguageCodebook.codes_to_token_ids` turns them into LLM token ids. All quantizer
maths (codebook, EMA, norm matching, the one straight-through wrap) lives in `StackedQuantizer`.

- `rq` (after kakaobrain/rq-vae-transformer, `RQBottleneck`): d residual layers over the shared
  codebook at the encoder grid; decoder input = proj_out(sum of the d quantized vectors).
- `vq`: `rq` with d = 1.
- `hq`: two levels (after HQ-VAE's top/bottom split, with UniCode's shared codebook). Top grid =
  encoder grid / 2: z is pixel-unshuffled (c -> 4c), projected and quantized with depth 1; its
  feature-space reconstruction is pixel-shuffled back to the encoder grid. The bottom quantizes, at
  the encoder grid, the feature-space residual z - top (top detached, as residual quantization
  does), through its own projection, with the same codebook. Decoder input = channel concatenation
  [top, bottom] (2c channels). Codes per top position, depth 5:
  [top, b(0,0), b(0,1), b(1,0), b(1,1)], where b(i, j) is the bottom code at encoder position
  (2*y_top + i, 2*x_top + j). Each training forward makes two EMA updates (top, then bottom; the
  bottom level is quantized with the codebook as updated by the top call), and the decay is split
  over them so that `decay` stays per step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from unicode_mllm.errors import ConfigError, UserError
from unicode_mllm.quantizer_settings import STACKINGS, stack_code_depth
from unicode_mllm.registry import Registry
from unicode_mllm.visual_tokenizer.quantizer import NormMatchedProjection, QuantizerSettings, StackedQuantizer


@dataclass
class StackOutput:
    """What a stack's `forward` returns.

    z_q: (b, c_dec, h, w) decoder input, input dtype, straight-through to z.
    codes: (b, h_code, w_code, d) int64 codebook indices, laid out as `code_shape`.
    commit_loss: () fp32, weighted.
    """

    z_q: Tensor
    codes: Tensor
    commit_loss: Tensor


class QuantizerStack(nn.Module):
    """Common interface of the stacks. `quantizer` holds the one shared codebook.

    z_channels: the encoder's channels; llm_width, num_codes: the codebook's; depth: codes per position where
    the stack lets it be chosen (`_code_depth` checks it); settings: the quantizer's options; sync_codebook:
    all-reduce the EMA statistics (DDP). A stack builds its quantizers in `_build`.
    """

    name: ClassVar[str]  # set by `STACKS.register`
    quantizer: StackedQuantizer
    code_depth: int
    decoder_in_channels: int
    z_channels: int

    def __init__(
        self,
        *,
        z_channels: int,
        llm_width: int,
        num_codes: int,
        depth: int | None = None,
        settings: QuantizerSettings | None = None,
        sync_codebook: bool = False,
    ) -> None:
        super().__init__()
        self.z_channels = z_channels
        self.code_depth = self._code_depth(depth)
        self._build(llm_width, num_codes, settings if settings is not None else QuantizerSettings(), sync_codebook)

    def _code_depth(self, depth: int | None) -> int:
        """The codes per position for the `depth` asked for; ConfigError when the stack cannot have it."""
        return stack_code_depth(self.name, depth)

    def _build(self, llm_width: int, num_codes: int, settings: QuantizerSettings, sync_codebook: bool) -> None:
        raise NotImplementedError

    def code_shape(self, latent_hw: tuple[int, int]) -> tuple[int, int, int]:
        """(h, w) encoder grid -> (h_code, w_code, d) code layout."""
        raise NotImplementedError

    def forward(self, z: Tensor, freeze_codebook: bool | None = None) -> StackOutput:
        raise NotImplementedError

    def decode_codes(self, codes: Tensor) -> Tensor:
        """(b, h_code, w_code, d) int64 -> (b, c_dec, h, w) fp32, equal to the eval-mode z_q."""
        raise NotImplementedError

    def get_codes_embeddings(self, codes: Tensor) -> Tensor:
        """(b, h_code, w_code, d) int64 -> (b, h_code, w_code, llm_width): the sum over depth of
        codebook rows (the LLM's aggregated embedding per position when the codebook is C_L)."""
        self._check_codes(codes)
        return self.quantizer.get_codes_embeddings(codes)

    def _check_latent(self, z: Tensor) -> tuple[int, int]:
        if z.ndim != 4 or z.shape[1] != self.z_channels:
            raise ValueError(f"stacking {self.name!r} expects z (b, {self.z_channels}, h, w); got {tuple(z.shape)}")
        h, w = z.shape[-2:]
        self.code_shape((h, w))  # raises for grids the stack cannot lay out
        return h, w

    def _check_codes(self, codes: Tensor) -> None:
        if codes.ndim != 4 or codes.shape[-1] != self.code_depth:
            raise UserError(
                f"stacking {self.name!r} expects codes (b, h, w, {self.code_depth}); got {tuple(codes.shape)}"
            )


STACKS: Registry[type[QuantizerStack]] = Registry(
    "stacking", size_args=("z_channels", "llm_width", "num_codes", "depth", "settings", "sync_codebook")
)


@STACKS.register("rq")
class ResidualStack(QuantizerStack):
    """`rq`: d residual codes per encoder position over the shared codebook."""

    def _build(self, llm_width: int, num_codes: int, settings: QuantizerSettings, sync_codebook: bool) -> None:
        self.decoder_in_channels = self.z_channels
        self.quantizer = StackedQuantizer(
            in_channels=self.z_channels,
            llm_width=llm_width,
            num_codes=num_codes,
            depth=self.code_depth,
            settings=settings,
            sync_codebook=sync_codebook,
        )

    def code_shape(self, latent_hw: tuple[int, int]) -> tuple[int, int, int]:
        h, w = latent_hw
        return (h, w, self.code_depth)

    def forward(self, z: Tensor, freeze_codebook: bool | None = None) -> StackOutput:
        """z (b, c, h, w) -> StackOutput(z_q (b, c, h, w), codes (b, h, w, d), commit_loss)."""
        h, w = self._check_latent(z)
        out = self.quantizer(rearrange(z, "b c h w -> b (h w) c"), freeze_codebook=freeze_codebook)
        return StackOutput(
            z_q=rearrange(out.z_q, "b (h w) c -> b c h w", h=h, w=w),
            codes=rearrange(out.codes, "b (h w) d -> b h w d", h=h, w=w),
            commit_loss=out.commit_loss,
        )

    def decode_codes(self, codes: Tensor) -> Tensor:
        self._check_codes(codes)
        h, w = codes.shape[1:3]
        z_q = self.quantizer.decode_codes(rearrange(codes, "b h w d -> b (h w) d"))
        return rearrange(z_q, "b (h w) c -> b c h w", h=h, w=w)


@STACKS.register("vq")
class SingleStack(ResidualStack):
    """`vq`: one code per encoder position (the plain baseline); depth 1 (`stack_code_depth`)."""


@STACKS.register("hq")
class HierarchicalStack(QuantizerStack):
    """`hq`: a top code per 2x2 block plus four bottom codes, depth 5 per top position."""

    def _build(self, llm_width: int, num_codes: int, settings: QuantizerSettings, sync_codebook: bool) -> None:
        z_channels = self.z_channels
        self.decoder_in_channels = 2 * z_channels
        # The top quantizer owns the shared codebook; the bottom level reuses it through its own
        # projection, so each training forward makes two EMA updates.
        self.quantizer = StackedQuantizer(
            in_channels=4 * z_channels,
            llm_width=llm_width,
            num_codes=num_codes,
            depth=1,
            settings=settings,
            ema_updates_per_step=2,
            sync_codebook=sync_codebook,
        )
        self.bottom_projection = NormMatchedProjection.from_settings(
            z_channels, llm_width, settings, sync=sync_codebook
        )
        # The bottom level maps onto the same codebook, so it needs the same target moments.
        self.quantizer.extra_projections.append(self.bottom_projection)

    def code_shape(self, latent_hw: tuple[int, int]) -> tuple[int, int, int]:
        h, w = latent_hw
        if h % 2 or w % 2:
            raise ConfigError(f"stacking 'hq' needs an even latent grid (top = grid / 2); got (h, w) = {(h, w)}")
        return (h // 2, w // 2, self.code_depth)

    def forward(self, z: Tensor, freeze_codebook: bool | None = None) -> StackOutput:
        """z (b, c, h, w) -> StackOutput(z_q (b, 2c, h, w), codes (b, h/2, w/2, 5), commit_loss)."""
        h, w = self._check_latent(z)
        target_norm = self.quantizer.target_norm
        with torch.autocast(device_type=z.device.type, enabled=False):
            z32 = z.float()
            top_tokens = rearrange(F.pixel_unshuffle(z32, 2), "b c ht wt -> b (ht wt) c")
            top = self.quantizer(top_tokens, freeze_codebook=freeze_codebook)
            top_z = self._top_to_grid(top.z_q, h, w)  # (b, c, h, w)
            residual = z32 - top_z.detach()
            x_bottom = self.bottom_projection.to_llm(rearrange(residual, "b c h w -> b (h w) c"), target_norm)
            q_bottom, bottom_codes, bottom_commit = self.quantizer.quantize_llm(x_bottom, freeze_codebook)
            bottom_z = rearrange(
                self.bottom_projection.from_llm(q_bottom, target_norm), "b (h w) c -> b c h w", h=h, w=w
            )
            z_q = torch.cat([top_z, bottom_z], dim=1)
        codes = torch.cat(
            [
                rearrange(top.codes, "b (ht wt) 1 -> b ht wt 1", ht=h // 2, wt=w // 2),
                rearrange(
                    rearrange(bottom_codes, "b (h w) 1 -> b h w", h=h, w=w),
                    "b (ht i) (wt j) -> b ht wt (i j)",
                    i=2,
                    j=2,
                ),
            ],
            dim=-1,
        )
        return StackOutput(z_q=z_q.to(z.dtype), codes=codes, commit_loss=(top.commit_loss + bottom_commit) / 2)

    @staticmethod
    def _top_to_grid(top_z_q: Tensor, h: int, w: int) -> Tensor:
        """(b, h/2 * w/2, 4c) top features -> (b, c, h, w), the inverse of the pixel-unshuffle."""
        return F.pixel_shuffle(rearrange(top_z_q, "b (ht wt) c -> b c ht wt", ht=h // 2, wt=w // 2), 2)

    def decode_codes(self, codes: Tensor) -> Tensor:
        self._check_codes(codes)
        ht, wt = codes.shape[1:3]
        h, w = 2 * ht, 2 * wt
        with torch.autocast(device_type=codes.device.type, enabled=False):
            top_z = self._top_to_grid(
                self.quantizer.decode_codes(rearrange(codes[..., :1], "b ht wt 1 -> b (ht wt) 1")), h, w
            )
            bottom_codes = rearrange(codes[..., 1:], "b ht wt (i j) -> b (ht i) (wt j)", i=2, j=2)
            bottom_llm = self.quantizer.get_codes_embeddings(rearrange(bottom_codes, "b h w -> b (h w) 1"))
            bottom_z = self.bottom_projection.from_llm(bottom_llm, self.quantizer.target_norm)
            bottom_z = rearrange(bottom_z, "b (h w) c -> b c h w", h=h, w=w)
            return torch.cat([top_z, bottom_z], dim=1)


assert sorted(STACKS) == sorted(STACKINGS)  # the light declaration config checks read (quantizer_settings.py)


def build_stack(kind: str, **sizes: Any) -> QuantizerStack:
    """The stack named `kind` ('rq', 'hq' or 'vq') built with `QuantizerStack`'s keyword arguments (z_channels,
    llm_width, num_codes, depth, settings, sync_codebook); raises ConfigError listing the known names.

    depth: codes per position for 'rq' (required); 'vq' is 1 and 'hq' is 5 (leave unset).
    sync_codebook: an explicit bool computed after the process group exists (DDP).
    """
    return STACKS.build(kind, {}, **sizes)


__all__ = [
    "STACKS",
    "HierarchicalStack",
    "QuantizerStack",
    "ResidualStack",
    "SingleStack",
    "StackOutput",
    "build_stack",
]
