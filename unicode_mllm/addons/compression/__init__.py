"""Visual-token compressors for the UniCode MLLM (an add-on behind the model's reading hook).

The LLM reads an image as h*w aggregated code embeddings, (b, h*w, C) in raster order on an explicit grid
(h, w), C = the LLM width. A compressor sits between those embeddings and the LLM:

    compressor = build_compressor("qwen2vl_merger", llm_width=C)            # or CompressorConfig(...).build(C)
    tokens, out_grid = compressor(embeds, (h, w))                           # (b, n, C), (h', w') or None
    n = compressor.num_output_tokens(h, w)                                  # size of the <img> ... </img> span

Every compressor takes the grid explicitly (never sqrt(N)); N != h*w, a wrong width or a grid the method
cannot take raises ValueError with the shapes. `CompressorConfig(name, options)` stores the choice in JSON
(`to_dict`/`from_dict`) so a saved model can rebuild it; llm_width is passed to `build`. Compressors act
only on images the LLM *reads*; generation targets and decompression targets keep every code. Only the
`aggregated` reading mode can be compressed (the integration must reject `interleaved` + anything but
`identity`). Options common to several compressors: `input_width` (c_in, default llm_width; set it to read
features of another width, e.g. S^2 channel mode or a ViT) and `odd_grid` for 2x2 merges: 'error'
(default, one-line ValueError), 'pad' (repeat the last row/column; output side ceil(side/2)) or 'crop'
(drop it; floor(side/2)).

Compressors (name: source; token count for an (h, w) grid; notes and deviations):

- `identity`: none; h*w. No parameters.
- `pool2x(mode='bilinear'|'average'|'max', stride=2, odd_grid)`: LLaVA-OneVision `get_2dPool`
  (LLaVA-VL/LLaVA-NeXT llava/model/llava_arch.py); bilinear: ceil(h/s)*ceil(w/s) (27x27 -> 196),
  average/max: (h/s)*(w/s) with odd sides per odd_grid ('crop' = the reference's floor, 27x27 -> 169).
  Parameter-free (inference-only ablation possible). Deviation: non-square grids allowed; an odd side
  raises by default instead of being silently dropped.
- `deco_avgpool(target_grid, mlp_layers=2, input_width)`: DeCo `AvgPoolProjector` (arXiv 2405.20985,
  yaolinli/DeCo README); th*tw. Adaptive average pooling (overlapping windows when sizes do not divide)
  BEFORE Linear(c_in, C) + (mlp_layers-1) x [GELU, Linear(C, C)]; mlp_layers=0 is pool-only
  (parameter-free). Deviations: explicit (possibly non-square) target_grid instead of sqrt(query_num);
  the input grid is explicit (the reference takes int(sqrt(N))); a target larger than the grid raises.
- `ldpv2(target_grid, input_width)`: MobileVLM V2 `LDPNetV2Projector` (arXiv 2402.03766,
  Meituan-AutoML/MobileVLM mobilevlm/model/vision_projector.py); th*tw. Linear -> GELU -> Linear on all
  tokens BEFORE adaptive pooling, then x + depthwise Conv3x3(x) with bias (PEG). Deviations: target_grid
  is a parameter (the reference hard-codes 12x12) and grids need not be square (it asserts h*h == N).
- `internvl_ps(ps_version='v2'|'v1', odd_grid, input_width)`: InternVL 1.1+ `pixel_shuffle(x, 0.5)` +
  `mlp1` (OpenGVLab/InternVL internvl_chat/internvl/model/internvl_chat/modeling_internvl_chat.py);
  (h/2)*(w/2). Channel block q = 2*di + dj of output (i, j) holds input (2i + di, 2j + dj); v1 returns
  the same tokens transposed (output grid (w/2, h/2)), as v1 checkpoints expect. mlp1 = LayerNorm(4c)
  -> Linear(4c, C) -> GELU -> Linear(C, C). Deviation: odd sides handled by odd_grid (the reference
  fails on a view).
- `qwen2vl_merger(odd_grid, input_width)`: Qwen2-VL `PatchMerger` (arXiv 2409.12191, huggingface/transformers
  models/qwen2_vl/modeling_qwen2_vl.py); (h/2)*(w/2). LayerNorm(c, eps 1e-6) per token, concat of the true
  2x2 neighbourhood (TL, TR, BL, BR: the order of Qwen2-VL's block-major processor), Linear(4c, 4c) -> GELU
  -> Linear(4c, C). Deviation: the reference merger only reshapes (-1, 4c) and relies on the processor's
  patch order; here the gather from the raster grid is explicit.
- `qformer(num_queries=32, num_layers=12, hidden_width=768, num_heads=12, cross_attention_freq=2,
  pos_emb='2d_sincos', input_width)`: BLIP-2 Q-Former (arXiv 2301.12597, salesforce/LAVIS
  lavis/models/blip2_models/Qformer.py); num_queries tokens, no grid. Learned queries N(0, 0.02) ->
  LayerNorm -> post-LN BERT layers (self-attention, cross-attention in layers l % freq == 0, query FFN
  4d, LayerNorm eps 1e-12) -> Linear(d, C). Deviations: queries only (no text branch, no BERT weights, no
  dropout); the visual tokens get LayerNorm(c_in) + a fixed 2-D sin-cos table before the cross-attention
  (BLIP-2 applies `ln_vision` to ViT features that already carry position); with pos_emb='none' the output
  is invariant to permuting the tokens.
- `perceiver(num_latents=64, depth=6, num_heads=8, head_width=64, pos_emb='2d_sincos', input_width)`:
  Flamingo Perceiver Resampler (arXiv 2204.14198, mlfoundations/open_flamingo open_flamingo/src/helpers.py);
  num_latents tokens, no grid. Latents N(0, 1); per layer latents += attn(q = latents, k/v = [media;
  latents], separate LayerNorms, bias-free); latents += FFN(LN, 4x, GELU, bias-free); final LayerNorm; then
  Linear(c_in, C) (Flamingo feeds gated cross-attention instead). Deviations: the same LayerNorm + 2-D
  sin-cos on the tokens as `qformer`; single image, no time/frame embeddings.

Which need stage-2 training: all but `identity`, `pool2x` and `deco_avgpool` with mlp_layers=0
(`Compressor.is_trainable`).

High-resolution views (several encoder views of one image, each compressed per grid) are the sibling
add-on `unicode_mllm.addons.highres`.

In the model: `UniCodeMLLM(..., compressor=CompressorConfig(...))` (stage 2: `model.compressor` in the YAML)
hands the config to its reading hook (`addons/read_hook.py`), which builds the compressor at the LM's width,
sizes every read span with `num_output_tokens(h, w)` and saves it in `unicode_mllm.json` +
`compressor.safetensors`; the model holds the compressor as its submodule `compressor`.

Not here: MustDrop, FiCoCo, FocusLLaVA's text-guided sampler (`unicode_mllm.addons.token_reduction`, whose
docstring also says why hyper attention and VLoRA are left out).
"""

