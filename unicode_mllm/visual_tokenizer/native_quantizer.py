"""A project-owned residual EMA quantizer over one shared codebook: the `native` quantizer backend.

It keeps the buffers of vector-quantize-pytorch 1.31.0's shared-codebook `ResidualVQ` (the layout
the adapter in `quantizer.py` writes into) and their meaning, but never builds a dense (N, V) one-hot
and never multiplies by one. Why it exists: the cost at LLM scale (BENCHMARKS.md; three N x V x C
matmuls and two dense (N, V) fp32 tensors per layer and step in the library).

Written from reading the library's `Codebook` / `VectorQuantize` / `ResidualVQ` (1.31.0); no code is
copied. What is kept, and checked against the library by tests/test_native_quantizer.py:

- buffers `initted` () bool, `cluster_size` (1, v), `embed_avg` (1, v, c), `embed` (1, v, c), all fp32,
  registered in that order; initial `embed` = Kaiming-uniform over the (1, v, c) tensor,
  `embed_avg` = a copy of it, `cluster_size` = ones (so an install with the adapter's recipe is
  consistent from the start); `initted` is always true (no k-means initialisation);
- search: Euclidean nearest code, with the library's `sqrt(clamp(||x||^2 - 2 x.e + ||e||^2, 1e-8))`
  and the first index on ties, so both backends pick the same codes (barring exact float ties
  that the two computations round differently);
- residual stacking: layer k quantizes r_k = x - sum_{j<k} q_j with the same codebook, which is not
  changed between layers (the library's shared codebook recomputes it once, after the last layer);
- EMA: each layer decays `cluster_size` and `embed_avg` once with `decay` (so one call decays them by
  `decay ** depth`) and adds its own counts and sums of residuals; then
  `embed = embed_avg / (laplace_smoothed(cluster_size) * cluster_size.sum())`, eps as the library;
- per-layer commitment losses `commitment_weight * mse(r_k, q_k)` = `commitment_weight * mse(x, sum_{j<=k} q_j)`,
  gradient to x only, zeros in eval mode;
- distributed: with `sync_codebook` the counts and sums of the step are all-reduced before they
  enter the EMA.

What is different, on purpose:

- cost: distances are computed `chunk_size` rows at a time (one (chunk, v) fp32 tensor alive, not
  (N, v)), then `argmin`; with `code_chunk_size` the codebook is split too (a running minimum over
  blocks of codes: one (chunk, code_chunk) tensor alive); with `search_dtype="bf16"` (the default "auto"
  on CUDA) the x.e matmul reads bf16 inputs and accumulates in fp32, which can change a code where two
  are nearly equally near (`search_agreement` measures it); statistics come from `bincount` and
  `index_add_` (O(N * c) instead of the library's one-hot matmul, O(N * v * c)); `embed` is gathered,
  not multiplied out;
- the D layers' statistics are folded into one update, `old * decay**D + sum_k (1 - decay) *
  decay**(D - 1 - k) * new_k`, which is the library's sequential per-layer `lerp` written out: equal
  up to float rounding, and one all-reduce per step instead of two per layer;
- the returned `quantized` (sum of the chosen rows) carries no gradient: the owner applies its own
  straight-through wrap (the adapter wraps once, in codebook space);
- residuals are exact differences `r - q`; in training with gradients the library subtracts the
  straight-through value `r + (q - r)`, which can differ in the last bit, so codes at depth >= 2 can
  differ from the library's on exact float ties only;
- no dead-code expiry, k-means init, masks, cosine distance, beam search or quantize dropout: the
  project keeps all of them off (quantizer.py's `_build_library_rvq`);
- optional low-dimensional search (`search_dim=k`, the library has no equivalent): the nearest code
  is chosen in the span of the k principal directions of the installed codebook (`search_basis`,
  (c, k), set by `set_search_basis`), while the codes' full rows are what is summed, subtracted,
  returned and averaged by the EMA. Why: a fixed language codebook of a few hundred rows cannot
  cover a 128-d (let alone 4096-d) feature space, so full-width residual search barely shrinks the
  residual (the best of v random directions has cosine ~sqrt(2 ln v / c) ~ 0.3) and the encoder
  collapses onto a handful of codes (measured: 5 of 435 per depth on the tiny preset). In k = 8
  dimensions the same rows tile the space and every depth refines (RESULTS.md, stage 1). This is the
  low-dimensional lookup of ViT-VQGAN / LlamaGen, with the projection fixed by C_L instead of learned,
  so a code is still exactly one LLM embedding row;
- freezing (`freeze_codebook=True` or eval mode) leaves every buffer untouched; the library's
  training-mode forward recomputes `embed` even when frozen;
- on CUDA, `index_add_` accumulates with atomics, so `embed_avg` is not bit-reproducible run to run
  (the library's einsum is); the codes are.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from unicode_mllm.errors import ConfigError
from unicode_mllm.quantizer_settings import DEFAULT_CHUNK_SIZE, SEARCH_DTYPES, SearchDtype  # re-exported


class SharedCodebookState(Protocol):
    """The codebook state both backends expose to the adapter (the library's `Codebook` has it).

    embed (1, v, c), embed_avg (1, v, c), cluster_size (1, v), initted (): fp32 buffers, except
    `initted` (bool). eps: the Laplace smoothing of `cluster_size`.
    """

    embed: Tensor
    embed_avg: Tensor
    cluster_size: Tensor
    initted: Tensor
    eps: float


def smoothed_cluster_size(cluster_size: Tensor, eps: float) -> Tensor:
    """(..., v) EMA counts -> (..., v) Laplace-smoothed counts with the same total.

    (n_i + eps) / (sum n + v * eps) * sum n: no count is zero, so `embed_avg / counts` is defined.
    """
    total = cluster_size.sum(dim=-1, keepdim=True)
    return (cluster_size + eps) / (total + cluster_size.shape[-1] * eps) * total


def squared_norms(rows: Tensor) -> Tensor:
    """(m, c) -> (m,) squared L2 norms, without the (m, c) temporary that `rows.pow(2).sum(-1)`
    allocates (524 MB for a 32000 x 4096 codebook). Equal to it up to float rounding (~1e-7 relative).
    """
    return torch.linalg.vector_norm(rows, dim=-1).square()


def principal_basis(codebook: Tensor, k: int) -> Tensor:
    """(v, c) rows -> (c, k) fp32 orthonormal basis of their k leading principal directions (rows centred).

    Distances inside the span do not depend on the basis chosen for it (signs, rotations), so
    neither do the codes. Raises ValueError unless 1 <= k <= min(v, c).
    """
    v, c = codebook.shape
    if not 1 <= k <= min(v, c):
        raise ValueError(f"search_dim must lie in [1, {min(v, c)}] for a ({v}, {c}) codebook; got {k}")
    rows = codebook.detach().float()
    _, _, vh = torch.linalg.svd(rows - rows.mean(dim=0, keepdim=True), full_matrices=False)
    return vh[:k].T.contiguous()


def resolve_search_dtype(search_dtype: str, device: torch.device | str) -> str:
    """The search dtype to run on `device`: "fp32" | "bf16" | "auto" -> "fp32" or "bf16".

    auto: bf16 on CUDA (tensor cores, fp32 accumulation and fp32 output through `mm(out_dtype=float32)`),
    fp32 elsewhere: the CPU has no fp32-output bf16 matmul, so a CPU bf16 search rounds every dot product
    to bf16 (BENCHMARKS.md, "Codebook search": measured faster on this machine's CPU, but less exact).
    Raises ValueError for another name.
    """
    if search_dtype not in SEARCH_DTYPES:
        raise ValueError(f"search_dtype must be one of {list(SEARCH_DTYPES)}; got {search_dtype!r}")
    if search_dtype == "auto":
        return "bf16" if torch.device(device).type == "cuda" else "fp32"
    return search_dtype


def _low_precision_scores(rows: Tensor, codebook_t: Tensor) -> Tensor:
    """(m, c) fp32 rows, (c, v) bf16 codebook -> (m, v) fp32 dot products of the bf16-rounded inputs.

    CUDA: bf16 tensor-core matmul with fp32 accumulation and fp32 output. Elsewhere: bf16 matmul (the
    backend accumulates in fp32) whose output is rounded to bf16, then widened.
    """
    low = rows.to(torch.bfloat16)
    if rows.device.type == "cuda":
        try:
            return torch.mm(low, codebook_t, out_dtype=torch.float32)
        except (RuntimeError, NotImplementedError):  # a build or card without the fp32-output kernel
            pass
    return torch.mm(low, codebook_t).float()


def nearest_codes(
    x: Tensor,
    codebook: Tensor,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    codebook_sq_norm: Tensor | None = None,
    search_dtype: str = "fp32",
    code_chunk_size: int | None = None,
) -> Tensor:
    """Index of the nearest codebook row (Euclidean) for each row of x, `chunk_size` rows at a time.

    x: (m, c) fp32. codebook: (v, c) fp32 (or bf16 already, for a bf16 search: converted once per call
    otherwise). codebook_sq_norm: optional (v,) ||e||^2 (of the fp32 rows), reused across calls.
    search_dtype: "fp32" (exact, the library's codes) or "bf16" (the x.e matmul on bf16 inputs; norms, the
    sum and the argmin stay fp32; codes can differ from fp32's where two codes are nearly equally near:
    `search_agreement` measures how often), "auto" (`resolve_search_dtype` on x's device).
    code_chunk_size: also split the codebook into blocks of this many rows, keeping a running minimum,
    so at most a (chunk_size, code_chunk_size) distance tensor is alive (None: whole rows of v).
    Returns (m,) int64; ties go to the first index either way. Raises ValueError for a chunk size below 1
    or an unknown search_dtype.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1; got {chunk_size}")
    if code_chunk_size is not None and code_chunk_size < 1:
        raise ValueError(f"code_chunk_size must be >= 1 or None; got {code_chunk_size}")
    if x.ndim != 2 or codebook.ndim != 2 or x.shape[1] != codebook.shape[1]:
        raise ValueError(f"expected x (m, c) and codebook (v, c); got {tuple(x.shape)} and {tuple(codebook.shape)}")
    low = resolve_search_dtype(search_dtype, x.device) == "bf16"
    if codebook_sq_norm is None:
        codebook_sq_norm = squared_norms(codebook.float())
    v = codebook.shape[0]
    block = v if code_chunk_size is None else min(code_chunk_size, v)
    codes = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    codebook_t = (codebook.to(torch.bfloat16) if low else codebook).t()  # (c, v)
    for start in range(0, x.shape[0], chunk_size):
        rows = x[start : start + chunk_size]  # (m_chunk, c)
        row_sq_norm = squared_norms(rows)[:, None]  # (m_chunk, 1)
        best = best_index = None
        for first in range(0, v, block):
            last = min(first + block, v)
            if low:
                dist_chunk = _low_precision_scores(rows, codebook_t[:, first:last])  # (m_chunk, block)
                dist_chunk.mul_(-2.0).add_(row_sq_norm).add_(codebook_sq_norm[first:last])
            else:
                # ||x||^2 + ||e||^2, then -2 x.e added in place by the matmul: one (m_chunk, block) tensor.
                dist_chunk = row_sq_norm + codebook_sq_norm[first:last]  # (m_chunk, block)
                dist_chunk.addmm_(rows, codebook_t[:, first:last], alpha=-2.0)
            # The library's cdist clamps at 1e-8 and takes the square root before its argmax; sqrt maps
            # some distinct squared distances to one float, and the first index then wins. Doing the
            # same keeps the codes of both backends identical (O(m_chunk * v), not O(m_chunk * v * c)).
            dist_chunk.clamp_min_(1e-8).sqrt_()
            index = dist_chunk.argmin(dim=-1)  # the first index on ties, as before
            if last == v and first == 0:
                best_index = index
                break
            value = dist_chunk.gather(1, index[:, None])[:, 0]
            if best is None:
                best, best_index = value, index
            else:  # strictly smaller only: an equal distance in a later block keeps the earlier (first) index
                better = value < best
                best = torch.where(better, value, best)
                best_index = torch.where(better, index + first, best_index)
        codes[start : start + chunk_size] = best_index
    return codes


def search_agreement(
    x: Tensor,
    codebook: Tensor,
    *,
    search_dtype: str = "bf16",
    sample: int | None = 4096,
    seed: int = 0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> float:
    """The fraction in [0, 1] of rows of x whose code under `search_dtype` equals the fp32 code.

    x: (m, c); codebook: (v, c). sample: rows drawn (without replacement, seeded) when m is larger; None
    uses every row. An empty x agrees trivially (1.0).
    """
    if x.shape[0] == 0:
        return 1.0
    if sample is not None and x.shape[0] > sample:
        pick = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:sample]
        x = x[pick.to(x.device)]
    x, codebook = x.float(), codebook.float()
    sq_norm = squared_norms(codebook)
    exact = nearest_codes(x, codebook, chunk_size=chunk_size, codebook_sq_norm=sq_norm)
    other = nearest_codes(x, codebook, chunk_size=chunk_size, codebook_sq_norm=sq_norm, search_dtype=search_dtype)
    return float((exact == other).float().mean())


class NativeResidualQuantizer(nn.Module):
    """`depth` residual EMA quantizers sharing one (v, c) codebook (see the module docstring).

    Called like the library's `ResidualVQ` as the adapter uses it: `forward(x)` with x (b, n, c)
    returns (quantized (b, n, c) fp32 without gradient, codes (b, n, d) int64, losses (d,) fp32
    per-layer weighted commitment losses). A training-mode call that is not frozen makes one EMA
    update after all codes are chosen.

    Args:
        dim: codebook width c (no projections: the owner projects).
        codebook_size: v.
        depth: residual layers d.
        decay: EMA decay applied once per layer (the library's `decay` with a shared codebook).
        eps: Laplace smoothing of the counts.
        commitment_weight: weight of each layer's commitment loss.
        sync_codebook: all-reduce the step's counts and sums (DDP); an explicit bool.
        chunk_size: rows per distance chunk.
        search_dim: search in the span of the codebook's `search_dim` principal directions (buffer
            `search_basis`, refreshed by `set_search_basis`); None searches the full width.
        search_dtype: "fp32", "bf16" or "auto" (bf16 on CUDA, fp32 elsewhere): the dtype of the distance
            matmul (`nearest_codes`); resolved per call from the input's device.
        code_chunk_size: codebook rows per distance block (None: all v); bounds memory at chunk_size x it.
    """

    def __init__(
        self,
        *,
        dim: int,
        codebook_size: int,
        depth: int,
        decay: float,
        eps: float = 1e-5,
        commitment_weight: float = 0.25,
        sync_codebook: bool = False,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        search_dim: int | None = None,
        search_dtype: str = "fp32",
        code_chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        if dim < 1 or depth < 1 or codebook_size < 2:
            raise ConfigError(
                f"native quantizer needs dim >= 1, depth >= 1, codebook_size >= 2; "
                f"got dim={dim}, depth={depth}, codebook_size={codebook_size}"
            )
        if not 0.0 < decay < 1.0:
            raise ConfigError(f"native quantizer decay must lie strictly between 0 and 1; got {decay}")
        if eps <= 0.0:
            raise ConfigError(f"native quantizer eps must be positive; got {eps}")
        if chunk_size < 1:
            raise ConfigError(f"native quantizer chunk_size must be >= 1; got {chunk_size}")
        if not isinstance(sync_codebook, bool):
            raise ConfigError(f"sync_codebook must be an explicit bool; got {sync_codebook!r}")
        if search_dim is not None and not 1 <= search_dim <= min(dim, codebook_size):
            raise ConfigError(
                f"search_dim must lie in [1, {min(dim, codebook_size)}] (codebook width {dim}, "
                f"{codebook_size} codes) or be unset; got {search_dim}"
            )
        if search_dtype not in SEARCH_DTYPES:
            raise ConfigError(f"search_dtype must be one of {list(SEARCH_DTYPES)}; got {search_dtype!r}")
        if code_chunk_size is not None and code_chunk_size < 1:
            raise ConfigError(f"native quantizer code_chunk_size must be >= 1 or unset; got {code_chunk_size}")
        self.dim = dim
        self.codebook_size = codebook_size
        self.depth = depth
        self.decay = decay
        self.eps = eps
        self.commitment_weight = commitment_weight
        self.sync_codebook = sync_codebook
        self.chunk_size = chunk_size
        self.search_dim = search_dim
        self.search_dtype = search_dtype
        self.code_chunk_size = code_chunk_size

        # The library's initial codebook: Kaiming-uniform over the (1, v, c) tensor (fan_in = v * c).
        embed = torch.empty(1, codebook_size, dim)
        nn.init.kaiming_uniform_(embed)
        self.register_buffer("initted", torch.tensor(True))
        self.register_buffer("cluster_size", torch.ones(1, codebook_size))
        self.register_buffer("embed_avg", embed.clone())
        self.register_buffer("embed", embed)
        if search_dim is not None:
            self.register_buffer("search_basis", principal_basis(embed[0], search_dim))

    @torch.no_grad()
    def set_search_basis(self, codebook: Tensor) -> None:
        """Make the search subspace the leading principal directions of `codebook` (v, c).

        No-op without `search_dim`. The owner calls it when it installs a codebook (C_L), so the
        basis is a function of the language codebook and is saved with the model.
        """
        if self.search_dim is not None:
            self.search_basis.copy_(principal_basis(codebook, self.search_dim))

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, codebook_size={self.codebook_size}, depth={self.depth}, decay={self.decay}, "
            f"eps={self.eps}, sync_codebook={self.sync_codebook}, chunk_size={self.chunk_size}, "
            f"search_dim={self.search_dim}, search_dtype={self.search_dtype}, code_chunk_size={self.code_chunk_size}"
        )

    def forward(self, x: Tensor, freeze_codebook: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """x (b, n, c) -> (quantized (b, n, c), codes (b, n, d), losses (d,)); see the class docstring."""
        if x.ndim != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"expected x (b, n, {self.dim}); got {tuple(x.shape)}")
        b, n, _ = x.shape
        with torch.autocast(device_type=x.device.type, enabled=False):
            flat = rearrange(x.float(), "b n c -> (b n) c")
            update = self.training and not freeze_codebook
            codes, partial_sums = self._search(flat.detach(), update=update)
            if self.training and self.commitment_weight > 0:
                # r_k - q_k = x - sum_{j<=k} q_j: the gradient reaches x through every layer's term.
                losses = torch.stack([F.mse_loss(flat, partial) for partial in partial_sums])
                losses = losses * self.commitment_weight
            else:
                losses = flat.new_zeros(self.depth)
        quantized = rearrange(partial_sums[-1], "(b n) c -> b n c", b=b, n=n)
        return quantized, rearrange(codes, "d (b n) -> b n d", b=b, n=n), losses

    @torch.no_grad()
    def _search(self, flat: Tensor, *, update: bool) -> tuple[Tensor, list[Tensor]]:
        """(m, c) -> codes (d, m) and the running sums sum_{j<=k} q_j, (m, c) each; maybe one EMA step."""
        embed = self.embed[0]  # (v, c), unchanged until every layer has chosen its codes
        if self.search_dim is None:
            search_rows = embed
            project = None
        else:
            project = self.search_basis  # (c, k)
            search_rows = embed @ project  # (v, k): the codebook as the search sees it
        sq_norm = squared_norms(search_rows)  # (v,)
        search_dtype = resolve_search_dtype(self.search_dtype, flat.device)
        if search_dtype == "bf16":
            search_rows = search_rows.to(torch.bfloat16)  # once per call, not once per layer
        num_codes, depth, decay = self.codebook_size, self.depth, self.decay
        if update:
            total_decay = decay**depth
            if self.sync_codebook:
                # The step's own statistics, all-reduced before they enter the EMA.
                sums = torch.zeros_like(embed)  # (v, c)
                counts = torch.zeros_like(self.cluster_size[0])  # (v,)
            else:
                # Decay first, then add each layer's weighted statistics in place: no (v, c) temporary.
                self.cluster_size.mul_(total_decay)
                self.embed_avg.mul_(total_decay)
                sums, counts = self.embed_avg[0], self.cluster_size[0]
        residual = flat
        partial = torch.zeros_like(flat)
        all_codes, partial_sums = [], []
        for k in range(depth):
            query = residual if project is None else residual @ project  # (m, c) or (m, k)
            codes = nearest_codes(
                query,
                search_rows,
                chunk_size=self.chunk_size,
                codebook_sq_norm=sq_norm,
                search_dtype=search_dtype,
                code_chunk_size=self.code_chunk_size,
            )  # (m,)
            quantized = F.embedding(codes, embed)  # (m, c), a gather
            if update:
                # Layer k's statistics are decayed by the d - 1 - k layers after it (library: lerp per layer).
                weight = (1.0 - decay) * decay ** (depth - 1 - k)
                counts.add_(torch.bincount(codes, minlength=num_codes).to(counts.dtype), alpha=weight)
                sums.index_add_(0, codes, residual, alpha=weight)
            residual = residual - quantized
            partial = partial + quantized  # same order as the adapter's decode: equal bit for bit
            all_codes.append(codes)
            partial_sums.append(partial)
        if update:
            if self.sync_codebook:
                dist.all_reduce(counts)
                dist.all_reduce(sums)
                self.cluster_size.mul_(total_decay).add_(counts)
                self.embed_avg.mul_(total_decay).add_(sums)
            self._recompute_embed()
        return torch.stack(all_codes), partial_sums

    @torch.no_grad()
    def _recompute_embed(self) -> None:
        # embed = embed_avg / smoothed counts, written in place (no (1, v, c) temporary).
        counts = smoothed_cluster_size(self.cluster_size, self.eps)  # (1, v)
        torch.div(self.embed_avg, rearrange(counts, "1 v -> 1 v 1"), out=self.embed)


__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "SEARCH_DTYPES",
    "NativeResidualQuantizer",
    "SearchDtype",
    "SharedCodebookState",
    "nearest_codes",
    "principal_basis",
    "resolve_search_dtype",
    "search_agreement",
    "smoothed_cluster_size",
    "squared_norms",
]
