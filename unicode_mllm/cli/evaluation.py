"""`unicode-mllm eval ...`: evaluate a visual tokenizer (reconstruction, code usage) or a model (VQA, POPE,
text-to-image), and run the ablations."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer

from unicode_mllm.cli.checks import check_at_least, check_lpips_trunk, check_sampling, ensure_writable_output
from unicode_mllm.cli.inference import with_token_reduction
from unicode_mllm.cli.options import DEPTH_TEMPERATURES_OPTION, DEVICE_OPTION, REDUCE_OPTION, parse_depth_temperatures
from unicode_mllm.errors import UserError
from unicode_mllm.runtime.model_folders import require_visual_tokenizer

eval_app = typer.Typer(
    help="Evaluate a visual tokenizer (reconstruction, code usage) or a model (VQA, text-to-image).",
    no_args_is_help=True,
)

EVAL_MLLM_OPTION = typer.Option(..., "--model", help="UniCodeMLLM folder (save_pretrained output).")
VQA_METRIC_HELP = "auto (VQAv2 accuracy for a question with >= 4 reference answers, else exact match), vqav2 or exact."
EVAL_OUT_HELP = "The JSON report (default: MODEL/eval/<name>.json); the .md table and the _results.json go next to it."
EVAL_OUT_OPTION = typer.Option(None, "--out", help=EVAL_OUT_HELP)
ANSWER_TOKENS_OPTION = typer.Option(16, "--max-new-tokens", help="Longest answer, in tokens.")
QUESTION_LIMIT_OPTION = typer.Option(None, "--limit", help="Ask at most this many questions.")


def _echo_lines(lines: list[str]) -> None:
    for line in lines:
        typer.echo(line)


def _write_report(report: dict, out: Path | None) -> None:
    if out is None:
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    typer.echo(f"report: {out}")


def _load_mllm(model: Path, device: str, reduce: list[str] | None = None):
    """UniCodeMLLM.from_pretrained(model) on `device`, in eval mode, its token reduction overridden by `reduce`."""
    from unicode_mllm.model import UniCodeMLLM
    from unicode_mllm.runtime.devices import select_device

    return with_token_reduction(UniCodeMLLM.from_pretrained(model), reduce or []).to(select_device(device)).eval()


# ---------------------------------------------------------------------------------------- tokenizer


@eval_app.command("tokenizer")
def eval_tokenizer_cmd(
    tokenizer: Path = typer.Option(..., "--tokenizer", help="Visual tokenizer folder (save_pretrained output)."),
    data: Path | None = typer.Option(None, "--data", help="Shard folder with manifest.json (split: --split)."),
    split: str | None = typer.Option(None, "--split", help="Split of --data to evaluate (default: val)."),
    folder: Path | None = typer.Option(None, "--folder", help="Image folder; unreadable files are counted skips."),
    photos: bool = typer.Option(False, "--photos", help="The real photos shipped with scikit-image (out of domain)."),
    photo: list[str] = typer.Option([], "--photo", help="With --photos: evaluate only this photo (repeatable)."),
    out: Path | None = typer.Option(None, "--out", help="Write the JSON report here."),
    grid: Path | None = typer.Option(None, "--grid", help="Write a PNG grid of original | reconstruction pairs here."),
    lpips_trunk: str = typer.Option(
        "auto", "--lpips-trunk", help="VGG16 trunk for LPIPS: auto (torch cache), a path, random (tests), or none."
    ),
    batch_size: int = typer.Option(16, "--batch-size"),
    limit: int | None = typer.Option(None, "--limit", help="Evaluate at most this many images."),
    device: str = DEVICE_OPTION,
    inception_weights: Path | None = typer.Option(
        None,
        "--inception-weights",
        help="FID Inception weights for rFID (pt_inception-2015-12-05-6726825d.pth); default: the torch hub cache, "
        "else rFID is not measured. Never downloaded.",
    ),
    feature_extractor: str | None = typer.Option(
        None, "--feature-extractor", help="rFID network: inception (default), or random-for-tests (not FID)."
    ),
) -> None:
    """PSNR, SSIM, LPIPS, rFID and per-depth code usage of a visual tokenizer on shards, a folder or photos."""
    from unicode_mllm.evaluation import ImageSet, eval_visual_tokenizer
    from unicode_mllm.evaluation.fid import INCEPTION, load_feature_extractor
    from unicode_mllm.runtime.devices import select_device

    require_visual_tokenizer(tokenizer)
    chosen = [name for name, given in (("--data", data), ("--folder", folder), ("--photos", photos)) if given]
    if len(chosen) != 1:
        raise UserError(f"pick exactly one image set: --data DIR [--split S], --folder DIR or --photos (got {chosen})")
    if split is not None and data is None:
        raise UserError("--split selects a split of --data; pass --data DIR as well")
    if photo and not photos:
        raise UserError("--photo picks photos of --photos; pass --photos as well")
    if batch_size < 1 or (limit is not None and limit < 1):
        raise UserError(f"--batch-size and --limit must be >= 1 (got {batch_size} and {limit})")
    check_lpips_trunk(lpips_trunk)
    ensure_writable_output(out, "--out")
    ensure_writable_output(grid, "--grid")
    if data is not None:
        images = ImageSet.shards(data, split or "val")
    elif folder is not None:
        images = ImageSet.folder(folder)
    else:
        images = ImageSet.photos(photo or None)
    run_device = select_device(device)
    rfid = INCEPTION  # measured when the weights are in the torch hub cache, else "not measured: <reason>"
    if feature_extractor is not None or inception_weights is not None:  # asked for: a bad file is an error, now
        rfid = load_feature_extractor(feature_extractor or INCEPTION, inception_weights, run_device)
    result = eval_visual_tokenizer(
        tokenizer,
        images,
        lpips_trunk=None if lpips_trunk == "none" else lpips_trunk,
        batch_size=batch_size,
        limit=limit,
        device=run_device,
        grid_path=grid,
        rfid=rfid,
    )
    _echo_lines(result.summary_lines())
    if grid is not None:
        typer.echo(f"grid: {grid}")
    _write_report(result.to_dict(), out)


# ---------------------------------------------------------------------------------------- answers: VQA, POPE


def _eval_outputs(model: Path, name: str, out: Path | None) -> tuple[Path, Path, Path]:
    """The JSON report, markdown table and official-format results of an `eval vqa`/`eval pope` run: --out and
    files next to it, else MODEL/eval/<name>.json, <name>.md and <name>_results.json; all checked writable."""
    if not model.is_dir():
        raise UserError(f"--model {model} is not a folder; pass a saved UniCodeMLLM folder")
    if out is not None and out.suffix.lower() == ".md":
        json_out = out.with_suffix(".json")
        raise UserError(f"--out {out} names the JSON report (the .md table goes next to it); e.g. --out {json_out}")
    report = out if out is not None else model / "eval" / f"{name}.json"
    paths = (report, report.with_suffix(".md"), report.with_name(f"{report.stem}_results.json"))
    for path in paths:
        ensure_writable_output(path, "--out")
    return paths


def _check_answer_sizes(batch_size: int, max_new_tokens: int, limit: int | None) -> None:
    if batch_size < 1 or max_new_tokens < 1 or (limit is not None and limit < 1):
        raise UserError(
            f"--batch-size, --max-new-tokens and --limit must be >= 1 (got {batch_size}, {max_new_tokens}, {limit})"
        )


def _greedy_decoding(model: Path, max_new_tokens: int, batch_size: int, reduce: list[str]) -> dict[str, Any]:
    """How `eval vqa` and `eval pope` decode, as their reports record it."""
    return {
        "model": str(model),
        "greedy": True,
        "max_new_tokens": max_new_tokens,
        "temperature": 0.0,
        "batch_size": batch_size,
        "reduce": list(reduce),
    }


def _greedy_answer_fn(mllm, decoding: dict[str, Any]) -> Callable[[list, list[str]], list[str]]:
    """The evaluators' answer_fn: a batch of (image, question) pairs -> greedy answers as `decoding` says."""
    from unicode_mllm.generation import answer

    max_new_tokens, batch_size = decoding["max_new_tokens"], decoding["batch_size"]

    def answer_fn(batch_images: list, batch_questions: list[str]) -> list[str]:
        return answer(
            mllm, batch_images, batch_questions, max_new_tokens=max_new_tokens, temperature=0.0, batch_size=batch_size
        )

    return answer_fn


