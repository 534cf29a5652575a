"""The field's VQA metrics, against scores worked out by hand: VQAv2 accuracy as the official vqaEval.py computes it
(GT-Vision-Lab/VQA), POPE's yes/no counts (AoiDragon/POPE evaluate.py), GQA exact match; and `eval vqa` /
`eval pope` on files in the official layouts."""

from __future__ import annotations

import json
import shutil

import pytest
from PIL import Image

from unicode_mllm.cli import evaluation as cli_evaluation
from unicode_mllm.cli import main
from unicode_mllm.evaluation.answers import is_correct
from unicode_mllm.evaluation.pope import PopeItem, eval_pope, is_unparseable, pope_yes_no
from unicode_mllm.evaluation.skips import SkipCounts
from unicode_mllm.evaluation.vqa import VQAItem, eval_vqa, metric_for
from unicode_mllm.evaluation.vqav2_metric import normalise_vqav2_answer, official_round, vqav2_accuracy

skimage_data = pytest.importorskip("skimage.data")

BLANK = Image.new("RGB", (8, 8))


# ------------------------------------------------------------------------------------------ VQAv2 normalisation


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("1,000", "1000"),  # a comma between digits: every punctuation character is deleted, not spaced
        ("none", "0"),  # the manual map: "none" -> "0"
        ("Two", "2"),  # lower-cased, then number words as digits
        ("dont", "don't"),  # the contractions table adds the apostrophe ...
        ("don't", "don't"),  # ... which is not a punctuation character there
        ("the dog", "dog"),  # articles a/an/the dropped
        ("A Red Car", "red car"),
        ("t-shirt", "t shirt"),  # '-' touches no space: replaced by a space
        ("yes, it is.", "yes it is"),  # ', ' touches a space: deleted; a '.' not before a digit: deleted
        ("3.5", "3.5"),  # a '.' before a digit stays
        ("red!", "red"),  # '!' -> ' ', then split/join drops the trailing space
        ("  left\tside\n", "left side"),  # tab/newline to spaces, stripped
    ],
)
def test_official_normalisation(raw, normalised):
    assert normalise_vqav2_answer(raw) == normalised


# ------------------------------------------------------------------------------------------ VQAv2 accuracy


@pytest.mark.parametrize(
    ("k", "expected"),
    [
        # k of 10 humans gave the prediction. Leaving out one of those k leaves k-1 matches (k subsets), leaving out
        # one of the others leaves k (10-k subsets): acc = (k * min((k-1)/3, 1) + (10-k) * min(k/3, 1)) / 10
        (0, 0.0),  # no subset has a match
        (1, 0.3),  # (1 * 0 + 9 * 1/3) / 10 = 3/10
        (2, 0.6),  # (2 * 1/3 + 8 * 2/3) / 10 = (2/3 + 16/3) / 10 = 6/10
        (3, 0.9),  # (3 * 2/3 + 7 * 1) / 10 = (2 + 7) / 10
        (4, 1.0),  # (4 * 1 + 6 * 1) / 10: every subset of 9 holds at least 3 matches
        (5, 1.0),
    ],
)
def test_leave_one_out_accuracy_by_hand(k, expected):
    humans = ["cat"] * k + ["dog"] * (10 - k)
    assert vqav2_accuracy("cat", humans) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("prediction", "humans", "official", "lenient"),
    [
        # "1,000" -> "1000": k = 1 -> 0.3; today's normalisation makes "1 000" and misses it
        ("1000", ["1,000"] + ["many"] * 9, 0.3, False),
        # "none" -> "0": k = 2 -> 0.6; today's normalisation keeps "none"
        ("0", ["none"] * 2 + ["2"] * 8, 0.6, False),
        # "two" -> "2": k = 3 -> (3 * 2/3 + 7 * 1) / 10 = 0.9
        ("2", ["two"] * 3 + ["3"] * 7, 0.9, True),
        # "dont" and "don't" both -> "don't": k = 2 -> 0.6
        ("dont", ["don't", "dont"] + ["yes"] * 8, 0.6, True),
        # articles: "The dog", "a dog", "dog" -> "dog": k = 3 -> 0.9
        ("The dog", ["a dog", "a dog", "dog"] + ["cat"] * 7, 0.9, True),
        # punctuation: "red." (period stripped) and "red!" ('!' -> ' ') -> "red": k = 2 -> 0.6
        ("Red", ["red.", "red!"] + ["blue"] * 8, 0.6, True),
        # yes/no: the humans differ, so "Yes" is normalised -> "yes": k = 9 -> 1.0; "no": k = 1 -> 0.3
        ("Yes", ["yes"] * 9 + ["no"], 1.0, True),
        ("no", ["yes"] * 9 + ["no"], 0.3, True),
        # the official code normalises nothing when all ten humans agree: the raw strings are compared
        ("Yes", ["yes"] * 10, 0.0, True),
        ("yes", ["yes"] * 10, 1.0, True),
        ("1000", ["1,000"] * 10, 0.0, False),
        (" yes\n", ["yes"] * 10, 1.0, True),  # only whitespace is cleaned then
    ],
)
def test_official_accuracy_against_the_lenient_exact_match(prediction, humans, official, lenient):
    assert vqav2_accuracy(prediction, humans) == pytest.approx(official)
    assert is_correct(prediction, humans) is lenient  # any-answer exact match, the old score


