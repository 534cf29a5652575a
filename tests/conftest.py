"""Shared fixtures: a tiny saved LLaMA with its own BPE text tokenizer, and a small shapes shard set."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from unicode_mllm.constants import IMAGE_END, IMAGE_PLACEHOLDER, IMAGE_START

TINY_LM_WIDTH = 32


def build_tiny_text_tokenizer(vocab_size: int = 120) -> PreTrainedTokenizerFast:
    from unicode_mllm.data.shapes import ShapesWorld

    world = ShapesWorld()
    texts = [s.caption for s in world.iter_split("train", 50)]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>", "<pad>"], show_progress=False
    )
    tok.train_from_iterator(texts, trainer)
    text_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    text_tokenizer.add_tokens([IMAGE_START, IMAGE_END, IMAGE_PLACEHOLDER], special_tokens=True)
    return text_tokenizer


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory):
    """A saved 2-layer LLaMA (width 32) + text tokenizer, loadable with from_pretrained."""
    text_tokenizer = build_tiny_text_tokenizer()
    config = LlamaConfig(
        vocab_size=len(text_tokenizer),
        hidden_size=TINY_LM_WIDTH,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=text_tokenizer.bos_token_id,
        eos_token_id=text_tokenizer.eos_token_id,
        pad_token_id=text_tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    path = tmp_path_factory.mktemp("tiny_lm")
    model.save_pretrained(path)
    text_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_shapes_dir(tmp_path_factory):
    """32 px shapes shards: 48 train (2 shards), 16 val, 16 heldout."""
    from unicode_mllm.data.shapes import ShapesConfig
    from unicode_mllm.data.shapes_dataset import write_shapes_dataset

    path = tmp_path_factory.mktemp("shapes32")
    write_shapes_dataset(ShapesConfig(image_size=32), path, {"train": 48, "val": 16, "heldout": 16}, shard_size=24)
    return path


@pytest.fixture(scope="session")
def tiny_visual_tokenizer_dir(tiny_lm_dir, tmp_path_factory):
    """A random 32 px rq visual tokenizer over the tiny LM's ordinary tokens: an 8x8 grid, depth 2."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from unicode_mllm.visual_tokenizer import LanguageCodebook
    from unicode_mllm.visual_tokenizer.modeling import VisualTokenizer

    lm = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    text_tokenizer = AutoTokenizer.from_pretrained(tiny_lm_dir)
    specials = {i for i, t in text_tokenizer.added_tokens_decoder.items() if t.special}
    code_ids = [i for i in range(len(text_tokenizer)) if i not in specials]
    torch.manual_seed(1)
    codebook = LanguageCodebook.from_embedding_matrix(lm.get_input_embeddings().weight.detach(), code_ids)
    vt = VisualTokenizer.from_language_codebook(
        codebook, stacking="rq", depth=2, image_size=32, ch=8, ch_mult=(1, 2, 2), z_channels=8, num_res_blocks=1
    )
    path = tmp_path_factory.mktemp("tiny_vt")
    vt.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_mllm_dir(tiny_lm_dir, tiny_visual_tokenizer_dir, tmp_path_factory):
    """A saved random UniCodeMLLM (tiny LLaMA + the tiny visual tokenizer): `UniCodeMLLM.from_pretrained` loads it."""
    from unicode_mllm.model import UniCodeMLLM

    model = UniCodeMLLM.from_components(tiny_lm_dir, tiny_visual_tokenizer_dir, template="plain")
    path = tmp_path_factory.mktemp("tiny_mllm")
    model.save_pretrained(path)
    return path
