"""Stage 0: the embedded tiny language model (byte-level BPE text tokenizer + LLaMA) made from the shapes world.

Example:
    cfg = load_config(LMTrainConfig, "configs/lm/tiny.yaml")
    model_dir = train_lm(cfg)  # AutoModelForCausalLM / AutoTokenizer .from_pretrained(model_dir)
    embedding_structure_report(model_dir)["nn_same_group"]
"""

from unicode_mllm.data.batches import DataPosition
from unicode_mllm.stages.lm.config import (
    CorpusConfig,
    LMLoopConfig,
    LMModelConfig,
    LMOptimConfig,
    LMTrainConfig,
    TextTokenizerConfig,
)
from unicode_mllm.stages.lm.corpus import build_corpus, sample_document
from unicode_mllm.stages.lm.inspect import DEFAULT_WORD_GROUPS, embedding_structure_report
from unicode_mllm.stages.lm.pretrain import (
    PackedWindows,
    WarmupCosine,
    build_model,
    build_optimizer,
    build_scheduler,
    encode_corpus,
    eval_windows,
    evaluate,
    lm_loss,
    train_lm,
)
from unicode_mllm.stages.lm.text_tokenizer import (
    MULTIMODAL_TOKENS,
    SPECIAL_TOKENS,
    check_text_tokenizer,
    train_text_tokenizer,
)

__all__ = [
    "DEFAULT_WORD_GROUPS",
    "MULTIMODAL_TOKENS",
    "SPECIAL_TOKENS",
    "CorpusConfig",
    "DataPosition",
    "LMLoopConfig",
    "LMModelConfig",
    "LMOptimConfig",
    "LMTrainConfig",
    "PackedWindows",
    "TextTokenizerConfig",
    "WarmupCosine",
    "build_corpus",
    "build_model",
    "build_optimizer",
    "build_scheduler",
    "check_text_tokenizer",
    "embedding_structure_report",
    "encode_corpus",
    "eval_windows",
    "evaluate",
    "lm_loss",
    "sample_document",
    "train_lm",
    "train_text_tokenizer",
]
