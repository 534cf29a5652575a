"""Stage 2: the multimodal LLM (`mllm.py`) and its special tokens (`special_tokens.py`).

Exports the model; see each module's docstring. Imported from their own modules, not from here: the
special-token helpers (`model/special_tokens.py`), the token layout the model shares with `data/`
(decompression order, sentinel ids, reading modes: `unicode_mllm/token_layout.py`), the image-embedding splice
that the add-ons and generation also use (`unicode_mllm/splice.py`) and the add-ons the model reads images
through, behind its reading hook (`unicode_mllm/addons/`).
"""

from unicode_mllm.model.mllm import LoraSettings, UniCodeMLLM, UniCodeMLLMConfig

__all__ = ["LoraSettings", "UniCodeMLLM", "UniCodeMLLMConfig"]