def _eval_settings(decoding: dict[str, Any], data: dict, limit: int | None) -> dict[str, str]:
    """The settings rows of the markdown table."""
    rows = {"model": decoding["model"], **{f"data: {k}": str(v) for k, v in data.items() if v is not None}}
    rows["decoding"] = f"greedy, at most {decoding['max_new_tokens']} new tokens, batches of {decoding['batch_size']}"
    rows["limit"] = "all questions" if limit is None else f"the first {limit} questions"
    if decoding["reduce"]:
        rows["token reduction"] = ", ".join(decoding["reduce"])
    return rows


def _write_answer_eval(
    result, title: str, settings: dict, decoding: dict, source: dict, paths: tuple, results: list | None = None
) -> None:
    """Print an `eval vqa`/`eval pope` result and write its JSON report, markdown table and official-format
    `results` (when given) to `paths` (`_eval_outputs`). settings: the command, model, metric and limit."""
    _echo_lines(result.summary_lines())
    report = {**result.to_dict(), "decoding": decoding, "settings": settings}
    _write_report(report, paths[0])
    paths[1].write_text(result.to_markdown(title, _eval_settings(decoding, source, settings["limit"])))
    typer.echo(f"table: {paths[1]}")
    if results is not None:
        paths[2].write_text(json.dumps(results) + "\n")
        typer.echo(f"answers in the official results format: {paths[2]}")


