"""Images of any size and mode in every stage: the preprocessing policy, the reader, stage 1, tokenize, inspect."""

from __future__ import annotations

import io
import json
import random

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from torchvision import transforms

from tests.test_tokenizer_training import tiny_cfg
from unicode_mllm.cli import main
from unicode_mllm.config import config_from_dict
from unicode_mllm.data.converters import convert_image_folder
from unicode_mllm.data.image_policy import ImagePolicy, center_crop, random_resized_crop
from unicode_mllm.data.shards import iter_split_records, write_manifest, write_split
from unicode_mllm.data.stream import SkipReport, StreamingDataset, collate
from unicode_mllm.errors import ConfigError, UserError
from unicode_mllm.shard_manifest import ShardInfo, SplitSummary
from unicode_mllm.stages.tokenizer.config import TokenizerTrainConfig
from unicode_mllm.stages.tokenizer.trainer import TokenizerTrainer

skimage_data = pytest.importorskip("skimage.data")


def _noise(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _pixels(image) -> np.ndarray:
    return image.numpy() if isinstance(image, torch.Tensor) else np.asarray(image)


def _small(array: np.ndarray, factor: int) -> Image.Image:
    image = Image.fromarray(array)
    return image.resize((image.width // factor, image.height // factor), Image.Resampling.BICUBIC)


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory):
    """`data from-folder` (originals kept) of seven real photos of other sizes and pixel modes than 32x32 RGB,
    plus one already 32x32: JPEG and PNG, grayscale, RGBA, palette."""
    src = tmp_path_factory.mktemp("photos_src")
    _small(skimage_data.astronaut(), 5).save(src / "astronaut.png")  # 102x102 RGB
    _small(skimage_data.coffee(), 4).save(src / "coffee.jpg", quality=90)  # 150x100 JPEG
    _small(skimage_data.chelsea(), 4).convert("RGBA").save(src / "chelsea.png")  # 112x75 RGBA
    _small(skimage_data.camera(), 6).crop((0, 0, 85, 60)).save(src / "camera.png")  # 85x60 grayscale "L"
    _small(skimage_data.rocket(), 4).save(src / "rocket.jpg")  # 160x106 JPEG
    _small(skimage_data.astronaut(), 12).convert("P").save(src / "palette.png")  # 42x42 palette
    _noise(32, 32).save(src / "already32.png")
    out = tmp_path_factory.mktemp("photos")
    convert_image_folder(src, out, image_storage="original", progress=False)
    return out


# ------------------------------------------------------------------------------------ the policy's math


@pytest.mark.parametrize("size", [32, 33, 64])
@pytest.mark.parametrize("wh", [(150, 100), (60, 85), (77, 33), (40, 40)])
def test_center_crop_is_shorter_side_resize_then_centre_cut(wh, size):
    image = _noise(*wh)
    out = center_crop(image, size)
    assert out.size == (size, size)
    # Pixel for pixel the reference code's torchvision Resize(size, bicubic, antialias) + CenterCrop(size).
    reference = transforms.CenterCrop(size)(
        transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC, antialias=True)(image)
    )
    assert np.array_equal(_pixels(out), _pixels(reference))


def test_center_crop_never_resamples_an_image_at_size_or_with_that_shorter_side():
    image = _noise(32, 32)
    assert center_crop(image, 32) is image
    wide = _noise(48, 32, seed=1)  # shorter side already 32: only cut, the pixels are the originals
    assert np.array_equal(_pixels(center_crop(wide, 32)), _pixels(wide)[:, 8:40])
    assert center_crop(_noise(40, 30), (20, 30)).size == (30, 20)  # (h, w) targets cover, then cut


def test_random_crops_are_deterministic_per_seed_epoch_and_key():
    image = _noise(96, 96)
    policy = ImagePolicy(resize="random_resized_crop", hflip=True, crop_scale=(0.3, 1.0))

    def crop(seed=0, epoch=0, key="k"):
        random.seed(seed + epoch + 99)  # global RNG state must not matter
        torch.manual_seed(epoch)
        return _pixels(policy.apply(image, 32, seed=seed, epoch=epoch, key=key))

    first = crop()
    assert first.shape == (32, 32, 3)
    assert np.array_equal(first, crop())
    assert not np.array_equal(first, crop(epoch=1))
    assert not np.array_equal(first, crop(key="other"))
    assert not np.array_equal(first, crop(seed=1))
    # A crop that can never fit (scale 1 at an aspect other than the image's) falls back to the centred one.
    box = random_resized_crop(_noise(60, 20), 16, (1.0, 1.0), (1.0, 1.0), random.Random(0))
    assert np.array_equal(
        _pixels(box), _pixels(_noise(60, 20).resize((16, 16), Image.Resampling.BICUBIC, (20, 0, 40, 20)))
    )


def test_eval_form_and_auto_resolution():
    train = ImagePolicy(resize="random_resized_crop", hflip=True)
    assert train.for_eval() == ImagePolicy(resize="center_crop", hflip=False)
    assert not train.for_eval().is_random and train.is_random
    assert ImagePolicy(resize="exact", hflip=True).for_eval().resize == "exact"
    assert ImagePolicy().resolve((32, 32)).resize == "exact"
    assert ImagePolicy().resolve(None).resize == "center_crop"
    assert ImagePolicy(resize="center_crop").resolve((32, 32)).resize == "center_crop"
    with pytest.raises(ValueError, match="resolve"):
        ImagePolicy().apply(_noise(8, 8), 8)


@pytest.mark.parametrize(
    "image, message",
    [
        ({"crop_scale": [0.9, 0.5]}, r"data\.image: crop_scale \[0\.9, 0\.5\] must be \[low, high\]"),
        ({"crop_scale": [0.0, 1.0]}, r"data\.image: crop_scale \[0\.0, 1\.0\] must be"),
        ({"crop_scale": [0.5, 1.5]}, r"key 'data\.image\.crop_scale' = \(0\.5, 1\.5\) is out of range"),
        ({"crop_ratio": [2.0, 1.0]}, r"data\.image: crop_ratio \[2\.0, 1\.0\] must be"),
        ({"crop_ratio": [-1.0, 1.0]}, r"key 'data\.image\.crop_ratio' = \(-1\.0, 1\.0\) is out of range"),
        ({"resize": "stretch"}, r"key 'data\.image\.resize' must be one of 'auto', 'center_crop'"),
    ],
)
def test_policy_config_is_validated(image, message):
    with pytest.raises(ConfigError, match=message) as info:
        config_from_dict(TokenizerTrainConfig, {"data": {"image": image}})
    assert "\n" not in str(info.value)
    cfg = config_from_dict(TokenizerTrainConfig, {}, ["data.image.resize=random_resized_crop", "data.image.hflip=true"])
    assert cfg.data.image == ImagePolicy(resize="random_resized_crop", hflip=True)


# ------------------------------------------------------------------------------------ the reader


def test_reader_brings_photos_of_any_size_and_mode_to_the_model_size(photo_dir):
    # Before image policies the trainer's reader (expected_size) skipped all but the 32x32 one: still so.
    report = SkipReport()
    kept = [s["key"] for s in report.track(StreamingDataset(photo_dir, "train", shuffle=False, expected_size=32))]
    assert len(kept) == 1 and dict(report.skipped) == {"wrong image size": 6}

    ds = StreamingDataset(photo_dir, "train", shuffle=False, image_format="tensor", image_size=32)
    assert ds.image_policy == ImagePolicy(resize="center_crop")  # auto: the manifest fixes no size
    report = SkipReport()
    samples = list(report.track(ds))
    assert report.num_skipped == 0 and len(samples) == 7
    assert all(s["image"].shape == (3, 32, 32) for s in samples)
    untouched = next(s for s in samples if s["meta"]["source"] == "already32.png")
    levels = ((untouched["image"] + 1) * 127.5).round().byte().permute(1, 2, 0)  # (32, 32, 3) uint8
    assert np.array_equal(levels.numpy(), _pixels(_noise(32, 32)))  # not resampled
    assert collate(samples[:4])["image"].shape == (4, 3, 32, 32)
    with pytest.raises(ValueError, match="image_policy needs image_size"):
        StreamingDataset(photo_dir, "train", image_policy=ImagePolicy())
    with pytest.raises(ValueError, match="not both"):
        StreamingDataset(photo_dir, "train", image_size=32, expected_size=32)


def test_shapes_are_never_resampled(tiny_shapes_dir):
    ds = StreamingDataset(tiny_shapes_dir, "val", shuffle=False, image_format="tensor", image_size=32)
    assert ds.image_policy.resize == "exact"
    plain = StreamingDataset(tiny_shapes_dir, "val", shuffle=False, image_format="tensor")
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(ds, plain, strict=True))


