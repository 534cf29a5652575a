"""FocusLLaVA's vision-guided sampler: multi-scale window max-pooling + a learned router with a token budget.

Method (FocusLLaVA, arXiv 2411.14228, vision-guided sampler, its §3): split the
grid into windows; max-pool each window at several sizes (SPP-like candidate sets); treat the sizes as
mixture-of-experts "experts" and let a router pick, per window, the size that represents it, so plain
regions get one coarse token and detailed ones keep fine tokens. It leaves the code-embedding manifold
(a max over channels is not a code sum) and so needs stage-2 training: it is the one *trainable* reducer
of this package, an `nn.Module`.

No public code exists; the choices the paper leaves open are pinned here (and in `FocusSamplerConfig`):
- windows: `window` x `window` tokens, non-overlapping, the grid sides must be multiples (no padding);
- experts: max-pool kernels `pool_sizes` inside the window (default 4, 2, 1 on a 4x4 window: 1, 4 or 16
  tokens); kernel p's token (a, b) covers the p x p cells starting at (a*p, b*p) of the window;
- router: LayerNorm(2c) -> Linear(2c, router_hidden) -> GELU -> Linear(router_hidden, n_experts) over the
  concatenated mean and max of the window's tokens, softmax gates per window; each window is routed top-1
  (its argmax expert), so an image's count = sum over windows of the chosen expert's token count;
- budget: with `max_tokens`, only the top `max_tokens` routed tokens of an image by gate survive (ties to
  the earlier candidate: window-major, then raster inside), the rest are dropped; per-image counts vary,
  so images are padded with `mask`;
- gradients: top-1 and top-k are not differentiable, so each kept token is multiplied by
  gate / gate.detach(): exactly 1 in the forward pass (the output is the pooled token itself) but the
  router receives the MoE gradient d loss / d gate = <d loss / d token, token> / gate;
- balance loss (`aux_loss`): balance_weight * E * sum_e f_e * P_e (switch-transformer form; f_e the fraction of
  windows routed to expert e, P_e its mean gate); it equals balance_weight for a uniform router;
- output order: raster order of each token's top-left cell (a region's prompt slot and position).
The paper's stochastic training schedule is not implemented (training recipes live in `training/`).
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn

from unicode_mllm.token_reduction.config import FocusSamplerConfig
from unicode_mllm.token_reduction.image_tokens import ReducedImageTokens, check_grid, pack_by_mask


class FocusVisionSampler(nn.Module):
    """Multi-scale window max-pooling routed per window; (n, h*w, c) -> `ReducedImageTokens` with `aux_loss`."""

    def __init__(self, width: int, config: FocusSamplerConfig | None = None):
        super().__init__()
        self.config = config or FocusSamplerConfig()
        self.config.validate()
        self.width = width
        num_experts = len(self.config.pool_sizes)
        self.router = nn.Sequential(
            nn.LayerNorm(2 * width),
            nn.Linear(2 * width, self.config.router_hidden),
            nn.GELU(),
            nn.Linear(self.config.router_hidden, num_experts),
        )

    def out_len(self, grid_hw: tuple[int, int]) -> int:
        """The most tokens one image can take (the padded width of the output), for sizing prompt spans."""
        h, w = grid_hw
        ws = self.config.window
        finest = (h // ws) * (w // ws) * max((ws // p) ** 2 for p in self.config.pool_sizes)
        return finest if self.config.max_tokens is None else min(finest, self.config.max_tokens)

    def _windows(self, image_embeds: Tensor, grid_hw: tuple[int, int]) -> Tensor:
        h, w = check_grid(image_embeds, grid_hw)
        ws = self.config.window
        if h % ws or w % ws:
            raise ValueError(f"focus_sampler window {ws} must divide the grid {h}x{w}")
        if image_embeds.shape[-1] != self.width:
            raise ValueError(f"focus_sampler was built for width {self.width}, got {image_embeds.shape[-1]}")
        return rearrange(image_embeds, "n (gh a gw b) c -> n (gh gw) a b c", gh=h // ws, a=ws, gw=w // ws, b=ws)

    def route(self, image_embeds: Tensor, grid_hw: tuple[int, int]) -> Tensor:
        """(n, h*w, c) -> (n, G, E) softmax gates over the experts (pool sizes), G = number of windows."""
        windows = self._windows(image_embeds, grid_hw)  # (n, G, ws, ws, c)
        summary = torch.cat([windows.mean(dim=(2, 3)), windows.amax(dim=(2, 3))], dim=-1)  # (n, G, 2c)
        return self.router(summary).softmax(dim=-1)

    def candidates(self, image_embeds: Tensor, grid_hw: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Every expert's pooled tokens for every window.

        Returns tokens (n, G, K, c), expert (K,) long (which pool size made candidate k), top-left raster
        cell (G, K) long, and cell_candidate (E, h*w) long (for each expert, the flat candidate g*K + k that
        covers each cell). K = sum over pool sizes p of (window / p)^2.
        """
        h, w = grid_hw
        ws = self.config.window
        windows = self._windows(image_embeds, grid_hw)  # (n, G, ws, ws, c)
        device = image_embeds.device
        gw = w // ws
        num_windows = windows.shape[1]
        tokens, experts, corners, cell_cands = [], [], [], []
        offset = 0
        cell = torch.arange(h * w, device=device)
        row, col = cell // w, cell % w
        cell_window = (row // ws) * gw + col // ws  # (h*w,)
        for e, p in enumerate(self.config.pool_sizes):
            side = ws // p
            pooled = rearrange(windows, "n g (a p1) (b p2) c -> n g a b (p1 p2) c", p1=p, p2=p).amax(dim=-2)
            tokens.append(rearrange(pooled, "n g a b c -> n g (a b) c"))
            experts.append(torch.full((side * side,), e, dtype=torch.long, device=device))
            g = torch.arange(num_windows, device=device)[:, None]  # (G, 1)
            a = torch.arange(side * side, device=device)[None, :] // side  # region row inside the window
            b = torch.arange(side * side, device=device)[None, :] % side
            corners.append(((g // gw) * ws + a * p) * w + (g % gw) * ws + b * p)  # (G, side^2)
            region = ((row % ws) // p) * side + (col % ws) // p  # (h*w,)
            cell_cands.append(region + offset)  # the window's offset g*K is added below
            offset += side * side
        k_total = offset
        cell_candidate = torch.stack(cell_cands) + cell_window[None, :] * k_total  # (E, h*w)
        return torch.cat(tokens, dim=2), torch.cat(experts), torch.cat(corners, dim=1), cell_candidate

    def forward(self, image_embeds: Tensor, grid_hw: tuple[int, int]) -> ReducedImageTokens:
        """(n, h*w, c) raster embeddings -> routed, budgeted tokens (n, m, c) with mask, mapping and aux_loss.

        Raises ValueError when the window does not divide the grid or the width differs from the router's.
        """
        h, w = check_grid(image_embeds, grid_hw)
        n, s, c = image_embeds.shape
        gates = self.route(image_embeds, (h, w))  # (n, G, E)
        tokens, expert, corner, cell_candidate = self.candidates(image_embeds, (h, w))  # (n, G, K, c) ...
        num_windows, k_total = corner.shape
        chosen = gates.argmax(dim=-1)  # (n, G): top-1 expert per window
        routed = expert[None, None, :] == chosen[..., None]  # (n, G, K)
        gate = gates.gather(2, expert[None, None, :].expand(n, num_windows, k_total))  # (n, G, K)

        flat_routed = routed.reshape(n, -1)
        flat_gate = gate.reshape(n, -1)
        if self.config.max_tokens is not None:
            score = flat_gate.detach().masked_fill(~flat_routed, float("-inf"))
            order = score.argsort(dim=-1, descending=True, stable=True)
            rank = torch.empty_like(order)
            rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
            flat_routed = flat_routed & (rank < self.config.max_tokens)

        # Straight-through gate: forward multiplies by exactly 1, backward carries d/d gate to the router.
        scaled = tokens.reshape(n, -1, c) * (flat_gate / flat_gate.detach())[..., None]
        order_key = corner.reshape(1, -1).expand(n, -1)
        out, index = pack_by_mask(scaled, flat_routed, order=order_key)  # index: flat candidate, -1 on padding
        mask = index >= 0
        pool = torch.tensor(self.config.pool_sizes, device=image_embeds.device)
        cand_size = (pool[expert] ** 2).float().repeat(num_windows)  # (G*K,)
        sizes = torch.where(mask, cand_size[index.clamp(min=0)], torch.zeros_like(index, dtype=torch.float32))
        src_index = torch.where(mask, corner.reshape(-1)[index.clamp(min=0)], torch.full_like(index, -1))

        slot_of_candidate = torch.full((n, num_windows * k_total), -1, dtype=torch.long, device=image_embeds.device)
        rows, slots = mask.nonzero(as_tuple=True)
        slot_of_candidate[rows, index[rows, slots]] = slots
        cell_window = cell_candidate[0] // k_total  # (h*w,)
        covering = cell_candidate[chosen[:, cell_window], torch.arange(s, device=image_embeds.device)]  # (n, s)

        aux_loss = None
        if self.config.balance_weight > 0:
            num_experts = gates.shape[-1]
            fraction = torch.nn.functional.one_hot(chosen, num_experts).float().mean(dim=(0, 1))  # (E,)
            mean_gate = gates.mean(dim=(0, 1))  # (E,)
            aux_loss = self.config.balance_weight * num_experts * (fraction * mean_gate).sum()
        return ReducedImageTokens(
            tokens=out,
            mask=mask,
            src_index=src_index,
            sizes=sizes,
            assignment=slot_of_candidate.gather(1, covering),
            grid_hw=(h, w),
            aux_loss=aux_loss,
        )
