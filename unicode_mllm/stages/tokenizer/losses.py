"""The VQGAN objective: pixel reconstruction + LPIPS + PatchGAN hinge with the adaptive weight.

After CompVis/taming-transformers, taming/modules/losses/vqperceptual.py (VQLPIPSWithDiscriminator),
re-implemented from reading. Two methods instead of an integer `optimizer_idx`: `generator_loss` and
`discriminator_loss`. The commitment loss comes from the quantizer and is added by the caller's
weight inside the quantizer (commitment_weight), so it enters here already weighted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from unicode_mllm.config import bounded
from unicode_mllm.perceptual import PerceptualLoss
from unicode_mllm.stages.tokenizer.discriminator import PatchDiscriminator


@dataclass
class LossConfig:
    reconstruction: Literal["l2", "l1"] = "l2"
    lpips_weight: float = bounded(1.0, min=0.0)
    lpips_trunk: str = "auto"  # 'auto' (torch cache file), a path to torchvision's vgg16 .pth, or 'random'
    disc_weight: float = bounded(0.5, min=0.0)
    disc_start: int = bounded(2000, min=0)  # generator GAN term and discriminator training start here
    disc_ch: int = bounded(64, min=1)
    disc_layers: int = bounded(3, min=1, max=6)
    max_adaptive_weight: float = bounded(1e4, min=0.0)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adaptive_gan_weight(
    nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor, max_weight: float = 1e4
) -> torch.Tensor:
    """||d nll / d last|| / (||d g / d last|| + 1e-4): balances the GAN gradient against reconstruction."""
    nll_grad = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = nll_grad.norm() / (g_grad.norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()


class VQGANLoss(nn.Module):
    def __init__(self, cfg: LossConfig):
        super().__init__()
        self.cfg = cfg
        self.perceptual = PerceptualLoss(cfg.lpips_trunk) if cfg.lpips_weight > 0 else None
        self.discriminator = PatchDiscriminator(ch=cfg.disc_ch, num_layers=cfg.disc_layers)

    def gan_active(self, step: int) -> bool:
        return self.cfg.disc_weight > 0 and step >= self.cfg.disc_start

    def reconstruction_terms(self, x: torch.Tensor, x_rec: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Pixel + perceptual loss (scalar) and their logged parts. x, x_rec: (b, 3, h, w) in [-1, 1]."""
        x, x_rec = x.float(), x_rec.float()
        pixel = F.mse_loss(x_rec, x) if self.cfg.reconstruction == "l2" else F.l1_loss(x_rec, x)
        loss, logs = pixel, {"pixel": pixel.item()}
        if self.perceptual is not None:
            p = self.perceptual(x, x_rec).mean()
            loss = loss + self.cfg.lpips_weight * p
            logs["lpips"] = p.item()
        return loss, logs

    def generator_loss(
        self,
        x: torch.Tensor,
        x_rec: torch.Tensor,
        quant_loss: torch.Tensor,
        step: int,
        last_layer: torch.Tensor | None,
        gan_scale: float = 1.0,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Total generator-side loss. `gan_scale` multiplies the GAN term (the ramp schedule's 1 - 0.9*ratio)."""
        nll, logs = self.reconstruction_terms(x, x_rec)
        loss = nll + quant_loss
        logs["quant"] = quant_loss.item()
        if self.gan_active(step):
            self.discriminator.requires_grad_(False)  # the generator step must not fill D's grads
            g_loss = -self.discriminator(x_rec.float()).mean()
            self.discriminator.requires_grad_(True)
            if last_layer is not None and torch.is_grad_enabled():
                weight = adaptive_gan_weight(nll, g_loss, last_layer, self.cfg.max_adaptive_weight)
            else:
                weight = torch.tensor(1.0, device=x.device)
            loss = loss + self.cfg.disc_weight * gan_scale * weight * g_loss
            logs.update(g_loss=g_loss.item(), gan_weight=weight.item())
        logs["total"] = loss.item()
        return loss, logs

    def discriminator_loss(self, x: torch.Tensor, x_rec: torch.Tensor, step: int) -> tuple[torch.Tensor, dict]:
        """Hinge loss on real vs detached reconstructions; zero (and no grads) before disc_start."""
        if not self.gan_active(step):
            return torch.zeros((), device=x.device), {}
        logits_real = self.discriminator(x.float().detach())
        logits_fake = self.discriminator(x_rec.float().detach())
        d_loss = hinge_d_loss(logits_real, logits_fake)
        return d_loss, {
            "d_loss": d_loss.item(),
            "logits_real": logits_real.mean().item(),
            "logits_fake": logits_fake.mean().item(),
        }