def test_training_crops_replay_after_a_resume_and_change_per_epoch(photo_dir):
    policy = ImagePolicy(resize="random_resized_crop", hflip=True, crop_scale=(0.3, 1.0))

    def epoch_images(epoch: int) -> dict[str, np.ndarray]:
        ds = StreamingDataset(photo_dir, "train", seed=5, shuffle_buffer=4, image_size=32, image_policy=policy)
        ds.set_epoch(epoch)
        random.seed(epoch * 7 + 1)  # a resumed process has other global RNG state
        return {s["key"]: _pixels(s["image"]) for s in SkipReport().track(ds)}

    first, again, second = epoch_images(0), epoch_images(0), epoch_images(1)
    assert first.keys() == again.keys() == second.keys() and len(first) == 7
    assert all(np.array_equal(first[k], again[k]) for k in first)
    assert any(not np.array_equal(first[k], second[k]) for k in first)


def _raw_split(root, samples: list[dict]) -> None:
    with wds.TarWriter(str(root / "train-000000.tar"), encoder=False) as sink:
        for sample in samples:
            sink.write(sample)
    write_manifest(root, [SplitSummary("train", len(samples), (ShardInfo("train-000000.tar", len(samples)),))], {})


def test_txt_member_becomes_the_caption_img2dataset_layout(tmp_path):
    jpg = _noise(40, 30)
    buf = io.BytesIO()
    jpg.save(buf, format="JPEG")
    data = buf.getvalue()
    samples = [
        {"__key__": "000000000", "jpg": data, "txt": b"  a cat on a mat \n", "json": b'{"url": "x", "caption": null}'},
        {"__key__": "000000001", "jpg": data, "txt": b"ignored", "json": b'{"caption": "from the json"}'},
        {"__key__": "000000002", "jpg": data, "txt": b"\xff\xfe bad", "json": b"{}"},
        {"__key__": "000000003", "jpg": data, "txt": b"   ", "json": b"{}"},
    ]
    _raw_split(tmp_path, samples)
    report = SkipReport()
    got = {s["key"]: s for s in report.track(StreamingDataset(tmp_path, "train", shuffle=False, image_size=16))}
    assert got["000000000"]["meta"]["caption"] == "a cat on a mat" and got["000000000"]["meta"]["url"] == "x"
    assert got["000000001"]["meta"]["caption"] == "from the json"
    assert "caption" not in got["000000003"]["meta"]
    assert dict(report.skipped) == {"bad caption text": 1} and "000000002" not in got
    assert got["000000000"]["image"].size == (16, 16)