@dataclass(frozen=True)
class _QuestionSet:
    """The question-set options of `eval vqa`: exactly one of data (a shard folder, split), jsonl (image_root) and
    questions (annotations, images, image_pattern, subset) is given."""

    data: Path | None
    split: str | None
    jsonl: Path | None
    image_root: Path | None
    questions: Path | None
    annotations: Path | None
    images: Path | None
    image_pattern: str | None
    subset: str | None

    def check_options(self) -> None:
        """UserError for a set missing or given twice, or an option that belongs to another set."""
        given = (("--data", self.data), ("--jsonl", self.jsonl), ("--questions", self.questions))
        chosen = [name for name, value in given if value]
        if len(chosen) != 1:
            raise UserError(
                "pick exactly one question set: --data DIR [--split S], --jsonl FILE or --questions FILE "
                f"[--annotations FILE] --images DIR (got {', '.join(chosen) or 'none'})"
            )
        if self.split is not None and self.data is None:
            raise UserError("--split selects a split of --data; pass --data DIR as well")
        if self.image_root is not None and self.jsonl is None:
            raise UserError("--image-root is the folder of --jsonl's images; with --questions, pass --images")
        file_options = (
            ("--annotations", self.annotations),
            ("--images", self.images),
            ("--image-pattern", self.image_pattern),
            ("--subset", self.subset),
        )
        extras = [option for option, value in file_options if value is not None]
        if extras and self.questions is None:
            raise UserError(f"{', '.join(extras)} go with --questions FILE; pass it, or drop them")
        if self.questions is not None and self.images is None:
            raise UserError("--questions needs --images DIR, the folder of its images (e.g. val2014/)")

    def read(self, skips) -> tuple[str, dict[str, Any], Any]:
        """(name, source, items); the files are read and checked now, so that a bad one fails before the model
        loads."""
        from unicode_mllm.evaluation.vqa import jsonl_vqa_items, question_file_items, shapes_vqa_items
        from unicode_mllm.generation.question_files import read_utf8_lines
        from unicode_mllm.shard_manifest import read_manifest

        files = (("--questions", self.questions), ("--annotations", self.annotations), ("--jsonl", self.jsonl))
        for option, path in files:
            if path is not None and not path.is_file():
                kind = "JSONL" if path is self.jsonl else "JSON"
                raise UserError(f"{option} {path} not found; pass an existing {kind} file")
        if self.data is not None:
            read_manifest(self.data)  # a missing or foreign folder fails here, not after the model is loaded
            split = self.split or "heldout"
            source = {"kind": "shards", "data_dir": str(self.data), "split": split}
            return f"vqa_{self.data.name}_{split}", source, shapes_vqa_items(self.data, split, skips)
        if self.jsonl is not None:
            read_utf8_lines(self.jsonl)  # a file that is not UTF-8 fails here, not after the model is loaded
            source = {"kind": "jsonl", "path": str(self.jsonl)}
            return f"vqa_{self.jsonl.stem}", source, jsonl_vqa_items(self.jsonl, skips, self.image_root)
        assert self.questions is not None and self.images is not None
        items, source = question_file_items(
            self.questions, self.annotations, self.images, skips, image_pattern=self.image_pattern, subset=self.subset
        )
        return f"vqa_{self.questions.stem}", source, items


