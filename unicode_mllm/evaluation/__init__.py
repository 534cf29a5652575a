"""Evaluation: the visual tokenizer (PSNR, SSIM, LPIPS, code usage), VQA accuracy and text-to-image accuracy.

Example:
    result = eval_visual_tokenizer("runs/tokenizer/final", ImageSet.photos(), lpips_trunk="auto")
    result.to_dict()["psnr"], result.to_dict()["usage"]["per_depth"]
    eval_vqa_shapes(answer_fn, "data/shapes", "heldout").accuracy
    eval_t2i(generate_fn, shapes_t2i_prompts(count=50)).group_summary("heldout")["overall"]
"""

from unicode_mllm.evaluation.answers import is_correct, normalise_answer
from unicode_mllm.evaluation.code_usage import CodeUsage
from unicode_mllm.evaluation.image_sets import ImageSet, NamedImage
from unicode_mllm.evaluation.photos import PHOTO_NAMES, Photo, load_photos
from unicode_mllm.evaluation.skips import SkipCounts
from unicode_mllm.evaluation.ssim import ssim
from unicode_mllm.evaluation.t2i import (
    T2I_GROUPS,
    GenerateFn,
    T2IPrompt,
    T2IResult,
    eval_t2i,
    shapes_config_from_manifest,
    shapes_t2i_prompts,
)
from unicode_mllm.evaluation.visual_tokenizer_eval import ImageScores, TokenizerEvalResult, eval_visual_tokenizer
from unicode_mllm.evaluation.vqa import (
    AnswerFn,
    VQAItem,
    VQAResult,
    eval_vqa,
    eval_vqa_jsonl,
    eval_vqa_shapes,
    jsonl_vqa_items,
    shapes_vqa_items,
)

__all__ = [
    "PHOTO_NAMES",
    "T2I_GROUPS",
    "AnswerFn",
    "CodeUsage",
    "GenerateFn",
    "ImageScores",
    "ImageSet",
    "NamedImage",
    "Photo",
    "SkipCounts",
    "T2IPrompt",
    "T2IResult",
    "TokenizerEvalResult",
    "VQAItem",
    "VQAResult",
    "eval_t2i",
    "eval_visual_tokenizer",
    "eval_vqa",
    "eval_vqa_jsonl",
    "eval_vqa_shapes",
    "is_correct",
    "jsonl_vqa_items",
    "load_photos",
    "normalise_answer",
    "shapes_config_from_manifest",
    "shapes_t2i_prompts",
    "shapes_vqa_items",
    "ssim",
]
