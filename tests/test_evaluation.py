"""Evaluation: SSIM against scikit-image, tokenizer metrics and usage, photos, skips, VQA and text-to-image scoring,
and the `eval` commands."""

from __future__ import annotations

import json
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from unicode_mllm.cli import main
from unicode_mllm.data.image_io import pil_to_tensor, tensor_to_pil
from unicode_mllm.data.shapes import Scene, ShapesConfig, ShapesWorld, parse_instruction, render_scene, score
from unicode_mllm.data.stream import StreamingDataset
from unicode_mllm.errors import UserError
from unicode_mllm.evaluation import (
    CodeUsage,
    ImageSet,
    SkipCounts,
    eval_t2i,
    eval_visual_tokenizer,
    eval_vqa_jsonl,
    eval_vqa_shapes,
    load_photos,
    normalise_answer,
    shapes_t2i_prompts,
    ssim,
)
from unicode_mllm.evaluation.t2i import shapes_config_from_manifest
from unicode_mllm.image_metrics import psnr
from unicode_mllm.visual_tokenizer.modeling import VisualTokenizer

# transformers deprecations (e.g. the KV-cache argument `past_key_values` -> `cache`, removed in 5.40) must
# fail here, not surface in users' terminals.
pytestmark = pytest.mark.filterwarnings("error::FutureWarning")

# ----------------------------------------------------------------------------------------- SSIM


def test_ssim_matches_skimage():
    from skimage.metrics import structural_similarity

    gen = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 40, 37, generator=gen) * 2 - 1  # (b, c, h, w) in [-1, 1]
    y = (x + 0.3 * torch.randn(x.shape, generator=gen)).clamp(-1, 1)
    y[2] = x[2].flip(-1)  # a structurally different pair as well as two noisy ones
    ours = ssim(x, y)
    assert ours.shape == (3,)
    for i in range(3):
        a = ((x[i] + 1) / 2).permute(1, 2, 0).double().numpy()
        b = ((y[i] + 1) / 2).permute(1, 2, 0).double().numpy()
        ref = structural_similarity(
            a, b, channel_axis=-1, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0
        )
        assert abs(float(ours[i]) - ref) < 1e-3, (i, float(ours[i]), ref)
    assert torch.allclose(ssim(x, x), torch.ones(3), atol=1e-5)
    assert float(ours[0]) < 0.9  # the noisy pair is far from identical


def test_ssim_rejects_images_smaller_than_the_window():
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(torch.zeros(1, 3, 10, 32), torch.zeros(1, 3, 10, 32))


# ----------------------------------------------------------------------------------------- code usage


def test_code_usage_distinct_and_perplexity():
    usage = CodeUsage(num_codes=10, depth=2)
    codes = torch.stack([torch.tensor([0, 1, 2, 3] * 3), torch.full((12,), 7)], dim=-1)  # (12, d=2)
    usage.add(codes.view(3, 2, 2, 2))  # (b, h, w, d)
    assert usage.distinct_per_depth() == [4, 1]
    assert usage.distinct_any_depth() == 5
    assert usage.perplexity_per_depth() == pytest.approx([4.0, 1.0])
    report = usage.to_dict()
    assert report["num_positions"] == 12 and report["per_depth"][0]["fraction"] == pytest.approx(0.4)
    with pytest.raises(ValueError, match=r"must lie in \[0, 10\)"):
        usage.add(torch.tensor([[0, 10]]))
    with pytest.raises(ValueError, match="depth 3"):
        usage.add(torch.zeros(4, 3, dtype=torch.long))


# ----------------------------------------------------------------------------------------- tokenizer


def _direct_metrics(tokenizer_dir, shapes_dir, split):
    """PSNR per image and the code histogram, computed without the evaluation package."""
    vt = VisualTokenizer.from_pretrained(str(tokenizer_dir)).eval()
    images = [s["image"] for s in StreamingDataset(shapes_dir, split, shuffle=False)]
    x = torch.stack([pil_to_tensor(img) for img in images])
    codes = vt.encode(x)
    return psnr(x, vt.decode(codes)), codes


