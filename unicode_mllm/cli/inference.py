"""A trained UniCodeMLLM from the command line: `ask` (VQA), `generate` (text-to-image), `chat` and `serve`."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from unicode_mllm.cli.app import app
from unicode_mllm.cli.checks import check_at_least, check_image_files, check_sampling, ensure_writable_output
from unicode_mllm.cli.options import (
    DEPTH_TEMPERATURES_OPTION,
    DEVICE_OPTION,
    REDUCE_HELP,
    REDUCE_OPTION,
    parse_depth_temperatures,
)
from unicode_mllm.errors import UserError

DTYPE_HELP = "The LM's weights: auto (bf16 on a GPU with native bf16, else fp32), fp32, bf16 or fp16 (GPU)."
DTYPE_OPTION = typer.Option("auto", "--dtype", help=DTYPE_HELP)
SAVED_MLLM_OPTION = typer.Option(..., "--model", help="A saved UniCodeMLLM folder.")


def with_token_reduction(mllm, specs: list[str]):
    """Apply --reduce key=value overrides to the model's TokenReductionConfig (ConfigError naming a bad key)."""
    if specs:
        from unicode_mllm.addons.token_reduction.config import TokenReductionConfig
        from unicode_mllm.config import config_from_dict

        saved = mllm.token_reduction.to_dict()
        mllm.token_reduction = config_from_dict(TokenReductionConfig, saved, specs, source="--reduce")
    return mllm


def _load_inference_model(path: Path, device: str, dtype: str = "fp32", reduce: list[str] | None = None):
    """Load a saved UniCodeMLLM onto a device, in eval mode, its LM in `dtype` (the visual tokenizer stays fp32)
    and its token reduction overridden by `reduce`; UserError when the folder is not one."""
    from unicode_mllm.model import UniCodeMLLM
    from unicode_mllm.runtime.devices import select_device, select_dtype

    target = select_device(device)
    lm_dtype = select_dtype(dtype, target)  # UserError for an unknown name or fp16 on a CPU
    model = UniCodeMLLM.from_pretrained(path, dtype=lm_dtype)  # "... it is not a saved UniCodeMLLM" without config
    return with_token_reduction(model, reduce or []).to(target).eval()


def _pair_questions(images: list[Path], questions: list[str]) -> tuple[list[Path | None], list[str]]:
    """--image/--question lists -> pairs: equal counts pair in order; one image or one question is shared."""
    if not questions:
        raise UserError('no question given; pass one, e.g. unicode-mllm ask --model DIR --image a.png "what is it?"')
    if not images:
        return [None] * len(questions), questions
    if len(images) != len(questions) and 1 not in (len(images), len(questions)):
        raise UserError(f"{len(images)} images but {len(questions)} questions; pass them in pairs, or one of either")
    check_image_files(images, "--image")  # a folder or a bad file fails before the model loads
    if len(images) == len(questions):
        return list(images), questions
    if len(images) == 1:
        return [images[0]] * len(questions), questions
    return list(images), questions * len(images)


def _answer_question_file(jsonl: Path, out: Path | None, model_args: tuple, settings: dict) -> None:
    """`ask --jsonl`: answer every record of the file, in chunks, into `out` (JSONL) or standard output.

    model_args: `_load_inference_model`'s (path, device, dtype, reduce), loaded once the file has been checked."""
    from unicode_mllm.generation.answering import generate_answers, question_prompts
    from unicode_mllm.generation.question_files import answer_record, check_question_images, read_questions_jsonl
    from unicode_mllm.generation.sampling import resolve_seed

    ensure_writable_output(out, "--out")
    records = read_questions_jsonl(jsonl)
    check_question_images(records, jsonl)  # a bad image late in the file must not cost the answers before it
    mllm = _load_inference_model(*model_args)
    settings = {**settings, "seed": resolve_seed(settings["seed"])}  # one seed: the chunks continue one request
    lines = []
    chunk = max(1, settings["batch_size"]) * 4  # images are loaded and encoded one chunk at a time
    for start in range(0, len(records), chunk):
        part = records[start : start + chunk]
        prompts = question_prompts(mllm, [r.image for r in part], [r.question for r in part])
        answers = generate_answers(mllm, prompts, first_index=start, **settings)
        lines += [answer_record(r, a.text) for r, a in zip(part, answers, strict=True)]
    if out is None:
        typer.echo("\n".join(lines))
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join(lines) + "\n")
        typer.echo(f"{len(lines)} answers written to {out}")