from unicode_mllm.addons.compression.base import (
    COMPRESSORS,
    Compressor,
    CompressorOutput,
    IdentityCompressor,
    build_compressor,
    compressor_option_names,
    register_compressor,
)
from unicode_mllm.addons.compression.concat_merge import InternVLPixelShuffle, Qwen2VLMerger, internvl_pixel_shuffle
from unicode_mllm.addons.compression.config import CompressorConfig
from unicode_mllm.addons.compression.grid_layout import (
    adaptive_pool_tokens,
    gather_2x2,
    merge_blocks,
    merge_strided,
    split_blocks,
    split_strided,
)
from unicode_mllm.addons.compression.pooling import DecoAvgPool, Ldpv2, Pool2x
from unicode_mllm.addons.compression.position import sincos_2d
from unicode_mllm.addons.compression.resampler import PerceiverResampler, QFormer

__all__ = [
    "COMPRESSORS",
    "Compressor",
    "CompressorConfig",
    "CompressorOutput",
    "DecoAvgPool",
    "IdentityCompressor",
    "InternVLPixelShuffle",
    "Ldpv2",
    "PerceiverResampler",
    "Pool2x",
    "QFormer",
    "Qwen2VLMerger",
    "adaptive_pool_tokens",
    "build_compressor",
    "compressor_option_names",
    "gather_2x2",
    "internvl_pixel_shuffle",
    "merge_blocks",
    "merge_strided",
    "register_compressor",
    "sincos_2d",
    "split_blocks",
    "split_strided",
]
