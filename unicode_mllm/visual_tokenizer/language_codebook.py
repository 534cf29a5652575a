"""The language codebook C_L: rows of an LLM's input-embedding matrix, with the code <-> token id map.

A visual code is a row of the visual codebook; `code_to_token_id[code]` is the LLM vocabulary id
whose input embedding that row starts from (and, in the `language_driven` mode, ends at). Which ids
become codes is a policy:

- `all` (default): every ordinary token of the text tokenizer's vocabulary;
- `norm`: the ordinary tokens whose embedding has L2 norm >= `min_norm`; with `max_codes`, the
  `max_codes` of them with the smallest norms (after the reference code,
  zhengsipeng/UniCode-ECCV24, quantizer.py, `EMAVectorQuantizer.__init__`);
- `limit`: the `max_codes` ordinary tokens with the largest norms.

Special, control and added tokens (the text tokenizer's `all_special_ids` and every id in its
`added_tokens_decoder`) are never codes, nor are embedding rows beyond the tokenizer's vocabulary
(padding rows). Codes are numbered in increasing token-id order for every policy (the reference
code also re-sorts its selection by id), so `code_to_token_id` is strictly increasing.

Loading reads only the embedding tensor from the checkpoint's safetensors files when it can (a 7B
model need not be materialised) and falls back to `AutoModelForCausalLM.from_pretrained`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from safetensors import safe_open
from torch import Tensor

from unicode_mllm.errors import ConfigError, UserError
from unicode_mllm.runtime.model_folders import LANGUAGE_MODEL, hub_errors, require_language_model
from unicode_mllm.visual_tokenizer.code_map import CodeTokenMap

logger = logging.getLogger(__name__)

CodePolicy = Literal["all", "norm", "limit"]
CODE_POLICIES: tuple[str, ...] = get_args(CodePolicy)

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"


# ----- which ids become codes -------------------------------------------------------------------


def ordinary_token_ids(text_tokenizer: Any, num_rows: int) -> list[int]:
    """Sorted ids of ordinary tokens: in the tokenizer's vocabulary, below `num_rows` (the embedding
    matrix's rows), and neither special nor added."""
    vocab_ids = set(text_tokenizer.get_vocab().values())
    excluded = set(text_tokenizer.all_special_ids) | set(text_tokenizer.added_tokens_decoder)
    return sorted(i for i in vocab_ids if 0 <= i < num_rows and i not in excluded)


def select_code_token_ids(
    embedding_matrix: Tensor,
    candidate_ids: Sequence[int],
    *,
    policy: str = "all",
    min_norm: float = 1.0,
    max_codes: int | None = None,
) -> Tensor:
    """Pick the code token ids among `candidate_ids` by `policy` (see the module docstring).

    embedding_matrix: (rows, c) input embeddings. Returns (v,) int64 token ids, increasing.
    Raises ConfigError for an unknown policy or inconsistent options, UserError when the policy
    selects fewer than two ids.
    """
    if policy not in CODE_POLICIES:
        raise ConfigError(f"codebook policy {policy!r} is unknown; choose one of {sorted(CODE_POLICIES)}")
    if max_codes is not None and max_codes < 2:
        raise ConfigError(f"max_codes must be >= 2 (or unset); got {max_codes}")
    if policy == "all" and max_codes is not None:
        raise ConfigError(
            f"policy 'all' takes every ordinary token, so max_codes must be unset (got {max_codes}); "
            "use policy 'limit' or 'norm' to cap the codebook"
        )
    if policy == "limit" and max_codes is None:
        raise ConfigError("policy 'limit' needs max_codes (the number of codes to keep)")
    candidates = torch.as_tensor(sorted(set(candidate_ids)), dtype=torch.long)
    if candidates.numel() and int(candidates.max()) >= embedding_matrix.shape[0]:
        raise ConfigError(
            f"candidate token id {int(candidates.max())} is outside the embedding matrix "
            f"({embedding_matrix.shape[0]} rows)"
        )
    norms = embedding_matrix.detach().float()[candidates].norm(dim=-1)
    if policy == "all":
        selected = candidates
    elif policy == "norm":
        keep = norms >= min_norm
        if int(keep.sum()) < 2:
            top = float(norms.max()) if norms.numel() else float("nan")
            raise UserError(
                f"policy 'norm' with min_norm={min_norm} keeps {int(keep.sum())} tokens (largest norm "
                f"{top:.4g}); lower min_norm or use policy 'limit'"
            )
        kept_ids, kept_norms = candidates[keep], norms[keep]
        order = torch.sort(kept_norms, stable=True).indices  # ascending, ties broken by id
        selected = kept_ids[order][:max_codes]
    else:  # limit
        assert max_codes is not None
        if max_codes > candidates.numel():
            raise UserError(
                f"policy 'limit' asks for max_codes={max_codes} but the vocabulary has only "
                f"{candidates.numel()} ordinary tokens; lower max_codes or use policy 'all'"
            )
        order = torch.sort(norms, descending=True, stable=True).indices
        selected = candidates[order][:max_codes]
    if selected.numel() < 2:
        raise UserError(f"policy {policy!r} selected {selected.numel()} tokens; a codebook needs at least 2")
    return torch.sort(selected).values


