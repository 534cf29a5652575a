"""Inference-time visual-token reduction for reading images (training-free; an add-on behind the reading hook).

An image the LM reads is h*w embeddings, each the sum over depth of the LM's own embedding rows of its codes
(`aggregated` reading). This package shortens that span in two places, both switchable off (the default
`TokenReductionConfig()` changes nothing) and both refused while the LM generates an image (`guard.py`):

Vision stage, on the (n, h*w, c) embeddings before the splice -> `ReducedImageTokens`:
- `mustdrop_merge`: MustDrop stage 1, merge windows of similar neighbours (`mustdrop_merge.py`);
- `ficoco_v`: FiCoCo-V, filter redundant tokens, correlate, compress into kept ones (`ficoco.py`).
(FocusLLaVA's trainable vision-guided sampler was removed: no path could train or hold it.)
`apply_image_reduction` (`sequence.py`) then removes the dropped slots from the spliced prompt, keeping the
survivors' original positions (`keep_original`) or renumbering them (`renumber`).

LLM stage, inside the LM during prefill (`prefill.py`, layer by layer over the HF decoder layers):
- `mustdrop`: MustDrop stage 2, dual-attention filtering at chosen layers (`mustdrop_filter.py`);
- `ficoco_l`: FiCoCo-L, filter / correlate / compress hidden states at chosen layers (`ficoco.py`);
- `focus_text`: FocusLLaVA's text-guided sampler, top-k by text attention, training-free (`focus_text.py`);
with a KV policy for decoding (`kv_cache.py`): `layerwise`, or `final_set` = MustDrop stage 3's
output-aware cache; decoding runs on that cache (`decode.py`, one step at a time).

Batches: per-image and per-row counts may differ; everything is padded with masks (images right-padded,
prompt rows left-padded), so a batch gives its rows' one-by-one results.

The model reaches this package only through its reading hook (`addons/read_hook.py`), which holds the
model's `TokenReductionConfig` and checks it against the model (reading mode, compressor grid, LM layers).
A text answer about images (`generation/reduced_decoding.py`, used by `generation.answer` and chat replies
when the model's `token_reduction` is enabled) then runs:

    cfg = reduction_for_mode(model.token_reduction, generation_mode)   # off for image generation
    image_embeds = model.read_image_embeds(image_token_ids)            # (n, s, c), after the compressor
    spliced = model.splice_image_embeds(input_ids, image_embeds, mask)
    sequence = build_reduced_sequence(input_ids, spliced, image_embeds, (h, w), cfg, generation_mode="text")
    prefill = reduced_prefill(model.lm, sequence, cfg, generation_mode="text")
    logits = decode_step(model.lm, prefill.cache, next_token_embeds)   # the answering loop picks the tokens

A reply that may write an image (`allow_images`) and image generation run unreduced.

Non-goals
---------

mPLUG-Owl3 hyper attention and VLoRA are not implemented here, and neither can be made an inference-time
reduction of a unified-codebook model:

- They are not reductions but *injection modes*: no visual tokens go into the sequence at all; the image
  enters through new weights, mPLUG-Owl3 through per-layer visual K/V projections (`v_kv_proj`) and a
  learned gate, VLoRA through a ~8-layer perceptual weights generator whose low-rank updates have a
  zero-initialised B. Untrained, hyper attention reads through random projections and VLoRA equals the
  base LM with no image at all; neither has a training-free form, while this package only cuts tokens of a
  trained model at inference. They belong with the trainable options (stage 2's
  `vision.injection`), and even there serve understanding only.
- They discard what makes UniCode unified. UniCode reads an image as the LM's *own* token embeddings (the
  visual codebook is the LM's embedding table), processed by every LM layer exactly like text, and writes
  images with the same head into the same vocabulary. Hyper attention feeds the code embeddings only to
  the K/V of a few layers (no self-attention among image tokens, no MLP, a separate projection: a projector
  reintroduced); VLoRA turns them into weight deltas and never reads them as tokens. The codebook's
  alignment with the LM's input space, trained by the language-driven codebook schedule, is then unused on
  the read side.
- They break the read/write symmetry. A generated image is a span of code tokens in the sequence; a later
  turn must read it the same way a given image is read. With hyper attention all visual keys share the
  placeholder's RoPE phase (MI-RoPE), and VLoRA's weights come from learned queries with no grid location,
  so the raster geometry the LM writes images in is gone on the read side; the decompression task
  (read h*w, write h*w*d in raster order) loses the cell-to-cell alignment it trains.
- Cost. UniCode's reading span is already small (8x8 = 64 tokens for a 256 px image in the reference
  setup); removing it entirely saves little next to the projection and generator weights both add.
"""

