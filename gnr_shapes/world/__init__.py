"""The procedural "shapes" world: seeded captioned scenes with masks and ground truth.

Used to train the small SD-format model ``gnr_fast/models/shapes-v1`` and to build
"same scene, one attribute changed" benchmark pairs (render an edited :class:`SceneSpec`).
"""

from gnr_shapes.world.captions import CaptionObject, ParsedCaption, caption_for, parse_caption
from gnr_shapes.world.palette import BACKGROUND_KINDS, COLOUR_NAMES, COLOURS, SHAPES, SIZES
from gnr_shapes.world.scenes import (
    BackgroundSpec,
    ObjectSpec,
    Scene,
    SceneSpec,
    generate_images,
    generate_scene,
    render,
    sample_spec,
)

__all__ = [
    "BACKGROUND_KINDS",
    "COLOURS",
    "COLOUR_NAMES",
    "SHAPES",
    "SIZES",
    "BackgroundSpec",
    "CaptionObject",
    "ObjectSpec",
    "ParsedCaption",
    "Scene",
    "SceneSpec",
    "caption_for",
    "generate_images",
    "generate_scene",
    "parse_caption",
    "render",
    "sample_spec",
]
