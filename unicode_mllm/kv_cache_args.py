"""Hand a KV cache to a Hugging Face module and read it back, under the name the installed transformers uses.

transformers renamed the cache argument and output field `past_key_values` (`cache_params` for state-space
models) to `cache` after 5.18: 5.0 (the pyproject's lower bound) to 5.18 know only `past_key_values`; the
installed 5.25 declares `cache` in every causal LM's and decoder layer's `forward`, accepts `past_key_values`
with a FutureWarning until its removal in 5.40, and names the output field `cache` (`out.past_key_values` is
an alias that logs a deprecation). So the name is read from the signature of the module's `forward`.

Used by every project call that passes a cache itself: `IncrementalDecoder` (whole LM) and the token-reduction
layer loop (decoder layers).
"""

from __future__ import annotations

import inspect
from typing import Any

from transformers.modeling_outputs import CausalLMOutputWithPast

CACHE = "cache"  # transformers after 5.18 (5.25 installed)
LEGACY_CACHE = "past_key_values"  # transformers 5.0-5.18; deprecated later, removed in 5.40
LEGACY_STATE_CACHE = "cache_params"  # the same for state-space models (Mamba) before the rename
NAMES = (CACHE, LEGACY_CACHE, LEGACY_STATE_CACHE)  # the current name first: never pass a deprecated one by choice

# For a forward that declares none of them (only **kwargs): follow the installed library's output classes.
_LIBRARY_NAME = CACHE if CACHE in CausalLMOutputWithPast.__dataclass_fields__ else LEGACY_CACHE


def cache_argument(module: Any) -> str:
    """The keyword `module.forward` takes its KV cache under: "cache", "past_key_values" or "cache_params".

    module: a HF causal LM, a peft wrapper of one (peft forwards kwargs to its base model), or a decoder layer.
    """
    base = module.get_base_model() if hasattr(module, "get_base_model") else module
    parameters = inspect.signature(base.forward).parameters  # follows transformers' deprecate_kwarg wrapper
    return next((name for name in NAMES if name in parameters), _LIBRARY_NAME)


def output_cache(output: Any) -> Any:
    """The KV cache a HF forward returned, from its `cache` field or, before the rename, its older name."""
    fields = getattr(output, "__dataclass_fields__", {})
    return getattr(output, next((name for name in NAMES if name in fields), LEGACY_CACHE))
