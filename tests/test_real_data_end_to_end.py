"""Real data end to end through the CLI, as a user of the field brings it: an ImageNet-style folder of photos
in every awkward format into stage 1, and a LLaVA-1.5 mix JSON into stage 2 (mixed with shapes), with every
skip counted and named."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import yaml
from PIL import Image
from skimage import data as skdata

from unicode_mllm.cli import main

# transformers deprecations (e.g. the KV-cache argument `past_key_values` -> `cache`, removed in 5.40) must
# fail here, not surface in users' terminals.
pytestmark = pytest.mark.filterwarnings("error::FutureWarning")


def run(capsys, *args: str) -> tuple[int, str]:
    """Run the CLI; returns (exit code, stdout + stderr)."""
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def rgb(name: str) -> Image.Image:
    return Image.fromarray(getattr(skdata, name)()).convert("RGB")


def imagenet_tree(root):
    """train/<wnid>/<wnid>_<n>.JPEG as ImageNet has it, holding every image kind users' folders hold."""
    a, b = root / "train" / "n01440764", root / "train" / "n02102040"
    a.mkdir(parents=True)
    b.mkdir(parents=True)
    rgb("astronaut").save(a / "n01440764_1.JPEG", "JPEG")  # RGB, 512x512
    Image.fromarray(skdata.camera()).save(a / "n01440764_2.JPEG", "JPEG")  # grayscale
    rgb("coffee").convert("CMYK").save(a / "n01440764_3.JPEG", "JPEG")  # CMYK JPEG
    sixteen = (skdata.camera().astype(np.uint16) * 257).astype(np.uint16)
    Image.fromarray(sixteen).save(a / "n01440764_4.png")  # 16-bit grayscale PNG
    rgba = rgb("chelsea").convert("RGBA")
    rgba.putalpha(128)
    rgba.save(b / "n02102040_5.png")  # RGBA PNG
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees on display
    rgb("rocket").save(b / "n02102040_6.JPEG", "JPEG", exif=exif)  # EXIF-rotated JPEG, 427x640
    rgb("coffee").save(b / "n02102040_7.JPEG", "PNG")  # a PNG under a .JPEG name
    rgb("chelsea").resize((4000, 3000)).save(b / "n02102040_8.JPEG", "JPEG", quality=80)  # 4000x3000
    full = (a / "n01440764_1.JPEG").read_bytes()
    (b / "n02102040_9.JPEG").write_bytes(full[: len(full) // 3])  # truncated
    return root / "train"


def llava_mix(root):
    """A JSON in the exact layout of llava_v1_5_mix665k.json: COCO/GQA/OCR-VQA image records (multi-turn,
    <image> before or after the question), ShareGPT text-only records (with their "model" key), an integer id,
    and a record whose image file is missing."""
    coco = root / "coco" / "train2017"
    coco.mkdir(parents=True)
    (root / "ocr_vqa" / "images").mkdir(parents=True)
    for i, name in enumerate(("astronaut", "coffee", "chelsea")):
        rgb(name).save(coco / f"00000003347{i}.jpg", "JPEG")
    rgb("rocket").save(root / "ocr_vqa" / "images" / "140031996.jpg", "JPEG")
    records = [
        {
            "id": "000000033470",
            "image": "coco/train2017/000000033470.jpg",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat is the person wearing?"},
                {"from": "gpt", "value": "A white space suit."},
                {"from": "human", "value": "Is there a flag?"},
                {"from": "gpt", "value": "Yes, on the left."},
            ],
        },
        {
            "id": "000000033471",
            "image": "coco/train2017/000000033471.jpg",
            "conversations": [
                {"from": "human", "value": "What is in the cup?\n<image>"},  # <image> at the end of the question
                {"from": "gpt", "value": "Coffee."},
            ],
        },
        {
            "id": 33472,  # an integer id
            "image": "coco/train2017/000000033472.jpg",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat animal is this?\nAnswer with one word."},
                {"from": "gpt", "value": "Cat"},
            ],
        },
        {
            "id": "140031996",
            "image": "ocr_vqa/images/140031996.jpg",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat is shown?"},
                {"from": "gpt", "value": "A rocket."},
            ],
        },
        {
            "id": "i6IyJda_0",
            "model": "",
            "conversations": [
                {"from": "human", "value": "Say hello in French."},
                {"from": "gpt", "value": "Bonjour."},
                {"from": "human", "value": "And in German?"},
                {"from": "gpt", "value": "Hallo."},
            ],
        },
        {
            "id": "000000099999",
            "image": "coco/train2017/000000099999.jpg",  # not on disk
            "conversations": [{"from": "human", "value": "<image>\nDescribe it."}, {"from": "gpt", "value": "No."}],
        },
    ]
    records += [{**records[4], "id": f"i6IyJda_{k}"} for k in range(1, 3)]
    records += [{**records[k % 4], "id": f"{records[k % 4]['id']}_{k}"} for k in range(8)]
    path = root / "llava_v1_5_mix665k.json"
    path.write_text(json.dumps(records, indent=1))
    return path


