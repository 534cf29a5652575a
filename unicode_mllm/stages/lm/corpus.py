"""The LM's text corpus: everything the shapes world says about its images, one document per sample.

A document is the sample's caption, its drawing instruction and each question/answer pair as a
chat-like exchange, one line each:

    A small purple square at the top left and a small green circle in the center, on a white background.
    Paint a small purple square at the top left and a small green circle in the center on a white background.
    USER: What colour is the square? ASSISTANT: purple
    ...

The corpus is a pure function of `CorpusConfig` (each sample draws from its own seeded RNG), so two
builds give the same documents in the same order, in any process. `encode_corpus` turns documents into
the packed token stream (stage 0 trains on full windows of it, no padding: `PackedWindows` in pretrain.py),
optionally cutting some words in two (a seeded, deterministic form of subword regularisation) so that BPE's
intermediate tokens, not only whole words, are trained.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from unicode_mllm.constants import ASSISTANT_PREFIX, USER_PREFIX
from unicode_mllm.data.shapes import ShapesSample, ShapesWorld
from unicode_mllm.runtime.progress import track
from unicode_mllm.stages.lm.config import CorpusConfig

CORPUS_SPLITS: dict[str, str] = {"train": "train", "val": "val"}  # corpus split -> shapes world split


def sample_document(sample: ShapesSample) -> str:
    """One shapes sample as text: caption, instruction, then one `USER: q ASSISTANT: a` line per question."""
    lines = [sample.caption, sample.instruction]
    lines += [f"{USER_PREFIX} {qa.question} {ASSISTANT_PREFIX} {qa.answer}" for qa in sample.qa]
    return "\n".join(lines)


def build_corpus(cfg: CorpusConfig, split: str, *, show_progress: bool = False) -> list[str]:
    """The documents of corpus split `split` ('train' or 'val'), in sample order.

    Raises ValueError for an unknown split.
    """
    if split not in CORPUS_SPLITS:
        raise ValueError(f"corpus split {split!r} is unknown; choose one of {sorted(CORPUS_SPLITS)}")
    count = cfg.train_samples if split == "train" else cfg.val_samples
    world = ShapesWorld(cfg.shapes)
    samples = world.iter_split(CORPUS_SPLITS[split], count)
    return [sample_document(s) for s in track(samples, f"corpus {split}", total=count, disable=not show_progress)]


def encode_corpus(
    documents: Sequence[str], text_tokenizer: PreTrainedTokenizerBase, split_word_rate: float = 0.0, seed: int = 0
) -> Tensor:
    """All documents as one int64 token stream (n,), each document `<s> ... </s>`.

    With `split_word_rate` = 0 every document is encoded exactly as `text_tokenizer(doc)` does. Above 0,
    each pre-tokenized word is, with that probability, cut at a uniformly drawn character boundary and
    its two pieces BPE-encoded separately, unless that leaves its leading space as a token of its own.
    This follows BPE-dropout (Provilkov et al. 2020) in spirit, but seeded: document i draws from its
    own RNG seeded by (seed, i), so the stream is a pure function of the arguments.

    Raises ValueError when a document contains a special token's text (documents are plain text;
    specials are added here, never parsed).
    """
    if not 0.0 <= split_word_rate <= 1.0:
        raise ValueError(f"split_word_rate must lie in [0, 1], got {split_word_rate}")
    backend = text_tokenizer.backend_tokenizer
    specials = [t for t in text_tokenizer.all_special_tokens if t]
    bos, eos = text_tokenizer.bos_token_id, text_tokenizer.eos_token_id
    space_id = backend.model.tokenize(backend.pre_tokenizer.pre_tokenize_str(" ")[0][0])[0].id  # 'Ġ'
    stream: list[int] = []
    for index, document in enumerate(documents):
        found = [t for t in specials if t in document]
        if found:
            raise ValueError(f"corpus document {index} contains special token text {found}; documents are plain text")
        rng = np.random.default_rng(np.random.SeedSequence([seed, index]))
        stream.append(bos)
        for word, _ in backend.pre_tokenizer.pre_tokenize_str(document):
            word_ids = [token.id for token in backend.model.tokenize(word)]
            if split_word_rate > 0 and len(word) > 1 and rng.random() < split_word_rate:
                cut = int(rng.integers(1, len(word)))
                pieces = [token.id for piece in (word[:cut], word[cut:]) for token in backend.model.tokenize(piece)]
                # A piece may not start with a bare space: that token, shared by every word, would pile
                # up probability and become the LM's favourite next token whenever it is unsure.
                if pieces[0] != space_id or word_ids[0] == space_id:
                    word_ids = pieces
            stream.extend(word_ids)
        stream.append(eos)
    return torch.tensor(stream, dtype=torch.long)
