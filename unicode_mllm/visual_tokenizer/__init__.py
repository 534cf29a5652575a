"""The visual tokenizer: the language codebook, the quantizer adapter and the code stacks.

Flat exports; `quantizer.py` is the only module that imports `vector_quantize_pytorch`.
"""

from unicode_mllm.visual_tokenizer.code_map import CodeTokenMap
from unicode_mllm.visual_tokenizer.language_codebook import (
    CODE_POLICIES,
    CodePolicy,
    LanguageCodebook,
    input_embedding_key,
    load_input_embeddings,
    ordinary_token_ids,
    select_code_token_ids,
)
from unicode_mllm.visual_tokenizer.quantizer import (
    CODEBOOK_MODES,
    NORM_MATCHINGS,
    PINNED_VQ_VERSION,
    CodebookMode,
    CodeUsage,
    NormMatchedProjection,
    NormMatching,
    QuantizerOutput,
    QuantizerSettings,
    StackedQuantizer,
    cast_except_quantizer,
    code_histogram,
    code_usage,
    installed_vq_version,
    should_sync_codebook,
)
from unicode_mllm.visual_tokenizer.stacking import (
    STACKS,
    HierarchicalStack,
    QuantizerStack,
    ResidualStack,
    SingleStack,
    StackOutput,
    build_stack,
)

__all__ = [
    "CODEBOOK_MODES",
    "CODE_POLICIES",
    "NORM_MATCHINGS",
    "PINNED_VQ_VERSION",
    "STACKS",
    "CodePolicy",
    "CodeTokenMap",
    "CodeUsage",
    "CodebookMode",
    "HierarchicalStack",
    "LanguageCodebook",
    "NormMatchedProjection",
    "NormMatching",
    "QuantizerOutput",
    "QuantizerSettings",
    "QuantizerStack",
    "ResidualStack",
    "SingleStack",
    "StackOutput",
    "StackedQuantizer",
    "build_stack",
    "cast_except_quantizer",
    "code_histogram",
    "code_usage",
    "input_embedding_key",
    "installed_vq_version",
    "load_input_embeddings",
    "ordinary_token_ids",
    "select_code_token_ids",
    "should_sync_codebook",
]
