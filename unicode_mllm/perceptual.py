"""LPIPS with a VGG trunk that never downloads at run time (stage 1's perceptual loss, and the LPIPS of evaluations).

The `lpips` package ships its small linear heads but fetches the torchvision VGG16 trunk from the
network, which fails offline. We build LPIPS with a random trunk (`pnet_rand=True`, no download) and
then load the trunk from a local file: an explicit path, or torchvision's own cache file
(`$TORCH_HOME/hub/checkpoints/vgg16-397923af.pth`). A random trunk is used only when the config says
`trunk: random` (tests), never as a silent fallback.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from unicode_mllm.errors import UserError

log = logging.getLogger(__name__)

VGG16_CACHE_NAME = "vgg16-397923af.pth"  # torchvision's file name for IMAGENET1K_V1 weights
# torchvision vgg16.features indices -> the five LPIPS slices (lpips/pretrained_networks.py, class vgg16)
_SLICE_BOUNDS = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))


def torch_cache_vgg_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG16_CACHE_NAME


def resolve_trunk(trunk: str) -> Path | None:
    """'auto' -> the torch cache file (error if absent); 'random' -> None; else a file path."""
    if trunk == "random":
        return None
    path = torch_cache_vgg_path() if trunk == "auto" else Path(os.path.expanduser(trunk))
    if not path.is_file():
        raise UserError(
            f"LPIPS VGG16 trunk not found at {path}: copy torchvision's {VGG16_CACHE_NAME} there or set "
            "loss.lpips_trunk=/path/to/vgg16.pth (loss.lpips_trunk=random only for tests; or loss.lpips_weight=0)"
        )
    return path


def _trunk_state_from_torchvision(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename torchvision `features.{i}.*` keys to the LPIPS `slice{k}.{i}.*` layout."""
    out = {}
    for key, value in state.items():
        if not key.startswith("features."):
            continue
        index = int(key.split(".")[1])
        for k, (lo, hi) in enumerate(_SLICE_BOUNDS, start=1):
            if lo <= index < hi:
                out[f"slice{k}.{key[len('features.') :]}"] = value
    return out


class PerceptualLoss(nn.Module):
    """LPIPS(VGG) distance per sample, inputs in [-1, 1]; frozen, kept in fp32, always in eval mode."""

    def __init__(self, trunk: str = "auto"):
        super().__init__()
        import lpips  # deferred: it imports torchvision models

        path = resolve_trunk(trunk)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision's deprecation notice for `pretrained=`
            self.lpips = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
        if path is None:
            log.warning("LPIPS uses a RANDOM VGG trunk (loss.lpips_trunk=random): perceptual values are not LPIPS")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            mapped = _trunk_state_from_torchvision(state)
            self.lpips.net.load_state_dict(mapped, strict=True)
        self.is_random_trunk = path is None
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> PerceptualLoss:
        return super().train(False)  # dropout in the heads must stay off

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x, y: (b, 3, h, w) in [-1, 1] -> (b,) distances."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self.lpips(x.float(), y.float()).flatten()