# ------------------------------------------------------------------------------------ stage 1

# The photo folder has one split: train on it and evaluate on it, two steps.
SHORT_RUN = {"train.steps": 2, "train.eval_every": 2, "codebook.blend.ramp_steps": 2, "data.eval_splits": ["train"]}


def test_stage1_trains_on_real_photos_of_mixed_sizes_with_no_skips(tiny_lm_dir, photo_dir, tmp_path):
    cfg = tiny_cfg(tiny_lm_dir, photo_dir, tmp_path, **SHORT_RUN)
    result = TokenizerTrainer(cfg).fit()
    assert result.steps == 2
    assert result.metrics["data"].startswith("skipped 0 of "), result.metrics["data"]
    assert result.metrics["psnr_train"] > 0


def test_stage1_random_crops_train_too(tiny_lm_dir, photo_dir, tmp_path):
    overrides = {**SHORT_RUN, "data.image.resize": "random_resized_crop", "data.image.hflip": True}
    trainer = TokenizerTrainer(tiny_cfg(tiny_lm_dir, photo_dir, tmp_path, **overrides))
    assert trainer._dataset("train", shuffle=True).image_policy.resize == "random_resized_crop"
    assert trainer._dataset("train", shuffle=False).image_policy == ImagePolicy(resize="center_crop")
    assert trainer.next_batch().shape == (4, 3, 32, 32)


def test_stage1_refuses_shapes_of_another_size_up_front(tiny_lm_dir, tiny_shapes_dir, tmp_path):
    cfg = tiny_cfg(tiny_lm_dir, tiny_shapes_dir, tmp_path, **{"model.image_size": 64})
    with pytest.raises(UserError) as info:
        TokenizerTrainer(cfg).fit()
    message = str(info.value)
    assert message == (
        "data.shards holds 32x32 images (its manifest) but model.image_size is 64; "
        "render the shapes at 64 or set data.image.resize=center_crop"
    )
    # The fix it names works: the shapes are centre-cropped (here: upscaled) to 64.
    cfg = tiny_cfg(tiny_lm_dir, tiny_shapes_dir, tmp_path / "b", **{"model.image_size": 64})
    cfg.data.image = ImagePolicy(resize="center_crop")
    assert TokenizerTrainer(cfg).next_batch().shape == (4, 3, 64, 64)


# ------------------------------------------------------------------------------------ data inspect