@eval_app.command("vqa")
def eval_vqa_cmd(
    model: Path = EVAL_MLLM_OPTION,
    data: Path | None = typer.Option(
        None, "--data", help="Shard folder: shapes, or `data from-vqav2` (questions from its samples' qa)."
    ),
    split: str | None = typer.Option(None, "--split", help="Split of --data (default: heldout)."),
    jsonl: Path | None = typer.Option(
        None, "--jsonl", help='JSONL of {"image", "question", "answers" (or "answer")} lines.'
    ),
    image_root: Path | None = typer.Option(None, "--image-root", help="Folder --jsonl image paths are relative to."),
    questions: Path | None = typer.Option(
        None,
        "--questions",
        help="Official question file: VQAv2 (v2_OpenEnded_mscoco_val2014_questions.json, with --annotations) or GQA "
        "(testdev_balanced_questions.json).",
    ),
    annotations: Path | None = typer.Option(
        None, "--annotations", help="VQAv2 annotations (v2_mscoco_val2014_annotations.json): the human answers."
    ),
    images: Path | None = typer.Option(None, "--images", help="Folder of the --questions images (e.g. val2014/)."),
    image_pattern: str | None = typer.Option(
        None,
        "--image-pattern",
        help="Image file name of {subset} and {image_id} (default: COCO_{subset}_{image_id:012d}.jpg for VQAv2, "
        "{image_id}.jpg for GQA).",
    ),
    subset: str | None = typer.Option(None, "--subset", help="Fills {subset} (default: the files' data_subtype)."),
    metric: str = typer.Option("auto", "--metric", help=VQA_METRIC_HELP),
    max_new_tokens: int = ANSWER_TOKENS_OPTION,
    batch_size: int = typer.Option(16, "--batch-size"),
    limit: int | None = QUESTION_LIMIT_OPTION,
    device: str = DEVICE_OPTION,
    reduce: list[str] = REDUCE_OPTION,
    out: Path | None = EVAL_OUT_OPTION,
) -> None:
    """VQA accuracy per answer and question type: VQAv2's official metric or exact match (greedy answers)."""
    from unicode_mllm.evaluation import SkipCounts
    from unicode_mllm.evaluation.vqa import METRICS, eval_vqa

    question_set = _QuestionSet(data, split, jsonl, image_root, questions, annotations, images, image_pattern, subset)
    question_set.check_options()
    if metric not in METRICS:
        raise UserError(f"--metric {metric!r} is unknown; choose one of {', '.join(METRICS)}")
    _check_answer_sizes(batch_size, max_new_tokens, limit)
    skips = SkipCounts()
    name, source, items = question_set.read(skips)
    paths = _eval_outputs(model, name if limit is None else f"{name}_limit{limit}", out)
    mllm = _load_mllm(model, device, reduce)
    decoding = _greedy_decoding(model, max_new_tokens, batch_size, reduce)
    answer_fn = _greedy_answer_fn(mllm, decoding)
    result = eval_vqa(answer_fn, items, batch_size=batch_size, limit=limit, source=source, skips=skips, metric=metric)
    settings = {"command": "eval vqa", "model": str(model), "metric": result.metric_name, "limit": limit}
    _write_answer_eval(result, f"VQA: {name}", settings, decoding, source, paths, result.official_results())


