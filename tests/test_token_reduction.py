"""Inference-time visual-token reduction (`unicode_mllm.addons.token_reduction`): counts, mappings, exactness, batching.

Tiny CPU models only: an in-memory 3-layer LLaMA (width 32, 4 heads over 2 KV heads) for the LM stage, and the
saved tiny UniCodeMLLM (`tiny_mllm_dir`, 8x8x2 codes) for the end-to-end path. Tolerances are stated per test;
"exact" means `torch.equal`.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from unicode_mllm.addons.token_reduction import (
    FiCoCoLLMConfig,
    FiCoCoLPruner,
    FiCoCoVisionConfig,
    FocusTextConfig,
    MustDropFilterConfig,
    MustDropMergeConfig,
    PruneDecision,
    PruneInputs,
    TokenReductionConfig,
    apply_image_reduction,
    attention_probs,
    build_reduced_sequence,
    check_reduction_allowed,
    decode_step,
    dual_attention_filter,
    ficoco_compress,
    ficoco_correlate,
    ficoco_vision_reduce,
    mustdrop_window_merge,
    reduce_image_tokens,
    reduced_prefill,
    reduction_for_mode,
    sequence_from_embeds,
)
from unicode_mllm.addons.token_reduction.mustdrop_merge import window_members
from unicode_mllm.addons.token_reduction.prefill import prefill_allowed
from unicode_mllm.config import ConfigError
from unicode_mllm.constants import IMAGE_PLACEHOLDER_ID
from unicode_mllm.generation.reduced_decoding import ReducedDecoder
from unicode_mllm.splice import position_ids_from_attention_mask, splice_image_embeddings

# transformers deprecations (e.g. the KV-cache argument `past_key_values` -> `cache`, removed in 5.40) must
# fail here, not surface in users' terminals.
pytestmark = pytest.mark.filterwarnings("error::FutureWarning")

WIDTH = 32


def make_lm(attn_implementation: str = "sdpa", num_layers: int = 3) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=WIDTH,
        intermediate_size=64,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        attn_implementation=attn_implementation,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def lm() -> LlamaForCausalLM:
    return make_lm()


def make_prompt(lengths: tuple[int, ...], image_span: tuple[int, int], seed: int = 0):
    """Left-padded rows of `lengths` real tokens; the image span (start, count) is relative to each row's start.

    Returns inputs_embeds (b, t, c), attention_mask (b, t), is_image (b, t), t = max(lengths).
    """
    g = torch.Generator().manual_seed(seed)
    t = max(lengths)
    embeds = torch.randn(len(lengths), t, WIDTH, generator=g)
    mask = torch.zeros(len(lengths), t, dtype=torch.long)
    is_image = torch.zeros(len(lengths), t, dtype=torch.bool)
    start, count = image_span
    for row, n in enumerate(lengths):
        mask[row, t - n :] = 1
        is_image[row, t - n + start : t - n + start + count] = True
    return embeds * mask[..., None], mask, is_image


def plain_logits(lm, embeds, mask):
    return lm(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids_from_attention_mask(mask)).logits


def by_source(out, row):
    """Logits (n, V) and source columns (n,) of the real tokens of one prefill row."""
    real = out.attention_mask[row].bool()
    return out.logits[row][real], out.source_index[row][real]


# ----- config and guard ----------------------------------------------------------------------------


def test_config_json_round_trip_and_unknown_key():
    cfg = TokenReductionConfig(
        vision="mustdrop_merge",
        llm="ficoco_l",
        position_policy="renumber",
        kv_policy="final_set",
        mustdrop_merge=MustDropMergeConfig(window=(3, 2), threshold=0.7),
        ficoco_l=FiCoCoLLMConfig(layers=(1, 2), num_drop=3, num_targets=2),
    )
    back = TokenReductionConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg
    # Folders saved while FocusLLaVA's (never enabled) vision sampler existed carry its section: it loads as before.
    retired = {"window": 4, "pool_sizes": [4, 2, 1], "router_hidden": 64, "max_tokens": None, "balance_weight": 0.01}
    assert TokenReductionConfig.from_dict({**cfg.to_dict(), "focus_sampler": retired}) == cfg
    assert back.pruning_layers == (1, 2)
    with pytest.raises(ConfigError, match=r"unknown key 'mustdrop\.global_treshold' \(did you mean"):
        TokenReductionConfig.from_dict({"mustdrop": {"global_treshold": 0.1}})
    with pytest.raises(ConfigError, match="llm"):
        TokenReductionConfig.from_dict({"llm": "fastv"})
    with pytest.raises(ValueError, match="pruning layer 5 does not exist: the LM has 3 layers"):
        TokenReductionConfig(llm="mustdrop", mustdrop=MustDropFilterConfig(layers=(5,))).validate(num_layers=3)
    assert not TokenReductionConfig().enabled


def test_guard_refuses_reduction_while_generating_an_image(lm):
    on = TokenReductionConfig(llm="mustdrop", mustdrop=MustDropFilterConfig(layers=(1,)))
    check_reduction_allowed(on, generation_mode="text")
    check_reduction_allowed(TokenReductionConfig(), generation_mode="image")  # off: allowed everywhere
    with pytest.raises(ValueError, match="must be off while generating an image"):
        check_reduction_allowed(on, generation_mode="image")
    with pytest.raises(ValueError, match="needs reading='aggregated'"):
        check_reduction_allowed(on, generation_mode="text", reading="interleaved")
    with pytest.raises(ValueError, match="generation_mode 'video' is unknown"):
        check_reduction_allowed(on, generation_mode="video")
    assert reduction_for_mode(on, "image") == TokenReductionConfig()
    assert reduction_for_mode(on, "text") is on

    embeds, mask, is_image = make_prompt((12,), (2, 6))
    sequence = sequence_from_embeds(embeds, mask, is_image)
    with pytest.raises(ValueError, match="must be off while generating an image"):
        reduced_prefill(lm, sequence, on, generation_mode="image")
    vision_on = TokenReductionConfig(vision="mustdrop_merge")
    with pytest.raises(ValueError, match="must be off while generating an image"):
        reduce_image_tokens(torch.randn(1, 16, WIDTH), (4, 4), vision_on, generation_mode="image")
    # Switched off, image generation mode runs the plain LM.
    out = reduced_prefill(lm, sequence, TokenReductionConfig(), generation_mode="image")
    assert torch.equal(out.logits[0], plain_logits(lm, embeds, mask)[0])


# ----- vision stage: MustDrop window merge ---------------------------------------------------------


def naive_window_merge(x: torch.Tensor, h: int, w: int, wh: int, ww: int, threshold: float):
    """Loop version after MustDrop's `conditional_pooling` idea: returns {slot cell: (token, members)}."""
    out = {}
    for gi in range(0, h, wh):
        for gj in range(0, w, ww):
            cells = [i * w + j for i in range(gi, min(gi + wh, h)) for j in range(gj, min(gj + ww, w))]
            pairs = [(a, b) for a in cells for b in cells if a != b]
            score = sum(F.cosine_similarity(x[a], x[b], dim=0) for a, b in pairs) / len(pairs) if pairs else None
            if score is not None and score >= threshold:
                out[max(cells)] = (x[cells].mean(dim=0), cells)
            else:
                out.update({cell: (x[cell], [cell]) for cell in cells})
    return dict(sorted(out.items()))


