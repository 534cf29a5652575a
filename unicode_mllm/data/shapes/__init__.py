"""The synthetic shapes world: coloured shapes on a 3x3 grid, with captions, QA and drawing instructions.

Example:
    world = ShapesWorld(ShapesConfig(image_size=64))
    sample = world.sample("train", 0)  # .image (PIL RGB), .scene, .caption, .qa, .instruction
    analyse(sample.image) == sample.scene  # True: the scene read back from the pixels
    score(sample.image, sample.instruction).overall  # True
"""

from unicode_mllm.data.shapes.analyser import UNKNOWN_SHAPE, Detection, ShapesAnalyser, ShapesScore, analyse, score
from unicode_mllm.data.shapes.config import (
    BACKGROUND_COLOURS,
    OBJECT_COLOURS,
    POSITIONS,
    SHAPE_NAMES,
    SIZE_NAMES,
    ShapesConfig,
)
from unicode_mllm.data.shapes.language import (
    COUNT_WORDS,
    POSITION_PHRASES,
    QA_KINDS,
    QAPair,
    caption,
    instruction,
    parse_instruction,
    questions,
)
from unicode_mllm.data.shapes.render import add_gaussian_noise, jpeg_roundtrip, render_scene
from unicode_mllm.data.shapes.scene import Scene, SceneObject
from unicode_mllm.data.shapes.world import SPLITS, ShapesSample, ShapesWorld

__all__ = [
    "BACKGROUND_COLOURS",
    "COUNT_WORDS",
    "OBJECT_COLOURS",
    "POSITIONS",
    "POSITION_PHRASES",
    "QA_KINDS",
    "SHAPE_NAMES",
    "SIZE_NAMES",
    "SPLITS",
    "UNKNOWN_SHAPE",
    "Detection",
    "QAPair",
    "Scene",
    "SceneObject",
    "ShapesAnalyser",
    "ShapesConfig",
    "ShapesSample",
    "ShapesScore",
    "ShapesWorld",
    "add_gaussian_noise",
    "analyse",
    "caption",
    "instruction",
    "jpeg_roundtrip",
    "parse_instruction",
    "questions",
    "render_scene",
    "score",
]