@eval_app.command("pope")
def eval_pope_cmd(
    model: Path = EVAL_MLLM_OPTION,
    questions: Path = typer.Option(
        ..., "--questions", help="POPE question file (JSON lines), e.g. coco_pope_random.json."
    ),
    images: Path = typer.Option(..., "--images", help="Folder of the POPE images (val2014/ for the COCO sets)."),
    max_new_tokens: int = ANSWER_TOKENS_OPTION,
    batch_size: int = typer.Option(16, "--batch-size"),
    limit: int | None = QUESTION_LIMIT_OPTION,
    device: str = DEVICE_OPTION,
    reduce: list[str] = REDUCE_OPTION,
    out: Path | None = EVAL_OUT_OPTION,
) -> None:
    """POPE yes/no questions (object hallucination): accuracy, precision, recall, F1, yes-ratio (greedy answers)."""
    from unicode_mllm.evaluation import SkipCounts
    from unicode_mllm.evaluation.pope import eval_pope, pope_items

    _check_answer_sizes(batch_size, max_new_tokens, limit)
    skips = SkipCounts()
    items = pope_items(questions, images, skips)  # read and checked now: a bad file fails before the model loads
    name = f"pope_{questions.stem}"
    paths = _eval_outputs(model, name if limit is None else f"{name}_limit{limit}", out)
    mllm = _load_mllm(model, device, reduce)
    decoding = _greedy_decoding(model, max_new_tokens, batch_size, reduce)
    source = {"kind": "pope", "questions": str(questions), "images": str(images)}
    result = eval_pope(
        _greedy_answer_fn(mllm, decoding), items, source=source, skips=skips, batch_size=batch_size, limit=limit
    )
    settings = {"command": "eval pope", "model": str(model), "metric": "pope", "limit": limit}
    _write_answer_eval(result, f"POPE: {name}", settings, decoding, source, paths)


# ---------------------------------------------------------------------------------------- text-to-image


@dataclass(frozen=True)
class _T2ISet:
    """What `eval t2i` draws: a caption set's captions, or the shapes world's `prompts` (data: its folder)."""

    caption_set: Any  # evaluation.caption_sets.CaptionSet, or None for shapes prompts
    shapes_cfg: Any  # the shapes world's ShapesConfig, or None for a caption set
    prompts: list
    data: Path | None

    def name(self, count: int) -> str:
        return f"{self.caption_set.name}-n{count}" if self.caption_set is not None else f"shapes-n{count}"


def _t2i_set(data: Path | None, split: str | None, captions: Path | None, images: Path | None, count: int, start: int):
    """The `_T2ISet` the options pick. Checks the options and reads the files now, so that a bad one fails before
    the model loads."""
    from unicode_mllm.evaluation import shapes_config_from_manifest, shapes_t2i_prompts
    from unicode_mllm.evaluation.caption_sets import CaptionSet
    from unicode_mllm.shard_manifest import read_manifest

    if (captions is None) != (images is None):
        raise UserError("--captions FILE and --images DIR go together (the COCO layout); pass both")
    if captions is not None and data is not None:
        raise UserError("pick one set: --data DIR, or --captions FILE --images DIR")
    caption_set, shapes_cfg = None, None
    if captions is not None:
        caption_set = CaptionSet.coco(captions, images)
    elif data is not None:
        source = read_manifest(data).source_generator_config()
        if isinstance(source, dict) and source.get("generator") == "shapes":
            shapes_cfg = shapes_config_from_manifest(data)
        else:
            caption_set = CaptionSet.shards(data, split)
    if split is not None and caption_set is None:
        raise UserError("--split selects a split of a caption --data folder; shapes prompts come from val and heldout")
    if start != 0 and caption_set is not None:
        raise UserError("--start picks shapes world samples; captions are always the first --count images")
    prompts = shapes_t2i_prompts(shapes_cfg, count, start=start) if caption_set is None else []
    return _T2ISet(caption_set, shapes_cfg, prompts, data)


def _t2i_feature_extractor(captions_given: bool, name: str | None, weights: Path | None, device):
    """(extractor or None, note): the FID network, required for a caption set or when asked for (a bad file is an
    error); beside the shapes score only when its weights are there (else None and the reason)."""
    from unicode_mllm.evaluation.fid import INCEPTION, load_feature_extractor, try_feature_extractor

    if captions_given or name is not None or weights is not None:
        return load_feature_extractor(name or INCEPTION, weights, device), None
    return try_feature_extractor(INCEPTION, None, device)


def _seeded_generate_fn(mllm, sampling: dict[str, Any]) -> Callable[[list[str]], list]:
    """The evaluators' generate_fn: one image per prompt as `sampling` says; batch i is drawn with seed + i."""
    import itertools

    from unicode_mllm.generation import generate_images

    batches = itertools.count()
    seed = sampling["seed"]
    keys = ("temperature", "top_k", "top_p", "cfg_scale", "depth_temperatures", "batch_size")
    settings = {k: sampling[k] for k in keys}

    def generate_fn(batch_prompts: list[str]) -> list:
        index = next(batches)
        batch_seed = None if seed is None else seed + index
        return generate_images(mllm, batch_prompts, num_images_per_prompt=1, seed=batch_seed, **settings).images

    return generate_fn


