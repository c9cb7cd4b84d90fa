"""Editor.edit's diffusers habits: the four output types, callback_on_step_end and its interrupt."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gnr_fast.errors import InputError

STEPS = 3


@pytest.fixture(scope="module")
def inversion(tiny_editor):
    from PIL import Image

    yy, xx = np.mgrid[:64, :64]
    rgb = np.zeros((64, 64, 3), np.uint8)
    rgb[...] = (30, 60, 200)
    rgb[(yy - 32) ** 2 + (xx - 30) ** 2 < 225] = (220, 30, 30)
    return tiny_editor.invert(Image.fromarray(rgb), "a red circle", num_steps=STEPS, progress=False)


@pytest.fixture(scope="module")
def full_edit(tiny_editor, inversion):
    """The uninterrupted PIL edit, with the latents a callback saw after each step; after a first edit
    that fills the inversion's source cache (edits reusing it differ from the first in float rounding)."""
    tiny_editor.edit(inversion, "a green circle", progress=False)
    seen = []

    def record(editor, step, timestep, kwargs):
        seen.append(kwargs["latents"].clone())
        return kwargs

    result = tiny_editor.edit(inversion, "a green circle", progress=False, callback_on_step_end=record)
    return result, seen


def test_every_output_type_holds_the_same_pixels(tiny_editor, inversion, full_edit, monkeypatch):
    pil = full_edit[0]
    assert pil.image.size == (64, 64) and not pil.interrupted and pil.steps_done == STEPS
    as_np = tiny_editor.edit(inversion, "a green circle", progress=False, output_type="np")
    as_pt = tiny_editor.edit(inversion, "a green circle", progress=False, output_type="pt")
    expected = np.asarray(pil.image, dtype=np.float32) / 255
    assert as_np.image.dtype == np.float32 and as_np.image.shape == (64, 64, 3)
    np.testing.assert_array_equal(as_np.image, expected)
    assert as_pt.image.dtype == torch.float32 and as_pt.image.shape == (3, 64, 64)
    assert torch.equal(as_pt.image, torch.from_numpy(expected).permute(2, 0, 1))

    def no_decode(*args, **kwargs):
        raise AssertionError("output_type='latent' must not decode")

    monkeypatch.setattr(tiny_editor.components.vae, "decode", no_decode)
    latent = tiny_editor.edit(inversion, "a green circle", progress=False, output_type="latent")
    assert latent.image is None and latent.timings.decoding_s == 0
    assert torch.equal(latent.latents, pil.latents)


def test_unknown_output_type_is_refused(tiny_editor, inversion):
    with pytest.raises(InputError, match="output_type must be one of"):
        tiny_editor.edit(inversion, "a green circle", progress=False, output_type="jpeg")


def test_callback_reads_the_latents_and_terms_of_every_step(tiny_editor, inversion, full_edit):
    result, seen = full_edit
    assert len(seen) == STEPS and torch.equal(seen[-1], result.latents)
    shapes = []

    def read(editor, step, timestep, kwargs):
        assert editor is tiny_editor and isinstance(timestep, int)
        shapes.append({name: None if v is None else tuple(v.shape) for name, v in kwargs.items()})

    tiny_editor.edit(inversion, "a green circle", progress=False, callback_on_step_end=read,
                     callback_on_step_end_tensor_inputs=["latents", "noise_pred", "gamma"])
    assert shapes == [{"latents": (1, 4, 8, 8), "noise_pred": (1, 4, 8, 8), "gamma": (1,)}] * STEPS


def test_interrupt_at_step_k_returns_the_marked_partial_result(tiny_editor, inversion, full_edit):
    result, seen = full_edit
    k = 1

    def stop_at_k(editor, step, timestep, kwargs):
        if step == k:
            editor._interrupt = True
        return kwargs

    partial = tiny_editor.edit(inversion, "a green circle", progress=False, callback_on_step_end=stop_at_k)
    assert partial.interrupted and partial.steps_done == k + 1
    assert torch.equal(partial.latents, seen[k])
    assert partial.image.size == (64, 64)  # the partial latents, decoded
    again = tiny_editor.edit(inversion, "a green circle", progress=False)  # nothing else changed
    assert not again.interrupted and torch.equal(again.latents, result.latents)


def test_returned_latents_replace_the_loop_latents(tiny_editor, inversion):
    def zero_last(editor, step, timestep, kwargs):
        return {"latents": torch.zeros_like(kwargs["latents"])} if step == STEPS - 1 else kwargs

    result = tiny_editor.edit(inversion, "a green circle", progress=False, output_type="latent",
                              callback_on_step_end=zero_last)
    assert torch.equal(result.latents, torch.zeros(1, 4, 8, 8))


def test_unknown_tensor_input_names_the_choices(tiny_editor, inversion):
    with pytest.raises(InputError, match="prompt_embeds.*choose from.*noise_pred"):
        tiny_editor.edit(inversion, "a green circle", progress=False, callback_on_step_end=lambda *a: None,
                         callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"])
