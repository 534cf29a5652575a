"""`CompressorConfig`: the JSON-storable choice of a compressor, a registered name plus its options.

    cfg = CompressorConfig(name="deco_avgpool", options={"target_grid": (4, 4), "mlp_layers": 2})
    compressor = cfg.build(llm_width=4096)

Options are the keyword arguments of the registered class (`compressor_option_names(name)` lists them);
llm_width follows from the model and is passed to `build`, never stored (`unicode_mllm/registry.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from unicode_mllm.addons.compression.base import COMPRESSORS, Compressor, build_compressor
from unicode_mllm.registry import RegisteredChoice, Registry


@dataclass(frozen=True)
class CompressorConfig(RegisteredChoice):
    """Which compressor sits between the code embeddings and the LLM, and its options.

    name: a registered compressor ('identity', 'pool2x', 'deco_avgpool', 'ldpv2', 'internvl_ps',
        'qwen2vl_merger', 'qformer', 'perceiver'); options: its keyword arguments (see each class).
    """

    name: str = "identity"

    registry: ClassVar[Registry] = COMPRESSORS
    default_source: ClassVar[str] = "compressor"

    def build(self, llm_width: int) -> Compressor:
        self.validate()
        return build_compressor(self.name, llm_width, **self.options)