def test_official_rounding_is_python2_round():
    # vqaEval.py is Python 2: round() there sends exact ties away from zero; Python 3's to the even digit.
    assert official_round(58.125) == 58.13 and round(58.125, 2) == 58.12  # 58.125 is exact in binary
    assert official_round(2.675) == 2.67  # 2.675 is 2.67499999... in binary: no tie
    assert official_round(100 * 0.3) == 30.0  # 100 * 0.3 = 30.000000000000004


def test_auto_metric_by_answer_count():
    # Fewer than 4 answers cannot be a vote: all of 3 humans agreeing gives subsets of 2 matches, 2/3 < 1.
    assert [metric_for(["a"] * n) for n in (1, 2, 3, 4, 10)] == ["exact", "exact", "exact", "vqav2", "vqav2"]
    assert metric_for(["a"] * 10, "exact") == "exact" and metric_for(["a"], "vqav2") == "vqav2"


# The five-question example: official 58% where any-answer exact match says 100%.
FIVE = [
    # (question_id, image_id, question, question_type, answer_type, the ten human answers, prediction)
    # "no" is 1 of 10 humans: k = 1 -> 0.3
    (42000, 42, "Is the man wearing a hat?", "is the man", "yes/no", ["yes"] * 9 + ["no"], "no"),
    # "2" and "two" -> "2": k = 7 -> 1.0
    (42001, 42, "How many dogs are there?", "how many", "number", ["2"] * 5 + ["two"] * 2 + ["3"] * 3, "2"),
    # "maroon": k = 1 -> 0.3
    (73000, 73, "What color is the bus?", "what color is the", "other", ["red"] * 7 + ["dark red"] * 2 + ["maroon"],
     "maroon"),
    # "Umbrella." -> "umbrella", "an umbrella" -> "umbrella": k = 8 -> 1.0
    (73001, 73, "What is the man holding?", "what is the man", "other",
     ["umbrella"] * 6 + ["an umbrella"] * 2 + ["parasol"] * 2, "Umbrella."),
    # "6": k = 1 -> 0.3
    (74000, 74, "How many people are in the photo?", "how many", "number", ["4"] * 6 + ["5"] * 3 + ["6"], "6"),
]  # fmt: skip
# overall (0.3 + 1 + 0.3 + 1 + 0.3) / 5 = 2.9 / 5 = 58%; yes/no 0.3 -> 30%; number (1 + 0.3) / 2 = 65%;
# other (0.3 + 1) / 2 = 65%; question type "how many" (1 + 0.3) / 2 = 65%, the others one question each.
OFFICIAL_FIVE = {
    "overall": 58.0,
    "perAnswerType": {"number": 65.0, "other": 65.0, "yes/no": 30.0},
    "perQuestionType": {"how many": 65.0, "is the man": 30.0, "what color is the": 30.0, "what is the man": 100.0},
}
REPLIES = {q[2]: q[6] for q in FIVE}