def test_mustdrop_merge_counts_means_and_mapping():
    torch.manual_seed(0)
    h, w, c = 8, 8, 16
    x = torch.randn(h * w, c)
    constant_windows = [(0, 0), (2, 4), (6, 6)]  # top-left cells of 2x2 windows made redundant
    for i, j in constant_windows:
        x[[i * w + j, i * w + j + 1, (i + 1) * w + j, (i + 1) * w + j + 1]] = torch.randn(c)
    out = mustdrop_window_merge(x[None], (h, w), MustDropMergeConfig(window=(2, 2), threshold=0.8))
    assert out.counts.tolist() == [h * w - 3 * len(constant_windows)]
    assert torch.equal(out.src_index[0], out.src_index[0].sort().values)  # raster order of the slots
    for i, j in constant_windows:
        bottom_right = (i + 1) * w + j + 1
        slot = int((out.src_index[0] == bottom_right).nonzero())
        torch.testing.assert_close(out.tokens[0, slot], x[bottom_right], rtol=0, atol=1e-6)
        assert out.sizes[0, slot] == 4
        assert out.assignment[0, [i * w + j, i * w + j + 1, (i + 1) * w + j]].tolist() == [slot] * 3
    assert out.sizes[0].sum() == h * w

    # A non-divisible grid (edge windows are smaller) against the loop version.
    torch.manual_seed(1)
    y = torch.randn(5 * 7, c).sign()  # +-1 vectors: many similar pairs
    y[:3] = y[0]
    out = mustdrop_window_merge(y[None], (5, 7), MustDropMergeConfig(window=(3, 3), threshold=0.3))
    expected = naive_window_merge(y, 5, 7, 3, 3, 0.3)
    assert out.src_index[0][out.mask[0]].tolist() == list(expected)
    torch.testing.assert_close(out.tokens[0][out.mask[0]], torch.stack([v[0] for v in expected.values()]))
    for slot, (_, members) in enumerate(expected.values()):
        assert out.assignment[0, members].tolist() == [slot] * len(members)

    # Above any cosine: nothing merges, the output is the input.
    out = mustdrop_window_merge(x[None], (h, w), MustDropMergeConfig(threshold=1.5))
    assert torch.equal(out.tokens[0], x) and out.counts.tolist() == [h * w]
    with pytest.raises(ValueError, match="grid 8x4 needs 32"):
        mustdrop_window_merge(x[None], (8, 4), MustDropMergeConfig())


