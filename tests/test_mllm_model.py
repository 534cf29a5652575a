"""UniCodeMLLM on a tiny random LLaMA: special tokens, reading modes, padding, LoRA, save/load."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from unicode_mllm.constants import IGNORE_INDEX, IMAGE_PLACEHOLDER_ID
from unicode_mllm.data.mllm_samples import MODEL_INPUTS, MLLMCollator, MLLMSampleBuilder
from unicode_mllm.errors import UserError
from unicode_mllm.generation.batch_prefill import prefill_prompts
from unicode_mllm.model import LoraSettings, UniCodeMLLM
from unicode_mllm.model.special_tokens import add_multimodal_tokens
from unicode_mllm.visual_tokenizer import LanguageCodebook
from unicode_mllm.visual_tokenizer.modeling import VisualTokenizer

# transformers deprecations (e.g. the KV-cache argument `past_key_values` -> `cache`, removed in 5.40) must
# fail here, not surface in users' terminals.
pytestmark = [
    pytest.mark.filterwarnings("error::FutureWarning"),
    # peft 0.21 reads transformers' deprecated `is_gradient_checkpointing` inside `PeftModel.__init__` (LoRA
    # test): peft's code, not ours; the last filter wins, so this one is listed last.
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]

# 16 px through two downsamplings: a 4x4 grid, residual depth 2 -> reads 16 embeddings, writes 32 ids.
ARCH = dict(image_size=16, ch=8, ch_mult=(1, 2, 2), z_channels=8, num_res_blocks=1)
CODE_IDS = list(range(4, 100))  # ordinary ids of the fixture's text tokenizer (0-3 and 114-116 are special)


def tiny_visual_tokenizer(lm, code_ids=CODE_IDS) -> VisualTokenizer:
    torch.manual_seed(1)
    codebook = LanguageCodebook.from_embedding_matrix(lm.get_input_embeddings().weight.detach(), code_ids)
    return VisualTokenizer.from_language_codebook(codebook, stacking="rq", depth=2, **ARCH)


@pytest.fixture(scope="module")
def vt_dir(tiny_lm_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("vt")
    tiny_visual_tokenizer(AutoModelForCausalLM.from_pretrained(tiny_lm_dir)).save_pretrained(path)
    return path


def load(tiny_lm_dir, vt_dir, **kwargs) -> UniCodeMLLM:
    model = UniCodeMLLM.from_components(tiny_lm_dir, vt_dir, **kwargs)
    return model.eval()


def random_images(model: UniCodeMLLM, n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, model.visual_tokenizer.config.num_codes, (n, *model.code_shape), generator=gen)
    return model.visual_tokenizer.codes_to_token_ids(codes)  # (n, h, w, d) LLM token ids


def bare_tokenizer_and_lm():
    """A text tokenizer without the multimodal sentinels or a pad token, and a tiny LLaMA sized to it."""
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    texts = ["a red circle at the top left", "a small blue square in the center"] * 5
    backend.train_from_iterator(
        texts, trainers.BpeTrainer(special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return tok, LlamaForCausalLM(config)


def test_adding_special_tokens_keeps_every_code_id_valid():
    tok, lm = bare_tokenizer_and_lm()
    vocab = len(tok)
    vt = tiny_visual_tokenizer(lm, list(range(3, vocab)))
    input_before = lm.get_input_embeddings().weight.detach().clone()
    output_before = lm.get_output_embeddings().weight.detach().clone()
    ids = add_multimodal_tokens(tok, lm, vt.code_to_token_id)
    assert sorted([ids.image_start, ids.image_end, ids.image_placeholder, ids.pad]) == list(range(vocab, vocab + 4))
    assert tok.convert_ids_to_tokens(ids.image_start) == "<img>" and tok.pad_token == "<pad>"
    weight = lm.get_input_embeddings().weight
    assert weight.shape[0] == vocab + 4 == lm.get_output_embeddings().weight.shape[0] == lm.config.vocab_size
    assert torch.equal(weight[:vocab], input_before)  # old rows bit for bit: every code id means what it meant
    assert torch.equal(lm.get_output_embeddings().weight[:vocab], output_before)
    assert torch.allclose(weight[vocab:], input_before.mean(0, keepdim=True).expand(4, -1))
    codes = torch.randint(0, vt.config.num_codes, (2, *vt.code_shape))
    token_ids = vt.codes_to_token_ids(codes)
    assert torch.equal(
        VisualTokenizer.aggregate_embeddings(token_ids, weight), vt.aggregate_embeddings(token_ids, input_before)
    )
    assert not bool(vt.is_code_token_id(torch.tensor([ids.image_start, ids.image_end, ids.pad])).any())
    assert add_multimodal_tokens(tok, lm, vt.code_to_token_id) == ids and lm.config.vocab_size == vocab + 4  # no-op
    # A 'separate' codebook appended after a vocabulary without sentinels: the new ids would collide.
    tok2, lm2 = bare_tokenizer_and_lm()
    with pytest.raises(UserError, match=rf"special ids \[{len(tok2)}, .*\] are also visual code token ids"):
        add_multimodal_tokens(tok2, lm2, list(range(len(tok2), len(tok2) + 8)))


def test_tiny_lm_fixture_needs_no_resize(tiny_lm_dir, vt_dir):
    model = load(tiny_lm_dir, vt_dir)
    assert model.lm.config.vocab_size == len(model.text_tokenizer) == 117  # sentinels already there (114-116)
    assert (model.token_ids.image_start, model.token_ids.image_end, model.token_ids.image_placeholder) == (
        114,
        115,
        116,
    )
    model.train()
    assert not model.visual_tokenizer.training and not any(p.requires_grad for p in model.visual_tokenizer.parameters())


@pytest.mark.parametrize("reading", ["aggregated", "interleaved"])
def test_reading_splices_the_lms_own_embeddings_in_place(tiny_lm_dir, vt_dir, reading):
    model = load(tiny_lm_dir, vt_dir, reading=reading)
    builder = MLLMSampleBuilder(model.text_tokenizer, model.code_shape, reading=reading)
    images = random_images(model, 1)
    sample = builder.caption(images[0], "a red circle")
    batch = MLLMCollator(model.token_ids.pad)([sample])
    spliced = model.build_inputs(batch["input_ids"], batch["attention_mask"], batch["image_token_ids"])
    table = model.lm.get_input_embeddings().weight
    slots = batch["input_ids"][0] == IMAGE_PLACEHOLDER_ID
    if reading == "aggregated":
        expected = VisualTokenizer.aggregate_embeddings(images, table)[0]  # (h*w, c): the sum over depth
    else:
        expected = table[images[0].reshape(-1)]  # (h*w*d, c), raster order, depth-first
    assert int(slots.sum()) == expected.shape[0] == model.tokens_per_image
    assert torch.equal(spliced.inputs_embeds[0, slots], expected)
    # The *current* table: a change to a code's row shows up in the next read.
    with torch.no_grad():
        table[images[0, 0, 0, 0]] += 1.0
    again = model.build_inputs(batch["input_ids"], batch["attention_mask"], batch["image_token_ids"])
    assert not torch.equal(again.inputs_embeds[0, slots][0], spliced.inputs_embeds[0, slots][0])


def test_forward_trains_on_labels_and_refuses_labelled_placeholders(tiny_lm_dir, vt_dir):
    model = load(tiny_lm_dir, vt_dir)
    builder = MLLMSampleBuilder(model.text_tokenizer, model.code_shape)
    images = random_images(model, 2)
    samples = [builder.caption(images[0], "a red circle"), builder.text_to_image("a blue square", images[1])]
    batch = MLLMCollator(model.token_ids.pad)(samples)
    out = model(**{k: batch[k] for k in MODEL_INPUTS})
    logits, labels = out.logits[:, :-1].float(), batch["labels"][:, 1:]
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    assert torch.allclose(out.loss, expected, atol=1e-5)
    out.loss.backward()
    grad = model.lm.get_input_embeddings().weight.grad
    assert float(grad[images[0].reshape(-1)].abs().sum()) > 0  # the image read reaches the code rows
    bad = batch["labels"].clone()
    bad[batch["input_ids"] == IMAGE_PLACEHOLDER_ID] = 5
    with pytest.raises(ValueError, match="labels on image placeholder slots"):
        model(batch["input_ids"], batch["attention_mask"], bad, batch["image_token_ids"])
    with pytest.raises(ValueError, match="not visual codes"):
        model.embed_images(torch.full((1, *model.code_shape), 114))


def prompts(model: UniCodeMLLM):
    builder = MLLMSampleBuilder(model.text_tokenizer, model.code_shape)
    images = random_images(model, 3, seed=3)
    questions = ["what colour is the square", "where", "how many objects are there in the picture at the top"]
    return [builder.question_prompt(img, q) for img, q in zip(images, questions, strict=True)]


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_gives_the_same_logits_as_one_by_one(tiny_lm_dir, vt_dir, side):
    model = load(tiny_lm_dir, vt_dir)
    samples = prompts(model)
    assert len({len(s) for s in samples}) == 3
    batch = MLLMCollator(model.token_ids.pad, padding_side=side)(samples)
    with torch.no_grad():
        batched = model(batch["input_ids"], batch["attention_mask"], image_token_ids=batch["image_token_ids"]).logits
        for row, s in enumerate(samples):
            alone = model(s.input_ids[None], image_token_ids=s.image_token_ids).logits[0]
            last = batch["attention_mask"][row].nonzero()[-1, 0]
            torch.testing.assert_close(batched[row, last], alone[-1], atol=1e-5, rtol=1e-4)
            real = batch["attention_mask"][row] == 1
            torch.testing.assert_close(batched[row, real], alone, atol=1e-5, rtol=1e-4)


def test_decoding_continues_the_spliced_prompt(tiny_lm_dir, vt_dir):
    model = load(tiny_lm_dir, vt_dir)
    samples = prompts(model)[:2]
    decoder, logits = prefill_prompts(model, samples)  # left-padded, as generation pads
    first = logits.argmax(dim=-1)
    new = torch.stack([first, decoder.step(first).argmax(dim=-1)], dim=1)  # greedy
    assert new.shape == (2, 2)
    with torch.no_grad():
        for row, s in enumerate(samples):
            first = model(s.input_ids[None], image_token_ids=s.image_token_ids).logits[0, -1].argmax()
            assert int(new[row, 0]) == int(first)


def test_lora_step_merge_save_reload_gives_identical_logits(tiny_lm_dir, vt_dir, tmp_path):
    model = load(tiny_lm_dir, vt_dir)
    model.save_pretrained(tmp_path / "base")
    model.enable_lora(LoraSettings(r=4, alpha=8, dropout=0.0))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    builder = MLLMSampleBuilder(model.text_tokenizer, model.code_shape)
    images = random_images(model, 2, seed=5)
    batch = MLLMCollator(model.token_ids.pad)(
        [builder.decompression(images[0]), builder.vqa(images[1], [("what colour is the square", "red")])]
    )
    inputs = (batch["input_ids"], batch["attention_mask"])
    with torch.no_grad():
        base_logits = model(*inputs, image_token_ids=batch["image_token_ids"]).logits
    model.train()
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    model(*inputs, batch["labels"], batch["image_token_ids"]).loss.backward()
    optimizer.step()
    model.eval()
    with torch.no_grad():
        lora_logits = model(*inputs, image_token_ids=batch["image_token_ids"]).logits
    assert not torch.allclose(lora_logits, base_logits, atol=1e-4)  # the step changed the model
    with pytest.raises(UserError, match="LoRA adapters are not merged"):
        model.save_pretrained(tmp_path / "unmerged")
    model.save_lora_adapter(tmp_path / "adapter")

    model.merge_lora()
    assert not model.has_lora
    model.save_pretrained(tmp_path / "merged")
    reloaded = UniCodeMLLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        merged_logits = reloaded(*inputs, image_token_ids=batch["image_token_ids"]).logits
        plain_lm = AutoModelForCausalLM.from_pretrained(tmp_path / "merged" / "lm").eval()
        plain_logits = plain_lm(
            inputs_embeds=reloaded.build_inputs(*inputs, batch["image_token_ids"]).inputs_embeds,
            attention_mask=batch["attention_mask"],
        ).logits
    torch.testing.assert_close(merged_logits, lora_logits, atol=1e-5, rtol=1e-4)
    real = batch["attention_mask"] == 1  # padding slots get other positions without position_ids; never read
    torch.testing.assert_close(plain_logits[real], merged_logits[real], atol=1e-5, rtol=1e-4)

    base = UniCodeMLLM.from_pretrained(tmp_path / "base").eval()
    base.load_lora_adapter(tmp_path / "adapter")
    with torch.no_grad():
        adapter_logits = base(*inputs, image_token_ids=batch["image_token_ids"]).logits
    torch.testing.assert_close(adapter_logits, lora_logits, atol=1e-5, rtol=1e-4)


def test_save_by_reference_keeps_reading_mode_and_checks_the_config(tiny_lm_dir, vt_dir, tmp_path):
    model = load(tiny_lm_dir, vt_dir, reading="interleaved", template="vicuna_v1")
    model.save_pretrained(tmp_path / "m", copy_visual_tokenizer=False)
    saved = json.loads((tmp_path / "m" / "unicode_mllm.json").read_text())
    assert saved["reading"] == "interleaved" and saved["template"] == "vicuna_v1"
    assert saved["visual_tokenizer"] == str(vt_dir.resolve()) and not (tmp_path / "m" / "visual_tokenizer").exists()
    assert saved["code_shape"] == [4, 4, 2] and saved["token_ids"]["image_start"] == 114
    reloaded = UniCodeMLLM.from_pretrained(tmp_path / "m")
    assert reloaded.reading == "interleaved" and reloaded.tokens_per_image == 32
    saved["code_shape"] = [2, 2, 2]
    (tmp_path / "m" / "unicode_mllm.json").write_text(json.dumps(saved))
    with pytest.raises(UserError, match=r"code_shape \(2, 2, 2\) but the visual tokenizer's is \(4, 4, 2\)"):
        UniCodeMLLM.from_pretrained(tmp_path / "m")
    with pytest.raises(UserError, match="holds no unicode_mllm.json"):
        UniCodeMLLM.from_pretrained(tmp_path)


def test_labels_are_ignore_index_on_the_prompt(tiny_lm_dir, vt_dir):
    model = load(tiny_lm_dir, vt_dir)
    sample = prompts(model)[0]
    assert bool((sample.labels == IGNORE_INDEX).all())
    with pytest.raises(UserError, match="width 16 differs from the LM's embedding width 32"):
        UniCodeMLLM(model.lm, tiny_visual_tokenizer_of_width(16), model.text_tokenizer)


def tiny_visual_tokenizer_of_width(width: int) -> VisualTokenizer:
    codebook = LanguageCodebook.from_embedding_matrix(torch.randn(100, width), CODE_IDS)
    return VisualTokenizer.from_language_codebook(codebook, stacking="rq", depth=2, **ARCH)


def test_public_aggregation_is_what_the_model_reads_on_gemma():
    """Gemma's input-embedding module multiplies by sqrt(hidden size): the public `aggregate_embeddings`, given the
    LM's embedding module, sums what the model reads (not the raw rows, 8x smaller here)."""
    from transformers import GemmaConfig, GemmaForCausalLM

    tok, _ = bare_tokenizer_and_lm()
    sizes = dict(hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, head_dim=32)
    torch.manual_seed(0)
    lm = GemmaForCausalLM(GemmaConfig(vocab_size=len(tok), num_key_value_heads=1, **sizes))
    codebook = LanguageCodebook.from_embedding_matrix(lm.get_input_embeddings().weight.detach(), range(3, len(tok)))
    vt = VisualTokenizer.from_language_codebook(codebook, stacking="rq", depth=2, **ARCH)
    model = UniCodeMLLM(lm, vt, tok).eval()
    codes = torch.randint(0, vt.config.num_codes, (2, *vt.code_shape), generator=torch.Generator().manual_seed(0))
    ids = vt.codes_to_token_ids(codes)
    read = model.embed_images(ids)  # (2, h*w, c): what the LM gets in the image slots
    embeddings = model.lm.get_input_embeddings()
    assert torch.equal(VisualTokenizer.aggregate_embeddings(ids, embeddings), read)
    raw = VisualTokenizer.aggregate_embeddings(ids, embeddings.weight)  # the rows as stored
    torch.testing.assert_close(read, raw * 64**0.5)
