"""The high-resolution check: the split view API, small-object data, reading through views, the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from unicode_mllm.addons.highres import build_view_generator
from unicode_mllm.cli import main
from unicode_mllm.constants import IMAGE_PLACEHOLDER_ID
from unicode_mllm.data.image_io import pil_to_tensor
from unicode_mllm.data.mllm_samples import MODEL_INPUTS, MLLMCollator
from unicode_mllm.data.shapes import ShapesWorld
from unicode_mllm.data.shapes.render import render_scene
from unicode_mllm.errors import UserError
from unicode_mllm.evaluation.highres import (
    HighResConfig,
    ViewReadingModel,
    build_view_samples,
    highres_view_generator,
    small_object_records,
)
from unicode_mllm.generation import prompt_builder
from unicode_mllm.model import UniCodeMLLM

WIDTH = 16
VIEW = (8, 8)
GRID = (2, 2)


def encoder(views: torch.Tensor) -> torch.Tensor:
    """A row-wise deterministic toy encoder: (m, 3, 8, 8) -> (m, 4, WIDTH), 4x4 patches, a fixed projection."""
    gen = torch.Generator().manual_seed(0)
    proj = torch.randn(3 * 16, WIDTH, generator=gen)
    patches = views.unfold(2, 4, 4).unfold(3, 4, 4)  # (m, 3, 2, 2, 4, 4)
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(views.shape[0], 4, 48)
    return patches @ proj


@pytest.mark.parametrize(
    ("name", "options", "views"),
    [("single", {}, 1), ("s2", {"scales": (1, 2)}, 5), ("s2", {"scales": (1, 3), "merge": "channel"}, 10),
     ("inf_llava", {"n": 2, "num_heads": 4}, 9)],
)  # fmt: skip
def test_make_views_then_fuse_equals_forward(name, options, views):
    torch.manual_seed(0)
    generator = build_view_generator(name, view_size=VIEW, view_grid=GRID, width=WIDTH, **options)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    made = generator.make_views(images)
    assert made.shape == (views, 2, 3, 8, 8) and generator.num_views() == views
    feats = encoder(made.flatten(0, 1)).unflatten(0, (views, 2))  # (v, b, h*w, c)
    fused, direct = generator.fuse(feats), generator(images, encoder)
    assert fused.grids == direct.grids
    torch.testing.assert_close(fused.tokens, direct.tokens, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="view features must be"):
        generator.fuse(feats[:, :, :3])


def test_small_object_records_keep_the_scene_but_shrink_it():
    records = small_object_records("heldout", 3, 64, start=5)
    world = ShapesWorld()
    for record, index in zip(records, range(5, 8), strict=True):
        original = world.sample("heldout", index)
        assert record.id == original.id and record.pixel_values.shape == (3, 64, 64)
        assert float(record.pixel_values.min()) >= -1.0 and float(record.pixel_values.max()) <= 1.0
        kinds = {kind for _, _, kind in record.qa}
        assert "size" not in kinds and "background" in kinds
        where = {q: a for q, a, k in record.qa if k == "position"}
        for obj in original.scene.objects:  # same objects in the same cells
            question = f"Where is the {obj.colour} {obj.shape}?"
            assert where.get(question, obj.position) == obj.position
    # Every object is drawn small: never more covered pixels than the world's own drawing of the scene.
    small = small_object_records("train", 8, 64)
    small_cover, normal_cover = 0, 0
    for record, index in zip(small, range(8), strict=True):
        normal = pil_to_tensor(render_scene(world.sample_scene("train", index), 64))
        for pixels in (record.pixel_values, normal):
            covered = int((pixels != pixels[:, :1, :1]).any(dim=0).sum())  # the corner is always background
            if pixels is normal:
                normal_cover += covered
            else:
                assert covered <= int((normal != normal[:, :1, :1]).any(dim=0).sum())
                small_cover += covered
    assert 0 < small_cover < normal_cover


def test_single_view_reading_is_the_models_own_reading(tiny_mllm_dir):
    model = UniCodeMLLM.from_pretrained(tiny_mllm_dir).eval()
    generator = highres_view_generator("single", 2, 32).build(view_size=(32, 32), view_grid=(8, 8), width=32)
    reader = ViewReadingModel(model, generator).eval()
    records = small_object_records("val", 2, 64)
    samples = build_view_samples(reader, records, "val")
    assert reader.tokens_per_image == 64 and samples[0].sample.image_token_ids.shape == (1, 8, 8, 2)
    downscaled = generator.make_views(torch.stack([r.pixel_values for r in records]))[0]  # (2, 3, 32, 32)
    token_ids = model.encode_images(downscaled)
    first = samples[0].sample
    assert torch.equal(first.image_token_ids[0], token_ids[0])
    question, answer, _ = records[0].qa[0]
    expected = prompt_builder(model).vqa(token_ids[0], [(question, answer)])
    assert torch.equal(first.input_ids, expected.input_ids)
    batch = MLLMCollator(model.token_ids.pad)([first, expected])
    with torch.no_grad():
        logits = reader(**{k: batch[k] for k in MODEL_INPUTS}).logits
        reference = model(**{k: batch[k] for k in MODEL_INPUTS}).logits
    assert torch.equal(logits, reference)


def test_s2_and_inf_llava_spans_and_gradients(tiny_mllm_dir):
    model = UniCodeMLLM.from_pretrained(tiny_mllm_dir)
    records = small_object_records("train", 2, 64)
    for path, views, tokens in (("s2", 5, 128), ("inf_llava", 9, 64)):
        torch.manual_seed(0)
        generator = highres_view_generator(path, 2, 32).build(view_size=(32, 32), view_grid=(8, 8), width=32)
        reader = ViewReadingModel(model, generator)
        assert reader.num_views == views and reader.tokens_per_image == tokens
        samples = [s.sample for s in build_view_samples(reader, records, "train")[:3]]
        assert all(s.image_token_ids.shape == (views, 8, 8, 2) for s in samples)
        assert all(int((s.input_ids == IMAGE_PLACEHOLDER_ID).sum()) == tokens for s in samples)
        batch = MLLMCollator(model.token_ids.pad)(samples)
        reader.train()
        model.zero_grad(set_to_none=True)
        out = reader(**{k: batch[k] for k in MODEL_INPUTS})
        out.loss.backward()
        assert float(model.lm.get_input_embeddings().weight.grad.abs().sum()) > 0
        if path == "inf_llava":
            assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in generator.parameters())
    with pytest.raises(UserError, match="high-res paths"):
        HighResConfig(paths=("single", "s3")).validate()


def test_eval_highres_cli_compares_the_three_paths(tiny_mllm_dir, tmp_path):
    out = tmp_path / "highres"
    args = ["eval", "highres", "--model", str(tiny_mllm_dir), "--steps", "1", "--train-records", "2"]
    code = main([*args, "--eval-records", "2", "--batch-size", "4", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "highres.json").read_text())
    rows = {r["path"]: r for r in report["rows"]}
    assert list(rows) == ["single", "s2", "inf_llava"] and report["image_size"] == 64
    assert [rows[p]["views_per_image"] for p in rows] == [1, 5, 9]
    assert [rows[p]["tokens_per_image"] for p in rows] == [64, 128, 64]
    assert rows["single"]["generator_parameters"] == 0 < rows["inf_llava"]["generator_parameters"]
    for row in rows.values():
        assert set(row["before"]) == set(row["after"]) == {"val", "heldout"}
        assert all(0.0 <= v <= 1.0 for v in row["after"].values()) and row["train_seconds"] > 0
    assert (out / "highres.md").read_text().startswith("| path | views/image | tokens/image")
    assert main(["eval", "highres", "--model", str(tiny_mllm_dir), "--paths", "single,s4"]) == 2
