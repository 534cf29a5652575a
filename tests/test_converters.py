"""Image-folder and LLaVA converters: good samples land in shards, bad ones are counted and named."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from unicode_mllm.data.converters import check_conversation, convert_image_folder, convert_llava_json
from unicode_mllm.data.image_io import encode_png
from unicode_mllm.data.shards import iter_split_records
from unicode_mllm.data.stream import SkipReport, StreamingDataset
from unicode_mllm.errors import UserError
from unicode_mllm.shard_manifest import read_manifest


def _image(i: int, size: int = 8) -> Image.Image:
    return Image.fromarray(np.random.default_rng(i).integers(0, 256, (size, size, 3), dtype=np.uint8))


def _read(out, split: str = "train") -> dict[str, dict]:
    report = SkipReport()
    samples = list(report.track(StreamingDataset(out, split, shuffle=False)))
    assert report.num_skipped == 0
    return {s["meta"].get("source") or str(s["meta"].get("id")): s for s in samples}


def _turns(*values: str) -> list[dict]:
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(values)]


# ------------------------------------------------------------------------------------- image folder


def _image_folder(root):
    root.mkdir()
    (root / "sub").mkdir()
    _image(0).save(root / "a.png")
    (root / "a.txt").write_text("  a red square \n", encoding="utf-8")
    _image(1).save(root / "sub" / "b.jpg", quality=95)
    _image(2).convert("RGBA").save(root / "c.webp", lossless=True)
    (root / "bad.png").write_bytes(encode_png(_image(3, size=64))[:100])  # truncated
    (root / "notes.md").write_text("not an image")
    return root


def test_image_folder_counts_corrupt_file_and_reads_sidecar(tmp_path):
    src = _image_folder(tmp_path / "images")
    out = tmp_path / "out"
    report = convert_image_folder(src, out, maxcount=2, progress=False)

    assert report.num_inputs == 4 and report.num_written == 3
    assert report.skipped == {"corrupt image": ["bad.png"]}
    assert report.num_without_caption == 2
    assert report.summary().endswith("; skipped 1: 1 corrupt image (bad.png)")
    manifest = read_manifest(out)
    assert manifest.split("train").num_samples == 3 and len(manifest.split("train").shards) == 2
    assert manifest.extra["conversion"]["skipped"] == {"corrupt image": 1}
    assert manifest.generator_config["captions_from"] == "sidecar"

    samples = _read(out)
    assert sorted(samples) == ["a.png", "c.webp", "sub/b.jpg"]
    assert samples["a.png"]["meta"]["caption"] == "a red square"
    assert samples["sub/b.jpg"]["meta"]["caption"] is None
    assert np.array_equal(np.asarray(samples["a.png"]["image"]), np.asarray(_image(0)))
    assert np.array_equal(np.asarray(samples["c.webp"]["image"]), np.asarray(_image(2)))  # lossless webp


def test_image_folder_original_storage_keeps_jpeg_bytes(tmp_path):
    src = _image_folder(tmp_path / "images")
    out = tmp_path / "out"
    convert_image_folder(src, out, recursive=False, image_storage="original", progress=False)
    members = {json.loads(r["json"])["source"]: r for r in iter_split_records(out, "train")}
    assert sorted(members) == ["a.png", "c.webp"]  # recursive=False leaves sub/ out
    assert members["a.png"]["png"] == (src / "a.png").read_bytes()
    assert "png" in members["c.webp"]  # webp is re-encoded, the writer stores png or jpg only
    out2 = tmp_path / "out2"
    convert_image_folder(src, out2, image_storage="original", progress=False)
    by_source = {json.loads(r["json"])["source"]: r for r in iter_split_records(out2, "train")}
    assert by_source["sub/b.jpg"]["jpg"] == (src / "sub" / "b.jpg").read_bytes()


def test_image_folder_errors(tmp_path):
    with pytest.raises(UserError, match="no such image folder"):
        convert_image_folder(tmp_path / "missing", tmp_path / "out", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"no image files \(.png, .jpg"):
        convert_image_folder(tmp_path / "empty", tmp_path / "out", progress=False)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(UserError, match=r"no sample could be converted: .*1 corrupt image \(x\.png\)"):
        convert_image_folder(tmp_path / "broken", tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "manifest.json").exists()


# -------------------------------------------------------------------------------------------- LLaVA


def test_llava_converter_counts_each_problem(tmp_path):
    root = tmp_path / "images"
    (root / "coco").mkdir(parents=True)
    _image(0).save(root / "coco" / "good.png")
    buf = io.BytesIO()
    _image(1).save(buf, format="PNG")
    (root / "coco" / "corrupt.png").write_bytes(buf.getvalue()[:80])
    records = [
        {"id": "good", "image": "coco/good.png", "conversations": _turns("<image>\nWhat is it?", "A square.")},
        {"id": "gone", "image": "coco/missing.png", "conversations": _turns("<image>\nWhat?", "Nothing.")},
        {"id": "noplaceholder", "image": "coco/good.png", "conversations": _turns("What is it?", "A square.")},
        {"id": "corrupt", "image": "coco/corrupt.png", "conversations": _turns("<image> hi", "hello")},
        {"id": "text", "conversations": _turns("Say hi.", "Hi.", "Again.", "Hi again.")},
        {"id": "order", "conversations": [{"from": "gpt", "value": "I start."}, {"from": "human", "value": "no"}]},
        {"id": "gptimage", "image": "coco/good.png", "conversations": _turns("<image> q", "see <image>")},
        "not a record",
    ]
    json_path = tmp_path / "llava.json"
    json_path.write_text(json.dumps(records), encoding="utf-8")
    out = tmp_path / "out"
    report = convert_llava_json(json_path, root, out, progress=False)

    assert report.num_written == 2 and report.num_text_only == 1
    assert report.skipped == {
        "missing image": ["gone"],
        "image placeholder mismatch": ["noplaceholder", "gptimage"],
        "corrupt image": ["corrupt"],
        "bad turn order": ["order"],
        "malformed record": ["#7"],
    }
    assert read_manifest(out).extra["conversion"]["skipped"]["image placeholder mismatch"] == 2
    samples = _read(out)
    assert sorted(samples) == ["good", "text"]
    assert samples["good"]["meta"]["conversations"] == records[0]["conversations"]
    assert samples["good"]["meta"]["image_source"] == "coco/good.png"
    assert np.array_equal(np.asarray(samples["good"]["image"]), np.asarray(_image(0)))
    assert samples["text"]["image"] is None and samples["text"]["meta"]["has_image"] is False


@pytest.mark.parametrize(
    ("conversations", "has_image", "reason"),
    [
        (_turns("<image> q", "a"), True, None),
        (_turns("q", "a"), False, None),
        (_turns("<image> <image> q", "a"), True, "image placeholder mismatch"),
        (_turns("<image> q", "a"), False, "image placeholder mismatch"),
        (_turns("q", "a", "q2"), False, "bad turn order"),
        ([{"from": "human", "value": "q"}, {"from": "human", "value": "q"}], False, "bad turn order"),
        ([{"from": "system", "value": "q"}], False, "malformed record"),
        ([{"from": "user", "value": "<image> q"}, {"from": "assistant", "value": "a"}], True, None),  # aliases
        ([{"from": "user", "value": "q"}], False, "bad turn order"),
        ([], False, "malformed record"),
        ("hello", False, "malformed record"),
    ],
)
def test_check_conversation(conversations, has_image, reason):
    result = check_conversation(conversations, has_image)
    assert (result[0] if result else None) == reason


def test_llava_bad_json_file(tmp_path):
    (tmp_path / "bad.json").write_text("[{", encoding="utf-8")
    with pytest.raises(UserError, match=r"bad\.json: not valid JSON \(line 1"):
        convert_llava_json(tmp_path / "bad.json", tmp_path, tmp_path / "out", progress=False)
    (tmp_path / "obj.json").write_text("{}", encoding="utf-8")
    with pytest.raises(UserError, match="top level is a dict; expected a list"):
        convert_llava_json(tmp_path / "obj.json", tmp_path, tmp_path / "out", progress=False)


def test_llava_role_aliases_are_normalised_and_ids_of_any_type_survive(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    _image(0).save(root / "a.png")
    sharegpt = [{"from": "user", "value": "<image>\nWhat?"}, {"from": "assistant", "value": "A square."}]
    records = [
        {"id": 7, "image": "a.png", "conversations": sharegpt},
        {"id": "7", "conversations": _turns("Hi.", "Hello.")},  # not a repeat of the int 7
        {"id": None, "conversations": [{"from": "user", "value": "Hi."}, {"from": "gpt", "value": "Yo."}]},
        {"id": 2.5, "conversations": _turns("Q.", "A.")},
        {"id": ["a", 1], "conversations": _turns("Q.", "A.")},
        {"conversations": _turns("no id", "ok")},
    ]
    (tmp_path / "sharegpt.json").write_text(json.dumps(records), encoding="utf-8")
    out = tmp_path / "out"
    report = convert_llava_json(tmp_path / "sharegpt.json", root, out, progress=False)

    assert report.num_written == 6 and not report.skipped and not report.warned
    metas = [s["meta"] for s in StreamingDataset(out, "train", shuffle=False)]
    assert [m["id"] for m in metas] == [7, "7", None, 2.5, ["a", 1], None]
    assert [type(m["id"]) for m in metas[:4]] == [int, str, type(None), float]
    assert metas[0]["conversations"] == _turns("<image>\nWhat?", "A square.")
    assert [t["from"] for t in metas[2]["conversations"]] == ["human", "gpt"]
    assert "id" not in records[5] and metas[5]["id"] is None