def test_eval_tokenizer_on_tiny_shards_matches_direct_computation(tiny_visual_tokenizer_dir, tiny_shapes_dir, tmp_path):
    grid = tmp_path / "grid.png"
    result = eval_visual_tokenizer(
        tiny_visual_tokenizer_dir,
        ImageSet.shards(tiny_shapes_dir, "val"),
        lpips_trunk=None,
        batch_size=5,  # 16 images: three full batches and a partial one
        grid_path=grid,
        grid_count=4,
    )
    expected_psnr, codes = _direct_metrics(tiny_visual_tokenizer_dir, tiny_shapes_dir, "val")
    assert result.num_images == 16 and result.num_resized == 0 and result.skips.total == 0
    assert result.psnr == pytest.approx(float(expected_psnr.mean()), abs=1e-3)
    assert [s.name.split(":")[0] for s in result.per_image] == ["val-000000.tar"] * 16
    assert 0.0 < result.ssim < 1.0
    report = result.to_dict()
    d = codes.shape[-1]
    expected_distinct = [len(set(codes[..., k].flatten().tolist())) for k in range(d)]
    assert [u["distinct"] for u in report["usage"]["per_depth"]] == expected_distinct
    assert report["usage"]["num_positions"] == 16 * codes.shape[1] * codes.shape[2]
    for u in report["usage"]["per_depth"]:
        assert 1.0 <= u["perplexity"] <= u["distinct"] + 1e-6
    assert report["lpips"]["measured"] is False and report["lpips"]["mean"] is None
    assert report["lpips"]["note"].startswith("not measured")
    assert grid.is_file() and Image.open(grid).width == 4 * (256 + 8)  # four pairs in one row


def test_eval_tokenizer_scores_scene_fidelity_on_shapes_shards(tiny_visual_tokenizer_dir, tiny_shapes_dir, tmp_path):
    result = eval_visual_tokenizer(tiny_visual_tokenizer_dir, ImageSet.shards(tiny_shapes_dir, "val"), lpips_trunk=None)
    fidelity = result.scene_fidelity
    assert fidelity is not None and fidelity.num_images == 16
    assert fidelity.originals_overall == 1.0  # the analyser reads every clean 32 px image exactly
    # The same numbers computed directly: decode the codes, read them back with the analyser.
    vt = VisualTokenizer.from_pretrained(tiny_visual_tokenizer_dir).eval()
    records = list(StreamingDataset(tiny_shapes_dir, "val", shuffle=False, image_format="tensor"))
    x = torch.stack([r["image"] for r in records])
    with torch.no_grad():
        rec = vt.decode(vt.encode(x))
    cfg = shapes_config_from_manifest(tiny_shapes_dir)
    direct = [
        score(tensor_to_pil(r), Scene.from_dict(rec_meta["meta"]["scene"]), cfg)
        for r, rec_meta in zip(rec, records, strict=True)
    ]
    assert fidelity.shape == pytest.approx(sum(d.shape for d in direct) / 16)
    assert fidelity.overall == pytest.approx(sum(d.overall for d in direct) / 16)
    assert "scene fidelity" in result.summary_lines()[-1] and result.to_dict()["scene_fidelity"]["num_images"] == 16
    # Images without scenes (a folder) get no fidelity.
    folder = tmp_path / "imgs"
    folder.mkdir()
    tensor_to_pil(records[0]["image"]).save(folder / "a.png")
    assert (
        eval_visual_tokenizer(tiny_visual_tokenizer_dir, ImageSet.folder(folder), lpips_trunk=None).scene_fidelity
        is None
    )


