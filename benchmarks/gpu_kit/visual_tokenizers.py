"""A visual tokenizer of a stage-1 preset's shape over a given embedding table, without the preset's LLM.

`tokenizer_training.trainer.build_tokenizer` reads C_L from the LLM named in `codebook.llm` (a 13 GB download for
the 7B preset); the kit's throughput sections need the shape only, so they pass a random table of the LLM's
size. The keyword mapping below mirrors build_tokenizer's (a `tokenizer_kwargs(cfg)` there would remove it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from tokenizer_training.config import TokenizerTrainConfig
from unicode_mllm.config import load_config
from unicode_mllm.demo import preset_path
from unicode_mllm.visual_tokenizer import LanguageCodebook
from unicode_mllm.visual_tokenizer.modeling import VisualTokenizer


def preset_config(preset: str, overrides: Sequence[str] = ()) -> TokenizerTrainConfig:
    """configs/<preset> with overrides (e.g. "tokenizer/llama7b_256.yaml")."""
    return load_config(TokenizerTrainConfig, preset_path(preset), list(overrides))


def tokenizer_kwargs(cfg: TokenizerTrainConfig) -> dict[str, Any]:
    m, c = cfg.model, cfg.codebook
    return dict(
        image_size=m.image_size,
        ch=m.ch,
        ch_mult=m.ch_mult,
        num_res_blocks=m.num_res_blocks,
        attn_resolutions=m.attn_resolutions,
        z_channels=m.z_channels,
        dropout=m.dropout,
        stacking=m.stacking,
        depth=m.depth if m.stacking == "rq" else None,
        llm_name_or_path=str(c.llm),
        codebook_mode=c.mode,
        decay=c.decay,
        commitment_weight=c.commitment_weight,
        norm_matching=c.norm_matching,
        backend=c.backend,
        search_dim=c.search_dim,
    )


def build_visual_tokenizer(cfg: TokenizerTrainConfig, table: torch.Tensor, code_ids: Sequence[int]) -> VisualTokenizer:
    """A fresh tokenizer of `cfg`'s shape whose codebook is the rows `code_ids` of `table` (V, C), fp32."""
    codebook = LanguageCodebook.from_embedding_matrix(table.detach().float(), list(code_ids))
    return VisualTokenizer.from_language_codebook(codebook, **tokenizer_kwargs(cfg))