@app.command("ask")
def ask_cmd(
    question: str | None = typer.Argument(None, help="The question (or use --question, repeatable)."),
    model: Path = SAVED_MLLM_OPTION,
    image: list[Path] = typer.Option([], "--image", help="Image file; repeat to pair with repeated questions."),
    questions: list[str] = typer.Option([], "--question", help="A question; repeatable, paired with --image."),
    jsonl: Path | None = typer.Option(None, "--jsonl", help='Question file: {"image": PATH, "question": TEXT} lines.'),
    out: Path | None = typer.Option(None, "--out", help="Answers JSONL for --jsonl (default: standard output)."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="Longest answer in tokens."),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy decoding."),
    top_k: int | None = typer.Option(None, "--top-k", help="Sample among the k most likely tokens."),
    top_p: float | None = typer.Option(None, "--top-p", help="Sample within the top-p probability mass."),
    seed: int | None = typer.Option(None, "--seed", help="Seed for sampling (per question, batch-independent)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Questions decoded together."),
    device: str = DEVICE_OPTION,
    dtype: str = DTYPE_OPTION,
    reduce: list[str] = REDUCE_OPTION,
    stream: bool = typer.Option(True, "--stream/--no-stream", help="Print a single answer as it is decoded."),
) -> None:
    """Answer questions about images (VQA) with a trained UniCodeMLLM; --jsonl for a question file."""
    from unicode_mllm.generation import answer_questions

    sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "seed": seed}
    settings = {"max_new_tokens": max_new_tokens, "batch_size": batch_size, **sampling}
    check_at_least(max_new_tokens, 1, "--max-new-tokens")
    check_at_least(batch_size, 1, "--batch-size")
    check_sampling(temperature, top_k, top_p)
    if jsonl is not None:
        if question or questions or image:
            raise UserError("--jsonl takes its questions and images from the file; drop the other questions/--image")
        _answer_question_file(jsonl, out, (model, device, dtype, reduce), settings)
        return
    if out is not None:
        raise UserError("--out writes the answers of a --jsonl question file; pass --jsonl too")
    pairs_images, pairs_questions = _pair_questions(list(image), [*questions, *([question] if question else [])])
    mllm = _load_inference_model(model, device, dtype, reduce)
    if len(pairs_questions) == 1 and stream:
        answer_questions(
            mllm, pairs_images, pairs_questions, stream=lambda _i, piece: typer.echo(piece, nl=False), **settings
        )
        typer.echo("")
        return
    answers = answer_questions(mllm, pairs_images, pairs_questions, **settings)
    for img, q, a in zip(pairs_images, pairs_questions, answers, strict=True):
        typer.echo(f"{img if img is not None else '(no image)'} | {q} -> {a.text}")


def _numbered_paths(out: Path, n: int) -> list[Path]:
    """out.png for one image; out_0.png ... out_{n-1}.png for several."""
    if out.suffix.lower() != ".png":
        raise UserError(f"--out {out} must name a .png file (e.g. -o drawing.png)")
    return [out] if n == 1 else [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(n)]