def test_window_members_cover_the_grid_once():
    members = window_members((5, 7), (2, 3))
    cells = members[members >= 0]
    assert members.shape == (3 * 3, 6) and torch.equal(cells.sort().values, torch.arange(35))


def test_mustdrop_merge_batch_equals_single():
    torch.manual_seed(2)
    x = torch.randn(2, 36, 8).sign()  # random +-1: per-image merge counts differ
    cfg = MustDropMergeConfig(window=(2, 2), threshold=0.2)
    batch = mustdrop_window_merge(x, (6, 6), cfg)
    assert batch.counts[0] != batch.counts[1]
    for i in range(2):
        single = mustdrop_window_merge(x[i : i + 1], (6, 6), cfg)
        m = int(single.counts[0])
        assert torch.equal(batch.src_index[i, :m], single.src_index[0]) and not batch.mask[i, m:].any()
        torch.testing.assert_close(batch.tokens[i, :m], single.tokens[0], rtol=0, atol=1e-6)
        assert torch.equal(batch.assignment[i], single.assignment[0])


# ----- vision stage: FiCoCo-V ------------------------------------------------------------------------


def test_ficoco_v_counts_conservation_and_batch():
    torch.manual_seed(3)
    x = torch.randn(2, 16, 8)
    cfg = FiCoCoVisionConfig(num_drop=5, num_targets=2)
    out = ficoco_vision_reduce(x, (4, 4), cfg)
    assert out.counts.tolist() == [11, 11]
    # Compress conserves sum(size * x) per image: nothing discarded is lost.
    kept_mass = (out.tokens * out.sizes[..., None]).sum(dim=1)
    torch.testing.assert_close(kept_mass, x.sum(dim=1), rtol=0, atol=1e-5)
    assert out.sizes.sum(dim=-1).tolist() == [16.0, 16.0]
    # Every discarded cell is assigned to a kept slot.
    assert bool((out.assignment >= 0).all())
    for i in range(2):
        single = ficoco_vision_reduce(x[i : i + 1], (4, 4), cfg)
        torch.testing.assert_close(out.tokens[i], single.tokens[0], rtol=0, atol=1e-6)
        assert torch.equal(out.src_index[i], single.src_index[0])
    # num_drop 0 keeps the input exactly; the quantile rule (num_targets None) runs too.
    assert torch.equal(ficoco_vision_reduce(x, (4, 4), FiCoCoVisionConfig(num_drop=0)).tokens, x)
    assert ficoco_vision_reduce(x, (4, 4), FiCoCoVisionConfig(num_drop=3)).counts.tolist() == [13, 13]


