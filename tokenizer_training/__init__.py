"""Stage 1's public entry, top-level as the design card lists it: `from tokenizer_training import train_tokenizer`.

The stage itself lives with the other two in `unicode_mllm/stages/tokenizer/` (README "Layout"); this package
re-exports its public names.
"""

from unicode_mllm.stages import tokenizer as _stage1
from unicode_mllm.stages.tokenizer import *  # noqa: F403 - the re-export is this package's purpose

__all__ = list(_stage1.__all__)
