"""Stage 2: the multimodal LLM, the image-embedding splice, decompression targets, special tokens.

Flat exports; see each module's docstring. The token layout it shares with `data/` (decompression order,
sentinel ids, reading modes) lives below both, in `unicode_mllm/token_layout.py`.
"""

from unicode_mllm.model.mllm import (
    READING_MODES,
    LoraSettings,
    ReadingMode,
    UniCodeMLLM,
    UniCodeMLLMConfig,
)
from unicode_mllm.model.special_tokens import (
    MULTIMODAL_TOKENS,
    MultimodalTokenIds,
    add_multimodal_tokens,
    multimodal_token_ids,
    resize_keeping_rows,
    single_special_token_id,
    special_token_ids,
    special_token_texts,
)
from unicode_mllm.model.splice import (
    SplicedInputs,
    image_counts,
    position_ids_from_attention_mask,
    splice_image_embeddings,
)
from unicode_mllm.token_layout import (
    check_num_segments,
    grid_to_sequence,
    segments_to_grid,
    sequence_to_grid,
    split_into_segments,
)

__all__ = [
    "MULTIMODAL_TOKENS",
    "READING_MODES",
    "LoraSettings",
    "MultimodalTokenIds",
    "ReadingMode",
    "SplicedInputs",
    "UniCodeMLLM",
    "UniCodeMLLMConfig",
    "add_multimodal_tokens",
    "check_num_segments",
    "grid_to_sequence",
    "image_counts",
    "multimodal_token_ids",
    "position_ids_from_attention_mask",
    "resize_keeping_rows",
    "segments_to_grid",
    "sequence_to_grid",
    "single_special_token_id",
    "special_token_ids",
    "special_token_texts",
    "splice_image_embeddings",
    "split_into_segments",
]
