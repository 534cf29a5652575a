"""Does the embedded LM's input-embedding table (the future visual codebook C_L) carry structure?

`embedding_structure_report` reads the embedding of one token per word of the shapes world's
vocabulary, grouped by meaning (colours, shapes, sizes, ...), and measures
- the mean cosine similarity within each group against the mean across groups (0 for random rows);
- how often a word's nearest neighbour among all grouped words is in its own group (and the chance rate);
- the same among the whole ordinary vocabulary, plus each word's nearest vocabulary tokens.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from unicode_mllm.data.shapes import BACKGROUND_COLOURS, OBJECT_COLOURS, SHAPE_NAMES, SIZE_NAMES
from unicode_mllm.runtime.model_folders import LANGUAGE_MODEL, hub_errors, require_language_model
from unicode_mllm.visual_tokenizer.language_codebook import load_input_embeddings, ordinary_token_ids

# The words the shapes world's text uses, by meaning. Words that are not one ordinary token of the
# text tokenizer (e.g. a shape the corpus never names) are reported as skipped.
DEFAULT_WORD_GROUPS: dict[str, tuple[str, ...]] = {
    "colour": tuple(OBJECT_COLOURS),
    "background": tuple(BACKGROUND_COLOURS),
    "shape": SHAPE_NAMES,
    "size": SIZE_NAMES,
    "count": ("zero", "one", "two", "three"),
    "position": ("top", "bottom", "left", "right", "center"),
}


def _mean_offdiag(block: torch.Tensor) -> float:
    n = block.shape[0]
    if n < 2:
        return float("nan")
    return float((block.sum() - block.diagonal().sum()) / (n * (n - 1)))


def embedding_structure_report(
    model_dir: str | Path, groups: Mapping[str, Sequence[str]] | None = None, top_k: int = 5
) -> dict[str, Any]:
    """Cosine-similarity structure of the input embeddings of `model_dir` (a `save_pretrained` folder).

    Each word is looked up as the token of " word" (with its leading space, as it appears mid-sentence).
    Returns a JSON-safe dict: `within_cosine`, `across_cosine`, `per_group` (within cosine and
    nearest-neighbour rate per group), `nn_same_group` and `nn_same_group_chance` (among grouped words),
    `nn_vocab_same_group` (nearest neighbour among all ordinary tokens), `neighbours` (word -> its
    `top_k` nearest ordinary tokens) and `skipped` (words that are not one ordinary token).
    Raises ValueError when fewer than two groups have at least two usable words, UserError for a bad folder.
    """
    groups = dict(groups or DEFAULT_WORD_GROUPS)
    folder = require_language_model(model_dir)  # one-line UserError for a folder of another kind or damaged files
    with hub_errors(model_dir, LANGUAGE_MODEL, folder):
        text_tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    embeddings, _ = load_input_embeddings(model_dir)  # (v, c) fp32
    ordinary = ordinary_token_ids(text_tokenizer, embeddings.shape[0])
    ordinary_set = set(ordinary)

    words: list[str] = []
    word_groups: list[str] = []
    token_ids: list[int] = []
    skipped: list[str] = []
    for group, members in groups.items():
        for word in members:
            ids = text_tokenizer.encode(" " + word, add_special_tokens=False)
            if len(ids) == 1 and ids[0] in ordinary_set:
                words.append(word)
                word_groups.append(group)
                token_ids.append(ids[0])
            else:
                skipped.append(word)
    usable = {g for g in groups if word_groups.count(g) >= 2}
    if len(usable) < 2:
        raise ValueError(f"need two groups with two single-token words each; usable groups: {sorted(usable)}")

    unit = F.normalize(embeddings, dim=-1)
    vectors = unit[token_ids]  # (n, c)
    sim = vectors @ vectors.T  # (n, n)
    group_ids = torch.tensor([sorted(groups).index(g) for g in word_groups])
    same = group_ids[:, None] == group_ids[None, :]
    off_diag = ~torch.eye(len(words), dtype=torch.bool)

    # Nearest neighbour among grouped words (self excluded), and its chance rate under a random pick.
    nn_index = sim.masked_fill(~off_diag, -2.0).argmax(dim=1)
    nn_hit = group_ids[nn_index] == group_ids
    chance = (same & off_diag).sum(dim=1).float() / (len(words) - 1)

    # Nearest neighbours among the whole ordinary vocabulary (self excluded).
    vocab = torch.tensor(ordinary)
    vocab_sim = vectors @ unit[vocab].T  # (n, |ordinary|)
    vocab_sim[vocab[None, :] == torch.tensor(token_ids)[:, None]] = -2.0
    top = vocab_sim.topk(min(top_k, len(ordinary) - 1), dim=1).indices
    token_to_group = dict(zip(token_ids, word_groups, strict=True))
    vocab_hit = [token_to_group.get(int(vocab[top[i, 0]])) == word_groups[i] for i in range(len(words))]

    per_group = {}
    for group in sorted(usable):
        rows = [i for i, g in enumerate(word_groups) if g == group]
        per_group[group] = {
            "words": [words[i] for i in rows],
            "within_cosine": _mean_offdiag(sim[rows][:, rows]),
            "nn_same_group": float(nn_hit[rows].float().mean()),
        }
    return {
        "num_words": len(words),
        "within_cosine": float(sim[same & off_diag].mean()),
        "across_cosine": float(sim[~same].mean()),
        "nn_same_group": float(nn_hit.float().mean()),
        "nn_same_group_chance": float(chance.mean()),
        "nn_vocab_same_group": sum(vocab_hit) / len(vocab_hit),
        "per_group": per_group,
        "neighbours": {words[i]: [text_tokenizer.decode([int(vocab[j])]) for j in top[i]] for i in range(len(words))},
        "skipped": skipped,
    }