def test_ficoco_correlate_targets_only_kept_tokens():
    torch.manual_seed(4)
    affinity = torch.randn(2, 6, 6)
    discard = torch.tensor([[1, 0, 0, 1, 0, 0], [0, 1, 1, 0, 0, 0]], dtype=torch.bool)
    targets, weights = ficoco_correlate(affinity, discard, ~discard, num_targets=3, target_quantile=0.998)
    assert targets.shape == (2, 6, 3)
    for b in range(2):
        for i in discard[b].nonzero()[:, 0].tolist():
            used = targets[b, i][weights[b, i] > 0]
            assert not discard[b, used].any()
            torch.testing.assert_close(weights[b, i].sum(), torch.tensor(1.0))
    assert float(weights[~discard].abs().sum()) == 0.0
    x, sizes = torch.randn(2, 6, 4), torch.ones(2, 6)
    merged, new_sizes = ficoco_compress(x, sizes, discard, targets, weights)
    keep = ~discard
    torch.testing.assert_close(
        (merged * new_sizes[..., None] * keep[..., None]).sum(dim=1), x.sum(dim=1), rtol=0, atol=1e-5
    )


# ----- the reduced prompt -------------------------------------------------------------------------


def test_apply_image_reduction_keeps_original_positions():
    torch.manual_seed(7)
    embed = torch.nn.Embedding(50, 8)
    input_ids = torch.tensor(
        [[0, 0, 5, 6, *[IMAGE_PLACEHOLDER_ID] * 16, 7, 8, 9], [4, 5, 6, 7, *[IMAGE_PLACEHOLDER_ID] * 16, 7, 8, 9]]
    )
    mask = (torch.arange(23) >= torch.tensor([[2], [0]])).long()
    image_embeds = torch.randn(2, 16, 8)
    image_embeds[0, :8] = image_embeds[0, 0]  # rows 0-1 of image 0's 4x4 grid equal: both 2x2 windows merge
    spliced = splice_image_embeddings(input_ids, image_embeds, embed, mask)
    cfg = TokenReductionConfig(vision="mustdrop_merge", mustdrop_merge=MustDropMergeConfig(window=(2, 2)))
    reduced = reduce_image_tokens(image_embeds, (4, 4), cfg, generation_mode="text")
    assert reduced.counts.tolist() == [10, 16]
    seq = apply_image_reduction(input_ids, spliced, reduced, position_policy="keep_original")
    assert seq.num_image_tokens.tolist() == [10, 16] and seq.attention_mask.sum(dim=-1).tolist() == [15, 23]
    real = seq.attention_mask.bool()
    original = spliced.position_ids.gather(1, seq.source_index.clamp(min=0))
    assert torch.equal(seq.position_ids[real], original[real])
    assert seq.next_position.tolist() == [21, 23]  # decoding continues from the unreduced lengths
    # Row 0: the merged windows sit on their bottom-right cells (raster 5 and 7) at positions 2 + 5, 2 + 7.
    image_positions = seq.position_ids[0][seq.is_image[0]].tolist()
    assert image_positions[:2] == [2 + 5, 2 + 7] and image_positions[2] == 2 + 8
    torch.testing.assert_close(seq.inputs_embeds[0][seq.is_image[0]], reduced.tokens[0][:10].to(torch.float32))
    renumbered = apply_image_reduction(input_ids, spliced, reduced, position_policy="renumber")
    assert renumbered.position_ids[0][renumbered.attention_mask[0].bool()].tolist() == list(range(15))
    assert renumbered.next_position.tolist() == [15, 23]
    # Switched off: the prompt is the splice, re-packed to the left.
    off = build_reduced_sequence(
        input_ids, spliced, image_embeds, (4, 4), TokenReductionConfig(), generation_mode="text"
    )
    real = spliced.attention_mask.bool()
    assert torch.equal(off.inputs_embeds[real], spliced.inputs_embeds[real])
    assert torch.equal(off.position_ids[real], spliced.position_ids[real]) and torch.equal(off.attention_mask, mask)
    text_only = torch.tensor([[0, 3, 4, 5]])
    spliced = splice_image_embeddings(text_only, None, embed, torch.tensor([[0, 1, 1, 1]]))
    plain = build_reduced_sequence(text_only, spliced, None, (4, 4), cfg, generation_mode="text")
    assert plain.position_ids.tolist() == [[0, 1, 2]] and plain.num_image_tokens.tolist() == [0]  # re-packed


