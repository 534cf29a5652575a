"""`CodeTokenMap`: visual codes <-> LLM token ids, the one implementation of both directions.

A visual code is a row of the visual codebook; `code_to_token_id[code]` is the LLM vocabulary id that row is
the embedding of. `LanguageCodebook` (C_L, while a tokenizer is built) and `VisualTokenizer` (from its saved
`code_to_token_id`) both convert through it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from unicode_mllm.errors import ConfigError, UserError


class CodeTokenMap:
    """code_to_token_id: (v,) int64 LLM token id of each code; token_id_to_code: (vocab_size,) int64, the inverse,
    -1 for ids that are not codes. vocab_size: the id space (rows of the LLM embedding matrix)."""

    def __init__(
        self, code_to_token_id: Tensor | Sequence[int], vocab_size: int, device: torch.device | str | None = None
    ) -> None:
        ids = torch.as_tensor(code_to_token_id, dtype=torch.long).flatten().cpu()
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
            raise ConfigError(f"code token ids must lie in [0, {vocab_size}); got {ids.tolist()[:8]}...")
        self.vocab_size = int(vocab_size)
        self.code_to_token_id = ids.to(device)
        self.token_id_to_code = torch.full((self.vocab_size,), -1, dtype=torch.long, device=device)
        self.token_id_to_code[self.code_to_token_id] = torch.arange(ids.numel(), device=device)

    @property
    def num_codes(self) -> int:
        return self.code_to_token_id.numel()

    def _moved_maps(self, device: torch.device | str) -> None:
        self.code_to_token_id = self.code_to_token_id.to(device)
        self.token_id_to_code = self.token_id_to_code.to(device)

    def codes_to_token_ids(self, codes: Tensor) -> Tensor:
        """Codes (any shape, int64 in [0, v)) -> LLM token ids of the same shape. Raises UserError."""
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.num_codes):
            raise UserError(
                f"codes must lie in [0, {self.num_codes}); got values in [{int(codes.min())}, {int(codes.max())}]"
            )
        return self.code_to_token_id.to(codes.device)[codes]

    def is_code_token_id(self, token_ids: Tensor) -> Tensor:
        """Token ids (any shape) -> bool mask of the ids that are visual codes."""
        table = self.token_id_to_code.to(token_ids.device)
        inside = (token_ids >= 0) & (token_ids < self.vocab_size)
        return inside & (table[token_ids.clamp(0, self.vocab_size - 1)] >= 0)

    def token_ids_to_codes(self, token_ids: Tensor) -> Tensor:
        """LLM token ids (any shape) -> codes of the same shape.

        Raises UserError when an id is not a code (special, added, unselected or out of range).
        """
        is_code = self.is_code_token_id(token_ids)
        if not bool(is_code.all()):
            bad = token_ids[~is_code].unique()[:8].tolist()
            raise UserError(
                f"token ids {bad} are not visual codes (special, added, unselected or out-of-vocabulary "
                "ids); only ids in code_to_token_id convert to codes"
            )
        return self.token_id_to_code.to(token_ids.device)[token_ids]


__all__ = ["CodeTokenMap"]