def test_lpips_missing_trunk_is_not_measured_and_random_trunk_is_labelled(tiny_visual_tokenizer_dir, tiny_shapes_dir):
    images = ImageSet.shards(tiny_shapes_dir, "val")
    missing = eval_visual_tokenizer(tiny_visual_tokenizer_dir, images, lpips_trunk="/nonexistent/vgg16.pth", limit=2)
    assert missing.lpips is None and all(s.lpips is None for s in missing.per_image)
    assert "not measured" in missing.lpips_note and "/nonexistent/vgg16.pth" in missing.lpips_note
    assert missing.num_images == 2  # limit
    random = eval_visual_tokenizer(tiny_visual_tokenizer_dir, images, lpips_trunk="random", limit=2)
    report = random.to_dict()["lpips"]
    assert report["measured"] and report["random_trunk"] and report["mean"] > 0
    assert "not LPIPS" in report["note"] and "RANDOM trunk" in random.summary_lines()[1]


def test_photo_set_loads_and_is_fitted_to_the_tokenizer_size():
    photos, unavailable = load_photos(["astronaut", "coffee", "camera"])
    assert [p.name for p in photos] == ["astronaut", "coffee", "camera"] and unavailable == {}
    assert photos[1].image.size == (600, 400) and all(p.image.mode == "RGB" for p in photos)
    skips = SkipCounts()
    fitted = list(ImageSet.photos(["astronaut", "coffee", "camera"]).iter(48, skips))
    assert [(f.name, f.image.size, f.image.mode) for f in fitted] == [
        ("astronaut", (48, 48), "RGB"),
        ("coffee", (48, 48), "RGB"),
        ("camera", (48, 48), "RGB"),
    ]
    assert fitted[1].original_size == (600, 400) and skips.total == 0
    # Centre-cropped (the middle 400x400 of coffee), not squashed: compare both with the fitted image.
    fitted_px = np.asarray(fitted[1].image).astype(float)
    cropped = np.asarray(photos[1].image.crop((100, 0, 500, 400)).resize((48, 48), Image.Resampling.BOX)).astype(float)
    squashed = np.asarray(photos[1].image.resize((48, 48), Image.Resampling.BOX)).astype(float)
    assert np.abs(fitted_px - cropped).mean() < 5 < np.abs(fitted_px - squashed).mean()
    with pytest.raises(UserError, match="not an image of skimage.data"):
        load_photos(["no_such_photo"])