def _reply(_images, questions):
    return [REPLIES[q] for q in questions]


def test_five_questions_official_58_against_lenient_100():
    items = [VQAItem(BLANK, q, tuple(ten), qtype, f"q{qid}", qid, atype) for qid, _, q, qtype, atype, ten, _ in FIVE]
    official = eval_vqa(_reply, items, batch_size=2)
    assert official.metric_name == "vqav2" and official.accuracy == pytest.approx(0.58)
    report = official.to_dict()
    assert report["vqav2"]["official"] == OFFICIAL_FIVE
    assert report["vqav2"]["overall_percent"] == pytest.approx(58.0)
    assert report["per_answer_type"]["yes/no"] == pytest.approx({"correct": 0.3, "total": 1, "accuracy": 0.3})
    assert official.official_results() == [{"question_id": q[0], "answer": q[6]} for q in FIVE]
    lenient = eval_vqa(_reply, items, metric="exact")  # the old score: exact match with any of the ten
    assert lenient.accuracy == 1.0 and lenient.metric_name == "exact"


def test_single_answer_items_keep_the_exact_match_score():
    """The shapes world (one answer a question): the score is today's `is_correct`, whatever the metric choice."""
    pairs = [("The Red-Triangle.", "red triangle"), ("three", "3"), ("top left", "top right"), ("Yes", "yes")]
    items = [VQAItem(BLANK, f"q{i}", (answer,), "colour", f"q{i}") for i, (_, answer) in enumerate(pairs)]
    result = eval_vqa(lambda _images, qs: [pairs[int(q[1:])][0] for q in qs], items)
    assert result.scores == [int(is_correct(p, [a])) for p, a in pairs] == [1, 1, 0, 1]
    assert result.metric_name == "exact" and result.per_kind()["colour"] == {"correct": 3, "total": 4, "accuracy": 0.75}
    assert result.official_results() is None  # no question ids


# ------------------------------------------------------------------------------------------ POPE

POPE_SET = [
    # (label, answer) -> POPE's reading: the first sentence, commas deleted, split at spaces; "no" if No/no/not
    ("yes", "Yes, there is a snowboard in the image."),  # yes -> TP
    ("no", "No."),  # no -> TN
    ("yes", "There is not a car."),  # "not" -> no -> FN
    ("no", "yes"),  # yes -> FP
    ("no", "I see no dog. Yes."),  # first sentence "I see no dog" -> no -> TN
    ("yes", "Nope"),  # no no-word -> yes -> TP; unparseable (no yes/no word)
    ("no", "Not at all."),  # "Not" is not in POPE's list -> yes -> FP; unparseable
    ("no", ""),  # -> yes -> FP; unparseable
]
# TP 2, FP 3, TN 2, FN 1 (8): accuracy (2 + 2) / 8 = 0.5; precision 2 / (2 + 3) = 0.4; recall 2 / (2 + 1) = 2/3;
# F1 = 2 * 0.4 * 2/3 / (0.4 + 2/3) = (8/15) / (16/15) = 0.5; yes-ratio (2 + 3) / 8 = 0.625; unparseable 3.


def test_pope_reading_and_counts_by_hand():
    assert [pope_yes_no(answer) for _, answer in POPE_SET] == ["yes", "no", "no", "yes", "no", "yes", "yes", "yes"]
    assert [is_unparseable(answer) for _, answer in POPE_SET] == [False] * 5 + [True] * 3
    items = [PopeItem(BLANK, f"q{i}", label, f"line {i + 1}", i + 1) for i, (label, _) in enumerate(POPE_SET)]
    result = eval_pope(
        lambda _images, qs: [POPE_SET[int(q[1:])][1] for q in qs], items, source={}, skips=SkipCounts(), batch_size=3
    )
    report = result.to_dict()
    assert report["counts"] == {"TP": 2, "FP": 3, "TN": 2, "FN": 1} and report["num_questions"] == 8
    assert report["accuracy"] == 0.5 and report["precision"] == pytest.approx(0.4)
    assert report["recall"] == pytest.approx(2 / 3) and report["f1"] == pytest.approx(0.5)
    assert report["yes_ratio"] == 0.625 and report["unparseable"]["count"] == 3


