"""Tests of the shapes world: determinism, masks vs pixels, captions, edited-spec rendering."""

from __future__ import annotations

import numpy as np
import pytest

from gnr_fast.errors import InputError
from gnr_shapes.world import (
    COLOURS,
    BackgroundSpec,
    ObjectSpec,
    SceneSpec,
    generate_scene,
    parse_caption,
    render,
)
from gnr_shapes.world.scenes import render_background

SEEDS = range(100, 160)


def _shift_or(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation of a [H, W] mask with a (2r+1) square."""
    out = mask.copy()
    padded = np.pad(mask, radius)
    h, w = mask.shape
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            out |= padded[dy : dy + h, dx : dx + w]
    return out


def _erode(mask: np.ndarray, radius: int = 1) -> np.ndarray:
    return ~_shift_or(~mask, radius)


def test_same_seed_same_scene_and_different_seeds_differ() -> None:
    a, b = generate_scene(7), generate_scene(7)
    assert a.spec == b.spec and a.caption == b.caption
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.masks, b.masks)
    others = {generate_scene(s).caption for s in range(8, 40)}
    assert len(others) > 25  # captions vary with the seed


def test_image_and_mask_shapes() -> None:
    scene = generate_scene(3, size=96)
    assert scene.image.shape == (96, 96, 3) and scene.image.dtype == np.uint8
    assert scene.masks.shape == (len(scene.objects), 96, 96) and scene.masks.dtype == bool


@pytest.mark.parametrize("seed", SEEDS)
def test_masks_match_rendered_pixels(seed: int) -> None:
    scene = generate_scene(seed)
    assert scene.masks.any(axis=(1, 2)).all(), "every object must be visible"
    for obj, mask in zip(scene.objects, scene.masks):
        interior = _erode(mask)
        assert interior.any()
        assert (scene.image[interior] == np.asarray(COLOURS[obj.colour], np.uint8)).all()
    background = np.rint(render_background(scene.background, 128)).astype(np.uint8)
    outside = ~_shift_or(scene.masks.any(axis=0), 1)
    np.testing.assert_array_equal(scene.image[outside], background[outside])


@pytest.mark.parametrize("seed", SEEDS)
def test_caption_parses_back_to_the_spec(seed: int) -> None:
    scene = generate_scene(seed)
    parsed = parse_caption(scene.caption)
    assert parsed.background_kind == scene.background.kind
    assert parsed.background_colours == scene.background.colours
    assert [(o.size, o.colour, o.shape) for o in parsed.objects] == [
        (o.size, o.colour, o.shape) for o in scene.objects
    ]


def test_parse_rejects_captions_outside_the_grammar() -> None:
    for bad in ["a photo of a cat", "a large pink circle on a blue background",
                "a large red circle on a blue striped background", "a large red circle"]:
        with pytest.raises(InputError):
            parse_caption(bad)


def test_sampling_invariants() -> None:
    two = 0
    for seed in range(300):
        spec = generate_scene(seed, size=32).spec
        colours = [o.colour for o in spec.objects]
        assert len(set(colours)) == len(colours)
        assert not set(colours) & set(spec.background.colours)
        if len(spec.objects) == 2:
            two += 1
            assert [o.size for o in spec.objects] == ["large", "small"]
            assert spec.objects[0].radius > spec.objects[1].radius
    assert 30 < two < 130  # about a quarter of scenes have two objects


def _first_scene_with(predicate) -> "object":
    return next(s for s in map(generate_scene, range(1000)) if predicate(s))


def test_colour_edit_changes_only_that_object() -> None:
    scene = _first_scene_with(lambda s: len(s.objects) == 2)
    used = {o.colour for o in scene.objects} | set(scene.background.colours)
    new_colour = next(c for c in COLOURS if c not in used)
    edited = render(scene.spec.with_object(1, colour=new_colour))
    changed = (edited.image != scene.image).any(axis=2)
    assert changed.any()
    assert not (changed & ~_shift_or(scene.masks[1], 1)).any()
    assert (edited.image[_erode(scene.masks[1])] == np.asarray(COLOURS[new_colour], np.uint8)).all()
    np.testing.assert_array_equal(edited.masks, scene.masks)
    assert parse_caption(edited.caption).objects[1].colour == new_colour
    assert parse_caption(edited.caption).objects[0] == parse_caption(scene.caption).objects[0]


def test_shape_edit_changes_only_the_union_of_old_and_new_shape() -> None:
    scene = _first_scene_with(lambda s: s.objects[0].shape == "circle")
    edited = render(scene.spec.with_object(0, shape="triangle"))
    changed = (edited.image != scene.image).any(axis=2)
    region = _shift_or(scene.masks[0] | edited.masks[0], 1)
    assert changed.any() and not (changed & ~region).any()
    assert parse_caption(edited.caption).objects[0].shape == "triangle"


def test_background_edit_keeps_objects() -> None:
    scene = _first_scene_with(lambda s: s.background.kind == "plain")
    used = {o.colour for o in scene.objects} | set(scene.background.colours)
    new_bg = next(c for c in COLOURS if c not in used)
    edited = render(scene.spec.with_background("plain", [new_bg]))
    interiors = np.stack([_erode(m) for m in scene.masks]).any(axis=0)
    np.testing.assert_array_equal(edited.image[interiors], scene.image[interiors])
    outside = ~_shift_or(scene.masks.any(axis=0), 1)
    assert (edited.image[outside] == np.asarray(COLOURS[new_bg], np.uint8)).all()
    assert parse_caption(edited.caption).background_colours == (new_bg,)


def test_spec_validation_names_the_bad_value() -> None:
    with pytest.raises(InputError, match="pink"):
        BackgroundSpec("plain", ("pink",))
    with pytest.raises(InputError, match="stripes"):
        BackgroundSpec("stripes", ("red",))
    with pytest.raises(InputError, match="hexagon"):
        ObjectSpec("hexagon", "red", "small", (0.5, 0.5), 0.1)
    obj = ObjectSpec("circle", "red", "small", (0.5, 0.5), 0.1)
    with pytest.raises(InputError, match="1 or 2"):
        SceneSpec(BackgroundSpec("plain", ("blue",)), (obj, obj, obj))


def test_render_is_resolution_independent_in_layout() -> None:
    spec = generate_scene(11).spec
    small, large = render(spec, 64), render(spec, 128)
    # The mask at 64 px equals the 128 px mask pooled 2x2, up to edge pixels.
    pooled = large.masks.reshape(len(spec.objects), 64, 2, 64, 2).mean(axis=(2, 4)) >= 0.5
    disagreement = (pooled != small.masks).mean()
    assert disagreement < 0.01