def test_corrupt_image_in_a_folder_is_a_counted_skip(tiny_visual_tokenizer_dir, tmp_path):
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    Image.new("RGB", (32, 32), (200, 30, 30)).save(folder / "red.png")
    Image.new("RGB", (64, 40), (20, 30, 200)).save(folder / "sub" / "blue.jpg")
    (folder / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (folder / "notes.txt").write_text("not an image, not counted")
    result = eval_visual_tokenizer(tiny_visual_tokenizer_dir, ImageSet.folder(folder), lpips_trunk=None)
    assert sorted(s.name for s in result.per_image) == ["red.png", "sub/blue.jpg"]
    assert result.num_resized == 1
    report = result.to_dict()["skipped"]
    assert report["total"] == 1 and report["by_reason"] == {"corrupt image": 1}
    assert report["names"] == {"corrupt image": ["bad.png"]}
    assert "1 corrupt image (bad.png)" in result.summary_lines()[0]


def test_folder_with_only_bad_images_is_a_user_error(tiny_visual_tokenizer_dir, tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"garbage")
    with pytest.raises(UserError, match="no usable images.*1 corrupt image"):
        eval_visual_tokenizer(tiny_visual_tokenizer_dir, ImageSet.folder(tmp_path), lpips_trunk=None)


# ----------------------------------------------------------------------------------------- VQA


def test_normalise_answer():
    assert normalise_answer("  The Red-Triangle. ") == "red triangle"
    assert normalise_answer("Three") == normalise_answer("3") == "3"
    assert normalise_answer("An apple, isn't it?") == "apple isnt it"
    assert normalise_answer("top left") != normalise_answer("top right")


def _heldout_oracle():
    """(image bytes, question) -> answer, and question counts per kind, from the world itself."""
    world = ShapesWorld(ShapesConfig(image_size=32))
    oracle, kinds = {}, Counter()
    for sample in world.iter_split("heldout", 16):
        for qa in sample.qa:
            oracle[(sample.image.tobytes(), qa.question)] = qa.answer
            kinds[qa.kind] += 1
    return oracle, kinds


def test_eval_vqa_shapes_perfect_and_wrong_answers(tiny_shapes_dir):
    oracle, kinds = _heldout_oracle()
    batch_sizes = []

    def perfect(images, questions):
        batch_sizes.append(len(questions))
        return [oracle[(img.tobytes(), q)].upper() + "." for img, q in zip(images, questions, strict=True)]

    result = eval_vqa_shapes(perfect, tiny_shapes_dir, "heldout", batch_size=7)
    assert result.num_questions == sum(kinds.values()) and result.accuracy == 1.0
    per_kind = result.per_kind()
    assert {k: v["total"] for k, v in per_kind.items()} == dict(kinds)
    assert all(v["accuracy"] == 1.0 for v in per_kind.values()) and result.mistakes == []
    assert max(batch_sizes) == 7 and sum(batch_sizes) == result.num_questions

    wrong = eval_vqa_shapes(lambda images, questions: ["zebra"] * len(questions), tiny_shapes_dir, batch_size=32)
    assert wrong.accuracy == 0.0 and all(v["accuracy"] == 0.0 for v in wrong.per_kind().values())
    assert wrong.to_dict()["mistakes"][0]["prediction"] == "zebra"

    with pytest.raises(ValueError, match="list of 4 answers"):
        eval_vqa_shapes(lambda images, questions: ["yes"], tiny_shapes_dir, batch_size=4)


def test_eval_vqa_jsonl_counts_bad_lines_and_scores_per_kind(tmp_path):
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "red.png")
    (tmp_path / "broken.png").write_bytes(b"nope")
    lines = [
        {"image": "red.png", "question": "What colour is it?", "answers": ["red", "crimson"], "kind": "colour"},
        {"image": "red.png", "question": "How many objects?", "answers": ["1"], "kind": "count"},
        {"image": "red.png", "question": "Is it blue?", "answers": ["no"]},
        {"image": "missing.png", "question": "?", "answers": ["x"]},
        {"image": "broken.png", "question": "?", "answers": ["x"]},
        {"image": "red.png", "question": "no answers"},
    ]
    text = "\n".join(json.dumps(line) for line in lines) + "\n{not json\n\n"
    (tmp_path / "vqa.jsonl").write_text(text)
    replies = {"What colour is it?": "The crimson!", "How many objects?": "one", "Is it blue?": "yes"}

    def answer_fn(images, questions):
        assert all(img.size == (32, 32) for img in images)
        return [replies[q] for q in questions]

    result = eval_vqa_jsonl(answer_fn, tmp_path / "vqa.jsonl", batch_size=2)
    assert result.num_questions == 3 and result.accuracy == pytest.approx(2 / 3)
    assert result.per_kind() == {
        "colour": {"correct": 1, "total": 1, "accuracy": 1.0},
        "count": {"correct": 1, "total": 1, "accuracy": 1.0},
        "untyped": {"correct": 0, "total": 1, "accuracy": 0.0},
    }
    skipped = result.to_dict()["skipped"]
    assert skipped["by_reason"] == {"missing image": 1, "corrupt image": 1, "bad record": 1, "bad json": 1}
    assert skipped["names"]["bad json"] == ["vqa.jsonl:line 7"]


# ----------------------------------------------------------------------------------------- text-to-image

T2I_CFG = ShapesConfig(image_size=64)


def test_t2i_prompts_cover_seen_and_heldout_pairs():
    prompts = shapes_t2i_prompts(T2I_CFG, count=4)
    assert [p.group for p in prompts] == ["seen"] * 4 + ["heldout"] * 4
    held = set(T2I_CFG.held_out())
    for p in prompts:
        pairs = {o.pair for o in parse_instruction(p.prompt).objects}
        assert bool(pairs & held) == (p.group == "heldout"), p.prompt


