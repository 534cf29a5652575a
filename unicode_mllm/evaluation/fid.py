"""Distribution metrics over image features: FID, KID and IS, computed by torch-fidelity.

The numbers come from torch-fidelity (https://github.com/toshas/torch-fidelity), the reference implementation
that torchmetrics also builds on: `fid_statistics_to_metric` (Fréchet distance of the two feature Gaussians,
Heusel et al. 2017), `kid_features_to_metric` (unbiased MMD^2 with the cubic kernel (x.y/d + 1)^3, averaged
over random subsets, Bińkowski et al. 2018) and `isc_features_to_metric` (exp E[KL(p(y|x) || p(y))] over
splits, Salimans et al. 2016). This module only feeds them features, once per image.

Features (`FeatureExtractor`): any `nn.Module` that maps uint8 images (n, 3, H, W) to features (n, d), or to
(features (n, d), class logits (n, c)) when IS is wanted too. `load_feature_extractor` builds the two named ones:

* ``inception``: torch-fidelity's `FeatureExtractorInceptionV3` (the TF FID Inception ported bit-exactly): the
  2048-d pool features for FID/KID and the 1008 unbiased logits for IS. Its weights file is never downloaded:
  it is `--inception-weights PATH` or one of `INCEPTION_WEIGHTS_FILES` in the torch hub cache
  (`$TORCH_HOME/hub/checkpoints/`, `~/.cache/torch/hub/checkpoints/`); absent, a one-line UserError says where
  to put it. We always hand torch-fidelity a path, so its download branch (path None) is never reached.
* ``random-for-tests``: a small seeded random conv net, only when asked for by that name. Its results are
  labelled as not FID/KID/IS.

Sizes: every image of both sets must have the same size (`DistributionMetrics.add` checks it). Callers
centre-crop real images to the generator's resolution first (`image_policy.center_crop`: shorter side to
the size, bicubic, centre cut, as the LlamaGen/ADM reference evaluates ImageNet at 256); the Inception
network then resizes every image to 299x299 itself with TF1-compatible bilinear interpolation
(torch-fidelity's convention, matching the TF reference code), so generated and real images take the same path.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from unicode_mllm.errors import UserError

logger = logging.getLogger(__name__)

# The FID Inception weights (TF's 2015-12-05 graph): pytorch-fid's file name, then torch-fidelity's.
INCEPTION_WEIGHTS_FILES = ("pt_inception-2015-12-05-6726825d.pth", "weights-inception-2015-12-05-6726825d.pth")
INCEPTION = "inception"
RANDOM_FOR_TESTS = "random-for-tests"
FEATURE_EXTRACTORS = (INCEPTION, RANDOM_FOR_TESTS)
# torch-fidelity's defaults (torch_fidelity/defaults.py): KID 100 subsets of 1000, IS 10 splits, seed 2020.
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
IS_SPLITS = 10
RNG_SEED = 2020

Images = Sequence[Image.Image] | torch.Tensor


# ----------------------------------------------------------------------------------------- extractors


@dataclass(frozen=True)
class FeatureExtractor:
    """A feature network and what the results say about it.

    module: uint8 (n, 3, H, W) -> features (n, d), or (features (n, d), logits (n, c)) to measure IS too.
    name: what reports call it ("inception", "random-for-tests", or a caller's own name).
    weights: the weights file it was loaded from, if any.
    standard: True only for the FID Inception with its weights: numbers comparable with papers.
    """

    module: nn.Module
    name: str
    weights: Path | None = None
    standard: bool = False

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "weights": str(self.weights) if self.weights else None,
            "standard": self.standard,
            "note": None if self.standard else "not the FID Inception network: values are not FID/KID/IS",
        }

    @property
    def note(self) -> str:
        """What reports say was used, e.g. "inception (/root/.cache/torch/hub/checkpoints/pt_inception-...pth)"."""
        if self.standard:
            return f"{self.name} ({self.weights})"
        kind = "a RANDOM network" if self.name == RANDOM_FOR_TESTS else "not the FID Inception"
        return f"{self.name} ({kind}: not FID)"


def inception_search_dirs() -> list[Path]:
    """Where the Inception weights are looked for: the torch hub cache (honours $TORCH_HOME), then ~/.cache."""
    dirs = [Path(torch.hub.get_dir()) / "checkpoints", Path("~/.cache/torch/hub/checkpoints").expanduser()]
    return list(dict.fromkeys(dirs))


def find_inception_weights(given: str | os.PathLike | None = None) -> Path:
    """The FID Inception weights file: `given` (must exist), else the first of `INCEPTION_WEIGHTS_FILES` found in
    `inception_search_dirs()`. Raises a one-line UserError naming the file, the places looked in and the fix."""
    if given is not None:
        path = Path(given).expanduser()
        if not path.is_file():
            raise UserError(
                f"--inception-weights {path} not found; pass the FID Inception weights file "
                f"{INCEPTION_WEIGHTS_FILES[0]} (nothing is downloaded)"
            )
        return path
    dirs = inception_search_dirs()
    for folder in dirs:
        for name in INCEPTION_WEIGHTS_FILES:
            if (folder / name).is_file():
                return folder / name
    raise UserError(
        f"FID Inception weights {INCEPTION_WEIGHTS_FILES[0]} (or torch-fidelity's {INCEPTION_WEIGHTS_FILES[1]}) "
        f"not found in {', '.join(str(d) for d in dirs)}; copy it into {dirs[0]} or pass --inception-weights PATH "
        "(nothing is downloaded)"
    )


def _read_inception_state(path: Path) -> dict[str, torch.Tensor]:
    """The state dict in `path`, read as plain tensors (weights_only: no code in the file runs)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exn:
        raise UserError(
            f"{path} is not a readable weights file ({type(exn).__name__}); pass the FID Inception weights "
            f"{INCEPTION_WEIGHTS_FILES[0]}"
        ) from None
    fc = state.get("fc.weight") if isinstance(state, dict) else None
    if (
        not isinstance(fc, torch.Tensor)
        or tuple(fc.shape) != (1008, 2048)
        or "Mixed_7c.branch_pool.conv.weight" not in state
    ):
        raise UserError(
            f"{path} is not the FID Inception weights (no 1008-class fc, no Mixed_7c); "
            f"pass {INCEPTION_WEIGHTS_FILES[0]}"
        )
    return state


class InceptionFeatures(nn.Module):
    """torch-fidelity's FID InceptionV3: uint8 (n, 3, H, W) -> (pool features (n, 2048), unbiased logits (n, 1008)).

    Resizes to 299x299 internally (TF1-compatible bilinear). Built only from a local weights file.
    """

    def __init__(self, weights: Path) -> None:
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        _read_inception_state(weights)  # checked as plain tensors before torch-fidelity loads it
        try:
            # A path, never None: torch-fidelity downloads only when the path is None.
            self.net = FeatureExtractorInceptionV3(
                "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=str(weights)
            )
        except RuntimeError as exn:  # load_state_dict: missing/unexpected keys, wrong shapes
            first = str(exn).splitlines()[0] if str(exn) else type(exn).__name__
            raise UserError(
                f"{weights} does not fit the FID Inception network ({first}); pass the right file"
            ) from None
        self.net.eval().requires_grad_(False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pool, logits = self.net(x)
        return pool, logits


class RandomFeatures(nn.Module):
    """A small conv net with seeded random weights: uint8 (n, 3, H, W) -> (features (n, 32), logits (n, 10)).

    For tests only (no weights file exists for it); its values are not FID/KID/IS.
    """

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
            torch.manual_seed(seed)
            self.body = nn.Sequential(
                nn.Conv2d(3, 16, 3, stride=2, padding=1),
                nn.ReLU(),
                nn.Conv2d(16, 32, 3, stride=2, padding=1),
                nn.ReLU(),
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(),
            )
            self.head = nn.Linear(32, 10)
        self.eval().requires_grad_(False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.float() / 127.5 - 1.0  # (n, 3, H, W) in [-1, 1]
        x = nn.functional.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False, antialias=True)
        features = self.body(x)  # (n, 32)
        return features, self.head(features)  # (n, 32), (n, 10)


def load_feature_extractor(
    name: str = INCEPTION, weights: str | os.PathLike | None = None, device: str | torch.device = "cpu"
) -> FeatureExtractor:
    """`inception` (weights: `weights` or the torch hub cache, see `find_inception_weights`) or `random-for-tests`.

    Raises UserError for another name, a missing or wrong weights file, or weights given to `random-for-tests`.
    """
    if name == INCEPTION:
        path = find_inception_weights(weights)
        return FeatureExtractor(InceptionFeatures(path).to(device), INCEPTION, path, standard=True)
    if name == RANDOM_FOR_TESTS:
        if weights is not None:
            raise UserError(f"--inception-weights is for the inception extractor, not {RANDOM_FOR_TESTS}; drop one")
        logger.warning("feature extractor %s: a random network, its values are not FID/KID/IS", RANDOM_FOR_TESTS)
        return FeatureExtractor(RandomFeatures().to(device), RANDOM_FOR_TESTS)
    raise UserError(f"--feature-extractor {name!r} is unknown; choose {INCEPTION} (or {RANDOM_FOR_TESTS} for tests)")


def try_feature_extractor(
    name: str = INCEPTION, weights: str | os.PathLike | None = None, device: str | torch.device = "cpu"
) -> tuple[FeatureExtractor | None, str]:
    """(extractor or None, a note): for metrics that are optional (rFID, FID beside the shapes score), a missing
    weights file gives (None, "not measured: <reason>") instead of an error, like LPIPS."""
    try:
        extractor = load_feature_extractor(name, weights, device)
    except UserError as exn:
        return None, f"not measured: {exn}"
    return extractor, extractor.note


# ----------------------------------------------------------------------------------------- metrics


def to_uint8(images: Images) -> torch.Tensor:
    """RGB PIL images, a uint8 tensor (n, 3, H, W) or a float tensor (n, 3, H, W) in [-1, 1] -> uint8 (n, 3, H, W).

    Floats are rounded like `image_io.tensor_to_pil`, so a tensor and its saved PNG give the same features.
    """
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (n, 3, H, W), got shape {tuple(images.shape)}")
        if images.dtype == torch.uint8:
            return images
        return ((images.detach().float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    arrays = [np.asarray(image.convert("RGB"), dtype=np.uint8) for image in images]  # each (H, W, 3)
    sizes = {a.shape for a in arrays}
    if len(sizes) > 1:
        raise ValueError(f"images of one batch must share a size, got {sorted(sizes)}")
    if not arrays:
        return torch.zeros((0, 3, 0, 0), dtype=torch.uint8)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()  # (n, 3, H, W)


@dataclass
class DistributionScores:
    """FID and KID of the generated set against the real one, and IS of the generated set (None without logits)."""

    num_real: int
    num_fake: int
    image_size: tuple[int, int]  # (h, w) of every compared image
    fid: float
    kid_mean: float
    kid_std: float
    kid_subsets: int
    kid_subset_size: int
    inception_score: float | None
    inception_score_std: float | None
    is_splits: int | None
    features: dict[str, Any]  # FeatureExtractor.describe() and the feature dimension
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_real": self.num_real,
            "num_fake": self.num_fake,
            "image_size": list(self.image_size),
            "fid": self.fid,
            "kid": {
                "mean": self.kid_mean,
                "std": self.kid_std,
                "subsets": self.kid_subsets,
                "subset_size": self.kid_subset_size,
            },
            "inception_score": {
                "mean": self.inception_score,
                "std": self.inception_score_std,
                "splits": self.is_splits,
            },
            "features": self.features,
            "notes": list(self.notes),
        }

    @property
    def label(self) -> str:
        """'' for the FID Inception; a warning prefix for any other network."""
        return "" if self.features.get("standard") else f"[{self.features['name']} features: not FID] "

    def summary_line(self, fid_name: str = "FID") -> str:
        text = (
            f"{self.label}{fid_name} {self.fid:.3f}, KID {self.kid_mean:.5f} ± {self.kid_std:.5f} "
            f"({self.kid_subsets} subsets of {self.kid_subset_size})"
        )
        if self.inception_score is not None:
            text += f", IS {self.inception_score:.3f} ± {self.inception_score_std:.3f} ({self.is_splits} splits)"
        h, w = self.image_size
        return text + f"; {self.num_fake} vs {self.num_real} images at {w}x{h}"

    def markdown_rows(self, fid_name: str = "FID") -> list[tuple[str, str]]:
        """(metric, value) rows of the results table."""
        rows = [
            (fid_name, f"{self.fid:.3f}"),
            ("KID", f"{self.kid_mean:.5f} ± {self.kid_std:.5f} ({self.kid_subsets} × {self.kid_subset_size})"),
        ]
        if self.inception_score is not None:
            rows.append(
                ("IS", f"{self.inception_score:.3f} ± {self.inception_score_std:.3f} ({self.is_splits} splits)")
            )
        h, w = self.image_size
        weights = self.features.get("weights") or "none"
        rows += [
            ("images (generated / real)", f"{self.num_fake} / {self.num_real}"),
            ("resolution", f"{w}x{h}"),
            ("feature extractor", f"{self.features['name']} (weights: {weights})"),
        ]
        return rows + [("note", note) for note in self.notes]


class DistributionMetrics:
    """Collects features of real and generated images, then computes FID, KID and IS with torch-fidelity.

    Usage: `m = DistributionMetrics(load_feature_extractor())`, `m.add(real_images, real=True)`,
    `m.add(generated, real=False)` (any number of times, any batch size), `m.compute()`. Images go through
    the network in chunks of `batch_size`; only their features are kept ((n, d) float32 on the CPU).
    """

    def __init__(self, extractor: FeatureExtractor, *, device: str | torch.device = "cpu", batch_size: int = 32):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.extractor = extractor
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.module = extractor.module.to(self.device).eval()
        self.image_size: tuple[int, int] | None = None  # (h, w) of the first image added
        self._features: dict[bool, list[torch.Tensor]] = {True: [], False: []}  # real? -> [(b, d)]
        self._logits: list[torch.Tensor] = []  # generated images only: [(b, c)]

    @property
    def num_real(self) -> int:
        return sum(len(f) for f in self._features[True])

    @property
    def num_fake(self) -> int:
        return sum(len(f) for f in self._features[False])

    @torch.no_grad()
    def add(self, images: Images, *, real: bool) -> None:
        """Add a batch of real or generated images (see `to_uint8` for the accepted forms).

        Raises ValueError when their size differs from the images added before: bring both sets to one size
        first (real images: centre-crop to the generator's resolution, see the module docstring).
        """
        x = to_uint8(images)  # (n, 3, H, W) uint8
        if len(x) == 0:
            return
        size = (int(x.shape[2]), int(x.shape[3]))
        if self.image_size is None:
            self.image_size = size
        elif size != self.image_size:
            raise ValueError(
                f"images of {size[1]}x{size[0]} after images of {self.image_size[1]}x{self.image_size[0]}: "
                "FID compares images of one size; centre-crop the real images to the generator's resolution first"
            )
        for start in range(0, len(x), self.batch_size):
            out = self.module(x[start : start + self.batch_size].to(self.device))
            features, logits = out if isinstance(out, tuple) else (out, None)
            if features.ndim != 2 or len(features) != len(x[start : start + self.batch_size]):
                raise ValueError(f"the feature extractor must return (n, d) features, got {tuple(features.shape)}")
            self._features[real].append(_keep(features))
            if not real and logits is not None:
                self._logits.append(_keep(logits))

    def compute(
        self,
        *,
        kid_subsets: int = KID_SUBSETS,
        kid_subset_size: int = KID_SUBSET_SIZE,
        is_splits: int = IS_SPLITS,
        seed: int = RNG_SEED,
    ) -> DistributionScores:
        """FID and KID (generated vs real) and IS (generated) of everything added so far.

        KID subsets hold min(kid_subset_size, n_real, n_fake) images (torch-fidelity refuses larger ones); IS uses
        min(is_splits, n_fake) splits. Raises UserError with fewer than 2 images in either set.
        """
        from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
        from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric
        from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

        n_real, n_fake = self.num_real, self.num_fake
        if n_real < 2 or n_fake < 2:
            raise UserError(f"FID needs at least 2 real and 2 generated images, got {n_real} and {n_fake}; use more")
        real = torch.cat(self._features[True])  # (n_real, d)
        fake = torch.cat(self._features[False])  # (n_fake, d)
        fid = fid_statistics_to_metric(
            fid_features_to_statistics(fake), fid_features_to_statistics(real), verbose=False
        )[KEY_METRIC_FID]
        subset_size = min(kid_subset_size, n_real, n_fake)
        kid = kid_features_to_metric(
            fake, real, kid_subsets=kid_subsets, kid_subset_size=subset_size, rng_seed=seed, verbose=False
        )
        inception_score = inception_std = splits = None
        if self._logits:
            logits = torch.cat(self._logits)  # (n_fake, c)
            splits = min(is_splits, n_fake)
            isc = isc_features_to_metric(logits, splits=splits, shuffle=True, rng_seed=seed)
            inception_score, inception_std = isc[KEY_METRIC_ISC_MEAN], isc[KEY_METRIC_ISC_STD]
        dim = int(real.shape[1])
        notes = []
        if not self.extractor.standard:
            notes.append(f"{self.extractor.name} features (explicitly requested): these are not FID/KID/IS values")
        if min(n_real, n_fake) <= dim:
            notes.append(
                f"{min(n_real, n_fake)} images for {dim}-d features: FID is biased upward at this count; "
                "papers use 50,000 (ImageNet) or 30,000 (COCO) images"
            )
        assert self.image_size is not None
        return DistributionScores(
            num_real=n_real,
            num_fake=n_fake,
            image_size=self.image_size,
            fid=float(fid),
            kid_mean=float(kid[KEY_METRIC_KID_MEAN]),
            kid_std=float(kid[KEY_METRIC_KID_STD]),
            kid_subsets=kid_subsets,
            kid_subset_size=subset_size,
            inception_score=inception_score,
            inception_score_std=inception_std,
            is_splits=splits,
            features={**self.extractor.describe(), "dim": dim, "library": _library_version()},
            notes=notes,
        )


def _keep(values: torch.Tensor) -> torch.Tensor:
    """Network outputs as kept on the CPU: float64 stays float64 (exact golden tests), anything else float32."""
    values = values.detach().cpu()
    return values if values.dtype == torch.float64 else values.float()


def _library_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"torch-fidelity {version('torch-fidelity')}"
    except PackageNotFoundError:
        return "torch-fidelity"
