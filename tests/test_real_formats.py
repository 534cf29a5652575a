"""Data people already have: img2dataset folders read as they are, COCO captions and VQAv2 converted to shards."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
import webdataset as wds
from PIL import Image
from skimage import data as skdata

from unicode_mllm.cli import main
from unicode_mllm.data.coco_vqa import convert_coco_captions, convert_vqav2
from unicode_mllm.data.stream import SkipReport, StreamingDataset
from unicode_mllm.errors import UserError
from unicode_mllm.shard_manifest import read_manifest

PHOTOS = {"astronaut": skdata.astronaut, "coffee": skdata.coffee, "chelsea": skdata.chelsea}


def _photo(name: str, width: int = 40) -> Image.Image:
    """A real photo from scikit-image, shrunk (aspect kept, so sizes differ between photos) for speed."""
    img = Image.fromarray(PHOTOS[name]())
    return img.resize((width, max(1, round(img.height * width / img.width))))


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _stream(folder, split: str = "train") -> tuple[list[dict], SkipReport]:
    report = SkipReport()
    samples = list(report.track(StreamingDataset(folder, split, shuffle=False, image_format="pil")))
    return samples, report


# -------------------------------------------------------------------------------- img2dataset folders


def _img2dataset_shard(folder, shard: int, photos: list[str], stats: bool, failed: int = 0) -> None:
    """One shard as img2dataset writes it: KEY.jpg/.txt/.json per sample, NNNNN_stats.json, NNNNN.parquet."""
    with wds.TarWriter(str(folder / f"{shard:05d}.tar")) as tar:
        for i, name in enumerate(photos):
            key = f"{shard:05d}{i:04d}"
            img = _photo(name, width=32 + 8 * i)
            meta = {
                "url": f"https://example.org/{name}.jpg",
                "key": key,
                "status": "success",
                "caption": f"a photo of {name}",
                "width": img.width,
                "height": img.height,
                "original_width": 512,
                "original_height": 512,
                "exif": "{}",
                "sha256": "0" * 64,
            }
            sample = {
                "__key__": key,
                "jpg": _jpeg(img),
                "txt": f"a photo of {name}",
                "json": json.dumps(meta, indent=4),
            }
            tar.write(sample)
    (folder / f"{shard:05d}.parquet").write_bytes(b"PAR1 not read")
    if stats:
        counts = {"count": len(photos) + failed, "successes": len(photos), "failed_to_download": failed}
        counts |= {"failed_to_resize": 0, "duration": 1.5, "status_dict": {"success": len(photos)}}
        (folder / f"{shard:05d}_stats.json").write_text(json.dumps(counts, indent=4), encoding="utf-8")


def test_img2dataset_folder_is_read_without_a_manifest(tmp_path):
    folder = tmp_path / "laion"
    folder.mkdir()
    _img2dataset_shard(folder, 0, ["astronaut", "coffee"], stats=True, failed=3)
    _img2dataset_shard(folder, 1, ["chelsea"], stats=True, failed=1)
    _img2dataset_shard(folder, 2, ["coffee", "chelsea", "astronaut"], stats=False)  # e.g. still being written
    (folder / "notes.json").write_text("{}", encoding="utf-8")  # foreign files are ignored

    manifest = read_manifest(folder)
    assert list(manifest.splits) == ["train"]
    train = manifest.split("train")
    assert [(s.name, s.num_samples) for s in train.shards] == [("00000.tar", 2), ("00001.tar", 1), ("00002.tar", 3)]
    assert train.num_samples == 6
    assert manifest.generator_config["generator"] == "img2dataset"
    assert manifest.image_size() is None
    assert manifest.extra["img2dataset"]["stats"] == {
        "count": 7,
        "successes": 3,
        "failed_to_download": 4,
        "failed_to_resize": 0,
    }
    assert manifest.extra["img2dataset"]["shards_without_stats"] == ["00002.tar"]
    with pytest.raises(UserError, match=r"\(img2dataset folder\): no split 'val'; available splits: \['train'\]"):
        manifest.split("val")

    samples, report = _stream(folder)
    assert report.num_skipped == 0 and len(samples) == 6
    assert [s["key"] for s in samples] == ["000000000", "000000001", "000010000", "000020000", "000020001", "000020002"]
    assert samples[0]["meta"]["caption"] == "a photo of astronaut" and samples[0]["meta"]["status"] == "success"
    assert len({s["image"].size for s in samples}) > 1  # sizes vary: no expected size is imposed
    assert samples[0]["image"].size == (samples[0]["meta"]["width"], samples[0]["meta"]["height"])
    assert StreamingDataset.from_folder(folder, "train").expected_size is None


def test_img2dataset_counts_from_the_tar_when_stats_are_missing_or_broken(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    _img2dataset_shard(folder, 0, ["astronaut", "coffee"], stats=True)
    (folder / "00000_stats.json").write_text("{not json", encoding="utf-8")
    # Only keys with an image member count: a json-only key and a png-only key are one and one.
    with tarfile.open(folder / "00001.tar", "w") as tar:
        for name, payload in [("a.json", b"{}"), ("b.png", b"x"), ("b.json", b"{}"), ("c.WEBP", b"x")]:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    (folder / "00010.tar").write_bytes(b"not a tar at all")  # counted as 0; the stream calls it broken
    manifest = read_manifest(folder)
    assert [(s.name, s.num_samples) for s in manifest.split("train").shards] == [
        ("00000.tar", 2),
        ("00001.tar", 2),
        ("00010.tar", 0),
    ]


def test_folders_without_manifest_or_img2dataset_tars_keep_the_error(tmp_path):
    with pytest.raises(UserError, match="manifest.json not found; write the shards"):
        read_manifest(tmp_path)
    (tmp_path / "train-000000.tar").write_bytes(b"")  # our own shard name: the manifest is really missing
    (tmp_path / "0001.tar.gz").write_bytes(b"")
    with pytest.raises(UserError, match="manifest.json not found"):
        read_manifest(tmp_path)


# -------------------------------------------------------------------------------------- COCO captions


def _coco(tmp_path):
    """3 captioned images, one without captions, one captioned image whose file is missing, one stray caption."""
    root = tmp_path / "train2017"
    root.mkdir()
    files = {1: "000000000001.jpg", 2: "000000000002.jpg", 3: "000000000003.jpg", 4: "000000000004.jpg"}
    for file_name, photo in zip(files.values(), ["astronaut", "coffee", "chelsea", "coffee"], strict=True):
        (root / file_name).write_bytes(_jpeg(_photo(photo)))
    images = [{"id": i, "file_name": f, "height": 1, "width": 1, "license": 1} for i, f in files.items()]
    images.append({"id": 5, "file_name": "000000000005.jpg", "height": 1, "width": 1})  # file missing
    annotations = []
    for image_id in (1, 2, 3, 5):
        for n in range(2):
            annotations.append({"id": 100 * image_id + n, "image_id": image_id, "caption": f" Image {image_id}, {n}. "})
    annotations.insert(3, {"id": 999, "image_id": 77, "caption": "of no listed image"})
    data = {"info": {"year": 2017}, "licenses": [], "images": images, "annotations": annotations}
    path = tmp_path / "captions_train2017.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path, root


def test_coco_captions_one_sample_per_image_with_all_captions(tmp_path):
    captions_json, root = _coco(tmp_path)
    out = tmp_path / "out"
    report = convert_coco_captions(captions_json, root, out, maxcount=2, progress=False)

    assert report.num_inputs == 5 and report.num_written == 3
    assert report.skipped == {"no caption": ["000000000004.jpg"], "missing image": ["000000000005.jpg"]}
    assert report.warned == {"caption of unknown image": ["annotation 999"]}
    assert "1 caption of unknown image (annotation 999)" in report.summary()
    manifest = read_manifest(out)
    assert manifest.split("train").num_samples == 3 and len(manifest.split("train").shards) == 2
    assert manifest.extra["conversion"] == {
        "num_inputs": 5,
        "skipped": {"no caption": 1, "missing image": 1},
        "warned": {"caption of unknown image": 1},
    }
    assert manifest.generator_config["converter"] == "coco_captions"

    samples, skips = _stream(out)
    assert skips.num_skipped == 0
    metas = [s["meta"] for s in samples]
    assert [m["id"] for m in metas] == [1, 2, 3]
    assert metas[0] == {
        "id": 1,
        "source": "000000000001.jpg",
        "caption": "Image 1, 0.",
        "captions": ["Image 1, 0.", "Image 1, 1."],
        "has_image": True,
    }
    assert samples[2]["image"].size == _photo("chelsea").size


def test_coco_malformed_entries_are_counted(tmp_path):
    captions_json, root = _coco(tmp_path)
    data = json.loads(captions_json.read_text())
    data["images"] += [{"id": "6", "file_name": "x.jpg"}, {"id": 1, "file_name": "again.jpg"}, "junk"]
    data["annotations"] += [{"id": 7, "image_id": 2, "caption": "   "}, {"id": 8, "image_id": 2}]
    captions_json.write_text(json.dumps(data))
    report = convert_coco_captions(captions_json, root, tmp_path / "out", progress=False)
    assert report.num_inputs == 8 and report.num_written == 3
    assert report.skipped["malformed entry"] == ["images[5]", "images[7]"]
    assert report.skipped["duplicate image id"] == ["again.jpg"]
    assert report.warned["malformed caption"] == ["annotation 7", "annotation 8"]

    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(UserError, match=r"top level is a list; expected an object with \"images\""):
        convert_coco_captions(tmp_path / "list.json", root, tmp_path / "o2", progress=False)
    (tmp_path / "noimages.json").write_text('{"annotations": []}')
    with pytest.raises(UserError, match="no 'images' list at the top level; is this a COCO captions file"):
        convert_coco_captions(tmp_path / "noimages.json", root, tmp_path / "o3", progress=False)


# ----------------------------------------------------------------------------------------------- VQAv2


def _vqa(tmp_path, subset: str = "train2014"):
    """Questions about images 1 (two), 2 (one) and 3 (file missing); annotations with ten answers each."""
    root = tmp_path / subset
    root.mkdir(exist_ok=True)
    for image_id, photo in [(1, "astronaut"), (2, "chelsea")]:
        (root / f"COCO_{subset}_{image_id:012d}.jpg").write_bytes(_jpeg(_photo(photo)))
    asked = [(1, 10, "What is the person wearing?"), (2, 20, "What animal is this?"), (1, 11, "Is it day?")]
    asked += [(3, 30, "Where is this?"), (2, 21, "How many cats?")]
    questions = [{"image_id": i, "question": q, "question_id": qid} for i, qid, q in asked]
    header = {"info": {}, "license": {}, "data_subtype": subset}
    q_path = tmp_path / f"v2_OpenEnded_mscoco_{subset}_questions.json"
    q_path.write_text(json.dumps(header | {"task_type": "Open-Ended", "data_type": "mscoco", "questions": questions}))
    best = {10: "spacesuit", 20: "cat", 11: "yes", 30: "kitchen"}  # question 21 has no annotation
    annotations = [
        {
            "question_id": qid,
            "image_id": qid // 10,
            "question_type": "what",
            "answer_type": "yes/no" if answer == "yes" else "other",
            "multiple_choice_answer": answer,
            "answers": [
                {"answer": answer if k < 8 else f"other {k}", "answer_confidence": "yes", "answer_id": k + 1}
                for k in range(10)
            ],
        }
        for qid, answer in best.items()
    ]
    a_path = tmp_path / f"v2_mscoco_{subset}_annotations.json"
    a_path.write_text(json.dumps(header | {"annotations": annotations}))
    return q_path, a_path, root


def test_vqav2_one_sample_per_image_with_its_qa_list(tmp_path):
    q_path, a_path, root = _vqa(tmp_path)
    out = tmp_path / "out"
    report = convert_vqav2(q_path, a_path, root, out, progress=False)

    assert report.num_inputs == 3 and report.num_written == 2
    assert report.skipped == {"missing image": ["COCO_train2014_000000000003.jpg"]}
    assert report.warned == {"question without annotation": ["question 21"]}
    assert read_manifest(out).generator_config["subset"] == "train2014"
    samples, skips = _stream(out)
    assert skips.num_skipped == 0
    first, second = (s["meta"] for s in samples)
    assert first["id"] == 1 and first["source"] == "COCO_train2014_000000000001.jpg"
    assert [qa["question_id"] for qa in first["qa"]] == [10, 11]
    assert first["qa"][0] == {
        "question": "What is the person wearing?",
        "answer": "spacesuit",
        "answers": ["spacesuit"] * 8 + ["other 8", "other 9"],
        "question_id": 10,
        "answer_type": "other",
        "question_type": "what",
    }
    assert first["qa"][1]["answer"] == "yes" and first["qa"][1]["answer_type"] == "yes/no"
    assert [qa["question"] for qa in second["qa"]] == ["What animal is this?"]
    assert all(len(qa["answers"]) == 10 for s in samples for qa in s["meta"]["qa"])


def test_vqav2_without_annotations_keeps_questions_for_evaluation(tmp_path):
    q_path, _, root = _vqa(tmp_path, subset="test2015")
    out = tmp_path / "out"
    report = convert_vqav2(q_path, None, root, out, split="testdev", progress=False)
    assert report.num_written == 2 and not report.warned
    samples, _ = _stream(out, "testdev")
    by_id = {s["meta"]["id"]: s["meta"]["qa"] for s in samples}
    assert [qa["question_id"] for qa in by_id[2]] == [20, 21]
    assert all(qa["answer"] is None and qa["answers"] == [] for qa in by_id[1] + by_id[2])


def test_vqav2_bad_questions_and_annotations_are_warned(tmp_path):
    q_path, a_path, root = _vqa(tmp_path)
    questions, annotations = json.loads(q_path.read_text()), json.loads(a_path.read_text())
    questions["questions"] += [
        {"image_id": 1, "question": "Again?", "question_id": 10},  # repeated id
        {"image_id": 2, "question": "  ", "question_id": 40},
        {"image_id": 2, "question": "Which?", "question_id": 50},  # its annotation names image 1
    ]
    annotations["annotations"][0]["answers"] = "spacesuit"  # question 10: malformed, so 10 has no annotation
    annotations["annotations"] += [
        dict(annotations["annotations"][1], question_id=50, image_id=1),
        dict(annotations["annotations"][1], question_id=60),  # answers no question
    ]
    q_path.write_text(json.dumps(questions))
    a_path.write_text(json.dumps(annotations))
    report = convert_vqav2(q_path, a_path, root, tmp_path / "out", progress=False)
    assert report.warned == {
        "malformed annotation": ["annotation 10"],
        "question without annotation": ["question 10", "question 21"],
        "duplicate question id": ["question 10"],
        "malformed question": ["question 40"],
        "annotation of another image": ["question 50"],
        "annotation of unknown question": ["annotation 60"],
    }
    assert report.num_written == 2
    samples, _ = _stream(tmp_path / "out")
    assert [[qa["question_id"] for qa in s["meta"]["qa"]] for s in samples] == [[20], [11]]  # by first kept question


def test_vqav2_subset_and_pattern_errors(tmp_path):
    q_path, a_path, root = _vqa(tmp_path)
    data = json.loads(a_path.read_text())
    other = tmp_path / "val_annotations.json"
    other.write_text(json.dumps(data | {"data_subtype": "val2014"}))
    with pytest.raises(UserError, match="questions are of 'train2014' but the annotations of 'val2014'"):
        convert_vqav2(q_path, other, root, tmp_path / "o1", progress=False)
    with pytest.raises(UserError, match=r"--image-pattern 'x\{oops\}.jpg' is not a valid pattern"):
        convert_vqav2(q_path, a_path, root, tmp_path / "o2", image_pattern="x{oops}.jpg", progress=False)
    bare = tmp_path / "bare_questions.json"
    bare.write_text(json.dumps({"questions": json.loads(q_path.read_text())["questions"]}))
    with pytest.raises(UserError, match="no 'data_subtype' to fill {subset}.*pass --subset train2014"):
        convert_vqav2(bare, None, root, tmp_path / "o3", progress=False)
    report = convert_vqav2(bare, None, root, tmp_path / "o4", subset="train2014", progress=False)
    assert report.num_written == 2
    # A flat folder of "<id>.jpg" files works through the pattern, no subset needed.
    for image_id in (1, 2):
        (root / f"COCO_train2014_{image_id:012d}.jpg").rename(root / f"{image_id}.jpg")
    report = convert_vqav2(bare, None, root, tmp_path / "o5", image_pattern="{image_id}.jpg", progress=False)
    assert report.num_written == 2


# -------------------------------------------------------------------------------------------------- CLI


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_from_coco_and_from_vqav2(capsys, tmp_path):
    captions_json, coco_root = _coco(tmp_path)
    out = tmp_path / "coco_out"
    code, stdout, err = run(
        capsys, "data", "from-coco", "--captions", str(captions_json), "--images", str(coco_root), "--out", str(out)
    )
    assert code == 0, err
    assert stdout.startswith("wrote 3 of 5 samples") and "1 no caption (000000000004.jpg)" in stdout
    assert read_manifest(out).split("train").num_samples == 3

    q_path, a_path, root = _vqa(tmp_path)
    args = ["data", "from-vqav2", "--questions", str(q_path), "--annotations", str(a_path), "--images", str(root)]
    code, stdout, err = run(capsys, *args, "--out", str(tmp_path / "vqa"), "--split", "val", "--shard-size", "1")
    assert code == 0, err
    assert stdout.startswith("wrote 2 of 3 samples") and "(split val, 2 shards)" in stdout
    assert [s["meta"]["id"] for s in _stream(tmp_path / "vqa", "val")[0]] == [1, 2]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["from-coco", "--captions", "/nonexistent.json", "--images", "."], "--captions /nonexistent.json not found"),
        (["from-vqav2", "--questions", "/nonexistent.json", "--images", "."], "--questions /nonexistent.json not"),
        (["from-vqav2", "--questions", "Q", "--annotations", "/no.json", "--images", "."], "--annotations /no.json"),
        (["from-coco", "--captions", "Q", "--images", "/nonexistent"], "--images /nonexistent not found"),
        (["from-coco", "--captions", "Q", "--images", ".", "--split", "a-b"], "--split 'a-b' must match"),
        (["from-vqav2", "--questions", "Q", "--images", ".", "--image-pattern", "{x}"], "--image-pattern '{x}'"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2(capsys, tmp_path, args, message):
    (tmp_path / "Q").write_text(json.dumps({"questions": [], "images": [], "annotations": []}))
    args = [str(tmp_path / "Q") if a == "Q" else a for a in args]
    code, _, err = run(capsys, "data", *args, "--out", str(tmp_path / "out"))
    assert code == 2, err
    assert message in err and err.count("\n") == 1 and err.startswith("error:") and "Traceback" not in err