def test_eval_t2i_ground_truth_renders_score_100_and_blank_images_0(tmp_path):
    prompts = shapes_t2i_prompts(T2I_CFG, count=4)
    calls = []

    def render_truth(batch):
        calls.append(len(batch))
        return [render_scene(parse_instruction(p), 64) for p in batch]

    grid = tmp_path / "t2i.png"
    result = eval_t2i(render_truth, prompts, cfg=T2I_CFG, batch_size=3, grid_path=grid)
    assert calls == [3, 3, 2] and grid.is_file()
    report = result.to_dict()
    for group in ("seen", "heldout"):
        g = report["groups"][group]
        assert g["num_prompts"] == 4
        assert g["overall"] == g["shape"] == g["colour"] == g["position"] == g["count"] == g["exact"] == 1.0
    assert report["all"]["overall"] == 1.0

    blank = eval_t2i(lambda batch: [Image.new("RGB", (64, 64), "black")] * len(batch), prompts, cfg=T2I_CFG)
    for group in ("seen", "heldout", None):
        g = blank.group_summary(group)
        assert g["overall"] == g["shape"] == g["colour"] == g["position"] == g["count"] == 0.0
    assert all(p["num_found"] == 0 for p in blank.to_dict()["per_prompt"])


def test_eval_t2i_rejects_a_generate_fn_that_returns_too_few_images():
    prompts = shapes_t2i_prompts(T2I_CFG, count=1)
    with pytest.raises(ValueError, match="list of 2 images"):
        eval_t2i(lambda batch: [Image.new("RGB", (64, 64))], prompts, cfg=T2I_CFG)


# ----------------------------------------------------------------------------------------- CLI


def test_cli_eval_tokenizer_writes_the_json_report(tiny_visual_tokenizer_dir, tiny_shapes_dir, tmp_path, capsys):
    out, grid = tmp_path / "report" / "eval.json", tmp_path / "grid.png"
    args = ["eval", "tokenizer", "--tokenizer", str(tiny_visual_tokenizer_dir), "--data", str(tiny_shapes_dir)]
    code = main([*args, "--split", "heldout", "--out", str(out), "--grid", str(grid), "--lpips-trunk", "none"])
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr
    report = json.loads(out.read_text())
    assert report["source"] == {"kind": "shards", "data_dir": str(tiny_shapes_dir), "split": "heldout"}
    assert report["num_images"] == 16 and len(report["per_image"]) == 16 and grid.is_file()
    assert report["psnr"] == pytest.approx(np.mean([r["psnr"] for r in report["per_image"]]))
    assert len(report["usage"]["per_depth"]) == 2 and report["lpips"]["measured"] is False
    assert "PSNR" in stdout and "code usage per depth" in stdout

    code = main(["eval", "tokenizer", "--tokenizer", str(tiny_visual_tokenizer_dir), "--photos", "--photo", "coffee"])
    stdout, _ = capsys.readouterr()
    assert code == 0 and "1 images (1 resized to 32px)" in stdout

    code = main([*args, "--photos"])
    _, stderr = capsys.readouterr()
    assert code == 2 and "pick exactly one image set" in stderr and stderr.count("\n") == 1


