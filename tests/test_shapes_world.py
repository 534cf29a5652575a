"""The shapes world: config checks, deterministic sampling, split invariants, text consistency, parser."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from unicode_mllm.config import config_from_dict
from unicode_mllm.data.shapes import (
    COUNT_WORDS,
    POSITIONS,
    Scene,
    SceneObject,
    ShapesConfig,
    ShapesWorld,
    caption,
    parse_instruction,
    render_scene,
)
from unicode_mllm.data.shapes.render import object_geometry, shape_coverage
from unicode_mllm.errors import ConfigError, UserError


@pytest.fixture(scope="module")
def world() -> ShapesWorld:
    return ShapesWorld(ShapesConfig(image_size=64, seed=3))


@pytest.fixture(scope="module")
def train_samples(world):
    return [world.sample("train", i) for i in range(150)]


# --- config -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"shapes": ("circle", "hexagon")}, r"shapes: 'hexagon' is unknown"),
        ({"colours": ("red", "black")}, r"colours: 'black' is unknown"),
        ({"held_out_pairs": ("red hexagon",)}, r"held-out pair 'red hexagon': shape 'hexagon' is not in shapes"),
        ({"held_out_pairs": ("pink circle",)}, r"colour 'pink' is not in colours"),
        ({"held_out_pairs": ("redcircle",)}, r"must be two words"),
        ({"held_out_pairs": ("red circle", "red circle")}, r"lists a pair twice"),
        ({"min_objects": 3, "max_objects": 2}, r"min_objects=3 is larger than max_objects=2"),
        ({"image_size": 16}, r"'image_size' = 16 is out of range \[32, 256\]"),
        ({"max_objects": 4}, r"'max_objects' = 4 is out of range"),
        ({"position_jitter": 0.9}, r"'position_jitter' = 0.9 is out of range"),
    ],
)
def test_config_errors_name_the_problem(overrides, match):
    with pytest.raises(ConfigError, match=match):
        ShapesWorld(ShapesConfig(**overrides))
    with pytest.raises(ConfigError, match=match):  # the YAML path gives the same message
        config_from_dict(ShapesConfig, overrides)


def test_held_out_pairs_must_leave_every_colour_and_shape_in_training():
    all_red = tuple(f"red {s}" for s in ("circle", "square"))
    with pytest.raises(ConfigError, match="every shape of colour 'red'"):
        ShapesWorld(ShapesConfig(shapes=("circle", "square"), held_out_pairs=all_red))
    all_circles = ("red circle", "green circle")
    with pytest.raises(ConfigError, match="every colour of shape 'circle'"):
        ShapesWorld(ShapesConfig(colours=("red", "green"), held_out_pairs=all_circles))


def test_bad_split_and_index_raise_user_errors(world):
    with pytest.raises(UserError, match="split 'test' is unknown"):
        world.sample("test", 0)
    with pytest.raises(UserError, match="non-negative integer"):
        world.sample("train", -1)
    with pytest.raises(UserError, match="needs held-out pairs"):
        ShapesWorld(ShapesConfig(held_out_pairs=())).sample("heldout", 0)


# --- determinism ----------------------------------------------------------------------------------------


def test_sampling_is_deterministic_and_order_independent(world):
    forward = [world.sample("train", i) for i in (0, 1, 2)]
    fresh = ShapesWorld(ShapesConfig(image_size=64, seed=3))
    backward = [fresh.sample("train", i) for i in (2, 1, 0)][::-1]
    for a, b in zip(forward, backward, strict=True):
        assert a.image.tobytes() == b.image.tobytes()
        assert a.to_json() == b.to_json()
    assert forward[0].image.tobytes() != forward[1].image.tobytes()
    other_seed = ShapesWorld(ShapesConfig(image_size=64, seed=4)).sample("train", 0)
    assert other_seed.image.tobytes() != forward[0].image.tobytes()
    assert world.sample("val", 0).image.tobytes() != forward[0].image.tobytes()


def test_sample_fields(world):
    sample = world.sample("train", 42)
    assert sample.id == "train-000042"
    assert sample.image.mode == "RGB" and sample.image.size == (64, 64)
    record = json.loads(json.dumps(sample.to_json()))
    assert set(record) == {"id", "split", "caption", "qa", "instruction", "scene", "image_size"}
    assert record["image_size"] == 64
    rebuilt = Scene.from_dict(record["scene"])
    assert rebuilt == sample.scene
    assert [o.offset for o in rebuilt.objects] == [o.offset for o in sample.scene.objects]
    # the offsets survive JSON exactly, so the image can be redrawn from the record alone
    assert render_scene(rebuilt, 64).tobytes() == sample.image.tobytes()


# --- layout and splits ----------------------------------------------------------------------------------


def test_objects_one_per_cell_and_never_touch(train_samples):
    for sample in train_samples:
        objects = sample.scene.objects
        cells = [o.cell for o in objects]
        assert cells == sorted(set(cells)), f"{sample.id}: cells {cells} repeat or are out of reading order"
        footprints = np.zeros((64, 64), dtype=int)
        for obj in objects:
            coverage, (top, left) = shape_coverage(obj.shape, *object_geometry(obj, 64), 64, 64)
            covered = np.zeros((64, 64), dtype=bool)
            covered[top : top + coverage.shape[0], left : left + coverage.shape[1]] = coverage > 0
            # grow by one pixel: objects must not even share an anti-aliased edge pixel
            grown = covered.copy()
            grown[1:] |= covered[:-1]
            grown[:-1] |= covered[1:]
            grown[:, 1:] |= covered[:, :-1]
            grown[:, :-1] |= covered[:, 1:]
            footprints += grown
        assert footprints.max() == 1, f"{sample.id}: objects overlap or touch"


def test_splits_respect_held_out_pairs(world, train_samples):
    held = set(world.held_out_pairs)
    assert held == {("red", "triangle"), ("blue", "star"), ("green", "square"), ("yellow", "circle")}
    val = [world.sample("val", i) for i in range(100)]
    for sample in train_samples + val:
        assert not any(o.pair in held for o in sample.scene.objects), sample.id
        for qa in sample.qa:  # no question in train/val even names a held-out pair
            assert not any(f"{c} {s}" in qa.question for c, s in held), (sample.id, qa)
    heldout = [world.sample("heldout", i) for i in range(100)]
    assert all(any(o.pair in held for o in s.scene.objects) for s in heldout)
    # every held-out pair shows up, and the other objects are not all held-out ones
    assert {o.pair for s in heldout for o in s.scene.objects} >= held
    assert any(o.pair not in held for s in heldout for o in s.scene.objects)


def test_config_options_shape_the_samples():
    cfg = ShapesConfig(
        image_size=96,
        min_objects=3,
        max_objects=3,
        shapes=("circle", "square"),
        colours=("red", "blue"),
        backgrounds=("white",),
        held_out_pairs=("red circle",),
        position_jitter=0.0,
    )
    world = ShapesWorld(cfg)
    samples = [world.sample("train", i) for i in range(30)]
    assert all(s.image.size == (96, 96) for s in samples)
    objects = [o for s in samples for o in s.scene.objects]
    assert all(len(s.scene.objects) == 3 for s in samples)
    assert {o.shape for o in objects} == {"circle", "square"}
    assert {o.colour for o in objects} == {"red", "blue"}
    assert {s.scene.background for s in samples} == {"white"}
    assert all(o.offset == (0.0, 0.0) for o in objects)
    assert ("red", "circle") not in {o.pair for o in objects}
    jittered = ShapesWorld(ShapesConfig(position_jitter=0.5)).sample("train", 0).scene.objects
    assert all(o.offset != (0.0, 0.0) for o in jittered)
    counts = Counter(len(ShapesWorld().sample("train", i).scene.objects) for i in range(60))
    assert set(counts) == {1, 2, 3}


# --- text -----------------------------------------------------------------------------------------------


def test_qa_answers_agree_with_the_scene(world, train_samples):
    kinds = Counter()
    heldout = [world.sample("heldout", i) for i in range(30)]
    for sample in train_samples + heldout:
        objects = sample.scene.objects
        for qa in sample.qa:
            kinds[(qa.kind, qa.answer if qa.kind == "exists" else "")] += 1
            assert qa.answer == qa.answer.lower() and qa.answer.strip() == qa.answer
            words = qa.question.rstrip("?").split()
            if qa.kind == "colour":
                (obj,) = [o for o in objects if o.shape == words[-1]]
                assert qa.answer == obj.colour
            elif qa.kind == "shape":
                (obj,) = [o for o in objects if o.colour == words[-2]]
                assert qa.answer == obj.shape
            elif qa.kind in ("size", "position"):
                (obj,) = [o for o in objects if o.pair == (words[-2], words[-1])]
                assert qa.answer == (obj.size if qa.kind == "size" else obj.position)
                assert qa.answer in (POSITIONS if qa.kind == "position" else ("small", "large"))
            elif qa.kind == "count":
                n = COUNT_WORDS.index(qa.answer)
                if qa.question == "How many objects are there?":
                    assert n == len(objects)
                else:
                    plural = words[2]
                    assert n == sum(plural in (o.shape + "s", o.shape + "es") for o in objects)
            elif qa.kind == "exists":
                present = (words[-2], words[-1]) in {o.pair for o in objects}
                assert qa.answer == ("yes" if present else "no")
            else:
                assert qa.kind == "background" and qa.answer == sample.scene.background
    assert kinds[("exists", "yes")] > 0 and kinds[("exists", "no")] > 0
    assert {k for k, _ in kinds} == {"colour", "shape", "size", "position", "count", "exists", "background"}
    assert any(qa.answer == "zero" for s in train_samples for qa in s.qa)


def test_caption_and_instruction_name_everything_and_parse_back(world, train_samples):
    heldout = [world.sample("heldout", i) for i in range(50)]
    templates = set()
    for sample in train_samples + heldout:
        assert parse_instruction(sample.instruction) == sample.scene, sample.instruction
        assert parse_instruction(sample.caption) == sample.scene, sample.caption
        templates.add(sample.instruction.split()[0])
        for obj in sample.scene.objects:
            assert f"{obj.size} {obj.colour} {obj.shape}" in sample.instruction
        assert f"on a {sample.scene.background} background" in sample.instruction
    assert len(templates) == 3  # every instruction template is used (and parsed above)
    scene = Scene(
        objects=(
            SceneObject("circle", "red", "large", "top left"),
            SceneObject("square", "blue", "small", "center"),
        ),
        background="black",
    )
    assert caption(scene) == (
        "A large red circle at the top left and a small blue square in the center, on a black background."
    )


def test_parser_accepts_partial_targets_and_rejects_unknown_words():
    scene = parse_instruction("Draw a red circle and a small blue star on the right.")
    assert scene.background is None
    assert scene.objects == (
        SceneObject("circle", "red", None, None),
        SceneObject("star", "blue", "small", "right"),
    )
    with pytest.raises(UserError, match="cannot read 'large pink circle at the top left'"):
        parse_instruction("Draw a large pink circle at the top left on a black background.")
    with pytest.raises(UserError, match="cannot read 'two circles'"):
        parse_instruction("Draw two circles")
    with pytest.raises(UserError, match="names no object"):
        parse_instruction("Draw on a white background.")
    with pytest.raises(UserError, match="names 2 backgrounds"):
        parse_instruction("Draw a red circle on a white background on a black background.")
