"""Stage 1: the visual tokenizer trained on image reconstruction, its codebook tied to the LLM's words.

cfg = load_config(TokenizerTrainConfig, "configs/tokenizer/tiny.yaml")
result = train_tokenizer(cfg)   # VisualTokenizer.from_pretrained(result.final_dir)
"""

from unicode_mllm.stages.tokenizer.blend_schedule import BlendSchedule
from unicode_mllm.stages.tokenizer.config import CodebookConfig, TokenizerTrainConfig
from unicode_mllm.stages.tokenizer.trainer import TokenizerTrainer, TokenizerTrainResult, train_tokenizer

__all__ = [
    "BlendSchedule",
    "CodebookConfig",
    "TokenizerTrainConfig",
    "TokenizerTrainResult",
    "TokenizerTrainer",
    "train_tokenizer",
]