def test_cli_eval_vqa_and_t2i_go_through_generation(tiny_mllm_dir, tiny_shapes_dir, tmp_path, capsys, monkeypatch):
    """The commands reach the model only through generation.answer/generate_images; fakes stand in for them here."""
    from unicode_mllm import generation

    oracle, kinds = _heldout_oracle()
    seen_kwargs = []

    def fake_answer(model, images, questions, *, max_new_tokens=64, temperature=0.0, batch_size=8):
        seen_kwargs.append({"max_new_tokens": max_new_tokens, "temperature": temperature, "batch_size": batch_size})
        return [oracle[(img.tobytes(), q)] for img, q in zip(images, questions, strict=True)]

    monkeypatch.setattr(generation, "answer", fake_answer)
    out = tmp_path / "vqa.json"
    code = main(["eval", "vqa", "--model", str(tiny_mllm_dir), "--data", str(tiny_shapes_dir), "--out", str(out)])
    _, stderr = capsys.readouterr()
    assert code == 0, stderr
    report = json.loads(out.read_text())
    assert report["accuracy"] == 1.0 and report["num_questions"] == sum(kinds.values())
    assert seen_kwargs[0] == {"max_new_tokens": 16, "temperature": 0.0, "batch_size": 16}
    assert report["decoding"]["max_new_tokens"] == 16

    generate_kwargs = []

    def fake_generate(model, prompts, *, num_images_per_prompt=1, temperature=1.0, top_k=None, top_p=None,
                      cfg_scale=1.0, seed=None, batch_size=8, depth_temperatures=None):  # fmt: skip
        assert num_images_per_prompt == 1 and batch_size == 4
        generate_kwargs.append({"temperature": temperature, "top_k": top_k, "cfg_scale": cfg_scale, "seed": seed,
                                "depth_temperatures": depth_temperatures})  # fmt: skip
        return SimpleNamespace(images=[render_scene(parse_instruction(p), 64) for p in prompts])

    monkeypatch.setattr(generation, "generate_images", fake_generate)
    out = tmp_path / "t2i.json"
    args = ["eval", "t2i", "--model", str(tiny_mllm_dir), "--data", str(tiny_shapes_dir), "--count", "3"]
    sampling = ["--batch-size", "4", "--top-k", "5", "--cfg-scale", "2", "--seed", "7"]
    code = main([*args, *sampling, "--depth-temperatures", "1,0.5", "--out", str(out)])
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr
    report = json.loads(out.read_text())
    assert report["groups"]["seen"]["overall"] == report["groups"]["heldout"]["overall"] == 1.0
    assert report["shapes_config"]["image_size"] == 32  # the world config comes from the shard manifest
    assert [k["seed"] for k in generate_kwargs] == [7, 8]  # 6 prompts in batches of 4: two calls
    expected = {"temperature": 1.0, "top_k": 5, "cfg_scale": 2.0, "seed": 7, "depth_temperatures": (1.0, 0.5)}
    assert generate_kwargs[0] == expected
    assert "heldout (3 prompts): overall 100.0%" in stdout
    assert report["sampling"]["seed"] == 7 and report["sampling"]["batch_size"] == 4
    assert report["sampling"]["depth_temperatures"] == [1.0, 0.5]


def test_cli_eval_vqa_and_t2i_run_the_real_tiny_model(tiny_mllm_dir, tiny_shapes_dir, tmp_path, capsys):
    """The real generation.answer/generate_images (random weights: the scores are not the point, the wiring is)."""
    out = tmp_path / "vqa.json"
    args = ["eval", "vqa", "--model", str(tiny_mllm_dir), "--data", str(tiny_shapes_dir), "--split", "val"]
    code = main([*args, "--limit", "3", "--max-new-tokens", "2", "--batch-size", "2", "--out", str(out)])
    _, stderr = capsys.readouterr()
    assert code == 0, stderr
    report = json.loads(out.read_text())
    assert report["num_questions"] == 3 and 0.0 <= report["accuracy"] <= 1.0
    assert report["source"]["split"] == "val"

    out = tmp_path / "t2i.json"
    args = ["eval", "t2i", "--model", str(tiny_mllm_dir), "--data", str(tiny_shapes_dir), "--count", "1"]
    code = main([*args, "--out", str(out), "--grid", str(tmp_path / "t2i.png")])
    _, stderr = capsys.readouterr()
    assert code == 0, stderr
    report = json.loads(out.read_text())
    assert [p["group"] for p in report["per_prompt"]] == ["seen", "heldout"]
    assert (tmp_path / "t2i.png").is_file() and 0.0 <= report["all"]["overall"] <= 1.0
