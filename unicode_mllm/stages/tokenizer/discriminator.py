"""PatchGAN discriminator (pix2pix / VQGAN NLayerDiscriminator design), re-implemented from reading.

After CompVis/taming-transformers, taming/modules/discriminator/model.py (NLayerDiscriminator).
Difference: GroupNorm instead of BatchNorm, so small per-device batches and DDP behave the same.
"""

from __future__ import annotations

import torch
from torch import nn

from unicode_mllm.visual_tokenizer.autoencoder import norm


class PatchDiscriminator(nn.Module):
    """(b, 3, H, W) -> (b, 1, H', W') real/fake logits per patch."""

    def __init__(self, in_channels: int = 3, ch: int = 64, num_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ch, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        width = ch
        for i in range(1, num_layers + 1):
            out = ch * min(2**i, 8)
            stride = 1 if i == num_layers else 2
            layers += [nn.Conv2d(width, out, 4, stride=stride, padding=1, bias=False), norm(out), nn.LeakyReLU(0.2)]
            width = out
        layers.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.GroupNorm):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)