@pytest.fixture
def tokenizer_overrides(tiny_lm_dir):
    # The tiny preset at test scale: an 8x8 grid, rq depth 2 (128 codes an image) over the tiny LM's table.
    return [
        f"codebook.llm={tiny_lm_dir}",
        "model.ch=8",
        "model.ch_mult=[1,2,2]",
        "model.z_channels=32",
        "model.stacking=rq",
        "model.depth=2",
        "codebook.blend.ramp_steps=2",
        "codebook.search_dim=8",
        "train.steps=3",
        "train.eval_batches=1",
        "train.device=cpu",
        "data.batch_size=4",
        "data.eval_splits=[train]",
    ]


def test_photos_and_llava_through_every_stage_of_the_cli(
    tmp_path, capsys, tiny_lm_dir, tiny_shapes_dir, tokenizer_overrides
):
    # ----- stage 1 on an ImageNet-style folder ---------------------------------------------------------------
    tree = imagenet_tree(tmp_path / "imagenet")
    code, out = run(capsys, "data", "from-folder", tree, "--out", tmp_path / "photos")
    assert code == 0, out
    assert "wrote 8 of 9 samples" in out and "1 corrupt image (n02102040/n02102040_9.JPEG)" in out
    code, out = run(capsys, "data", "inspect", tmp_path / "photos", "--image-size", "32")
    assert code == 0 and "skipped 0 of 8" in out, out  # what the trainer at 32 px will read: everything

    sets = [f"--set={o}" for o in [*tokenizer_overrides, f"data.shards={tmp_path / 'photos'}"]]
    code, out = run(capsys, "train-tokenizer", "--config=configs/tokenizer/tiny.yaml", *sets, "--out", tmp_path / "vt")
    assert code == 0, out
    assert "tokenizer saved to" in out
    reader = json.loads((tmp_path / "vt" / "final_metrics.json").read_text())["data"]
    assert reader.startswith("skipped 0 of"), reader  # photos of every size and mode: none skipped

    files = sorted(p for p in tree.rglob("*") if p.is_file())
    code, out = run(capsys, "reconstruct", *files, "--model", tmp_path / "vt" / "final", "-o", tmp_path / "rec")
    assert code == 2, out  # one file could not be read ...
    assert "reconstructed 8 of 9" in out and "n02102040_9.JPEG" in out  # ... and is named
    assert out.count("PSNR") == 8  # ... after the eight done were reported
    assert len(list((tmp_path / "rec").glob("*_recon.png"))) == 8

    # ----- stage 2 on a LLaVA mix, mixed with shapes ---------------------------------------------------------
    mix = llava_mix(tmp_path / "llava")
    llava_out = tmp_path / "llava_shards"
    code, out = run(capsys, "data", "from-llava", mix, "--images", tmp_path / "llava", "--out", llava_out)
    assert code == 0, out
    assert "1 missing image (000000099999)" in out and "3 text-only" in out
    code, out = run(
        capsys, "tokenize", "--model", tmp_path / "vt" / "final", "--shards", tmp_path / "llava_shards",
        "--out", tmp_path / "llava_codes", "--device", "cpu",
    )  # fmt: skip
    assert code == 0, out

    with open("configs/mllm/tiny.yaml") as file:
        config = yaml.safe_load(file)
    config["model"].update(lm=str(tiny_lm_dir), visual_tokenizer=str(tmp_path / "vt" / "final"))
    shapes_tasks = config["data"].pop("tasks")
    config["data"].pop("shards")
    config["data"]["sources"] = [
        {"name": "shapes", "shards": str(tiny_shapes_dir), "weight": 1.0, "tasks": shapes_tasks},
        {
            "name": "llava",
            "shards": str(tmp_path / "llava_codes"),
            "weight": 1.0,
            "tasks": {"vqa": 1.0, "caption": 0.0, "text_to_image": 0.0, "decompression": 0.5},
        },
    ]
    config["data"].update(max_length=512, records_per_batch=2, vqa_turns=2)
    config["train"].update(steps=3, device="cpu", eval_every=3, ckpt_every=3, max_minutes=None)
    config["eval"].update(splits=["heldout"], records=4, batch_size=8)
    (tmp_path / "mllm.yaml").write_text(yaml.safe_dump(config))
    code, out = run(capsys, "train-mllm", "--config", tmp_path / "mllm.yaml", "--out", tmp_path / "mllm")
    assert code == 0, out
    assert "model saved to" in out and "llava" in out  # per-source counts in the data line

    photo = tmp_path / "ask.jpg"
    shutil.copy(tmp_path / "llava" / "coco" / "train2017" / "000000033471.jpg", photo)  # 300x451, not 32 px
    code, out = run(capsys, "ask", "--model", tmp_path / "mllm" / "final", "--image", photo, "What is in the cup?")
    assert code == 0, out