def _shapes_set_with_one_big_image(out):
    records = [
        {"key": f"s{i}", "image": _noise(64 if i == 2 else 32, 64 if i == 2 else 32, i), "meta": {}} for i in range(4)
    ]
    summary = write_split(records, out, "train", progress=False)
    write_manifest(out, [summary], {"generator": "shapes", "shapes": {"image_size": 32}})
    return out


def _trainer_reader_summary(lm_dir, shards, out_dir, **overrides) -> str:
    cfg = tiny_cfg(lm_dir, shards, out_dir, **overrides)
    report = SkipReport()
    for _ in report.track(TokenizerTrainer(cfg)._dataset("train", shuffle=True)):
        pass
    return report.summary()


def test_inspect_with_image_size_agrees_with_the_trainer(tiny_lm_dir, photo_dir, tmp_path, capsys):
    def inspect(folder, *options) -> str:
        code = main(["data", "inspect", str(folder), "--split", "train", *options])
        out, err = capsys.readouterr()
        assert code == 0, err
        return out

    # Photos: every one read at 32 (centre crop), as the trainer does.
    out = inspect(photo_dir, "--image-size", "32")
    trainer = _trainer_reader_summary(tiny_lm_dir, photo_dir, tmp_path / "a")
    assert f"train: 7 samples read; {trainer}" in out and trainer.startswith("skipped 0 of 7")
    assert "7 samples read; skipped 0" in inspect(photo_dir)  # no size: decode only, as before
    out = inspect(photo_dir, "--image-size", "32", "--resize", "exact")
    exact = _trainer_reader_summary(tiny_lm_dir, photo_dir, tmp_path / "b", **{"data.image.resize": "exact"})
    assert f"1 samples read; {exact}" in out and "6 wrong image size" in exact

    # A shapes set with one odd image: the same one skip, for the same reason.
    shapes = _shapes_set_with_one_big_image(tmp_path / "shapes")
    out = inspect(shapes, "--image-size", "32")
    trainer = _trainer_reader_summary(tiny_lm_dir, shapes, tmp_path / "c")
    assert f"3 samples read; {trainer}" in out and trainer.endswith("1 wrong image size")
    # At a size the manifest does not hold, inspect says what the trainer would refuse (and why).
    out = inspect(shapes, "--image-size", "64")
    assert "note: a trainer stops before step 1 here:" in out and "but --image-size is 64" in out
    assert (
        "--resize=center_crop" in out and "1 samples read; skipped 3 of 4 samples (75.00%): 3 wrong image size" in out
    )

    assert main(["data", "inspect", str(shapes), "--resize", "exact"]) == 2
    assert "--resize exact needs --image-size" in capsys.readouterr().err
    assert main(["data", "inspect", str(shapes), "--image-size", "32", "--resize", "bogus"]) == 2
    assert "--resize 'bogus' is unknown" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ tokenize


def test_tokenize_passes_text_only_records_and_crops_photos(tiny_visual_tokenizer_dir, photo_dir, tmp_path):
    from unicode_mllm.visual_tokenizer.extract import extract_codes

    photos = [s for s in SkipReport().track(StreamingDataset(photo_dir, "train", shuffle=False))]
    records = []
    for i, sample in enumerate(photos[:5]):
        records.append({"key": f"img{i}", "image": sample["image"], "meta": {"caption": f"photo {i}"}})
        if i % 2 == 0:  # a LLaVA text-only conversation between the images: batches mix both
            turns = [{"from": "human", "value": f"hello {i}"}, {"from": "gpt", "value": "hi"}]
            records.append({"key": f"txt{i}", "image": None, "meta": {"conversations": turns}})
    shards = tmp_path / "mixed"
    write_manifest(shards, [write_split(records, shards, "train", progress=False)], {"converter": "llava_json"})

    out = tmp_path / "codes"
    summaries = extract_codes(tiny_visual_tokenizer_dir, shards, out, batch_size=4, device="cpu")
    assert summaries["train"].num_samples == len(records) == 8
    written = {r["__key__"]: r for r in iter_split_records(out, "train")}
    assert list(written) == [r["key"] for r in records]
    for record in records:
        raw = written[record["key"]]
        meta = json.loads(raw["json"])
        if record["image"] is None:
            assert meta == {**record["meta"], "has_image": False} and "png" not in raw
        else:
            assert meta["caption"] == record["meta"]["caption"] and meta["has_image"] is True
            assert meta["code_shape"] == [8, 8, 2] and len(meta["visual_token_ids"]) == 128
            assert Image.open(io.BytesIO(raw["png"])).size == (32, 32)  # the image the codes describe
