"""A visual tokenizer of a stage-1 preset's shape over a given embedding table, without the preset's LLM.

`stages.tokenizer.trainer.build_tokenizer` reads C_L from the LLM named in `codebook.llm` (a 13 GB download for
the 7B preset); the kit's throughput sections need the shape only, so they pass a random table of the LLM's
size, with the settings `unicode_mllm.stages.tokenizer.trainer.tokenizer_kwargs` maps from the config.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from unicode_mllm.config import load_config
from unicode_mllm.pipeline import preset_path
from unicode_mllm.stages.tokenizer.config import TokenizerTrainConfig
from unicode_mllm.stages.tokenizer.trainer import tokenizer_kwargs
from unicode_mllm.visual_tokenizer import LanguageCodebook
from unicode_mllm.visual_tokenizer.modeling import VisualTokenizer


def preset_config(preset: str, overrides: Sequence[str] = ()) -> TokenizerTrainConfig:
    """configs/<preset> with overrides (e.g. "tokenizer/llama7b_256.yaml")."""
    return load_config(TokenizerTrainConfig, preset_path(preset), list(overrides))


def build_visual_tokenizer(cfg: TokenizerTrainConfig, table: torch.Tensor, code_ids: Sequence[int]) -> VisualTokenizer:
    """A fresh tokenizer of `cfg`'s shape whose codebook is the rows `code_ids` of `table` (V, C), fp32."""
    codebook = LanguageCodebook.from_embedding_matrix(table.detach().float(), list(code_ids))
    return VisualTokenizer.from_language_codebook(codebook, **tokenizer_kwargs(cfg))
