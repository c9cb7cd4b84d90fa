"""Batched edits equal the single edits; only the number of UNet calls changes."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from gnr_fast import Editor, GuidanceError, InputError
from gnr_fast.batch import BatchRequest, edit_batch
from parity import rel_err

STEPS = 5
# batched vs single kernels differ only by float rounding: edits measured 5.8e-6 to 1.2e-5 on the tiny model
# (1 thread, 2026-12-07)
TOL = 1e-4
TARGETS = ("a green square", "a blue cat", "a yellow star")


def _image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (64, 64, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def editor(tiny_model_path) -> Editor:
    return Editor.from_pretrained(tiny_model_path)


@pytest.fixture(scope="module")
def inversions(editor):
    return [editor.invert(_image(seed), "a red circle", num_steps=STEPS, progress=False) for seed in range(3)]


def fresh(inversion):
    """The same trajectory without a filled source cache."""
    return dataclasses.replace(inversion, source_cache=None)


@pytest.mark.parametrize("preset", ["nonstyle", "style"])
def test_batched_edit_equals_single_edits(editor, inversions, preset):
    singles = [editor.edit(fresh(inv), target, preset=preset, progress=False) for inv, target in zip(inversions, TARGETS)]
    calls = editor.runner.calls
    batch = edit_batch(editor, [BatchRequest(fresh(inv), target, preset=preset) for inv, target in zip(inversions, TARGETS)])
    batch_calls = editor.runner.calls - calls
    for single, batched in zip(singles, batch):
        assert rel_err(batched.latents, single.latents) < TOL
        assert batched.latents.shape == single.latents.shape
        assert batched.image.size == single.image.size
    # the three edits share every UNet call: as many calls as one edit alone, three times its rows
    assert batch_calls == singles[0].unet_calls
    assert all(b.unet_calls == batch_calls and b.batch_size == 3 for b in batch)
    assert all(b.unet_rows == 3 * singles[0].unet_rows for b in batch)
    assert all(s.batch_size == 1 for s in singles)


def test_batch_of_one_is_the_single_edit(editor, inversions):
    single = editor.edit(fresh(inversions[0]), TARGETS[0], progress=False)
    (batched,) = editor.edit_batch([BatchRequest(fresh(inversions[0]), TARGETS[0])])
    assert rel_err(batched.latents, single.latents) < 1e-6
    assert np.abs(np.asarray(batched.image, np.int16) - np.asarray(single.image, np.int16)).max() <= 1


def test_edits_of_one_inversion_share_its_source_pass_and_cache(editor, inversions):
    inversion = fresh(inversions[1])
    singles = [editor.edit(fresh(inversions[1]), target, progress=False) for target in TARGETS[:2]]
    rows = editor.runner.rows
    first = edit_batch(editor, [BatchRequest(inversion, target) for target in TARGETS[:2]])
    first_rows = editor.runner.rows - rows
    cache = inversion.source_cache
    assert cache is not None and cache.nbytes > 0 and cache.hits == 0
    rows = editor.runner.rows
    second = edit_batch(editor, [BatchRequest(inversion, target) for target in TARGETS[:2]])
    second_rows = editor.runner.rows - rows
    assert cache.hits > 0  # the second batch read the source pass from the cache
    assert second_rows < first_rows
    for single, a, b in zip(singles, first, second):
        assert rel_err(a.latents, single.latents) < TOL
        assert rel_err(b.latents, single.latents) < TOL


def test_one_source_pass_per_distinct_inversion(editor, inversions):
    """Two edits of the same inversion run fewer rows than two edits of two copies of it."""
    rows = editor.runner.rows
    edit_batch(editor, [BatchRequest(fresh(inversions[0]), t) for t in TARGETS[:2]])
    separate = editor.runner.rows - rows
    shared_inversion = fresh(inversions[0])
    rows = editor.runner.rows
    edit_batch(editor, [BatchRequest(shared_inversion, t) for t in TARGETS[:2]])
    shared = editor.runner.rows - rows
    assert shared < separate


def test_mixed_requests_keep_order_and_match_singles(editor, inversions, sample_image):
    requests = [
        BatchRequest(fresh(inversions[0]), TARGETS[0], preset="style"),
        BatchRequest(sample_image, TARGETS[1], source_prompt="a red disc", num_steps=STEPS),
        BatchRequest(fresh(inversions[2]), TARGETS[2], preset="nonstyle"),
    ]
    batch = edit_batch(editor, requests)
    singles = [
        editor.edit(fresh(inversions[0]), TARGETS[0], preset="style", progress=False),
        editor.edit(sample_image, TARGETS[1], source_prompt="a red disc", num_steps=STEPS, progress=False),
        editor.edit(fresh(inversions[2]), TARGETS[2], preset="nonstyle", progress=False),
    ]
    for single, batched in zip(singles, batch):
        assert rel_err(batched.latents, single.latents) < TOL
    assert batch[1].timings.inversion_s > 0 and batch[0].timings.inversion_s == 0


def test_non_finite_guidance_fails_only_its_image(editor, inversions):
    broken = dataclasses.replace(inversions[0], latents=torch.full_like(inversions[0].latents, float("nan")))
    good = editor.edit(fresh(inversions[1]), TARGETS[1], progress=False)
    results = edit_batch(
        editor, [BatchRequest(broken, TARGETS[0]), BatchRequest(fresh(inversions[1]), TARGETS[1])], return_exceptions=True
    )
    assert isinstance(results[0], GuidanceError) and "non-finite" in str(results[0])
    assert rel_err(results[1].latents, good.latents) < TOL
    with pytest.raises(GuidanceError):
        edit_batch(editor, [BatchRequest(broken, TARGETS[0]), BatchRequest(fresh(inversions[1]), TARGETS[1])])


def test_bad_request_is_reported_in_its_slot(editor, inversions):
    results = edit_batch(
        editor,
        [BatchRequest(fresh(inversions[0]), "  "), BatchRequest(fresh(inversions[1]), TARGETS[1])],
        return_exceptions=True,
    )
    assert isinstance(results[0], InputError) and "target_prompt" in str(results[0])
    assert results[1].latents.shape == inversions[1].latents[0].shape
    with pytest.raises(InputError, match="source_prompt"):
        edit_batch(editor, [BatchRequest(_image(0), TARGETS[0])])
    with pytest.raises(InputError, match="list of BatchRequest"):
        edit_batch(editor, BatchRequest(fresh(inversions[0]), TARGETS[0]))


def test_new_images_of_one_size_are_inverted_together(editor):
    images = [_image(10), _image(11), Image.fromarray(np.zeros((128, 64, 3), np.uint8))]
    prompts = ["a red circle", "a blue square", "a black stripe"]
    calls = editor.runner.calls
    requests = [BatchRequest(img, "a green square", source_prompt=p, num_steps=STEPS) for img, p in zip(images, prompts)]
    batch = edit_batch(editor, requests)
    assert batch[0].unet_calls == batch[1].unet_calls  # the two 64x64 edits ran as one group
    inversion_calls = editor.runner.calls - calls - batch[0].unet_calls - batch[2].unet_calls
    assert inversion_calls == 2 * STEPS  # one call per step per working size, not per image
    for img, p, result in zip(images, prompts, batch):
        single = editor.invert(img, p, num_steps=STEPS, progress=False)
        assert rel_err(result.inversion.latents, single.latents) < 3e-5  # measured ≤ 2.0e-6 (1 thread, 2026-12-07)
        assert result.inversion.content_hash == single.content_hash and result.inversion.source_prompt == p
    assert batch[0].timings.inversion_s == batch[1].timings.inversion_s > 0  # shared


def test_an_unreadable_image_fails_only_its_request(editor, inversions):
    results = edit_batch(
        editor,
        [BatchRequest(b"not an image", TARGETS[0], source_prompt="a cat", num_steps=STEPS),
         BatchRequest(_image(12), TARGETS[1], source_prompt="  ", num_steps=STEPS),
         BatchRequest(_image(13), TARGETS[2], source_prompt="a cat", num_steps=STEPS)],
        return_exceptions=True,
    )
    assert isinstance(results[0], InputError) and "image" in str(results[0])
    assert isinstance(results[1], InputError) and "source_prompt" in str(results[1])
    assert results[2].latents.shape == inversions[0].latents[0].shape