# ----- LLM stage: prefill ---------------------------------------------------------------------------

KEEP_ALL = {
    "mustdrop": TokenReductionConfig(llm="mustdrop", mustdrop=MustDropFilterConfig(layers=(0, 1), global_threshold=0)),
    "ficoco_l": TokenReductionConfig(llm="ficoco_l", ficoco_l=FiCoCoLLMConfig(layers=(1,), num_drop=0)),
    "focus_text": TokenReductionConfig(llm="focus_text", focus_text=FocusTextConfig(layer=1, keep_ratio=1.0)),
}


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("name", sorted(KEEP_ALL))
def test_prefill_keeping_everything_equals_the_plain_lm(name, attn_implementation):
    model = make_lm(attn_implementation)
    embeds, mask, is_image = make_prompt((20, 15), (3, 9))
    out = reduced_prefill(model, sequence_from_embeds(embeds, mask, is_image), KEEP_ALL[name], generation_mode="text")
    reference = plain_logits(model, embeds, mask)
    for row in range(2):
        logits, source = by_source(out, row)
        assert torch.equal(logits, reference[row, source])  # exact
    assert out.image_tokens_per_layer.tolist() == [[9, 9]] * 3


def test_attention_probs_are_the_layers_own_softmax():
    model = make_lm("eager")
    embeds, mask, _ = make_prompt((12, 9), (2, 4))
    positions = position_ids_from_attention_mask(mask)
    out = model(
        inputs_embeds=embeds,
        attention_mask=mask,
        position_ids=positions,
        output_attentions=True,
        output_hidden_states=True,
    )
    rotary = model.model.rotary_emb
    for layer_idx, layer in enumerate(model.model.layers):
        hidden = out.hidden_states[layer_idx]
        cos, sin = rotary(hidden, positions)
        probs = attention_probs(layer, hidden, cos, sin, prefill_allowed(mask.bool()))
        real = mask.bool()
        torch.testing.assert_close(probs[real], out.attentions[layer_idx].mean(dim=1)[real], rtol=0, atol=1e-6)


def test_dual_attention_filter_on_synthetic_attention():
    # Columns: 0 system, 1-4 image, 5-7 text. Only text rows count; image rows carry decoys.
    attn = torch.zeros(1, 8, 8)
    attn[0, 5, 1:5] = torch.tensor([0.1, 0.0, 0.3, 0.0])
    attn[0, 6, 1:5] = torch.tensor([0.1, 0.0, 0.0, 0.05])
    attn[0, 7, 1:5] = torch.tensor([0.1, 0.01, 0.0, 0.0])
    attn[0, 2:5, 1] = 0.9
    is_image = torch.tensor([[0, 1, 1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    text = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1]], dtype=torch.bool)
    # s = (0.3, 0.01, 0.3, 0.05), sum 0.66, m = (0.1, 0.01, 0.3, 0.05); global candidates: s < 0.066.
    assert dual_attention_filter(attn, is_image, text, 0.1, 0.03).nonzero()[:, 1].tolist() == [2]
    assert dual_attention_filter(attn, is_image, text, 0.1, 0.06).nonzero()[:, 1].tolist() == [2, 4]
    assert not dual_attention_filter(attn, is_image, text, 0.0, 1.0).any()
    assert not dual_attention_filter(attn, is_image, torch.zeros_like(text), 1.0, 1.0).any()


DROPPING = {
    "mustdrop": TokenReductionConfig(
        llm="mustdrop", mustdrop=MustDropFilterConfig(layers=(1,), global_threshold=0.1, individual_threshold=1.0)
    ),
    "ficoco_l": TokenReductionConfig(llm="ficoco_l", ficoco_l=FiCoCoLLMConfig(layers=(0, 1), num_drop=3)),
    "focus_text": TokenReductionConfig(llm="focus_text", focus_text=FocusTextConfig(layer=0, keep_ratio=0.4)),
}


