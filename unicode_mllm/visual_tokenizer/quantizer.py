"""The quantizer adapter: stacked (residual) quantization over one shared, LLM-width codebook.

This is the only module of the project that imports `vector_quantize_pytorch` (pinned, see
`PINNED_VQ_VERSION`). Everything that depends on the library's buffer layout or defaults lives
here, so that a faster quantizer with the same buffers can replace it later. The verified library
facts this file relies on are the design decisions below (each passed explicitly in
`_build_library_rvq`) and are re-checked by tests/test_quantizer.py.

Spaces and units (einops letters: b batch, n tokens, c channels, d depth, v codes):

- feature space: the encoder's z channels (`in_channels`);
- LLM space: `llm_width` channels, where the codebook rows live (for UniCode they are rows of the
  LLM's input-embedding matrix C_L);
- "LLM units": LLM space with features rescaled so that their mean L2 norm equals the codebook's
  reference norm `target_norm` (see `NormMatchedProjection`).

Design decisions (each is tested):

- Norm matching (`norm_matching="running_ratio"`): LLaMA input embeddings have L2 norm about 1 while
  encoder features have any norm. The projection keeps a non-learned running mean of ||proj_in(x)||
  and multiplies by `target_norm / running_norm` before quantizing, and divides again before
  `proj_out`. Distances, EMA statistics, the codebook and the blend toward C_L are therefore all in
  the units of C_L. The scale is a buffer (no gradient), so it does not change the straight-through
  gradient. This plays the role of the reference code's fixed feature norm of 30 and its
  LLM-norm-relative distance (zhengsipeng/UniCode-ECCV24, quantizer.py, `EMAVectorQuantizer`).
- `decay` is the per-training-step decay of the EMA statistics. With a shared codebook the library
  decays the statistics once per quantizer layer (and the owner may call the quantizer more than
  once per step, as `hq` does), so the library receives
  `decay ** (1 / (depth * ema_updates_per_step))`; the statistics then decay by exactly `decay` per
  step (the codebook itself is recomputed once per call).
- One straight-through wrap, in LLM space, around the whole stack: the library's per-layer
  straight-through estimator would hand the encoder `depth` times the gradient (measured 4.0 for
  depth 4 on 1.31.0). The wrap is written `q + (x - x.detach())`, which has the gradient of
  `x + (q - x).detach()` and the value of `q` exactly, so an eval forward equals `decode_codes`
  bit for bit.
- The commitment loss is `commitment_weight * mean_d E_n ||x - sum_{k<=d} q_k||^2 / target_norm^2`:
  RQ-VAE's mean over depth of the partial-sum errors, expressed relative to the codebook's norm so
  that the weight (0.25) means the same for any LLM width and any feature scale. It is the library's
  per-layer loss times `llm_width / target_norm**2`; where the library cannot provide it (frozen
  codebook, eval) the adapter computes the same quantity itself.
- Freezing (`codebook_mode="frozen"`, the `freeze_codebook` flag, or eval mode) runs the library in
  eval mode: in training mode a shared-codebook `ResidualVQ` recomputes `embed` from the statistics
  at the end of every forward even with `freeze_codebook=True`, so the codebook would not stay
  bit-identical.
- Precision: the adapter (projections included) runs in fp32 with autocast disabled; its output is
  cast back to the input dtype. Never `.to(torch.bfloat16)` a module holding it: use
  `cast_except_quantizer` or autocast.
- Distributed: pass `sync_codebook` as an explicit bool computed after the process group exists
  (`should_sync_codebook()`); the library's own default resolves through a cached check that can
  keep a wrong first answer. Wrap the owner with DDP `broadcast_buffers=False`.
- Backends (`QuantizerSettings.backend`): "library" (default) is the pinned `ResidualVQ`;
  "native" is `native_quantizer.NativeResidualQuantizer`, the project's own quantizer with the same
  buffers and EMA meaning, which searches in row chunks with argmin and accumulates the EMA sums
  with `index_add_` (no dense (N, v) one-hot, no N x v x c matmuls for the statistics; see
  native_quantizer.py's docstring and BENCHMARKS.md). Both sit at `self.rvq` and
  share one calling convention, `self.rvq(x_llm) -> (quantized, codes (b, n, d), losses (d,))`
  (EMA step in training mode, plain search in eval mode), and one codebook state
  (`SharedCodebookState`: embed, embed_avg, cluster_size, initted, eps), so everything else in this
  adapter (install, blend, freezing, commitment loss, norm matching, the one straight-through wrap)
  is shared. State-dict keys differ (`rvq.layers.0._codebook.embed` vs `rvq.embed`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from vector_quantize_pytorch import ResidualVQ
from vector_quantize_pytorch.vector_quantize_pytorch import laplace_smoothing

from unicode_mllm.errors import ConfigError, UserError
from unicode_mllm.quantizer_settings import (  # the options' one declaration; re-exported here
    CODEBOOK_MODES,
    NORM_MATCHINGS,
    QUANTIZER_BACKENDS,
    CodebookMode,
    NormMatching,
    QuantizerBackend,
    QuantizerSettings,
)
from unicode_mllm.visual_tokenizer.native_quantizer import NativeResidualQuantizer, SharedCodebookState

logger = logging.getLogger(__name__)

PINNED_VQ_VERSION = "1.31.0"  # the library facts tests/test_quantizer.py checks were verified on this version only

try:
    _INSTALLED_VQ_VERSION = metadata.version("vector-quantize-pytorch")
except metadata.PackageNotFoundError:  # pragma: no cover - an unusual install (source tree on the path)
    _INSTALLED_VQ_VERSION = "unknown"
if _INSTALLED_VQ_VERSION != PINNED_VQ_VERSION:  # pragma: no cover - only on a mismatched install
    logger.warning(
        "vector-quantize-pytorch %s is installed but the quantizer adapter was verified on %s; "
        "run tests/test_quantizer.py before trusting results",
        _INSTALLED_VQ_VERSION,
        PINNED_VQ_VERSION,
    )


def installed_vq_version() -> str:
    """The installed version of vector-quantize-pytorch (compare with `PINNED_VQ_VERSION`)."""
    return _INSTALLED_VQ_VERSION


def should_sync_codebook() -> bool:
    """Whether EMA statistics must be all-reduced: call after the process group is set up.

    Not cached, unlike the library's own `is_distributed()` (which keeps its first answer).
    """
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@dataclass
class QuantizerOutput:
    """What `StackedQuantizer.forward` returns.

    z_q: (b, n, c) in feature space, input dtype, straight-through to the input.
    codes: (b, n, d) int64 codebook indices (rows of the visual codebook, not LLM token ids).
    commit_loss: () fp32, already weighted.
    """

    z_q: Tensor
    codes: Tensor
    commit_loss: Tensor


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    was_training = module.training
    module.train(False)
    try:
        yield
    finally:
        module.train(was_training)


class NormMatchedProjection(nn.Module):
    """proj_in (c -> llm_width) and proj_out (llm_width -> c) with non-learned norm matching.

    `to_llm` maps (b, n, c) features to LLM units: proj_in(x) * target_norm / running_norm, where
    running_norm is an EMA (momentum `norm_decay`, updated in training mode only) of the mean
    ||proj_in(x)|| over tokens. Before the first training batch the scale is 1. `from_llm` undoes
    the scale and applies proj_out. With `norm_matching="none"` the scale is always 1.
    """

    def __init__(
        self,
        in_channels: int,
        llm_width: int,
        *,
        norm_matching: NormMatching = "running_ratio",
        norm_decay: float = 0.99,
        sync: bool = False,
    ) -> None:
        super().__init__()  # norm_matching is one of NORM_MATCHINGS: QuantizerSettings.validate checked it
        self.in_channels = in_channels
        self.llm_width = llm_width
        self.norm_matching = norm_matching
        self.norm_decay = norm_decay
        self.sync = sync
        self.proj_in = nn.Linear(in_channels, llm_width)
        self.proj_out = nn.Linear(llm_width, in_channels)
        # 0 means "not measured yet": the scale is then 1.
        self.register_buffer("feature_norm", torch.zeros(()))
        # "moments": per-channel running mean/variance of proj_in outputs, mapped onto the codebook's
        # per-channel mean/std (set by `set_target_moments` at install). A freshly initialised encoder
        # emits features that share one dominant direction; matching only the norm then sends them
        # all to the same few codes of a fixed language codebook (measured: 5 of 435 codes in use).
        self.register_buffer("feature_mean", torch.zeros(llm_width))
        self.register_buffer("feature_var", torch.ones(llm_width))
        self.register_buffer("target_mean", torch.zeros(llm_width))
        self.register_buffer("target_std", torch.ones(llm_width))
        # Set by the trainer once the codebook is fixed (ramp tail): a stationary feature -> LLM map
        # keeps the decoder's input distribution from drifting under it.
        self.freeze_stats = False

    @classmethod
    def from_settings(
        cls, in_channels: int, llm_width: int, settings: QuantizerSettings, *, sync: bool
    ) -> NormMatchedProjection:
        """The projection `settings` choose (norm matching and its momentum)."""
        return cls(
            in_channels,
            llm_width,
            norm_matching=settings.norm_matching,
            norm_decay=settings.feature_norm_decay,
            sync=sync,
        )

    def scale(self, target_norm: Tensor) -> Tensor:
        """() fp32: the factor from projected features to LLM units."""
        if self.norm_matching == "none":
            return torch.ones((), device=self.feature_norm.device)
        measured = self.feature_norm > 0
        return torch.where(measured, target_norm / self.feature_norm.clamp_min(1e-12), torch.ones_like(target_norm))

    @torch.no_grad()
    def _update_feature_norm(self, x_proj: Tensor) -> None:
        flat = x_proj.detach().reshape(-1, x_proj.shape[-1])
        stats = torch.cat([flat.norm(dim=-1).mean()[None], flat.mean(0), flat.pow(2).mean(0)])
        if self.sync and should_sync_codebook():
            dist.all_reduce(stats)
            stats /= dist.get_world_size()
        batch_norm, mean, second = stats[0], stats[1 : 1 + flat.shape[1]], stats[1 + flat.shape[1] :]
        measured = self.feature_norm > 0
        self.feature_norm.copy_(
            torch.where(measured, torch.lerp(batch_norm, self.feature_norm, self.norm_decay), batch_norm)
        )
        var = (second - mean.pow(2)).clamp_min(0.0)
        self.feature_mean.copy_(torch.where(measured, torch.lerp(mean, self.feature_mean, self.norm_decay), mean))
        self.feature_var.copy_(torch.where(measured, torch.lerp(var, self.feature_var, self.norm_decay), var))

    @torch.no_grad()
    def set_target_moments(self, codebook: Tensor) -> None:
        """Per-channel mean and std of the (v, llm_width) codebook that "moments" matching maps onto."""
        self.target_mean.copy_(codebook.float().mean(0))
        self.target_std.copy_(codebook.float().std(0).clamp_min(1e-6))

    def _feature_std(self) -> Tensor:
        return (self.feature_var + 1e-6).sqrt()

    def normalize(self, x_proj: Tensor, target_norm: Tensor) -> Tensor:
        """Projected features -> LLM units (no statistics update)."""
        if self.norm_matching == "moments":
            if float(self.feature_norm) <= 0:
                return x_proj
            return (x_proj - self.feature_mean) / self._feature_std() * self.target_std + self.target_mean
        return x_proj * self.scale(target_norm)

    def to_llm(self, x: Tensor, target_norm: Tensor) -> Tensor:
        """(b, n, c) fp32 features -> (b, n, llm_width) in LLM units."""
        x_proj = self.proj_in(x)
        if self.norm_matching == "none":
            return x_proj
        if self.training and not self.freeze_stats:
            self._update_feature_norm(x_proj)
        return self.normalize(x_proj, target_norm)

    def from_llm(self, q_llm: Tensor, target_norm: Tensor) -> Tensor:
        """(b, n, llm_width) in LLM units -> (b, n, c) features (the inverse map, then proj_out)."""
        if self.norm_matching == "moments":
            if float(self.feature_norm) <= 0:
                return self.proj_out(q_llm)
            return self.proj_out((q_llm - self.target_mean) / self.target_std * self._feature_std() + self.feature_mean)
        return self.proj_out(q_llm / self.scale(target_norm))


class StackedQuantizer(nn.Module):
    """`depth` residual quantizers sharing one (num_codes, llm_width) codebook, behind projections.

    Wraps `vector_quantize_pytorch.ResidualVQ` with every behaviour-changing option passed
    explicitly (`settings.backend="library"`, the default) or the project's own
    `NativeResidualQuantizer` with the same buffers (`"native"`). The codebook is fp32 and lives in
    LLM units (see the module docstring).

    Codebook modes:
        language_driven: EMA updates, plus `blend_toward(C_L, lam)` from the trainer.
        frozen: the codebook is C_L (`install`) and never changes; forward never writes it.
        separate: an own codebook (`init_codebook_randomly` / `init_codebook_from_features`), EMA,
            never blended (its codes are new vocabulary, not LLM tokens).
        dual: EMA updates; the trainer copies `export_codebook()` into the LLM's table and
            `install`s the LLM's table back, periodically.

    Args:
        in_channels: feature channels c of the tokens given to `forward`.
        llm_width: width of the codebook rows (the LLM's hidden size).
        num_codes: codebook size v.
        depth: number of residual layers d (codes per token).
        settings: decay, commitment weight, norm matching, mode (validated here).
        ema_updates_per_step: training forwards the owner makes per optimisation step; the decay is
            split over them (`hq` quantizes twice per step).
        sync_codebook: all-reduce the EMA statistics and the running feature norm (DDP).
    """

    def __init__(
        self,
        *,
        in_channels: int,
        llm_width: int,
        num_codes: int,
        depth: int,
        settings: QuantizerSettings | None = None,
        ema_updates_per_step: int = 1,
        sync_codebook: bool = False,
    ) -> None:
        super().__init__()
        settings = settings if settings is not None else QuantizerSettings()
        settings.validate()
        for name, value in (("in_channels", in_channels), ("llm_width", llm_width), ("depth", depth)):
            if value < 1:
                raise ConfigError(f"quantizer {name} must be >= 1; got {value}")
        if num_codes < 2:
            raise ConfigError(f"quantizer num_codes must be >= 2; got {num_codes}")
        if ema_updates_per_step < 1:
            raise ConfigError(f"ema_updates_per_step must be >= 1; got {ema_updates_per_step}")
        if not isinstance(sync_codebook, bool):
            raise ConfigError(f"sync_codebook must be an explicit bool; got {sync_codebook!r}")
        self.settings = settings
        self.codebook_mode: CodebookMode = settings.mode
        self.in_channels = in_channels
        self.llm_width = llm_width
        self.num_codes = num_codes
        self.depth = depth
        self.commitment_weight = settings.commitment_weight
        self.decay_per_step = settings.decay
        # Shared statistics are decayed once per layer and per call (the `decay` note above): split the decay.
        self.decay_per_layer = settings.decay ** (1.0 / (depth * ema_updates_per_step))
        # Settable by the trainer (e.g. the reference code's tail epochs with a fixed codebook).
        self.freeze_codebook = settings.mode == "frozen"

        self.projection = NormMatchedProjection.from_settings(in_channels, llm_width, settings, sync=sync_codebook)
        self.backend: QuantizerBackend = settings.backend
        builders = {"library": self._build_library_rvq, "native": self._build_native_rvq}
        self.rvq: nn.Module = builders[settings.backend](settings, sync_codebook)
        self.register_buffer("target_norm", torch.tensor(float(settings.target_norm)))
        # Other projections onto this codebook (the `hq` bottom level); a plain list, not submodules.
        self.extra_projections: list[NormMatchedProjection] = []

    def _backend_args(self, settings: QuantizerSettings, sync_codebook: bool) -> dict[str, Any]:
        """What both backends are given alike: codebook width and size, the decay split (per layer and call), eps,
        the commitment weight and the DDP sync."""
        return {
            "dim": self.llm_width,
            "codebook_size": self.num_codes,
            "decay": self.decay_per_layer,
            "eps": settings.eps,
            "commitment_weight": settings.commitment_weight,
            "sync_codebook": sync_codebook,
        }

    def _build_library_rvq(self, settings: QuantizerSettings, sync_codebook: bool) -> nn.Module:
        return ResidualVQ(
            **self._backend_args(settings, sync_codebook),
            codebook_dim=self.llm_width,  # the adapter owns the projections (gradient must reach proj_out)
            num_quantizers=self.depth,
            shared_codebook=True,
            rotation_trick=False,  # library default is on for dim > 1
            straight_through=False,
            threshold_ema_dead_code=0,  # expiry would overwrite word embeddings with features
            kmeans_init=False,
            quantize_dropout=False,
            learnable_codebook=False,
            ema_update=True,
            use_cosine_sim=False,
            stochastic_sample_codes=False,
            orthogonal_reg_weight=0.0,
            codebook_diversity_loss_weight=0.0,
            affine_param=False,
            heads=1,
            quant_grad_frac=0.0,
            beam_size=None,
            implicit_neural_codebook=False,
            diveq=False,
            accept_image_fmap=False,  # broken for ResidualVQ in 1.31.0; the adapter reshapes itself
            channel_last=True,
        )

    def _build_native_rvq(self, settings: QuantizerSettings, sync_codebook: bool) -> nn.Module:
        # The library backend's arguments plus the search's chunking and precision; see native_quantizer.py.
        return NativeResidualQuantizer(
            **self._backend_args(settings, sync_codebook),
            depth=self.depth,
            chunk_size=settings.native_chunk_size,
            search_dim=settings.search_dim,
            search_dtype=settings.search_dtype,
            code_chunk_size=settings.native_code_chunk_size,
        )

    # ----- codebook state ---------------------------------------------------------------------

    @property
    def _codebook_module(self) -> SharedCodebookState:
        if self.backend == "native":
            return self.rvq  # the native quantizer holds its buffers itself
        # With shared_codebook=True every library layer points at this one object.
        return self.rvq.layers[0]._codebook

    @property
    def codebook(self) -> Tensor:
        """(v, llm_width) fp32, a read-only view of the codebook in LLM units: write it only through
        `install` / `blend_toward`, which keep the EMA statistics consistent."""
        return self._codebook_module.embed[0]

    def export_codebook(self) -> Tensor:
        """(v, llm_width) fp32 copy of the codebook (the `dual` mode copies it into the LLM table)."""
        return self.codebook.detach().clone()

    def codebook_buffers(self) -> dict[str, Tensor]:
        """The tensors that hold codebook state (for precision and freezing checks)."""
        cb = self._codebook_module
        return {
            "embed": cb.embed,
            "embed_avg": cb.embed_avg,
            "cluster_size": cb.cluster_size,
            "target_norm": self.target_norm,
            "feature_norm": self.projection.feature_norm,
        }

    def _check_codebook_shape(self, codebook: Tensor, what: str) -> None:
        expected = (self.num_codes, self.llm_width)
        if tuple(codebook.shape) != expected:
            raise ConfigError(
                f"{what} has shape {tuple(codebook.shape)} but the quantizer was built for "
                f"(num_codes, llm_width) = {expected}; build it from the language codebook's sizes"
            )

    @torch.no_grad()
    def _write_codebook(self, new: Tensor) -> None:
        # The library's EMA recipe (its `Codebook`): `embed` is recomputed from embed_avg / smoothed(cluster_size)
        # at every EMA step, so write embed_avg consistently or the write is undone one step later.
        cb = self._codebook_module
        new = new.to(device=cb.embed.device, dtype=cb.embed.dtype)
        counts = laplace_smoothing(cb.cluster_size, self.num_codes, cb.eps) * cb.cluster_size.sum(
            dim=-1, keepdim=True
        )  # (1, v)
        cb.embed.copy_(rearrange(new, "v c -> 1 v c"))
        cb.embed_avg.copy_(rearrange(new, "v c -> 1 v c") * rearrange(counts, "1 v -> 1 v 1"))

    @torch.no_grad()
    def install(self, codebook: Tensor, *, set_target_norm: bool = True) -> None:
        """Write `codebook` (v, llm_width) as the visual codebook (lam = 0), EMA state included.

        With `set_target_norm` (default) the norm-matching reference becomes its mean row norm. With
        `search_dim` the search subspace becomes its leading principal directions.
        Call on every rank. Raises ConfigError on a shape mismatch.
        """
        self._check_codebook_shape(codebook, "the codebook to install")
        codebook = codebook.detach().float()
        self._write_codebook(codebook)
        if self.backend == "native":
            self.rvq.set_search_basis(codebook)  # no-op without search_dim
        if set_target_norm:
            self.target_norm.fill_(float(codebook.norm(dim=-1).mean()))
            for projection in (self.projection, *self.extra_projections):
                projection.set_target_moments(codebook)

    @torch.no_grad()
    def blend_toward(self, language_codebook: Tensor, lam: float) -> None:
        """C <- lam * C + (1 - lam) * C_L, written to `embed` and `embed_avg` together.

        language_codebook: (v, llm_width) C_L. lam in [0, 1] (0 installs C_L, 1 is a no-op).
        Raises ConfigError in the `frozen` and `separate` modes, or for lam outside [0, 1].
        """
        if self.codebook_mode in ("frozen", "separate"):
            raise ConfigError(
                f"codebook_mode={self.codebook_mode!r} never blends toward the language codebook; "
                "use codebook_mode='language_driven' (or set blend.schedule to 'none')"
            )
        if not 0.0 <= lam <= 1.0:
            raise ConfigError(f"blend weight lam must lie in [0, 1]; got {lam}")
        self._check_codebook_shape(language_codebook, "the language codebook")
        target = language_codebook.detach().to(device=self.codebook.device, dtype=torch.float32)
        self._write_codebook(lam * self.codebook + (1.0 - lam) * target)

    @torch.no_grad()
    def relative_distance(self, language_codebook: Tensor) -> float:
        """||C - C_L||_F / ||C_L||_F (0 right after `install(C_L)`)."""
        self._check_codebook_shape(language_codebook, "the language codebook")
        target = language_codebook.detach().to(device=self.codebook.device, dtype=torch.float32)
        return float((self.codebook - target).norm() / target.norm().clamp_min(1e-12))

    @torch.no_grad()
    def init_codebook_randomly(
        self, *, mean_norm: float | None = None, generator: torch.Generator | None = None
    ) -> None:
        """Random codebook (the `separate` mode): Gaussian directions with L2 norm `mean_norm`
        (default: the current `target_norm`), which becomes the norm-matching reference."""
        norm = float(self.target_norm) if mean_norm is None else float(mean_norm)
        if norm <= 0:
            raise ConfigError(f"mean_norm must be positive; got {norm}")
        rows = torch.randn(self.num_codes, self.llm_width, generator=generator)
        self.install(F.normalize(rows, dim=-1) * norm)

    @torch.no_grad()
    def init_codebook_from_features(
        self, x: Tensor, *, kmeans_iters: int = 10, generator: torch.Generator | None = None
    ) -> None:
        """Codebook from k-means on one batch of features (the `separate` mode).

        x: (b, n, c) features. The batch also initialises the running feature norm when unset.
        The centroids are found in LLM units; `target_norm` is kept.
        """
        projection = self.projection
        with torch.autocast(device_type=x.device.type, enabled=False):
            x_proj = projection.proj_in(x.float())
            if projection.norm_matching != "none" and float(projection.feature_norm) <= 0:
                projection._update_feature_norm(x_proj)
            samples = rearrange(projection.normalize(x_proj, self.target_norm), "b n c -> (b n) c")
        num_samples = samples.shape[0]
        if num_samples >= self.num_codes:
            pick = torch.randperm(num_samples, generator=generator)[: self.num_codes]
        else:
            pick = torch.randint(0, num_samples, (self.num_codes,), generator=generator)
        centroids = samples[pick.to(samples.device)].clone()
        # After Lloyd (1982): assign to the nearest centroid, move each used centroid to its mean.
        for _ in range(kmeans_iters):
            assign = torch.cdist(samples, centroids).argmin(dim=-1)  # (N,)
            sums = torch.zeros_like(centroids).index_add_(0, assign, samples)
            counts = torch.bincount(assign, minlength=self.num_codes).to(samples.dtype)
            used = counts > 0
            centroids[used] = sums[used] / counts[used, None]
        self.install(centroids, set_target_norm=False)

    # ----- quantization -----------------------------------------------------------------------

    def freeze_norm_stats(self, frozen: bool) -> None:
        """Stop (or resume) updating the running feature statistics of every projection onto this codebook."""
        for projection in (self.projection, *self.extra_projections):
            projection.freeze_stats = frozen

    def is_frozen(self, freeze_codebook: bool | None = None) -> bool:
        """Whether a forward now leaves the codebook untouched (frozen mode, flag, or eval)."""
        if self.codebook_mode == "frozen" or not self.training:
            return True
        return self.freeze_codebook if freeze_codebook is None else freeze_codebook

    def _commit_scale(self) -> Tensor:
        # Per-element MSE in LLM units -> squared error relative to target_norm^2 (module docstring).
        return self.llm_width / self.target_norm.clamp_min(1e-12) ** 2

    def get_codes_embeddings(self, codes: Tensor) -> Tensor:
        """(..., d) int64 codes -> (..., llm_width) fp32: the sum over depth of codebook rows.

        With the codebook equal to C_L this is the aggregated LLM embedding of a position.
        Raises UserError for codes outside [0, num_codes).
        """
        self._check_codes(codes)
        return self._sum_codes(codes)

    def _sum_codes(self, codes: Tensor) -> Tensor:
        # One fixed summation order, shared by the eval forward and decode_codes (exact round trip).
        codebook = self.codebook.detach()
        out = codebook.new_zeros((*codes.shape[:-1], self.llm_width))
        for k in range(codes.shape[-1]):
            out = out + F.embedding(codes[..., k], codebook)
        return out

    def _check_codes(self, codes: Tensor) -> None:
        if codes.dtype != torch.long:
            raise UserError(f"codes must be int64 (LongTensor); got {codes.dtype}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.num_codes):
            raise UserError(
                f"codes must lie in [0, {self.num_codes}); got values in [{int(codes.min())}, {int(codes.max())}]"
            )

    def _gathered_commit_loss(self, x_llm: Tensor, codes: Tensor) -> Tensor:
        # The library's per-layer loss, mse(r_d, q_d) with r_d - q_d = x - sum_{k<=d} q_k.
        codebook = self.codebook.detach()
        partial = torch.zeros_like(x_llm)
        losses = []
        for k in range(codes.shape[-1]):
            partial = partial + F.embedding(codes[..., k], codebook)
            losses.append(F.mse_loss(x_llm, partial))
        return torch.stack(losses).mean() * self.commitment_weight * self._commit_scale()

    def quantize_llm(self, x_llm: Tensor, freeze_codebook: bool | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Quantize tokens already in LLM units.

        x_llm: (b, n, llm_width) fp32. Returns (q_llm (b, n, llm_width) straight-through to x_llm,
        codes (b, n, d) int64, commit_loss ()). A training-mode call that is not frozen makes one
        EMA update of the shared codebook (after choosing the codes).
        """
        x_llm = x_llm.float()
        if self.is_frozen(freeze_codebook):
            with _eval_mode(self.rvq):
                _, codes, _ = self.rvq(x_llm)
            q_llm = self._sum_codes(codes)  # identical to decode_codes, bit for bit
            commit_loss = self._gathered_commit_loss(x_llm, codes)
        else:
            q_lib, codes, losses = self.rvq(x_llm)  # losses: (d,) weighted per-layer MSE
            q_llm = q_lib.detach()  # cut the library's per-layer straight-through paths (d x gradient)
            commit_loss = losses.mean() * self._commit_scale()
        # Wrap once, in codebook space: gradient of x + (q - x).detach(), value exactly q.
        q_llm = q_llm + (x_llm - x_llm.detach())
        return q_llm, codes, commit_loss

    def forward(self, x: Tensor, freeze_codebook: bool | None = None) -> QuantizerOutput:
        """Quantize (b, n, c) feature tokens; see `QuantizerOutput`.

        `freeze_codebook` overrides the `freeze_codebook` attribute for this call.
        """
        if x.ndim != 3 or x.shape[-1] != self.in_channels:
            raise ValueError(f"expected tokens (b, n, {self.in_channels}); got {tuple(x.shape)}")
        with torch.autocast(device_type=x.device.type, enabled=False):
            x_llm = self.projection.to_llm(x.float(), self.target_norm)
            q_llm, codes, commit_loss = self.quantize_llm(x_llm, freeze_codebook)
            z_q = self.projection.from_llm(q_llm, self.target_norm)
        return QuantizerOutput(z_q=z_q.to(x.dtype), codes=codes, commit_loss=commit_loss)

    def decode_codes(self, codes: Tensor) -> Tensor:
        """(b, n, d) int64 codes -> (b, n, c) fp32 features, equal to the eval-mode forward's z_q."""
        if codes.ndim != 3 or codes.shape[-1] != self.depth:
            raise UserError(f"expected codes (b, n, {self.depth}); got {tuple(codes.shape)}")
        with torch.autocast(device_type=codes.device.type, enabled=False):
            return self.projection.from_llm(self.get_codes_embeddings(codes), self.target_norm)


# ----- usage statistics -------------------------------------------------------------------------


@dataclass(frozen=True)
class CodeUsage:
    """Per-depth usage of a code histogram: distinct codes used and perplexity (exp entropy)."""

    unique: tuple[int, ...]
    perplexity: tuple[float, ...]


def code_histogram(codes: Tensor, num_codes: int) -> Tensor:
    """(..., d) int64 codes -> (d, num_codes) int64 counts per depth."""
    flat = rearrange(codes, "... d -> d (...)")
    hist = torch.zeros(flat.shape[0], num_codes, dtype=torch.long, device=codes.device)
    return hist.scatter_add_(1, flat, torch.ones_like(flat))


def code_usage(hist: Tensor) -> CodeUsage:
    """(d, v) histogram (e.g. summed over a sliding window) -> `CodeUsage`."""
    probs = hist.double() / hist.sum(dim=-1, keepdim=True).clamp_min(1)
    entropy = -(probs * probs.clamp_min(1e-30).log()).sum(dim=-1)
    return CodeUsage(
        unique=tuple(int(u) for u in (hist > 0).sum(dim=-1)),
        perplexity=tuple(float(p) for p in entropy.exp()),
    )


# ----- precision --------------------------------------------------------------------------------

_FP32_MODULES: tuple[type[nn.Module], ...] = (StackedQuantizer, NormMatchedProjection)


def cast_except_quantizer(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast floating parameters and buffers of `module` to `dtype`, skipping the quantizer side.

    Every `StackedQuantizer` and `NormMatchedProjection` inside (codebook, EMA statistics,
    projections, norm buffers) stays fp32: `.to(torch.bfloat16)` on the whole model would cast the
    EMA buffers too. Returns `module` (changed in place).
    """
    if isinstance(module, _FP32_MODULES):
        return module
    for param in module.parameters(recurse=False):
        if param.is_floating_point():
            param.data = param.data.to(dtype)  # what nn.Module.to does, one module at a time
            param.grad = None
    for name, buffer in module.named_buffers(recurse=False):
        if buffer is not None and buffer.is_floating_point():
            setattr(module, name, buffer.to(dtype))
    for child in module.children():
        cast_except_quantizer(child, dtype)
    return module


__all__ = [
    "CODEBOOK_MODES",
    "NORM_MATCHINGS",
    "PINNED_VQ_VERSION",
    "QUANTIZER_BACKENDS",
    "CodeUsage",
    "CodebookMode",
    "NormMatchedProjection",
    "NormMatching",
    "QuantizerBackend",
    "QuantizerOutput",
    "QuantizerSettings",
    "StackedQuantizer",
    "cast_except_quantizer",
    "code_histogram",
    "code_usage",
    "installed_vq_version",
    "should_sync_codebook",
]