def _draw_and_score(
    generate_fn, t2i_set: _T2ISet, metrics, fid_note, count: int, image_size: int, batch_size: int, grid
):
    """Draw one image per prompt and score them: the shapes analyser (+ FID when `metrics`) for shapes prompts, FID,
    KID and IS against the real images for a caption set. Returns (result, report title, number of images, the
    data's description)."""
    from unicode_mllm.evaluation import eval_t2i
    from unicode_mllm.evaluation.t2i import eval_t2i_captions

    caption_set, prompts, data = t2i_set.caption_set, t2i_set.prompts, t2i_set.data
    if caption_set is not None:
        assert metrics is not None
        result = eval_t2i_captions(
            generate_fn, caption_set, metrics, count=count, image_size=image_size, batch_size=batch_size, grid_path=grid
        )
        return result, f"Text-to-image on {caption_set.name}", result.num_images, caption_set.describe()
    result = eval_t2i(
        generate_fn,
        prompts,
        cfg=t2i_set.shapes_cfg,
        batch_size=batch_size,
        grid_path=grid,
        metrics=metrics,
        metrics_note=fid_note,
    )
    data_files = {"kind": "shapes", "data_dir": str(data.resolve()) if data is not None else None}
    return result, "Text-to-image on the shapes world", len(prompts), data_files


def _write_t2i_report(result, title: str, sampling: dict[str, Any], run: dict[str, Any], extractor, out: Path) -> None:
    """Write an `eval t2i` result's JSON report and markdown table (`t2i.write_results`) and name them.

    run: the resolved model folder, the number of images, their resolution and the data drawn from."""
    from unicode_mllm.evaluation.t2i import results_markdown, write_results

    settings = {
        **sampling,
        "model": run["model"],
        "num_images": run["num_images"],
        "resolution": run["resolution"],
        "feature_extractor": extractor.name if extractor is not None else None,
        "inception_weights": str(extractor.weights) if extractor is not None and extractor.weights else None,
        "data": run["data"],
    }
    report = {**result.to_dict(), "sampling": sampling, "settings": settings}
    json_path, md_path = write_results(report, results_markdown(title, result.markdown_rows(), settings), out)
    typer.echo(f"report: {json_path}; table: {md_path}")