# ----- reading the input embeddings -------------------------------------------------------------


def _resolve_file(path_or_name: str | Path, filename: str, **hub_kwargs: Any) -> str | None:
    """Local path of `filename` in a model folder or cached hub repo, or None when absent."""
    folder = Path(path_or_name)
    if folder.is_dir():
        candidate = folder / filename
        return str(candidate) if candidate.is_file() else None
    from transformers.utils import cached_file

    try:
        return cached_file(str(path_or_name), filename, **hub_kwargs)
    except (OSError, ValueError):  # missing file, offline, unknown repo
        return None


def input_embedding_key(path_or_name: str | Path, **hub_kwargs: Any) -> tuple[str, tuple[int, int]] | None:
    """(state-dict key, (rows, c)) of the model's input embeddings, found on the meta device from
    `get_input_embeddings()` (no weights are allocated), or None when the model cannot be built."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(path_or_name), **hub_kwargs)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, NotImplementedError) as e:
        logger.info("cannot build %s on the meta device (%s); loading the full model", path_or_name, e)
        return None
    embeddings = model.get_input_embeddings()
    for name, module in model.named_modules():
        if module is embeddings:
            return f"{name}.weight", tuple(embeddings.weight.shape)
    return None


def _read_embedding_from_safetensors(path_or_name: str | Path, **hub_kwargs: Any) -> Tensor | None:
    found = input_embedding_key(path_or_name, **hub_kwargs)
    if found is None:
        return None
    key, shape = found
    index_file = _resolve_file(path_or_name, SAFETENSORS_INDEX, **hub_kwargs)
    if index_file is not None:
        weight_map = json.loads(Path(index_file).read_text()).get("weight_map", {})
        shard = weight_map.get(key)
        shard_file = _resolve_file(path_or_name, shard, **hub_kwargs) if shard is not None else None
    else:
        shard_file = _resolve_file(path_or_name, SAFETENSORS_SINGLE, **hub_kwargs)
    if shard_file is None:
        return None
    with safe_open(shard_file, framework="pt") as f:
        stored_keys = set(f.keys())  # safe_open supports no `in`
        if key not in stored_keys:  # e.g. a checkpoint whose keys the model class renames on load
            return None
        tensor = f.get_tensor(key)
    if tuple(tensor.shape) != shape:
        logger.info("%s in %s has shape %s, expected %s; loading the full model", key, shard_file, tensor.shape, shape)
        return None
    return tensor


def load_input_embeddings(
    path_or_name: str | Path,
    *,
    prefer_safetensors: bool = True,
    revision: str | None = None,
    local_files_only: bool = False,
) -> tuple[Tensor, str]:
    """The LLM's input-embedding matrix (rows, c) as fp32, and how it was read.

    Returns (matrix, "safetensors") when only the tensor was read from the checkpoint, else
    (matrix, "model") after `AutoModelForCausalLM.from_pretrained`. Raises UserError when the model
    cannot be loaded at all.
    """
    folder = require_language_model(path_or_name, text_tokenizer=False)  # one-line UserError for a bad folder
    hub_kwargs: dict[str, Any] = {"revision": revision, "local_files_only": local_files_only}
    if prefer_safetensors:
        tensor = _read_embedding_from_safetensors(path_or_name, **hub_kwargs)
        if tensor is not None:
            return tensor.float().contiguous(), "safetensors"
        logger.info("no safetensors fast path for %s; materialising the model", path_or_name)
    from transformers import AutoModelForCausalLM

    try:
        with hub_errors(path_or_name, LANGUAGE_MODEL, folder):
            model = AutoModelForCausalLM.from_pretrained(str(path_or_name), **hub_kwargs)
    except (OSError, ValueError) as e:
        raise UserError(
            f"cannot load the LLM {str(path_or_name)!r} ({e}); pass a local folder with config.json and weights"
        ) from None
    weight = model.get_input_embeddings().weight.detach().float().clone()
    del model
    return weight, "model"


# ----- the codebook -----------------------------------------------------------------------------


class LanguageCodebook(CodeTokenMap):
    """C_L for a subset of the vocabulary, with the code <-> token id maps (`CodeTokenMap`).

    Attributes:
        embeddings: (v, c) fp32, row k = the LLM input embedding of `code_to_token_id[k]`.
        code_to_token_id: (v,) int64, strictly increasing LLM token ids.
        token_id_to_code: (vocab_size,) int64, the inverse map, -1 for ids that are not codes.
        vocab_size: rows of the LLM embedding matrix (the id space of the maps).
        policy, source: how the codes were chosen and how the embeddings were read.
    """

    def __init__(
        self,
        embeddings: Tensor,
        code_to_token_id: Tensor | Sequence[int],
        vocab_size: int,
        *,
        policy: str = "explicit",
        source: str = "explicit",
    ) -> None:
        code_to_token_id = torch.as_tensor(code_to_token_id, dtype=torch.long).flatten().cpu()
        if embeddings.ndim != 2 or embeddings.shape[0] != code_to_token_id.numel():
            raise ConfigError(
                f"embeddings must be (v, c) with one row per code; got {tuple(embeddings.shape)} for "
                f"{code_to_token_id.numel()} token ids"
            )
        if code_to_token_id.numel() < 2:
            raise ConfigError(f"a codebook needs at least 2 codes; got {code_to_token_id.numel()}")
        if not bool((code_to_token_id[1:] > code_to_token_id[:-1]).all()):
            raise ConfigError("code token ids must be strictly increasing (sorted and without repeats)")
        self.embeddings = embeddings.detach().float().contiguous()
        super().__init__(code_to_token_id, vocab_size, device=self.embeddings.device)
        self.policy = policy
        self.source = source

    @classmethod
    def from_embedding_matrix(cls, embedding_matrix: Tensor, token_ids: Sequence[int] | Tensor) -> LanguageCodebook:
        """C_L from an explicit (rows, c) embedding matrix and the token ids to use as codes."""
        ids = torch.sort(torch.as_tensor(token_ids, dtype=torch.long).flatten()).values
        if ids.numel() and int(ids.max()) >= embedding_matrix.shape[0]:
            raise ConfigError(
                f"token id {int(ids.max())} is outside the embedding matrix ({embedding_matrix.shape[0]} rows)"
            )
        return cls(embedding_matrix.detach()[ids.to(embedding_matrix.device)], ids, embedding_matrix.shape[0])

    @classmethod
    def from_pretrained(
        cls,
        path_or_name: str | Path,
        *,
        policy: str = "all",
        min_norm: float = 1.0,
        max_codes: int | None = None,
        text_tokenizer: Any | None = None,
        prefer_safetensors: bool = True,
        revision: str | None = None,
        local_files_only: bool = False,
    ) -> LanguageCodebook:
        """C_L of any Hugging Face causal LM (folder or hub name).

        text_tokenizer: the LLM's text tokenizer (its special and added ids are excluded); loaded
        from `path_or_name` when not given. Raises ConfigError / UserError as `select_code_token_ids`
        and `load_input_embeddings` do.
        """
        if policy not in CODE_POLICIES:
            raise ConfigError(f"codebook policy {policy!r} is unknown; choose one of {sorted(CODE_POLICIES)}")
        # A folder of another kind, a missing path or damaged files fail here in one line, before HF builds
        # anything (or spends a minute on hub retries for a local path that does not exist).
        folder = require_language_model(path_or_name, text_tokenizer=text_tokenizer is None)
        if text_tokenizer is None:
            from transformers import AutoTokenizer

            try:
                with hub_errors(path_or_name, LANGUAGE_MODEL, folder):
                    text_tokenizer = AutoTokenizer.from_pretrained(
                        str(path_or_name), revision=revision, local_files_only=local_files_only
                    )
            except (OSError, ValueError) as e:
                raise UserError(
                    f"cannot load the text tokenizer of {str(path_or_name)!r} ({e}); pass text_tokenizer="
                ) from None
        matrix, source = load_input_embeddings(
            path_or_name, prefer_safetensors=prefer_safetensors, revision=revision, local_files_only=local_files_only
        )
        candidates = ordinary_token_ids(text_tokenizer, matrix.shape[0])
        ids = select_code_token_ids(matrix, candidates, policy=policy, min_norm=min_norm, max_codes=max_codes)
        logger.info(
            "language codebook of %s: %d codes (policy %r, read via %s)", path_or_name, ids.numel(), policy, source
        )
        return cls(matrix[ids], ids, matrix.shape[0], policy=policy, source=source)

    @property
    def llm_width(self) -> int:
        return self.embeddings.shape[1]

    @property
    def mean_norm(self) -> float:
        """Mean L2 norm of the rows (the norm-matching reference of the quantizer)."""
        return float(self.embeddings.norm(dim=-1).mean())

    def to(self, device: torch.device | str) -> LanguageCodebook:
        """This codebook with its tensors on `device` (a new object)."""
        moved = LanguageCodebook.__new__(LanguageCodebook)
        moved.__dict__.update(self.__dict__)
        moved.embeddings = self.embeddings.to(device)
        moved._moved_maps(device)
        return moved

    def __repr__(self) -> str:
        return (
            f"LanguageCodebook(num_codes={self.num_codes}, llm_width={self.llm_width}, "
            f"vocab_size={self.vocab_size}, policy={self.policy!r}, source={self.source!r})"
        )


__all__ = [
    "CODE_POLICIES",
    "CodePolicy",
    "LanguageCodebook",
    "input_embedding_key",
    "load_input_embeddings",
    "ordinary_token_ids",
    "select_code_token_ids",
]