from unicode_mllm.addons.token_reduction.config import (
    LLM_REDUCTIONS,
    VISION_REDUCTIONS,
    FiCoCoLLMConfig,
    FiCoCoVisionConfig,
    FocusTextConfig,
    KVPolicy,
    LLMReduction,
    MustDropFilterConfig,
    MustDropMergeConfig,
    PositionPolicy,
    TokenReductionConfig,
    VisionReduction,
)
from unicode_mllm.addons.token_reduction.decode import decode_step
from unicode_mllm.addons.token_reduction.ficoco import (
    FiCoCoLPruner,
    ficoco_compress,
    ficoco_correlate,
    ficoco_vision_reduce,
)
from unicode_mllm.addons.token_reduction.focus_text import TopKTextAttentionPruner
from unicode_mllm.addons.token_reduction.guard import (
    GENERATION_MODES,
    GenerationMode,
    check_reduction_allowed,
    reduction_for_mode,
)
from unicode_mllm.addons.token_reduction.image_tokens import VISION_REDUCERS, ReducedImageTokens, identity_reduction
from unicode_mllm.addons.token_reduction.kv_cache import ReducedKVCache
from unicode_mllm.addons.token_reduction.mustdrop_filter import MustDropPruner, dual_attention_filter
from unicode_mllm.addons.token_reduction.mustdrop_merge import mustdrop_window_merge
from unicode_mllm.addons.token_reduction.prefill import PrefillOutput, attention_probs, reduced_prefill
from unicode_mllm.addons.token_reduction.pruner import (
    LLM_PRUNERS,
    LLMTokenPruner,
    PruneDecision,
    PruneInputs,
    build_pruner,
)
from unicode_mllm.addons.token_reduction.reduce import build_reduced_sequence, reduce_image_tokens
from unicode_mllm.addons.token_reduction.sequence import ReducedSequence, apply_image_reduction, sequence_from_embeds

__all__ = [
    "GENERATION_MODES",
    "LLM_PRUNERS",
    "LLM_REDUCTIONS",
    "VISION_REDUCERS",
    "VISION_REDUCTIONS",
    "FiCoCoLLMConfig",
    "FiCoCoLPruner",
    "FiCoCoVisionConfig",
    "FocusTextConfig",
    "GenerationMode",
    "KVPolicy",
    "LLMReduction",
    "LLMTokenPruner",
    "MustDropFilterConfig",
    "MustDropMergeConfig",
    "MustDropPruner",
    "PositionPolicy",
    "PrefillOutput",
    "PruneDecision",
    "PruneInputs",
    "ReducedImageTokens",
    "ReducedKVCache",
    "ReducedSequence",
    "TokenReductionConfig",
    "TopKTextAttentionPruner",
    "VisionReduction",
    "apply_image_reduction",
    "attention_probs",
    "build_pruner",
    "build_reduced_sequence",
    "check_reduction_allowed",
    "decode_step",
    "dual_attention_filter",
    "ficoco_compress",
    "ficoco_correlate",
    "ficoco_vision_reduce",
    "identity_reduction",
    "mustdrop_window_merge",
    "reduce_image_tokens",
    "reduced_prefill",
    "reduction_for_mode",
    "sequence_from_embeds",
]