@pytest.mark.parametrize("name", sorted(DROPPING))
def test_prefill_drops_image_tokens_keeps_positions_and_batches(lm, name):
    cfg = DROPPING[name]
    embeds, mask, is_image = make_prompt((24, 18), (2, 12))
    out = reduced_prefill(lm, sequence_from_embeds(embeds, mask, is_image), cfg, generation_mode="text")
    counts = out.image_tokens_per_layer  # (layers, b)
    assert counts[0].tolist() == [12, 12] and bool((counts[-1] < 12).all())
    if name == "ficoco_l":
        assert counts.tolist() == [[12, 12], [9, 9], [6, 6]]
        assert out.token_sizes[out.is_image].sum() == 24  # merged, not dropped: 12 per row
    if name == "focus_text":
        assert counts[1:].tolist() == [[5, 5], [5, 5]]
    # Survivors keep their original position ids; text is never dropped.
    original = position_ids_from_attention_mask(mask)
    for row in range(2):
        real = out.attention_mask[row].bool()
        source = out.source_index[row][real]
        assert torch.equal(out.position_ids[row][real], original[row, source])
        text_columns = (mask[row].bool() & ~is_image[row]).nonzero()[:, 0]
        assert torch.isin(text_columns, source).all()
    # A batch of two equals each row alone (left padding, different keep counts allowed); tolerance 1e-5.
    for row in range(2):
        single = reduced_prefill(
            lm,
            sequence_from_embeds(embeds[row : row + 1], mask[row : row + 1], is_image[row : row + 1]),
            cfg,
            generation_mode="text",
        )
        logits, source = by_source(out, row)
        single_logits, single_source = by_source(single, 0)
        offset = int((mask[row] == 0).sum())  # the single row has no left padding
        assert torch.equal(source, single_source + offset)
        torch.testing.assert_close(logits, single_logits, rtol=0, atol=1e-5)


def test_prefill_renumber_policy_counts_survivors(lm):
    cfg = TokenReductionConfig(
        llm="focus_text", focus_text=FocusTextConfig(layer=0, keep_ratio=0.25), position_policy="renumber"
    )
    embeds, mask, is_image = make_prompt((20, 16), (2, 8))
    out = reduced_prefill(lm, sequence_from_embeds(embeds, mask, is_image), cfg, generation_mode="text")
    for row, n in enumerate((20 - 6, 16 - 6)):
        assert out.position_ids[row][out.attention_mask[row].bool()].tolist() == list(range(n))


# ----- LLM stage: decoding on the reduced cache --------------------------------------------------------


class EveryOtherImageToken:
    """A deterministic test pruner: after its layer, drop every second image token of each row."""

    def __init__(self, layer: int):
        self.layers = (layer,)

    def select(self, inputs: PruneInputs) -> PruneDecision:
        rank = inputs.is_image.long().cumsum(dim=-1)
        drop = inputs.is_image & (rank % 2 == 0)
        return PruneDecision(keep=inputs.valid & ~drop, hidden=inputs.hidden, sizes=inputs.sizes)


@pytest.mark.parametrize("position_policy", ["keep_original", "renumber"])
def test_decoding_on_a_layerwise_pruned_cache_matches_a_longer_prefill(lm, position_policy):
    cfg = TokenReductionConfig(position_policy=position_policy)
    embeds, mask, is_image = make_prompt((16, 12), (2, 8))
    pruner = EveryOtherImageToken(layer=1)
    out = reduced_prefill(lm, sequence_from_embeds(embeds, mask, is_image), cfg, generation_mode="text", pruner=pruner)
    # Layers 0-1 cached every token (rows of 16 and 12 real, padded to 16); layer 2 only the survivors.
    assert out.cache.lengths() == [16, 16, 12] and out.cache.num_real(2).tolist() == [12, 8]
    token = torch.randn(2, 1, WIDTH)
    step_logits = decode_step(lm, out.cache, token)
    # The same pruning over prompt + token, prefilled at once: the new token's logits agree (1e-5).
    longer = sequence_from_embeds(
        torch.cat([embeds, token], dim=1),
        torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1),
        torch.cat([is_image, torch.zeros(2, 1, dtype=torch.bool)], dim=1),
    )
    full = reduced_prefill(lm, longer, cfg, generation_mode="text", pruner=pruner)
    torch.testing.assert_close(step_logits, full.logits[:, -1], rtol=0, atol=1e-5)
    assert out.cache.lengths() == [17, 17, 13]