# ------------------------------------------------------------------------------- files in the official layouts


def _photo(name: str) -> Image.Image:
    image = Image.fromarray(getattr(skimage_data, name)())
    return image.resize((48, 40), Image.Resampling.BICUBIC)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """The five questions as VQAv2's val2014 files, the same as JSONL, POPE's JSONL over the same images, a GQA
    question file; three COCO-named photos from scikit-image."""
    root = tmp_path_factory.mktemp("bench")
    images = root / "val2014"
    images.mkdir()
    for image_id, photo in ((42, "astronaut"), (73, "coffee"), (74, "chelsea")):
        _photo(photo).save(images / f"COCO_val2014_{image_id:012d}.jpg", quality=90)
    header = {"info": {}, "license": {}, "data_subtype": "val2014"}
    questions = [{"image_id": img, "question": q, "question_id": qid} for qid, img, q, *_ in FIVE]
    (root / "questions.json").write_text(
        json.dumps({**header, "task_type": "Open-Ended", "data_type": "mscoco", "questions": questions})
    )
    annotations = [
        {
            "question_id": qid,
            "image_id": img,
            "question_type": qtype,
            "answer_type": atype,
            "multiple_choice_answer": max(set(humans), key=humans.count),
            "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(humans)],
        }
        for qid, img, _, qtype, atype, humans, _ in FIVE
    ]
    (root / "annotations.json").write_text(json.dumps({**header, "annotations": annotations}))
    lines = [
        {"image": f"val2014/COCO_val2014_{img:012d}.jpg", "question": q, "answers": humans, "question_id": qid,
         "question_type": qtype, "answer_type": atype}
        for qid, img, q, qtype, atype, humans, _ in FIVE
    ]  # fmt: skip
    (root / "vqa.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    pope = [
        {"question_id": i + 1, "image": f"COCO_val2014_{(42, 73)[i % 2]:012d}.jpg", "text": f"q{i}", "label": label}
        for i, (label, _) in enumerate(POPE_SET)
    ]
    (root / "coco_pope_random.json").write_text("\n".join(json.dumps(line) for line in pope) + "\n")
    gqa_images = root / "gqa_images"
    gqa_images.mkdir()
    _photo("astronaut").save(gqa_images / "n1.jpg")
    _photo("coffee").save(gqa_images / "n2.jpg")
    gqa_rows = [
        ("201", "n1", "Is the person on the left?", "yes", "verify"),
        ("202", "n1", "What color is the suit?", "white", "query"),
        ("203", "n2", "Is the cup left or right?", "left", "choose"),
    ]
    gqa = {qid: {"imageId": i, "question": q, "answer": a, "types": {"structural": t}} for qid, i, q, a, t in gqa_rows}
    (root / "testdev_balanced_questions.json").write_text(json.dumps(gqa))
    return root


GQA_REPLIES = {
    "Is the person on the left?": "Yes",
    "What color is the suit?": "blue",
    "Is the cup left or right?": "left.",
}
POPE_REPLIES = {f"q{i}": answer for i, (_, answer) in enumerate(POPE_SET)}


@pytest.fixture
def fake_answers(monkeypatch):
    """generation.answer replaced by the canned replies above; the keyword arguments it got are recorded."""
    from unicode_mllm import generation

    calls = []
    replies = {**REPLIES, **GQA_REPLIES, **POPE_REPLIES}

    def answer(model, images, questions, *, max_new_tokens=64, temperature=0.0, batch_size=8):
        calls.append({"max_new_tokens": max_new_tokens, "temperature": temperature, "n": len(questions)})
        assert all(isinstance(image, Image.Image) and image.size == (48, 40) for image in images)
        return [replies[q] for q in questions]

    monkeypatch.setattr(generation, "answer", answer)
    return calls


