"""`ReducedDecoder`: `IncrementalDecoder`'s interface over a token-reduced prompt (text answers only).

The prompt's images are read as the model reads them (`UniCodeMLLM.read_image_embeds`, after its compressor),
spliced, reduced by `unicode_mllm.addons.token_reduction` (vision stage: `build_reduced_sequence`; LLM stage:
`reduced_prefill`) and decoded one token at a time on the reduced KV cache (`decode_step`). Its `prefill`
and `step` return (b, V) fp32 logits like `IncrementalDecoder`'s, so the answering loop (constraints,
sampling, stop strings, streaming) is the same with and without reduction. The generation mode is always
`text`: the token-reduction guard raises for a config that is on in image mode.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from unicode_mllm.addons.token_reduction.config import TokenReductionConfig
from unicode_mllm.addons.token_reduction.decode import decode_step
from unicode_mllm.addons.token_reduction.kv_cache import ReducedKVCache
from unicode_mllm.addons.token_reduction.prefill import reduced_prefill
from unicode_mllm.addons.token_reduction.reduce import build_reduced_sequence
from unicode_mllm.errors import UserError

if TYPE_CHECKING:
    from unicode_mllm.model.mllm import UniCodeMLLM


class ReducedDecoder:
    """Prefill with token reduction `config`, then one token per `step`; inference only (no autograd needed)."""

    def __init__(self, model: UniCodeMLLM, config: TokenReductionConfig):
        self.model = model
        self.config = config
        self.cache: ReducedKVCache | None = None

    def prefill(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        image_token_ids: Tensor | None,
        images_per_sample: Tensor | None = None,
        image_is_uncompressed: Tensor | None = None,
    ) -> Tensor:
        """Left-padded (b, t) prompt ids + mask and their (n, h, w, d) images -> (b, V) next-token logits.

        Raises UserError when the prompts mix compressed and uncompressed reads (spans of two lengths cannot be
        reduced on one grid).
        """
        model = self.model
        image_embeds = None
        if image_token_ids is not None and image_token_ids.shape[0] > 0:
            image_embeds = model.read_image_embeds(image_token_ids.to(input_ids.device), image_is_uncompressed)
            if isinstance(image_embeds, list):
                raise UserError("token reduction cannot mix compressed and uncompressed image reads in one batch")
        spliced = model.splice_image_embeds(input_ids, image_embeds, attention_mask, images_per_sample)
        n = 0 if image_embeds is None else image_embeds.shape[1]
        # A compressor without an output grid (resampler) gives a (1, n) pseudo-grid: only llm-stage reductions,
        # which never look at the grid, accept it (`ReadHook.token_reduction` checks that).
        grid_hw = model.read_hook.read_grid_hw or (1, max(n, 1))
        sequence = build_reduced_sequence(
            input_ids, spliced, image_embeds, grid_hw, self.config, generation_mode="text", reading=model.reading
        )
        out = reduced_prefill(model.lm, sequence, self.config, generation_mode="text")
        self.cache = out.cache
        return out.logits[:, -1].float()  # rows are left-packed: the last column is every row's last real token

    def step(self, token_ids: Tensor) -> Tensor:
        """(b,) ids chosen last -> (b, V) fp32 logits of the token after them."""
        if self.cache is None:
            raise RuntimeError("call prefill before step")
        embed = self.model.lm.get_input_embeddings()
        return decode_step(self.model.lm, self.cache, embed(token_ids.long()[:, None])).float()