@eval_app.command("t2i")
def eval_t2i_cmd(  # long: 45 lines of options (typer reads them from the signature); the steps are the helpers above
    model: Path = EVAL_MLLM_OPTION,
    data: Path | None = typer.Option(
        None,
        "--data",
        help="Shapes shard folder the model was trained on (analyser score, seen vs held-out pairs), or a shard / "
        "img2dataset folder whose samples have captions (FID, KID, IS against its images).",
    ),
    split: str | None = typer.Option(
        None, "--split", help="Split of a caption --data folder (default: val, else its only split)."
    ),
    captions: Path | None = typer.Option(
        None, "--captions", help="COCO captions file (captions_val2017.json): FID, KID, IS against --images."
    ),
    images: Path | None = typer.Option(None, "--images", help="With --captions: the folder of its images (val2017/)."),
    count: int = typer.Option(
        50,
        "--count",
        help="Shapes: prompts per group (seen = val, heldout = heldout split). Captions: images to generate "
        "(the first caption of each of the first N images).",
    ),
    start: int = typer.Option(0, "--start", help="First world sample index of each split (shapes)."),
    temperature: float = typer.Option(1.0, "--temperature"),
    top_k: int | None = typer.Option(None, "--top-k"),
    top_p: float | None = typer.Option(None, "--top-p"),
    cfg_scale: float = typer.Option(1.0, "--cfg-scale", help="Classifier-free guidance scale (1 = off)."),
    depth_temperatures: str | None = DEPTH_TEMPERATURES_OPTION,
    seed: int | None = typer.Option(
        0, "--seed", help="Sampling seed; batch i of --batch-size prompts is generated with seed + i."
    ),
    batch_size: int = typer.Option(8, "--batch-size"),
    device: str = DEVICE_OPTION,
    inception_weights: Path | None = typer.Option(
        None,
        "--inception-weights",
        help="FID Inception weights (pt_inception-2015-12-05-6726825d.pth); default: the torch hub cache. "
        "Never downloaded.",
    ),
    feature_extractor: str | None = typer.Option(
        None, "--feature-extractor", help="inception (default), or random-for-tests (a random network: not FID)."
    ),
    out: Path | None = typer.Option(
        None, "--out", help="JSON report (a markdown table is written beside it); default MODEL/eval/t2i-NAME.json."
    ),
    grid: Path | None = typer.Option(None, "--grid", help="Write a PNG grid of generations with their prompts here."),
) -> None:
    """Text-to-image: the shapes analyser's score (seen vs held-out pairs) on a shapes folder, or FID, KID and IS
    of one image per caption against the real images (COCO captions, a from-coco or img2dataset folder)."""
    from unicode_mllm.evaluation.fid import DistributionMetrics
    from unicode_mllm.generation.guidance import check_cfg_scale
    from unicode_mllm.runtime.devices import select_device

    if count < 1 or batch_size < 1 or start < 0:
        raise UserError(f"--count and --batch-size must be >= 1 and --start >= 0 (got {count}, {batch_size}, {start})")
    depth_temps = parse_depth_temperatures(depth_temperatures)
    check_sampling(temperature, top_k, top_p, depth_temps)
    check_cfg_scale(cfg_scale)
    t2i_set = _t2i_set(data, split, captions, images, count, start)
    out = out if out is not None else model / "eval" / f"t2i-{t2i_set.name(count)}.json"
    ensure_writable_output(out, "--out")
    ensure_writable_output(grid, "--grid")
    fid_device = select_device(device)
    captions_given = t2i_set.caption_set is not None
    extractor, fid_note = _t2i_feature_extractor(captions_given, feature_extractor, inception_weights, fid_device)
    metrics = DistributionMetrics(extractor, device=fid_device) if extractor is not None else None
    mllm = _load_mllm(model, device)
    sampling = {
        "model": str(model),
        "temperature": temperature,
        "top_k": top_k,
        "top_p": top_p,
        "cfg_scale": cfg_scale,
        "depth_temperatures": depth_temps,
        "seed": seed,
        "batch_size": batch_size,  # with a seed, the images depend on the batching (batch i: seed + i)
    }
    image_size = mllm.visual_tokenizer.config.image_size
    generate_fn = _seeded_generate_fn(mllm, sampling)
    scored = _draw_and_score(generate_fn, t2i_set, metrics, fid_note, count, image_size, batch_size, grid)
    result, title, num_images, data_files = scored
    _echo_lines(result.summary_lines())
    if grid is not None:
        typer.echo(f"grid: {grid}")
    run = {"model": str(model.resolve()), "num_images": num_images, "resolution": image_size, "data": data_files}
    _write_t2i_report(result, title, sampling, run, extractor, out)


@eval_app.command("compressors")
def eval_compressors_cmd(
    config: Path = typer.Option(..., "--config", help="Stage-2 YAML, e.g. configs/mllm/tiny.yaml (the shared budget)."),
    set_: list[str] = typer.Option([], "--set", help="Override a config value (applies to every run)."),
    compressors: str | None = typer.Option(
        None, "--compressors", help="Comma-separated presets or compressor names (default: all eight)."
    ),
    out: Path = typer.Option(Path("runs/compressor_ablation"), "--out", help="One run folder per compressor."),
    prefill_batch_size: int = typer.Option(16, "--prefill-batch-size", help="VQA prompts in the timed batch."),
    prefill_repeats: int = typer.Option(10, "--prefill-repeats", help="Timed forward passes (after one warm-up)."),
) -> None:
    """Stage-2 compressor ablation: equal budgets; tokens/image, prefill time, training time, VQA accuracy."""
    from unicode_mllm.config import load_config
    from unicode_mllm.evaluation.compressor_ablation import (
        parse_compressor_list,
        rows_to_markdown,
        run_compressor_ablation,
    )
    from unicode_mllm.stages.mllm import MLLMTrainConfig

    cfg = load_config(MLLMTrainConfig, config, set_)
    check_at_least(prefill_batch_size, 1, "--prefill-batch-size")
    check_at_least(prefill_repeats, 1, "--prefill-repeats")
    ensure_writable_output(out, "--out", folder=True)
    rows = run_compressor_ablation(
        cfg,
        out,
        parse_compressor_list(compressors),
        prefill_batch_size=prefill_batch_size,
        prefill_repeats=prefill_repeats,
    )
    typer.echo(rows_to_markdown(rows, cfg.eval.splits))
    typer.echo(f"report: {out / 'comparison.md'} and {out / 'comparison.json'}")