@pytest.fixture
def model_copy(tiny_mllm_dir, tmp_path):
    """A private copy of the tiny model: the reports land in its eval/ folder by default."""
    return shutil.copytree(tiny_mllm_dir, tmp_path / "model")


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_eval_vqa_official_files_write_report_table_and_results(bench, model_copy, fake_answers, capsys, tmp_path):
    args = ["eval", "vqa", "--model", model_copy, "--questions", bench / "questions.json"]
    code, out, err = run(capsys, *args, "--annotations", bench / "annotations.json", "--images", bench / "val2014")
    assert code == 0, err
    assert "VQA accuracy 58.00% (vqav2 on 5)" in out and "yes/no 30.00% (1)" in out
    stem = model_copy / "eval" / "vqa_questions"
    report = json.loads(stem.with_suffix(".json").read_text())
    assert report["metric"] == "vqav2" and report["num_questions"] == 5
    assert report["vqav2"]["official"] == OFFICIAL_FIVE and report["accuracy"] == pytest.approx(0.58)
    assert report["source"]["annotations"] == str(bench / "annotations.json")
    assert report["decoding"]["greedy"] is True and report["decoding"]["max_new_tokens"] == 16
    assert report["settings"] == {"command": "eval vqa", "model": str(model_copy), "metric": "vqav2", "limit": None}
    table = stem.with_suffix(".md").read_text()
    assert "| overall | 5 | 58.00 |" in table and "| answer type: yes/no | 1 | 30.00 |" in table
    assert "| question type: how many | 2 | 65.00 |" in table and "greedy, at most 16 new tokens" in table
    results = json.loads((model_copy / "eval" / "vqa_questions_results.json").read_text())
    assert results == [{"question_id": q[0], "answer": q[6]} for q in FIVE]  # the official results format

    # The same questions as JSONL lines of ten answers: the same official score; --metric exact: the old 100%.
    code, out, err = run(capsys, "eval", "vqa", "--model", model_copy, "--jsonl", bench / "vqa.jsonl", "--limit", "5")
    assert code == 0, err
    report = json.loads((model_copy / "eval" / "vqa_vqa_limit5.json").read_text())
    assert report["vqav2"]["official"] == OFFICIAL_FIVE
    out_path = tmp_path / "lenient" / "r.json"
    code, out, err = run(capsys, "eval", "vqa", "--model", model_copy, "--jsonl", bench / "vqa.jsonl", "--metric",
                         "exact", "--out", out_path)  # fmt: skip
    assert code == 0, err
    assert json.loads(out_path.read_text())["accuracy"] == 1.0 and out_path.with_suffix(".md").is_file()
    assert "VQA exact match 100.00% over 5 questions" in out


def test_cli_eval_vqa_on_from_vqav2_shards_scores_the_ten_answers(bench, model_copy, fake_answers, capsys, tmp_path):
    from unicode_mllm.data.coco_vqa import convert_vqav2

    shards = tmp_path / "shards"
    files = (bench / "questions.json", bench / "annotations.json", bench / "val2014")
    convert_vqav2(*files, shards, split="val", progress=False)
    out = tmp_path / "r.json"
    args = ["eval", "vqa", "--model", model_copy, "--data", shards, "--split", "val", "--out", out]
    code, _, err = run(capsys, *args)
    assert code == 0, err
    report = json.loads(out.read_text())
    assert report["vqav2"]["official"] == OFFICIAL_FIVE and report["source"]["split"] == "val"
    assert json.loads((tmp_path / "r_results.json").read_text())[0] == {"question_id": 42000, "answer": "no"}


def test_cli_eval_vqa_gqa_layout_is_exact_match(bench, model_copy, fake_answers, capsys):
    args = ["eval", "vqa", "--model", model_copy, "--questions", bench / "testdev_balanced_questions.json"]
    code, _, err = run(capsys, *args, "--images", bench / "gqa_images")
    assert code == 0, err
    stem = model_copy / "eval" / "vqa_testdev_balanced_questions"
    report = json.loads(stem.with_suffix(".json").read_text())
    # "Yes" -> "yes" = "yes": 1; "blue" != "white": 0; "left." -> "left" = "left": 1 -> 2/3
    assert report["source"]["kind"] == "gqa" and report["metric"] == "exact"
    assert report["accuracy"] == pytest.approx(2 / 3)
    assert {k: v["accuracy"] for k, v in report["per_kind"].items()} == {"choose": 1.0, "query": 0.0, "verify": 1.0}
    results = json.loads((stem.parent / f"{stem.name}_results.json").read_text())
    assert results[1] == {"questionId": "202", "prediction": "blue"}  # GQA's own results format


