"""Shard writing, the manifest, and image decoding (unicode_mllm.data.shards / image_io)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from unicode_mllm.data.image_io import encode_png, load_image, pil_to_tensor, tensor_to_pil
from unicode_mllm.data.shards import iter_split_records, shard_urls, write_manifest, write_split
from unicode_mllm.errors import UserError
from unicode_mllm.shard_manifest import FORMAT_VERSION, read_manifest


def _image(seed: int, size: int = 8) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def _jpeg_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _jpeg_cmyk_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG")
    return buf.getvalue()


def _records(n: int, start: int = 0) -> list[dict]:
    return [
        {"key": f"s{i:04d}", "image": _image(i), "meta": {"index": i, "caption": f"näive caption {i}"}}
        for i in range(start, start + n)
    ]


# ------------------------------------------------------------------------------------------ shards


def test_round_trip_across_shards(tmp_path):
    records = _records(23)
    records[3] = {**records[3], "image": _jpeg_bytes(_image(3)), "image_ext": "jpg"}
    summary = write_split(records, tmp_path, "train", maxcount=5, progress=False)
    write_manifest(tmp_path, [summary], {"generator": "test", "seed": 7})

    assert [s.num_samples for s in summary.shards] == [5, 5, 5, 5, 3]
    assert [s.name for s in summary.shards] == [f"train-{i:06d}.tar" for i in range(5)]
    manifest = read_manifest(tmp_path)
    assert manifest.format_version == FORMAT_VERSION
    assert manifest.split("train").num_samples == 23
    assert manifest.generator_config == {"generator": "test", "seed": 7}
    assert manifest.shard_counts("train") == {str(tmp_path / s.name): s.num_samples for s in summary.shards}

    got = list(iter_split_records(tmp_path, "train"))
    assert [g["__key__"] for g in got] == [r["key"] for r in records]
    for record, raw in zip(records, got, strict=True):
        assert json.loads(raw["json"]) == {**record["meta"], "has_image": True}
        if record.get("image_ext") == "jpg":
            assert raw["jpg"] == record["image"]  # bytes are stored as given
        else:
            decoded = load_image(raw["png"])
            assert np.array_equal(np.asarray(decoded), np.asarray(record["image"]))


def test_text_only_sample_is_json_only(tmp_path):
    summary = write_split(
        [{"key": "t0", "image": None, "meta": {"q": "hi"}}, *_records(1)], tmp_path, "train", progress=False
    )
    assert summary.num_text_only == 1
    write_manifest(tmp_path, [summary], {})
    assert read_manifest(tmp_path).split("train").num_text_only == 1
    first = next(iter(iter_split_records(tmp_path, "train")))
    assert "png" not in first and json.loads(first["json"]) == {"q": "hi", "has_image": False}


def test_existing_split_needs_overwrite_and_stale_shards_go(tmp_path):
    write_split(_records(12), tmp_path, "train", maxcount=4, progress=False)
    assert len(list(tmp_path.glob("train-*.tar"))) == 3
    with pytest.raises(UserError, match="already holds shards of split 'train'; pass --overwrite"):
        write_split(_records(2), tmp_path, "train", progress=False)
    summary = write_split(_records(2), tmp_path, "train", maxcount=4, progress=False, overwrite=True)
    assert sorted(p.name for p in tmp_path.glob("train-*.tar")) == ["train-000000.tar"]
    assert summary.num_samples == 2


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"key": "a.b", "image": None, "meta": {}}, "key 'a.b' must be"),
        ({"key": "a", "image": b"not a png", "meta": {}}, "do not start like a png"),
        ({"key": "a", "image": None, "meta": {"x": object()}}, "not JSON-serialisable"),
        ({"key": "a", "image": None, "meta": {}, "caption": "x"}, "unknown fields"),
    ],
)
def test_bad_record_raises_and_leaves_nothing(tmp_path, bad, message):
    with pytest.raises(ValueError, match=message):
        write_split([*_records(2), bad], tmp_path, "train", progress=False)
    assert list(tmp_path.iterdir()) == []  # the staging folder is cleaned, no shard moved in


def test_duplicate_key_raises(tmp_path):
    with pytest.raises(ValueError, match="duplicate key 's0000'"):
        write_split(_records(2) + _records(1), tmp_path, "train", progress=False)


def test_empty_split_writes_no_shard(tmp_path):
    summary = write_split([], tmp_path, "val", progress=False)
    assert summary.num_samples == 0 and summary.shards == ()
    assert list(tmp_path.glob("*.tar")) == []


# ---------------------------------------------------------------------------------------- manifest


def test_manifest_errors_are_one_line_with_the_fix(tmp_path):
    with pytest.raises(UserError, match="manifest.json not found; write the shards") as missing:
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text('{"format": "unicode_mllm.shards", "splits": ')
    with pytest.raises(UserError, match="is not valid JSON .*re-run the conversion") as corrupt:
        read_manifest(tmp_path)
    for err in (missing, corrupt):
        assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="no such data folder"):
        read_manifest(tmp_path / "nope")


def test_manifest_counts_must_add_up(tmp_path):
    summary = write_split(_records(3), tmp_path, "train", progress=False)
    path = write_manifest(tmp_path, [summary], {})
    raw = json.loads(path.read_text())
    raw["splits"]["train"]["num_samples"] = 4
    path.write_text(json.dumps(raw))
    with pytest.raises(UserError, match="says 4 samples but its shards sum to 3"):
        read_manifest(tmp_path)


def test_shard_urls_missing_split_lists_available(tmp_path):
    summaries = [write_split(_records(2), tmp_path, s, progress=False) for s in ("train", "val")]
    write_manifest(tmp_path, summaries, {"x": tmp_path})  # paths in the config become strings
    assert shard_urls(tmp_path, "val") == [str(tmp_path / "val-000000.tar")]
    with pytest.raises(UserError, match=r"no split 'test'; available splits: \['train', 'val'\]"):
        shard_urls(tmp_path, "test")
    assert read_manifest(tmp_path).generator_config == {"x": str(tmp_path)}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left


def test_write_manifest_rejects_missing_shard(tmp_path):
    summary = write_split(_records(2), tmp_path, "train", progress=False)
    (tmp_path / "train-000000.tar").unlink()
    with pytest.raises(UserError, match="train-000000.tar: shard of split 'train' is missing"):
        write_manifest(tmp_path, [summary], {})


# ---------------------------------------------------------------------------------------- image_io


def test_truncated_png_names_the_file(tmp_path):
    path = tmp_path / "cut.png"
    path.write_bytes(encode_png(_image(0, size=64))[:200])
    with pytest.raises(UserError, match=r"cut\.png: corrupt or truncated image") as err:
        load_image(path)
    assert "\n" not in str(err.value)
    assert err.value.reason == "corrupt image"


def test_garbage_bytes_and_missing_file(tmp_path):
    with pytest.raises(UserError, match="blob: not a readable image") as err:
        load_image(b"hello world", name="blob")
    assert err.value.reason == "corrupt image"
    with pytest.raises(UserError, match="gone.png: image file not found"):
        load_image(tmp_path / "gone.png")


def test_wrong_size_states_both_sizes(tmp_path):
    path = tmp_path / "small.png"
    Image.new("RGB", (6, 4)).save(path)
    with pytest.raises(UserError, match=r"small\.png: image is 4x6 \(h x w\) but 8x8 was expected") as err:
        load_image(path, expected_size=8)
    assert err.value.reason == "wrong image size"
    assert load_image(path, expected_size=(4, 6)).size == (6, 4)


def test_mode_conversions():
    cmyk = Image.new("CMYK", (2, 2), (0, 255, 255, 0))  # pure red in CMYK
    assert load_image(_jpeg_cmyk_bytes(cmyk)).mode == "RGB"
    deep = Image.fromarray(np.full((2, 2), 0x8000, dtype=np.uint16))  # I;16, half scale
    assert np.asarray(load_image(encode_png(deep), mode="L")).tolist() == [[128, 128], [128, 128]]
    rgba = Image.new("RGBA", (2, 2), (0, 0, 0, 0))  # fully transparent -> white background
    assert np.asarray(load_image(encode_png(rgba))).max() == 255
    floats = Image.fromarray(np.zeros((2, 2), dtype=np.float32))
    buf = io.BytesIO()
    floats.save(buf, format="TIFF")
    with pytest.raises(UserError, match="pixel mode 'F' .* convert the file to 8-bit RGB") as err:
        load_image(buf.getvalue(), name="f.tif")
    assert err.value.reason == "unsupported image mode"


def test_tensor_round_trip_is_exact():
    img = _image(5)
    x = pil_to_tensor(img)
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32
    assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0
    assert np.array_equal(np.asarray(tensor_to_pil(x)), np.asarray(img))
    with pytest.raises(ValueError, match=r"needs a \(3, h, w\) tensor, got shape \(8, 8\)"):
        tensor_to_pil(x[0])
    with pytest.raises(ValueError, match="needs an RGB image, got mode 'L'"):
        pil_to_tensor(img.convert("L"))