@app.command("generate")
def generate_cmd(
    prompt: str = typer.Argument(..., help="The drawing instruction, e.g. 'a red circle at the top left'."),
    model: Path = SAVED_MLLM_OPTION,
    out: Path = typer.Option(Path("generated.png"), "-o", "--out", help="PNG path (out_0.png ... for -n > 1)."),
    num_images: int = typer.Option(1, "-n", "--num-images", help="Images to draw."),
    temperature: float = typer.Option(1.0, "--temperature", help="1 samples the model; 0 (greedy) gives flat images."),
    top_k: int | None = typer.Option(None, "--top-k", help="Sample among the k most likely codes."),
    top_p: float | None = typer.Option(None, "--top-p", help="Sample within the top-p probability mass."),
    seed: int | None = typer.Option(None, "--seed", help="Seed (default: random, printed)."),
    cfg_scale: float = typer.Option(1.0, "--cfg-scale", help="Classifier-free guidance scale (1 = none)."),
    depth_temperatures: str | None = DEPTH_TEMPERATURES_OPTION,
    batch_size: int = typer.Option(8, "--batch-size", help="Images decoded together."),
    device: str = DEVICE_OPTION,
    dtype: str = DTYPE_OPTION,
) -> None:
    """Text-to-image: write PNGs, a captioned grid (<out>_grid.png) and the settings/ids (<out>.json)."""
    import json

    from unicode_mllm.generation import check_prompt_text, generate_images
    from unicode_mllm.generation.guidance import check_cfg_scale
    from unicode_mllm.viz import caption_grid

    text = check_prompt_text(prompt, "prompt")
    if num_images < 1:
        raise UserError(f"-n must be >= 1, got {num_images}")
    paths = _numbered_paths(out, num_images)
    for path in [*paths, out.with_name(f"{out.stem}_grid.png"), out.with_suffix(".json")]:
        ensure_writable_output(path, "-o/--out")
    depth_temps = parse_depth_temperatures(depth_temperatures)
    check_sampling(temperature, top_k, top_p, depth_temps)
    check_cfg_scale(cfg_scale)
    mllm = _load_inference_model(model, device, dtype)
    result = generate_images(
        mllm,
        [text],
        num_images_per_prompt=num_images,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        cfg_scale=cfg_scale,
        seed=seed,
        batch_size=batch_size,
        depth_temperatures=depth_temps,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    images = result.images
    for path, img in zip(paths, images, strict=True):
        img.save(path)
    grid_path = out.with_name(f"{out.stem}_grid.png")
    captions = [f"#{i} {text}" for i in range(num_images)]
    caption_grid(images, captions, columns=min(4, num_images), cell_size=128).save(grid_path)
    record = {
        "prompt": text,
        "files": [str(p) for p in paths],
        "grid": str(grid_path),
        "settings": result.settings,
        "image_seeds": result.seeds,
        "token_ids": result.token_ids.tolist(),
    }
    out.with_suffix(".json").write_text(json.dumps(record) + "\n")
    seed_note = f" (seed {result.seed})" if result.seed is not None else ""
    typer.echo(f"wrote {', '.join(str(p) for p in paths)} and {grid_path}{seed_note}")


@app.command("chat")
def chat_cmd(
    model: Path = SAVED_MLLM_OPTION,
    out_dir: Path = typer.Option(Path("chat_images"), "--out-dir", help="Where drawings are saved (image_NNN.png)."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="Longest answer in tokens."),
    temperature: float = typer.Option(0.0, "--temperature", help="Answers: 0 = greedy."),
    image_temperature: float = typer.Option(1.0, "--image-temperature", help="Drawings: sampling temperature."),
    image_top_k: int | None = typer.Option(None, "--image-top-k", help="Drawings: sample among the k best codes."),
    cfg_scale: float = typer.Option(1.0, "--cfg-scale", help="Drawings: classifier-free guidance scale."),
    seed: int | None = typer.Option(None, "--seed", help="Session seed (default: random)."),
    device: str = DEVICE_OPTION,
    dtype: str = DTYPE_OPTION,
    reduce: list[str] = typer.Option([], "--reduce", help=REDUCE_HELP + " Drawing turns never reduce."),
) -> None:
    """Multi-turn chat on standard input: questions, /image PATH, /draw TEXT (or draw: TEXT), /reset, /quit."""
    from unicode_mllm.generation import ChatSession, ChatSettings
    from unicode_mllm.generation.chat_repl import CHAT_HELP, run_chat

    drawing = {"image_temperature": image_temperature, "image_top_k": image_top_k, "cfg_scale": cfg_scale}
    # ChatSettings checks every setting: one error before loading, not one per message.
    settings = ChatSettings(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, **drawing)
    ensure_writable_output(out_dir, "--out-dir", folder=True)
    session = ChatSession(_load_inference_model(model, device, dtype, reduce), settings)
    if hasattr(sys.stdin, "reconfigure"):  # bytes that are not UTF-8 reach run_chat, which reports the line
        sys.stdin.reconfigure(errors="surrogateescape")
    interactive = sys.stdin.isatty()
    if interactive:
        typer.echo(CHAT_HELP)

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    run_chat(
        session,
        sys.stdin,
        out_dir,
        write,
        lambda line: typer.echo(line, err=True),
        prompt=(lambda: write("you> ")) if interactive else None,
    )


@app.command("serve")
def serve_cmd(
    model: Path = SAVED_MLLM_OPTION,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(7860, "--port", help="Port to listen on."),
    device: str = DEVICE_OPTION,
    dtype: str = DTYPE_OPTION,
) -> None:
    """Web demo in the browser (gradio: the demo extra): Ask, Draw, Reconstruct and Chat tabs."""
    from unicode_mllm.web_demo import check_port_free, require_gradio, serve

    require_gradio()  # a missing extra or a taken port fail before the model loads
    check_port_free(host, port)
    mllm = _load_inference_model(model, device, dtype)
    typer.echo(f"serving {model} on http://{host}:{port} (Ctrl+C stops)")
    serve(mllm, host, port)