def test_cli_eval_pope(bench, model_copy, fake_answers, capsys):
    args = ["eval", "pope", "--model", model_copy, "--questions", bench / "coco_pope_random.json"]
    code, out, err = run(capsys, *args, "--images", bench / "val2014", "--batch-size", "3")
    assert code == 0, err
    assert "TP 2, FP 3, TN 2, FN 1; 3 unparseable" in out
    report = json.loads((model_copy / "eval" / "pope_coco_pope_random.json").read_text())
    assert report["counts"] == {"TP": 2, "FP": 3, "TN": 2, "FN": 1} and report["f1"] == pytest.approx(0.5)
    assert report["settings"]["metric"] == "pope" and report["decoding"]["max_new_tokens"] == 16
    table = (model_copy / "eval" / "pope_coco_pope_random.md").read_text()
    assert "| 50.00 | 40.00 | 66.67 | 50.00 | 62.50 | 2 | 3 | 2 | 1 | 3 |" in table


def test_cli_eval_vqa_and_pope_run_the_real_tiny_model(bench, model_copy, capsys, tmp_path):
    """The real generation.answer (random weights: the wiring is the point, not the scores)."""
    args = ["--questions", bench / "questions.json", "--annotations", bench / "annotations.json"]
    opts = ["--images", bench / "val2014", "--limit", "2", "--max-new-tokens", "2", "--device", "cpu"]
    code, _, err = run(capsys, "eval", "vqa", "--model", model_copy, *args, *opts, "--out", tmp_path / "v.json")
    assert code == 0, err
    report = json.loads((tmp_path / "v.json").read_text())
    assert report["num_questions"] == 2 and 0.0 <= report["accuracy"] <= 1.0
    args = ["--questions", bench / "coco_pope_random.json"]
    code, _, err = run(capsys, "eval", "pope", "--model", model_copy, *args, *opts, "--out", tmp_path / "p.json")
    assert code == 0, err
    assert json.loads((tmp_path / "p.json").read_text())["num_questions"] == 2


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*_args, **_kwargs):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(cli_evaluation, "_load_mllm", refuse)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["vqa", "--questions", "{tmp}/nope.json", "--images", "{images}"], "--questions {tmp}/nope.json not found"),
        (["vqa", "--questions", "{q}", "--annotations", "{tmp}/nope.json", "--images", "{images}"], "not found"),
        (["vqa", "--questions", "{q}", "--images", "{images}"], "pass --annotations"),
        (["vqa", "--questions", "{q}", "--annotations", "{a}", "--images", "{tmp}/none"], "no such image folder"),
        (["vqa", "--questions", "{q}", "--annotations", "{a}"], "--questions needs --images"),
        (["vqa", "--jsonl", "{tmp}/nope.jsonl"], "--jsonl {tmp}/nope.jsonl not found"),
        (["vqa", "--jsonl", "{jsonl}", "--metric", "soft"], "--metric 'soft' is unknown"),
        (["vqa", "--jsonl", "{jsonl}", "--annotations", "{a}"], "--annotations go with --questions"),
        (["pope", "--questions", "{tmp}/nope.json", "--images", "{images}"], "POPE question file"),
        (["pope", "--questions", "{pope}", "--images", "{tmp}/none"], "no such image folder"),
    ],
)
def test_input_errors_are_one_line_before_the_model_loads(bench, tmp_path, capsys, no_model_load, args, message):
    values = dict(
        tmp=tmp_path,
        images=bench / "val2014",
        q=bench / "questions.json",
        a=bench / "annotations.json",
        jsonl=bench / "vqa.jsonl",
        pope=bench / "coco_pope_random.json",
    )
    code, _, err = run(capsys, "eval", *[a.format(**values) for a in args], "--model", tmp_path)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert message.format(**values) in err
