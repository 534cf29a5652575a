"""The language codebook from a tiny saved LLaMA: id policies, special tokens, id maps, loading paths."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from unicode_mllm.errors import ConfigError, UserError
from unicode_mllm.visual_tokenizer import (
    LanguageCodebook,
    input_embedding_key,
    load_input_embeddings,
    ordinary_token_ids,
    select_code_token_ids,
)

SPECIAL = ["<unk>", "<s>", "</s>", "<pad>"]
ADDED_SPECIAL = ["<img>", "</img>"]
ADDED_PLAIN = ["newword"]
PADDING_ROWS = 4  # embedding rows past the tokenizer's vocabulary
WIDTH = 16


def build_text_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=60, special_tokens=SPECIAL, show_progress=False)
    tok.train_from_iterator(["a red circle left of a blue square", "green triangle on top"] * 10, trainer)
    text_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    text_tokenizer.add_tokens(ADDED_SPECIAL, special_tokens=True)
    text_tokenizer.add_tokens(ADDED_PLAIN)
    return text_tokenizer


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    """A saved tiny LLaMA (single file and sharded copies) whose embedding rows have spread-out norms."""
    text_tokenizer = build_text_tokenizer()
    rows = len(text_tokenizer) + PADDING_ROWS
    config = LlamaConfig(
        vocab_size=rows,
        hidden_size=WIDTH,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    generator = torch.Generator().manual_seed(0)
    directions = torch.nn.functional.normalize(torch.randn(rows, WIDTH, generator=generator), dim=-1)
    norms = torch.linspace(0.5, 2.0, rows)[torch.randperm(rows, generator=generator)]  # distinct norms
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(directions * norms[:, None])
    single = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(single)
    text_tokenizer.save_pretrained(single)
    sharded = tmp_path_factory.mktemp("tiny_llama_sharded")
    model.save_pretrained(sharded, max_shard_size="5KB")
    text_tokenizer.save_pretrained(sharded)
    bf16 = tmp_path_factory.mktemp("tiny_llama_bf16")
    model.to(torch.bfloat16).save_pretrained(bf16)
    text_tokenizer.save_pretrained(bf16)
    embedding = AutoModelForCausalLM.from_pretrained(single).get_input_embeddings().weight.detach().float()
    return {
        "single": single,
        "sharded": sharded,
        "bf16": bf16,
        "text_tokenizer": text_tokenizer,
        "embedding": embedding,
    }


def expected_ordinary_ids(text_tokenizer: PreTrainedTokenizerFast) -> list[int]:
    excluded = set(SPECIAL + ADDED_SPECIAL + ADDED_PLAIN)
    return sorted(i for token, i in text_tokenizer.get_vocab().items() if token not in excluded)


def test_special_added_and_padding_ids_are_never_codes(tiny_llm):
    text_tokenizer = tiny_llm["text_tokenizer"]
    codebook = LanguageCodebook.from_pretrained(tiny_llm["single"])
    ids = codebook.code_to_token_id.tolist()
    assert ids == expected_ordinary_ids(text_tokenizer)
    never = [text_tokenizer.convert_tokens_to_ids(t) for t in SPECIAL + ADDED_SPECIAL + ADDED_PLAIN]
    assert not set(ids) & set(never)
    assert max(ids) < len(text_tokenizer)  # padding rows excluded
    assert codebook.vocab_size == len(text_tokenizer) + PADDING_ROWS
    assert codebook.num_codes == len(text_tokenizer) - len(SPECIAL + ADDED_SPECIAL + ADDED_PLAIN)
    assert codebook.policy == "all" and codebook.source == "safetensors"


def test_id_maps_invert_each_other(tiny_llm):
    codebook = LanguageCodebook.from_pretrained(tiny_llm["single"])
    codes = torch.arange(codebook.num_codes)
    assert torch.equal(codebook.token_id_to_code[codebook.code_to_token_id], codes)
    assert int((codebook.token_id_to_code >= 0).sum()) == codebook.num_codes
    token_ids = codebook.codes_to_token_ids(codes.reshape(1, -1))
    assert token_ids.shape == (1, codebook.num_codes)
    assert torch.equal(codebook.token_ids_to_codes(token_ids), codes.reshape(1, -1))
    assert torch.equal(codebook.is_code_token_id(codebook.code_to_token_id), torch.ones(codebook.num_codes, dtype=bool))


@pytest.mark.parametrize("token", ["<s>", "<img>", "newword"])
def test_non_code_ids_raise(tiny_llm, token):
    codebook = LanguageCodebook.from_pretrained(tiny_llm["single"])
    token_id = tiny_llm["text_tokenizer"].convert_tokens_to_ids(token)
    with pytest.raises(UserError, match=rf"token ids \[{token_id}\] are not visual codes"):
        codebook.token_ids_to_codes(torch.tensor([int(codebook.code_to_token_id[0]), token_id]))


def test_out_of_range_ids_and_codes_raise(tiny_llm):
    codebook = LanguageCodebook.from_pretrained(tiny_llm["single"])
    padding_row = codebook.vocab_size - 1
    for bad in (padding_row, codebook.vocab_size + 3, -1):
        with pytest.raises(UserError, match="are not visual codes"):
            codebook.token_ids_to_codes(torch.tensor([bad]))
    with pytest.raises(UserError, match=rf"codes must lie in \[0, {codebook.num_codes}\)"):
        codebook.codes_to_token_ids(torch.tensor([codebook.num_codes]))


def test_embeddings_are_the_models_input_embeddings(tiny_llm):
    codebook = LanguageCodebook.from_pretrained(tiny_llm["single"])
    assert codebook.embeddings.dtype == torch.float32
    assert codebook.llm_width == WIDTH
    assert torch.equal(codebook.embeddings, tiny_llm["embedding"][codebook.code_to_token_id])
    assert codebook.mean_norm == pytest.approx(float(codebook.embeddings.norm(dim=-1).mean()))


def test_norm_policy_selects_ids_above_the_threshold(tiny_llm):
    embedding = tiny_llm["embedding"]
    ordinary = expected_ordinary_ids(tiny_llm["text_tokenizer"])
    norms = {i: float(embedding[i].norm()) for i in ordinary}
    codebook = LanguageCodebook.from_pretrained(tiny_llm["single"], policy="norm", min_norm=1.2)
    expected = sorted(i for i in ordinary if norms[i] >= 1.2)
    assert 2 < len(expected) < len(ordinary)
    assert codebook.code_to_token_id.tolist() == expected

    # With max_codes: the smallest norms above the threshold (the reference code's choice).
    capped = LanguageCodebook.from_pretrained(tiny_llm["single"], policy="norm", min_norm=1.2, max_codes=5)
    assert capped.code_to_token_id.tolist() == sorted(sorted(expected, key=lambda i: norms[i])[:5])


def test_limit_policy_keeps_the_largest_norms(tiny_llm):
    embedding = tiny_llm["embedding"]
    ordinary = expected_ordinary_ids(tiny_llm["text_tokenizer"])
    largest = sorted(ordinary, key=lambda i: -float(embedding[i].norm()))[:7]
    codebook = LanguageCodebook.from_pretrained(tiny_llm["single"], policy="limit", max_codes=7)
    assert codebook.code_to_token_id.tolist() == sorted(largest)
    assert torch.equal(codebook.embeddings, embedding[sorted(largest)])


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"policy": "rare"}, ConfigError, r"policy 'rare' is unknown; choose one of \['all', 'limit', 'norm'\]"),
        ({"policy": "limit"}, ConfigError, "policy 'limit' needs max_codes"),
        ({"policy": "all", "max_codes": 8}, ConfigError, "max_codes must be unset"),
        ({"policy": "norm", "min_norm": 5.0}, UserError, "lower min_norm"),
        ({"policy": "limit", "max_codes": 10_000}, UserError, "only .* ordinary tokens"),
    ],
)
def test_policy_errors(tiny_llm, options, error, message):
    with pytest.raises(error, match=message):
        LanguageCodebook.from_pretrained(tiny_llm["single"], **options)


@pytest.mark.parametrize("copy", ["single", "sharded", "bf16"])
def test_safetensors_fast_path_equals_the_full_model(tiny_llm, copy):
    fast, fast_source = load_input_embeddings(tiny_llm[copy])
    full, full_source = load_input_embeddings(tiny_llm[copy], prefer_safetensors=False)
    assert (fast_source, full_source) == ("safetensors", "model")
    assert fast.dtype == full.dtype == torch.float32
    assert torch.equal(fast, full)
    if copy != "bf16":
        assert torch.equal(fast, tiny_llm["embedding"])


def test_sharded_checkpoint_really_is_sharded(tiny_llm):
    assert (tiny_llm["sharded"] / "model.safetensors.index.json").is_file()
    assert not (tiny_llm["sharded"] / "model.safetensors").exists()
    rows = len(tiny_llm["text_tokenizer"]) + PADDING_ROWS
    assert input_embedding_key(tiny_llm["sharded"]) == ("model.embed_tokens.weight", (rows, WIDTH))


def test_explicit_constructor(tiny_llm):
    embedding = tiny_llm["embedding"]
    codebook = LanguageCodebook.from_embedding_matrix(embedding, [9, 4, 30])
    assert codebook.code_to_token_id.tolist() == [4, 9, 30]  # codes follow token-id order
    assert torch.equal(codebook.embeddings, embedding[[4, 9, 30]])
    assert torch.equal(codebook.token_ids_to_codes(torch.tensor([30, 4])), torch.tensor([2, 0]))
    with pytest.raises(ConfigError, match="strictly increasing"):
        LanguageCodebook.from_embedding_matrix(embedding, [4, 4, 9])
    with pytest.raises(ConfigError, match="outside the embedding matrix"):
        LanguageCodebook.from_embedding_matrix(embedding, [4, 1000])


def test_select_and_ordinary_ids_helpers(tiny_llm):
    text_tokenizer = tiny_llm["text_tokenizer"]
    ordinary = ordinary_token_ids(text_tokenizer, num_rows=10)
    assert ordinary == [i for i in expected_ordinary_ids(text_tokenizer) if i < 10]
    matrix = torch.tensor([[3.0, 0.0], [1.0, 0.0], [0.5, 0.0], [2.0, 0.0], [1.5, 0.0]])
    assert select_code_token_ids(matrix, [0, 1, 2, 3, 4]).tolist() == [0, 1, 2, 3, 4]
    assert select_code_token_ids(matrix, [0, 1, 2, 3, 4], policy="norm", min_norm=1.0).tolist() == [0, 1, 3, 4]
    smallest = select_code_token_ids(matrix, [0, 1, 2, 3, 4], policy="norm", min_norm=1.0, max_codes=2)
    assert smallest.tolist() == [1, 4]
    assert select_code_token_ids(matrix, [0, 1, 2, 3, 4], policy="limit", max_codes=2).tolist() == [0, 3]
    assert select_code_token_ids(matrix, [1, 2, 3], policy="limit", max_codes=2).tolist() == [1, 3]