@eval_app.command("highres")
def eval_highres_cmd(
    model: Path = typer.Option(..., "--model", help="UniCodeMLLM folder (save_pretrained output), the common start."),
    data: Path | None = typer.Option(None, "--data", help="Shapes shard folder the model was trained on (its world)."),
    paths: str = typer.Option("single,s2,inf_llava", "--paths", help="Comma-separated: single, s2, inf_llava."),
    scale: int = typer.Option(2, "--scale", help="Image side = scale x the visual tokenizer's image size."),
    steps: int = typer.Option(200, "--steps", help="Fine-tuning steps per path (0: score the paths as they are)."),
    train_records: int = typer.Option(200, "--train-records", help="Train-split images to fine-tune on."),
    eval_records: int = typer.Option(50, "--eval-records", help="Images per eval split (val, heldout)."),
    lr: float = typer.Option(1e-4, "--lr"),
    batch_size: int = typer.Option(16, "--batch-size"),
    seed: int = typer.Option(0, "--seed"),
    device: str = DEVICE_OPTION,
    out: Path = typer.Option(Path("runs/highres"), "--out", help="Folder for highres.md and highres.json."),
) -> None:
    """High-resolution check: small objects at 2x size read by one downscaled view, S^2 or INF-LLaVA (VQA)."""
    from unicode_mllm.evaluation.highres import HighResConfig, rows_to_markdown, run_highres_check
    from unicode_mllm.evaluation.t2i import shapes_config_from_manifest
    from unicode_mllm.runtime.devices import select_device

    cfg = HighResConfig(
        paths=tuple(p.strip() for p in paths.split(",") if p.strip()),
        scale=scale,
        train_records=train_records,
        eval_records=eval_records,
        steps=steps,
        lr=lr,
        batch_size=batch_size,
        seed=seed,
    )
    cfg.validate()
    if not math.isfinite(lr):
        raise UserError(f"--lr must be a finite number >= 0, got {lr}")
    ensure_writable_output(out, "--out", folder=True)
    shapes = shapes_config_from_manifest(data) if data is not None else None
    rows = run_highres_check(model, cfg, shapes=shapes, out_dir=out, device=select_device(device))
    typer.echo(rows_to_markdown(rows, cfg.eval_splits, cfg.steps))
    typer.echo(f"report: {out / 'highres.md'} and {out / 'highres.json'}")


@eval_app.command("ablation")
def eval_ablation_cmd(
    out: Path = typer.Option(..., "--out", help="Run folder: data, LM, one sub-folder per setting, ablation.md."),
    profile: str = typer.Option("quick", "--profile", help="quick or full (the demo profiles' steps and minutes)."),
    lm: Path | None = typer.Option(None, "--lm", help="A stage-0 LM folder to share (default: train one)."),
    data: Path | None = typer.Option(None, "--data", help="A shapes shard folder (default: write one)."),
    rebuild_table: bool = typer.Option(
        False, "--rebuild-table", help="Only re-render ablation.md from the ablation.json of a finished run in --out."
    ),
) -> None:
    """The paper's ablation: codebook modes (language_driven, frozen, dual, separate) and stage 2 without
    decompression pre-training, equal budgets, one table of VQA, text-to-image and PSNR."""
    from unicode_mllm.evaluation import ablation

    if rebuild_table:
        typer.echo(ablation.rebuild_table(out).read_text().rstrip())
        return
    if profile not in ablation.ABLATION_PROFILES:
        raise UserError(f"--profile {profile!r} is unknown; choose one of {list(ablation.ABLATION_PROFILES)}")
    for name, path in (("--lm", lm), ("--data", data)):
        if path is not None and not path.is_dir():
            raise UserError(f"{name} {path} is not a folder; pass an existing one or leave {name} out")
    ensure_writable_output(out, "--out", folder=True)
    ablation.run_ablation(out, profile, lm_dir=lm, data_dir=data)
    typer.echo((out / "ablation.md").read_text().rstrip())
    typer.echo(f"table: {out / 'ablation.md'}; every number: {out / 'ablation.json'}")