def test_decoding_with_keep_all_equals_the_plain_lm(lm):
    embeds, mask, is_image = make_prompt((14, 10), (2, 6))
    out = reduced_prefill(
        lm, sequence_from_embeds(embeds, mask, is_image), KEEP_ALL["mustdrop"], generation_mode="text"
    )
    tokens = torch.randn(2, 3, WIDTH)
    steps = torch.stack([decode_step(lm, out.cache, tokens[:, k : k + 1]) for k in range(3)], dim=1)
    full_mask = torch.cat([mask, torch.ones(2, 3, dtype=torch.long)], dim=1)
    reference = plain_logits(lm, torch.cat([embeds, tokens], dim=1), full_mask)[:, -3:]
    torch.testing.assert_close(steps, reference, rtol=0, atol=1e-5)


def greedy_on_reduced_cache(lm, sequence, cfg, max_new_tokens: int) -> torch.Tensor:
    """(b, max_new_tokens) greedy ids: reduced prefill, then `decode_step`s (`ReducedDecoder`'s two calls)."""
    out = reduced_prefill(lm, sequence, cfg, generation_mode="text")
    ids = [out.logits[:, -1].argmax(dim=-1)]
    for _ in range(max_new_tokens - 1):
        ids.append(decode_step(lm, out.cache, lm.get_input_embeddings()(ids[-1])[:, None]).argmax(dim=-1))
    return torch.stack(ids, dim=1)


def test_output_aware_final_set_cache_lengths_and_generation(lm):
    cfg = TokenReductionConfig(
        llm="focus_text", focus_text=FocusTextConfig(layer=1, keep_ratio=0.5), kv_policy="final_set"
    )
    embeds, mask, is_image = make_prompt((18, 14), (2, 8))
    out = reduced_prefill(lm, sequence_from_embeds(embeds, mask, is_image), cfg, generation_mode="text")
    # Layer 0 runs before the first pruning layer and keeps all; from layer 1 on only the final 4 + 10 / 4 + 6.
    assert out.cache.lengths() == [18, 14, 14]
    assert [out.cache.num_real(layer).tolist() for layer in range(3)] == [[18, 14], [14, 10], [14, 10]]
    final_sources = out.source_index[out.attention_mask.bool()]
    layer1 = out.cache.source[1][out.cache.valid[1]]
    assert torch.equal(layer1.sort().values, final_sources.sort().values)
    for _ in range(3):
        decode_step(lm, out.cache, torch.randn(2, 1, WIDTH))
    assert out.cache.lengths() == [21, 17, 17]
    ids = greedy_on_reduced_cache(lm, sequence_from_embeds(embeds, mask, is_image), cfg, max_new_tokens=4)
    assert ids.shape == (2, 4) and bool((ids >= 0).all()) and bool((ids < 97).all())


def test_ficoco_l_pruner_merges_and_conserves_mass():
    torch.manual_seed(8)
    b, length = 2, 10
    attn = torch.rand(b, length, length).tril()
    attn = attn / attn.sum(dim=-1, keepdim=True)
    is_image = torch.zeros(b, length, dtype=torch.bool)
    is_image[:, 2:8] = True
    valid = torch.ones(b, length, dtype=torch.bool)
    valid[1, :1] = False
    text = valid & ~is_image & (torch.arange(length) >= 8)
    hidden = torch.randn(b, length, 6)
    inputs = PruneInputs(attn, hidden, is_image, text, valid, torch.ones(b, length), layer_idx=0)
    decision = FiCoCoLPruner(FiCoCoLLMConfig(layers=(0,), num_drop=4, num_targets=2)).select(inputs)
    assert (is_image & decision.keep).sum(dim=-1).tolist() == [2, 2]
    assert bool(decision.keep[~is_image & valid].all())
    kept = decision.keep & is_image
    mass = (decision.hidden * decision.sizes[..., None] * kept[..., None]).sum(dim=1)
    torch.testing.assert_close(mass, (hidden * is_image[..., None]).sum(dim=1), rtol=0, atol=1e-5)
    # num_drop larger than the image tokens still keeps one of them.
    many = FiCoCoLPruner(FiCoCoLLMConfig(layers=(0,), num_drop=50)).select(inputs)
    assert (is_image & many.keep).sum(dim=-1).tolist() == [1, 1]


