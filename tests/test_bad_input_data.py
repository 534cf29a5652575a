"""Bad input to the data commands: every odd sample is counted and named, never dropped or kept silently."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from unicode_mllm.cli import main
from unicode_mllm.config import load_config
from unicode_mllm.data.converters import convert_image_folder, convert_llava_json
from unicode_mllm.data.shapes import ShapesConfig, ShapesWorld
from unicode_mllm.data.shapes_dataset import write_shapes_dataset
from unicode_mllm.data.shards import write_manifest, write_split
from unicode_mllm.data.stream import SkipReport, StreamingDataset
from unicode_mllm.errors import ConfigError, UserError
from unicode_mllm.evaluation.t2i import shapes_config_from_manifest
from unicode_mllm.shard_manifest import read_manifest


def _image(i: int, size: int = 8) -> Image.Image:
    return Image.fromarray(np.random.default_rng(i).integers(0, 256, (size, size, 3), dtype=np.uint8))


def _turns(*values: str) -> list[dict]:
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(values)]


# ------------------------------------------------------------------- row 28: data inspect, image size


def _shapes_set_with_one_big_image(out):
    """Four samples of a 32 px shapes set whose third image is 64 px."""
    records = [{"key": f"s{i}", "image": _image(i, 64 if i == 2 else 32), "meta": {"i": i}} for i in range(4)]
    summary = write_split(records, out, "train", progress=False)
    write_manifest(out, [summary], {"generator": "shapes", "shapes": {"image_size": 32}})
    return out


def test_inspect_counts_an_image_of_the_wrong_size(tmp_path, capsys):
    out = _shapes_set_with_one_big_image(tmp_path / "bad_size")
    assert read_manifest(out).image_size() == (32, 32)
    report = SkipReport()
    keys = [s["key"] for s in report.track(StreamingDataset.from_folder(out, "train", shuffle=False))]
    assert keys == ["s0", "s1", "s3"] and dict(report.skipped) == {"wrong image size": 1}

    assert main(["data", "inspect", str(out), "--split", "train"]) == 0
    assert "3 samples read; skipped 1 of 4 samples (25.00%): 1 wrong image size" in capsys.readouterr().out


def test_manifest_image_size_of_other_writers(tmp_path):
    records = [{"key": "a", "image": _image(0), "meta": {}}]
    summary = write_split(records, tmp_path, "train", progress=False)
    for config, size in [
        ({"converter": "image_folder", "expected_size": None}, None),
        ({"converter": "image_folder", "expected_size": 8}, (8, 8)),
        ({"converter": "llava_json", "expected_size": [8, 6]}, (8, 6)),
        ({"generator": "tokenize", "source_generator": {"generator": "shapes", "shapes": {"image_size": 8}}}, (8, 8)),
        ({"generator": "shapes", "shapes": {"image_size": "big"}}, None),
    ]:
        write_manifest(tmp_path, [summary], config)
        assert read_manifest(tmp_path).image_size() == size, config


# ------------------------------------------------------------------- row 29: shapes image size rule


@pytest.mark.parametrize("size", [33, 36, 60])
def test_shapes_size_must_be_a_multiple_of_8(size):
    with pytest.raises(ConfigError, match=rf"image_size {size} is not a multiple of 8.*use {size - size % 8} or"):
        load_config(ShapesConfig, None, [f"image_size={size}"])
    with pytest.raises(ConfigError, match="not a multiple of 8"):
        ShapesWorld(ShapesConfig(image_size=size))


def test_shapes_cli_rejects_size_33(tmp_path, capsys):
    code = main(["data", "shapes", "--out", str(tmp_path / "s33"), "--size", "33", "--train", "2", "--val", "0"])
    assert code != 0 and "image_size 33 is not a multiple of 8" in capsys.readouterr().err
    assert not (tmp_path / "s33" / "manifest.json").exists()
    assert ShapesWorld(ShapesConfig(image_size=40)).cfg.image_size == 40  # a multiple of 8 is fine


# ------------------------------------------------------------------- row 30: t2i on a tokenized set


def test_t2i_world_config_from_a_tokenized_shapes_set(tmp_path):
    shapes = tmp_path / "shapes"
    write_shapes_dataset(ShapesConfig(image_size=32, seed=7), shapes, {"train": 2}, grid_samples=2)
    source = read_manifest(shapes).generator_config
    tokenized = tmp_path / "tok"
    summary = write_split([{"key": "a", "image": None, "meta": {}}], tokenized, "train", progress=False)
    write_manifest(tokenized, [summary], {"generator": "tokenize", "source": str(shapes), "source_generator": source})
    assert shapes_config_from_manifest(tokenized) == shapes_config_from_manifest(shapes)
    assert shapes_config_from_manifest(tokenized).seed == 7

    other = tmp_path / "other"
    write_manifest(tokenized, [summary], {"generator": "tokenize", "source_generator": {"converter": "x"}})
    write_split([{"key": "a", "image": None, "meta": {}}], other, "train", progress=False)
    write_manifest(other, [summary], {"converter": "image_folder"})
    for folder in (tokenized, other):
        with pytest.raises(UserError, match="was not written by `unicode-mllm data shapes`"):
            shapes_config_from_manifest(folder)


# ------------------------------------------------------------------- row 33: dangling symlink


def test_image_folder_counts_a_dangling_symlink(tmp_path):
    src = tmp_path / "ff"
    src.mkdir()
    _image(0).save(src / "good.png")
    os.symlink(tmp_path / "gone.png", src / "dangling.png")
    report = convert_image_folder(src, tmp_path / "out", progress=False)
    assert report.num_inputs == 2 and report.num_written == 1
    assert report.skipped == {"missing image": ["dangling.png"]}
    assert "1 missing image (dangling.png)" in report.summary()
    assert read_manifest(tmp_path / "out").extra["conversion"]["skipped"] == {"missing image": 1}


# ------------------------------------------------------------------- row 34: LLaVA records


def test_llava_empty_turns_duplicate_ids_and_escaping_paths(tmp_path):
    root = tmp_path / "imgs"
    (root / "sub").mkdir(parents=True)
    _image(0).save(root / "good.png")
    _image(1).save(tmp_path / "outside.png")
    records = [
        {"id": "g1", "image": "good.png", "conversations": _turns("<image>\nWhat?", "A square.")},
        {"id": "g1", "image": "good.png", "conversations": _turns("<image>\nColour?", "Red.")},  # repeated id
        {"id": "only_image", "image": "good.png", "conversations": _turns("<image>", "A caption.")},  # allowed
        {"id": "emptyq", "conversations": _turns("  ", "An answer.")},
        {"id": "emptya", "image": "good.png", "conversations": _turns("<image>\nWhat?", "")},
        {"id": "up", "image": "../outside.png", "conversations": _turns("<image>\nWhat?", "A.")},
        {"id": "abs", "image": str(tmp_path / "outside.png"), "conversations": _turns("<image>\nWhat?", "A.")},
        {"id": "inner", "image": "sub/../good.png", "conversations": _turns("<image>\nWhat?", "A.")},
    ]
    (tmp_path / "data.json").write_text(json.dumps(records), encoding="utf-8")
    out = tmp_path / "out"
    report = convert_llava_json(tmp_path / "data.json", root, out, progress=False)

    assert report.num_written == 4  # g1, g1, only_image, inner
    assert report.skipped == {"empty turn": ["emptyq", "emptya"], "image outside root": ["up", "abs"]}
    assert report.warned == {"duplicate id": ["g1"]}
    assert "1 duplicate id (g1)" in report.summary() and "2 image outside root (up, abs)" in report.summary()
    conversion = read_manifest(out).extra["conversion"]
    assert conversion["skipped"] == {"empty turn": 2, "image outside root": 2}
    assert conversion["warned"] == {"duplicate id": 1}
