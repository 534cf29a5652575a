"""LlamaGen's VQ-16 image tokenizer, rebuilt from its published shape, as the peer of bench_tokenizer_peer.py.

LlamaGen (Sun et al. 2024, "Autoregressive Model Beats Diffusion", https://github.com/FoundationVision/LlamaGen,
tokenizer/tokenizer_image/vq_model.py) tokenizes a 256 px image into a 16 x 16 grid with a VQGAN-family CNN:
channels 128 x (1, 1, 2, 2, 4), two residual blocks a level in the encoder and three in the decoder, self-attention
at the 16 px level and in the middle block, z 256 projected by 1x1 convolutions to 8-dimensional codes, a
16384-entry codebook searched by cosine similarity (codes and features l2-normalised). The paper reports 72M
parameters; this module has 71.9M (`parameter_count`). Random weights: only the work per image matters here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CH, CH_MULT, Z_CHANNELS, CODE_DIM, CODEBOOK_SIZE = 128, (1, 1, 2, 2, 4), 256, 8, 16384


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6)


class _Res(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class _Attn(nn.Module):
    """Single-head self-attention over the h*w positions (b, c, h, w)."""

    def __init__(self, c: int):
        super().__init__()
        self.norm, self.qkv, self.out = _norm(c), nn.Conv2d(c, 3 * c, 1), nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(-1, -2).unbind(1)  # each (b, hw, c)
        a = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]  # (b, hw, c)
        return x + self.out(a.transpose(-1, -2).reshape(b, c, h, w))


def _encoder() -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(3, CH, 3, padding=1)]
    width = CH
    for level, mult in enumerate(CH_MULT):
        last = level == len(CH_MULT) - 1
        for _ in range(2):
            layers.append(_Res(width, CH * mult))
            width = CH * mult
            if last:
                layers.append(_Attn(width))
        if not last:
            layers.append(nn.Conv2d(width, width, 3, stride=2, padding=1))
    layers += [_Res(width, width), _Attn(width), _Res(width, width), _norm(width), nn.SiLU()]
    layers.append(nn.Conv2d(width, Z_CHANNELS, 3, padding=1))
    return nn.Sequential(*layers)


def _decoder() -> nn.Sequential:
    width = CH * CH_MULT[-1]
    layers: list[nn.Module] = [nn.Conv2d(Z_CHANNELS, width, 3, padding=1)]
    layers += [_Res(width, width), _Attn(width), _Res(width, width)]
    for level in reversed(range(len(CH_MULT))):
        for _ in range(3):
            layers.append(_Res(width, CH * CH_MULT[level]))
            width = CH * CH_MULT[level]
            if level == len(CH_MULT) - 1:
                layers.append(_Attn(width))
        if level != 0:
            layers += [nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(width, width, 3, padding=1)]
    layers += [_norm(width), nn.SiLU(), nn.Conv2d(width, 3, 3, padding=1)]
    return nn.Sequential(*layers)


class VQ16(nn.Module):
    """encode: (b, 3, 256, 256) in [-1, 1] -> (b, 16, 16) code indices; decode: indices -> (b, 3, 256, 256)."""

    def __init__(self):
        super().__init__()
        self.encoder, self.decoder = _encoder(), _decoder()
        self.quant_conv, self.post_quant_conv = nn.Conv2d(Z_CHANNELS, CODE_DIM, 1), nn.Conv2d(CODE_DIM, Z_CHANNELS, 1)
        self.codebook = nn.Embedding(CODEBOOK_SIZE, CODE_DIM)

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        z = F.normalize(self.quant_conv(self.encoder(images)), dim=1)  # (b, 8, h, w)
        b, c, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, c)  # (b*h*w, 8)
        return (flat @ F.normalize(self.codebook.weight, dim=1).T).argmax(dim=1).view(b, h, w)  # max cosine

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        z = F.normalize(self.codebook(codes), dim=-1).permute(0, 3, 1, 2)  # (b, 8, h, w)
        return self.decoder(self.post_quant_conv(z))