# ----- end to end on the tiny UniCodeMLLM ---------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_mllm(tiny_mllm_dir):
    from unicode_mllm.model import UniCodeMLLM

    return UniCodeMLLM.from_pretrained(tiny_mllm_dir).eval()


def test_unicode_mllm_reduced_reading_and_generation(tiny_mllm):
    model = tiny_mllm
    h, w, d = model.code_shape
    assert (h, w) == (8, 8) and model.tokens_per_image == 64
    g = torch.Generator().manual_seed(9)
    codes = torch.randint(0, model.visual_tokenizer.code_to_token_id.numel(), (2, h, w, d), generator=g)
    image_token_ids = model.visual_tokenizer.code_to_token_id[codes]  # (2, 8, 8, 2)
    text = torch.randint(4, 100, (2, 9), generator=g)
    span = torch.full((64,), IMAGE_PLACEHOLDER_ID)
    row0 = torch.cat([text[0, :2], span, text[0, 2:]])  # 73 tokens
    row1 = torch.cat([torch.full((3,), model.token_ids.pad), text[1, :2], span, text[1, 2:6]])  # 3 pads + 70
    input_ids = torch.stack([row0, row1])
    mask = (input_ids != model.token_ids.pad).long()
    mask[0] = 1
    image_embeds = model.embed_images(image_token_ids)  # (2, 64, c)
    spliced = model.build_inputs(input_ids, mask, image_token_ids)

    off = build_reduced_sequence(
        input_ids, spliced, image_embeds, (h, w), TokenReductionConfig(), generation_mode="text"
    )
    out = reduced_prefill(model.lm, off, TokenReductionConfig(), generation_mode="text")
    reference = model(input_ids, attention_mask=mask, image_token_ids=image_token_ids).logits
    for row in range(2):
        logits, source = by_source(out, row)
        assert torch.equal(logits, reference[row, source])

    cfg = TokenReductionConfig(
        vision="mustdrop_merge",
        mustdrop_merge=MustDropMergeConfig(window=(2, 2), threshold=-1.0),  # every window merges: 64 -> 16
        llm="mustdrop",
        mustdrop=MustDropFilterConfig(layers=(0,), global_threshold=0.1, individual_threshold=1.0),
        kv_policy="final_set",
    )
    sequence = build_reduced_sequence(input_ids, spliced, image_embeds, (h, w), cfg, generation_mode="text")
    assert sequence.num_image_tokens.tolist() == [16, 16]
    assert sequence.next_position.tolist() == [73, 70]
    prefill = reduced_prefill(model.lm, sequence, cfg, generation_mode="text")
    assert prefill.image_tokens_per_layer[0].tolist() == [16, 16]
    assert bool((prefill.image_tokens_per_layer[1] < 16).all())
    decoder = ReducedDecoder(model, cfg)  # the answering loop's path: the same reduced prefill, then steps
    logits = decoder.prefill(input_ids, mask, image_token_ids)
    torch.testing.assert_close(logits, prefill.logits[:, -1].float(), rtol=0, atol=0)
    ids = [logits.argmax(dim=-1)]
    for _ in range(2):
        ids.append(decoder.step(ids[-1]).argmax(dim=-1))
    assert torch.stack(ids, dim=1).shape == (2, 3)
    with pytest.raises(ValueError, match="must be off while generating an image"):
        build_reduced_sequence(input_ids, spliced, image_embeds, (h, w), cfg, generation_mode="image")
