"""The embedded LM's text tokenizer: a byte-level BPE (HF `tokenizers`) wrapped as `PreTrainedTokenizerFast`.

Ids 0-6 are the special tokens, in this order: `<s>` (bos), `</s>` (eos), `<pad>`, `<unk>`, then the
multimodal sentinels `<img>`, `</img>`, `<image>` from `unicode_mllm.constants`. All seven are special
added tokens: never split, never produced by BPE merges, listed in `all_special_ids`, so the visual
codebook (which excludes special and added ids) can never hand one out as a visual code. Encoding
prepends `<s>` (the LLaMA convention) and never appends `</s>`. Byte-level BPE reads any string, so
`<unk>` exists for the HF interface only and is never produced.

Saved with `save_pretrained` and read back with `AutoTokenizer.from_pretrained(path)` like a real LLM's.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from unicode_mllm.constants import IMAGE_END, IMAGE_PLACEHOLDER, IMAGE_START
from unicode_mllm.stages.lm.config import TextTokenizerConfig

log = logging.getLogger(__name__)

BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"
MULTIMODAL_TOKENS: tuple[str, ...] = (IMAGE_START, IMAGE_END, IMAGE_PLACEHOLDER)
SPECIAL_TOKENS: tuple[str, ...] = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, UNK_TOKEN, *MULTIMODAL_TOKENS)


def train_text_tokenizer(texts: Iterable[str], cfg: TextTokenizerConfig) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts` and wrap it with bos/eos/pad/unk and the multimodal specials.

    Deterministic for the same texts and config. `len(result)` can be below `cfg.vocab_size`: BPE
    stops once every word is a single token.
    """
    backend = Tokenizer(models.BPE())
    # add_prefix_space=False keeps decode(encode(text)) == text exactly.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=list(SPECIAL_TOKENS),  # ids 0..6, in this order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen or not
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    bos_id = backend.token_to_id(BOS_TOKEN)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B", special_tokens=[(BOS_TOKEN, bos_id)]
    )
    text_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        additional_special_tokens=list(MULTIMODAL_TOKENS),  # transformers 5 reads this as extra_special_tokens
        clean_up_tokenization_spaces=False,  # the clean-up rewrites " ," and " 's"; we want exact round trips
    )
    if len(text_tokenizer) < cfg.vocab_size:
        log.info(
            "text tokenizer: %d tokens (vocab_size=%d asked); the corpus has no more pairs to merge",
            len(text_tokenizer),
            cfg.vocab_size,
        )
    check_text_tokenizer(text_tokenizer)
    return text_tokenizer


def check_text_tokenizer(text_tokenizer: PreTrainedTokenizerBase) -> None:
    """Check that bos/eos/pad exist and each multimodal sentinel is one special token.

    Raises ValueError naming the token that is missing, split or not special.
    """
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(text_tokenizer, name) is None:
            raise ValueError(f"text tokenizer has no {name}; it must define bos, eos and pad")
    special_ids = set(text_tokenizer.all_special_ids)
    for token in MULTIMODAL_TOKENS:
        ids = text_tokenizer.encode(token, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"text tokenizer splits {token!r} into {len(ids)} tokens {ids}; it must be one token")
        if ids[0] not in special_ids:
            raise ValueError(f"text tokenizer token {token!r} (id {ids[0]}) is not special; register it as special")
