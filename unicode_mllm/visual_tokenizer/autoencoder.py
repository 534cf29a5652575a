"""VQGAN-style convolutional encoder and decoder (GroupNorm + SiLU res-blocks, attention at low res).

After the design of CompVis/taming-transformers (taming/modules/diffusionmodules/model.py, Encoder and
Decoder), re-implemented from reading. Differences: attention uses `scaled_dot_product_attention`,
GroupNorm groups shrink for narrow test widths, and the decoder input width is a parameter (the `hq`
stack feeds it a channel concatenation of two levels).

Pixels are in [-1, 1]. With `len(ch_mult) = L`, the downsampling factor is 2**(L-1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


def _groups(channels: int) -> int:
    """32 groups as in VQGAN, fewer for the narrow widths used by tiny presets and tests."""
    for g in (32, 16, 8, 4, 2):
        if channels % g == 0 and channels // g >= 2:
            return g
    return 1


def norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(_groups(channels), channels, eps=1e-6, affine=True)


class ResBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all h*w positions, with a residual."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, h, w = x.shape
        q, k, v = rearrange(self.qkv(self.norm(x)), "b (three c) h w -> three b 1 (h w) c", three=3)
        out = F.scaled_dot_product_attention(q, k, v)  # (b, 1, h*w, c)
        return x + self.proj(rearrange(out, "b 1 (h w) c -> b c h w", h=h, w=w))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Asymmetric padding keeps the output exactly half the input (VQGAN's choice).
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _mid_block(width: int, dropout: float) -> nn.Sequential:
    """The lowest-resolution block both nets share: res-block, self-attention, res-block."""
    return nn.Sequential(ResBlock(width, width, dropout), AttnBlock(width), ResBlock(width, width, dropout))


@dataclass(frozen=True)
class AutoencoderShape:
    """What the encoder and decoder share: base width `ch`, its multiplier per level `ch_mult`, res-blocks per
    level, the resolutions (sides) with attention, the image side `resolution` and the dropout."""

    ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    attn_resolutions: tuple[int, ...]
    resolution: int
    dropout: float = 0.0

    def level_blocks(self, blocks: list[nn.Module], width: int, out: int, count: int, res: int) -> int:
        """Append `count` res-blocks (width -> out), each followed by attention at the attention resolutions, to
        `blocks`; returns the new width."""
        for _ in range(count):
            blocks.append(ResBlock(width, out, self.dropout))
            width = out
            if res in self.attn_resolutions:
                blocks.append(AttnBlock(width))
        return width


class Encoder(nn.Module):
    """(b, 3, H, W) in [-1, 1] -> (b, z_channels, H / f, W / f), f = 2**(len(ch_mult) - 1)."""

    def __init__(self, shape: AutoencoderShape, *, z_channels: int, in_channels: int = 3):
        super().__init__()
        ch, ch_mult = shape.ch, shape.ch_mult
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        blocks: list[nn.Module] = []
        width, res = ch, shape.resolution
        for level, mult in enumerate(ch_mult):
            width = shape.level_blocks(blocks, width, ch * mult, shape.num_res_blocks, res)
            if level != len(ch_mult) - 1:
                blocks.append(Downsample(width))
                res //= 2
        self.down = nn.Sequential(*blocks)
        self.mid = _mid_block(width, shape.dropout)
        self.norm_out = norm(width)
        self.conv_out = nn.Conv2d(width, z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.down(self.conv_in(x)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """(b, in_channels, h, w) -> (b, 3, h * f, w * f); mirrors the encoder (one more res-block per level)."""

    def __init__(self, shape: AutoencoderShape, *, in_channels: int, out_channels: int = 3):
        super().__init__()
        ch, ch_mult = shape.ch, shape.ch_mult
        width = ch * ch_mult[-1]
        res = shape.resolution // 2 ** (len(ch_mult) - 1)
        self.conv_in = nn.Conv2d(in_channels, width, 3, padding=1)
        self.mid = _mid_block(width, shape.dropout)
        blocks: list[nn.Module] = []
        for level in reversed(range(len(ch_mult))):
            width = shape.level_blocks(blocks, width, ch * ch_mult[level], shape.num_res_blocks + 1, res)
            if level != 0:
                blocks.append(Upsample(width))
                res *= 2
        self.up = nn.Sequential(*blocks)
        self.norm_out = norm(width)
        self.conv_out = nn.Conv2d(width, out_channels, 3, padding=1)

    @property
    def last_layer_weight(self) -> torch.Tensor:
        """The weight the VQGAN adaptive GAN weight differentiates against."""
        return self.conv_out.weight

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.up(self.mid(self.conv_in(z)))
        return self.conv_out(F.silu(self.norm_out(h)))
