"""unicode-mllm: a unified visual-text codebook tokenizer and generative multimodal LLM (UniCode)."""

__version__ = "0.1.0"
