"""Bad input at the command line: one `error:` line and exit 2 before any work, never lost work or silent cuts.

Each test reproduces a row of the bad-input audit; they fail on the code before the fix.
"""

from __future__ import annotations

import io
import json
import logging

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from unicode_mllm.cli import evaluation as cli_evaluation
from unicode_mllm.cli import inference as cli_inference
from unicode_mllm.cli import main
from unicode_mllm.generation import ChatSession
from unicode_mllm.generation.chat_repl import run_chat
from unicode_mllm.generation.question_files import read_questions_jsonl
from unicode_mllm.model import UniCodeMLLM


def make_fake_tokenizer(folder) -> None:
    """A folder the CLI's checks take for a visual tokenizer (kind from config.json, an intact but empty
    safetensors file); loading it as a model would fail, so a test passing through it never loads one."""
    (folder / "config.json").write_text('{"model_type": "unicode_visual_tokenizer"}')
    save_file({}, str(folder / "model.safetensors"))


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2, err
    assert err.startswith("error:") and err.strip().count("\n") == 0, err
    for fragment in fragments:
        assert fragment in err, err


def write_png(path, colour=(200, 30, 30), size=32):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path)
    return path


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if a command loads a model: the checks must come first."""

    def refuse(*_args, **_kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(cli_inference, "_load_inference_model", refuse)
    monkeypatch.setattr(cli_evaluation, "_load_mllm", refuse)


@pytest.fixture(scope="module")
def chat_model(tiny_mllm_dir):
    return UniCodeMLLM.from_pretrained(tiny_mllm_dir).eval()


# ----- row 7: reconstruct output names -------------------------------------------------------------------


def test_output_paths_are_distinct_for_shared_stems(tmp_path):
    from unicode_mllm.visual_tokenizer.reconstruct import output_paths

    paths = [tmp_path / "x.png", tmp_path / "x.jpg", tmp_path / "other" / "x.png", tmp_path / "y.png"]
    names = [p.name for p in output_paths(paths, tmp_path / "out")]
    assert names == ["x_png_recon.png", "x_jpg_recon.png", "x_png_2_recon.png", "y_recon.png"]


def test_reconstruct_writes_one_file_per_input(capsys, tiny_visual_tokenizer_dir, tmp_path):
    a = write_png(tmp_path / "good.png")
    b = tmp_path / "good.jpg"
    Image.new("RGB", (32, 32), (10, 200, 10)).save(b)
    c = write_png(tmp_path / "sub" / "good.png", (10, 10, 200))
    out = tmp_path / "rec"
    args = ("reconstruct", "--model", str(tiny_visual_tokenizer_dir), "-o", str(out), "--lpips-trunk", "none")
    code, stdout, err = run(capsys, *args, "--device", "cpu", str(a), str(b), str(c))
    assert code == 0, err
    assert len(list(out.iterdir())) == 3 and len({line.split("-> ")[1] for line in stdout.splitlines()}) == 3


# ----- row 8: ask --jsonl checks every image before answering ----------------------------------------------


def test_ask_jsonl_bad_late_image_fails_up_front_naming_the_line(capsys, tmp_path, no_model_load):
    write_png(tmp_path / "good.png")
    lines = [{"image": "good.png", "question": "what colour?"}] * 3 + [{"image": "missing.png", "question": "what?"}]
    questions = tmp_path / "q.jsonl"
    questions.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    code, _, err = run(capsys, "ask", "--model", str(tmp_path), "--jsonl", str(questions), "--device", "cpu")
    assert_one_line_error(code, err, f"{questions}:4:", "missing.png")


# ----- rows 9 and 10: unwritable outputs are refused before the work ------------------------------------


UNWRITABLE_CASES = [
    ["generate", "--model", "{model}", "a red circle", "-o", "{file}/x.png"],
    ["generate", "--model", "{model}", "a red circle", "-o", "{folder_png}"],
    ["ask", "--model", "{model}", "--jsonl", "{jsonl}", "--out", "{file}/answers.jsonl"],
    ["reconstruct", "--model", "{tok}", "-o", "{file}", "{image}"],
    ["reconstruct", "--model", "{tok}", "-o", "{recon_clash}", "{image}"],
    ["eval", "tokenizer", "--tokenizer", "{tok}", "--folder", "{images}", "--out", "{file}/r.json"],
    ["eval", "tokenizer", "--tokenizer", "{tok}", "--folder", "{images}", "--grid", "{file}/g.png"],
    ["eval", "t2i", "--model", "{model}", "--out", "{file}/t.json"],
    ["eval", "t2i", "--model", "{model}", "--grid", "{file}/t.png"],
    ["eval", "vqa", "--model", "{model}", "--jsonl", "{jsonl}", "--out", "{file}/v.json"],
    ["tokenize", "--model", "{tok}", "--shards", "{images}", "--out", "{file}"],
    ["data", "shapes", "--out", "{file}/shapes"],
    ["data", "from-folder", "{images}", "--out", "{file}"],
    ["chat", "--model", "{model}", "--out-dir", "{file}"],
]


@pytest.mark.parametrize("args", UNWRITABLE_CASES, ids=lambda a: "-".join(a[:2]))
def test_unwritable_outputs_fail_before_the_work(capsys, tmp_path, args, no_model_load):
    tok = tmp_path / "tok"
    tok.mkdir()
    make_fake_tokenizer(tok)  # passes the folder checks; loading it would fail
    (tmp_path / "file").write_text("a file where a folder is needed")
    (tmp_path / "folder.png").mkdir()
    image = write_png(tmp_path / "images" / "a.png")
    (tmp_path / "recon").mkdir()
    (tmp_path / "recon" / "a_recon.png").mkdir()  # the output file's name is taken by a folder
    jsonl = tmp_path / "q.jsonl"
    jsonl.write_text(json.dumps({"image": str(image), "question": "what?", "answers": ["red"]}) + "\n")
    values = dict(
        model=str(tmp_path),
        tok=str(tok),
        file=str(tmp_path / "file"),
        folder_png=str(tmp_path / "folder.png"),
        image=str(image),
        images=str(image.parent),
        jsonl=str(jsonl),
        recon_clash=str(tmp_path / "recon"),
    )
    code, _, err = run(capsys, *[a.format(**values) for a in args])
    assert_one_line_error(code, err, "cannot write", "choose another")


def test_read_only_output_folder_is_named(capsys, tmp_path, monkeypatch, no_model_load):
    import os

    real_access = os.access  # the tests may run as root, who may write anywhere: deny writes only
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: not mode & os.W_OK and real_access(path, mode, **kw))
    code, _, err = run(capsys, "generate", "--model", str(tmp_path), "a red circle", "-o", str(tmp_path / "x.png"))
    assert_one_line_error(code, err, f"cannot write -o/--out {tmp_path / 'x.png'}", str(tmp_path))


def test_chat_draw_into_an_unwritable_folder_reports_and_goes_on(chat_model, tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    written, errors = [], []
    count = run_chat(ChatSession(chat_model), ["/draw a red circle", "where"], blocked, written.append, errors.append)
    assert count == 1 and "cannot save the drawing" in errors[0] and "--out-dir" in errors[0]
    assert any(piece.startswith("assistant:") for piece in written)  # the next line was still answered


# ----- row 16: text that is not UTF-8 ---------------------------------------------------------------------------


def test_ask_jsonl_not_utf8_names_file_and_line(capsys, tmp_path, no_model_load):
    questions = tmp_path / "q.jsonl"
    questions.write_bytes(b'{"question": "where"}\n\xff\xfe{"question": "x"}\n')
    code, _, err = run(capsys, "ask", "--model", str(tmp_path), "--jsonl", str(questions))
    assert_one_line_error(code, err, f"{questions}:2:", "not UTF-8")


def test_eval_vqa_jsonl_not_utf8_names_file_and_line(capsys, tiny_mllm_dir, tmp_path):
    questions = tmp_path / "v.jsonl"
    questions.write_bytes(b"\xff\xfe garbage\n")
    args = ("eval", "vqa", "--model", str(tiny_mllm_dir), "--jsonl", str(questions), "--device", "cpu")
    code, _, err = run(capsys, *args)
    assert_one_line_error(code, err, f"{questions}:1:", "not UTF-8")


def test_chat_stdin_not_utf8_reports_the_line_and_goes_on(capsys, tiny_mllm_dir, tmp_path, monkeypatch):
    stdin = io.TextIOWrapper(io.BytesIO(b"\xff\xfebad bytes\nwhere\n"), encoding="utf-8")
    monkeypatch.setattr("sys.stdin", stdin)
    args = ("chat", "--model", str(tiny_mllm_dir), "--out-dir", str(tmp_path / "d"), "--max-new-tokens", "4")
    code, out, err = run(capsys, *args, "--device", "cpu")
    assert code == 0, err
    assert err.count("error:") == 1 and "input line 1 is not UTF-8" in err
    assert "assistant:" in out


# ----- rows 17, 26 and 32: option ranges -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["data", "shapes", "--out", "{tmp}/s", "--shard-size", "0"], "--shard-size must be >= 1"),
        (["data", "from-folder", "{tmp}", "--out", "{tmp}/f", "--shard-size", "-3"], "--shard-size must be >= 1"),
        (["data", "from-folder", "{tmp}", "--out", "{tmp}/f", "--split", "bad split!"], "--split 'bad split!'"),
        (["data", "from-llava", "{json}", "--images", "{tmp}", "--out", "{tmp}/l", "--split", "a-b"], "[A-Za-z0-9_]"),
        (["data", "from-llava", "{json}", "--images", "{tmp}", "--out", "{tmp}/l", "--shard-size", "0"], "--shard"),
        (
            ["tokenize", "--model", "{tok}", "--shards", "{tmp}", "--out", "{tmp}/t", "--batch-size", "0"],
            "--batch-size",
        ),
        (["data", "check-analyser", "--count", "0"], "--count must be >= 1"),
        (["--log-level", "LOUD", "data", "inspect", "{tmp}"], "DEBUG, INFO, WARNING, ERROR"),
        (["generate", "--model", "{tmp}", "a red circle", "--temperature", "inf"], "finite"),
        (["ask", "--model", "{tmp}", "where", "--temperature", "nan"], "temperature must be"),
        (["eval", "t2i", "--model", "{tmp}", "--temperature", "inf"], "finite"),
        (["generate", "--model", "{tmp}", "a red circle", "--depth-temperatures", "1,inf"], "finite"),
        (["ask", "--model", "{tmp}", "where", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    ],
)
def test_option_ranges_are_checked_up_front(capsys, tmp_path, args, message, no_model_load):
    tok = tmp_path / "tok"
    tok.mkdir()
    make_fake_tokenizer(tok)
    llava = tmp_path / "c.json"
    llava.write_text("[]")
    values = dict(tmp=str(tmp_path), tok=str(tok), json=str(llava))
    code, _, err = run(capsys, *[a.format(**values) for a in args])
    assert_one_line_error(code, err, message)


# ----- row 19: --lpips-trunk ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("trunk", "message"),
    [("{tmp}/nonexistent/vgg.pth", "not found"), ("bogus", "not found"), ("{png}", "not a VGG16 weights file")],
)
def test_reconstruct_lpips_trunk_is_checked(capsys, tmp_path, trunk, message):
    tok = tmp_path / "tok"
    tok.mkdir()
    make_fake_tokenizer(tok)
    png = write_png(tmp_path / "a.png")
    trunk = trunk.format(tmp=tmp_path, png=png)
    args = ("reconstruct", "--model", str(tok), "-o", str(tmp_path / "r"), "--lpips-trunk", trunk, str(png))
    code, _, err = run(capsys, *args)
    assert_one_line_error(code, err, f"--lpips-trunk {trunk}", message)


def test_eval_tokenizer_lpips_trunk_without_vgg_weights_is_refused(capsys, tmp_path):
    weights = tmp_path / "other.pth"
    torch.save({"layer.weight": torch.zeros(2)}, weights)
    tok = tmp_path / "tok"
    tok.mkdir()
    make_fake_tokenizer(tok)
    write_png(tmp_path / "img" / "a.png")
    args = ("eval", "tokenizer", "--tokenizer", str(tok), "--folder", str(tmp_path / "img"))
    code, _, err = run(capsys, *args, "--lpips-trunk", str(weights))
    assert_one_line_error(code, err, "not a VGG16 weights file")


# ----- row 20: answers cut by the LM's context ------------------------------------------------------------------


def test_ask_warns_when_the_context_limits_the_answer(capsys, caplog, tiny_mllm_dir, chat_model):
    from unicode_mllm.generation.answering import question_prompts

    question = "where " * 8
    while len(question_prompts(chat_model, [None], [question + "where "])[0]) < 512 - 4:  # leave 4 positions
        question += "where "
    args = ("ask", "--model", str(tiny_mllm_dir), "--max-new-tokens", "64", "--device", "cpu", question)
    with caplog.at_level(logging.WARNING):
        code, _, err = run(capsys, *args)
    assert code == 0, err
    warnings = [r.getMessage() for r in caplog.records if "limited to" in r.getMessage()]
    assert len(warnings) == 1 and "context of 512 positions" in warnings[0] and "max_new_tokens=64" in warnings[0]


# ----- row 21: misspelled keys in a question file --------------------------------------------------------------


def test_question_file_warns_about_a_misspelled_image_key(caplog, tmp_path):
    questions = tmp_path / "q.jsonl"
    lines = [{"id": 1, "question": "what?"}, {"img": "good.png", "question": "what?"}]
    questions.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    with caplog.at_level(logging.WARNING):
        records = read_questions_jsonl(questions)
    assert [r.image for r in records] == [None, None]
    messages = [r.getMessage() for r in caplog.records]
    assert (
        len(messages) == 1 and f"{questions}:2" in messages[0] and "'img'" in messages[0] and "'image'" in messages[0]
    )


# ----- rows 22 and 27: chat settings and a full conversation -----------------------------------------------------


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--temperature", "-1", "temperature must be >= 0"),
        ("--image-temperature", "inf", "finite"),
        ("--cfg-scale", "-1", "cfg_scale"),
        ("--max-new-tokens", "0", "max_new_tokens must be >= 1"),
        ("--image-top-k", "-3", "top_k"),
        ("--seed", "-1", "seed must be >= 0"),
    ],
)
def test_chat_settings_are_checked_before_loading(capsys, tmp_path, monkeypatch, option, value, message, no_model_load):
    monkeypatch.setattr("sys.stdin", io.StringIO("where\n"))
    code, _, err = run(capsys, "chat", "--model", str(tmp_path), option, value)
    assert_one_line_error(code, err, message)


def test_chat_full_conversation_suggests_reset(chat_model, tmp_path):
    written, errors = [], []
    lines = ["/draw a red circle"] * 4 + ["/reset", "/draw a red circle"]
    run_chat(ChatSession(chat_model), lines, tmp_path / "d", written.append, errors.append)
    assert len(errors) == 1 and "conversation is full" in errors[0] and "/reset" in errors[0]
    assert len(list((tmp_path / "d").iterdir())) == 4  # after /reset drawing works again
