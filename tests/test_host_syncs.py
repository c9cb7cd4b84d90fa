"""Host synchronisation of the fast editing loop (issue 20, docs/precision.md §6), counted on CPU.

On CUDA every read of a device value by the host (``.item()``, ``.tolist()``, ``bool(t)``,
``float(t)``, ``.cpu()``, ``torch.equal`` …) waits for the queue to drain. CPU has no queue, so
these tests count the *calls* that would wait: the Python-level tensor methods and functions
below are wrapped while an edit runs, and the calls made between two step callbacks are that
step's syncs. (Syncs inside C++ ops — boolean-mask indexing, ``nonzero`` — are not seen; the loop
uses none.) Also: UNet calls take timestep tensors made once per edit, not a host copy per call,
and phase timings synchronise the device before reading the clock.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from gnr_fast import Editor, batch
from gnr_fast.precision import PrecisionPolicy

STEPS = 6
SYNC_METHODS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy", "nonzero")
SYNC_FUNCTIONS = ("equal", "allclose")


class _Counter:
    """Counts host-sync calls while ``active``; ``marks`` holds the count at each step callback."""

    def __init__(self) -> None:
        self.count = 0
        self.active = False
        self.marks: list[int] = []
        self.guided: list[bool] = []

    def wrap(self, fn):
        def counted(*args, **kwargs):
            if self.active:
                self.count += 1
            return fn(*args, **kwargs)

        return counted

    def callback(self, step, t, z, terms) -> None:
        self.marks.append(self.count)
        self.guided.append(terms.guider_grad is not None)
        self.active = True  # from the end of step 0 on: step 0 also holds the loop's setup

    def per_step(self) -> list[int]:
        """Syncs of steps 1 … N−1."""
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


@pytest.fixture
def count_syncs(monkeypatch):
    counter = _Counter()
    for name in SYNC_METHODS:
        monkeypatch.setattr(torch.Tensor, name, counter.wrap(getattr(torch.Tensor, name)))
    for name in SYNC_FUNCTIONS:
        monkeypatch.setattr(torch, name, counter.wrap(getattr(torch, name)))
    return counter


@pytest.fixture(scope="module")
def inversions(tiny_model_path):
    """One inversion per model dtype (inverted before any counting)."""
    from PIL import Image

    image = Image.new("RGB", (64, 64), (30, 60, 200))
    image.paste((220, 30, 30), (20, 20, 44, 44))
    out = {}
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        editor = Editor.from_pretrained(tiny_model_path, dtype=dtype)
        out[dtype] = (editor, editor.invert(image, "a red square", num_steps=STEPS, progress=False))
    return out


def test_counter_sees_the_calls_that_sync():
    counter = _Counter()
    counter.active = True
    item = counter.wrap(torch.Tensor.item)
    item(torch.ones(()))
    assert counter.count == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fast_step_syncs_once(inversions, count_syncs, dtype):
    """float32 and bfloat16 models: γ, the energies and the |E| ≤ atol mask stay on the device; the
    step's one sync is the loop's finite check (measured: exactly 1 on every step)."""
    editor, inversion = inversions[dtype]
    editor.edit(inversion, "a green circle", preset="nonstyle", progress=False, callback=count_syncs.callback)
    assert any(count_syncs.guided[1:]), "the preset must guide some step ≥ 1, else nothing is counted"
    assert count_syncs.per_step() == [1] * (STEPS - 1)


def test_fp16_fast_step_adds_one_sync_per_guided_step_and_carries_its_loss_scale(inversions, count_syncs, caplog):
    """float16: the loss-scaled backward checks the scaled gradient for overflow (one more sync per
    guided step). The tiny random UNet overflows at 2^10 and 2^6 and works at 2^2 (measured): the
    back-off happens on the first guided step only, later steps start from the scale that worked."""
    editor, inversion = inversions[torch.float16]
    with caplog.at_level(logging.WARNING, logger="gnr_fast.precision"):
        result = editor.edit(inversion, "a green circle", preset="nonstyle", progress=False, callback=count_syncs.callback)
    assert torch.isfinite(result.latents).all()
    backoffs = [r for r in caplog.records if "overflowed" in r.getMessage()]
    assert 1 <= len(backoffs) <= 3  # one step's back-off, not one per guided step (measured 2)
    guided = count_syncs.guided[1:]
    assert sum(guided) >= 2
    first = guided.index(True)
    for i, (syncs, was_guided) in enumerate(zip(count_syncs.per_step(), guided)):
        if i > first:
            assert syncs == (2 if was_guided else 1), (i, syncs)


def test_unet_calls_take_timestep_tensors_made_once(inversions, monkeypatch):
    """No ``torch.tensor(timestep, device=…)`` per call: every plain, capturing and grad call of a
    fast edit gets one of the edit's 0-dim timestep tensors, and no tensor is built from host data
    during the loop (on CUDA each would be a host-to-device copy)."""
    editor, inversion = inversions[torch.float32]
    seen: list[torch.Tensor] = []
    built = {"during_loop": 0}
    in_loop = {"on": False}

    def spy(method):
        def call(latents, timestep, *args, **kwargs):
            seen.append(timestep)
            return method(latents, timestep, *args, **kwargs)

        return call

    monkeypatch.setattr(editor.runner, "plain", spy(editor.runner.plain))
    monkeypatch.setattr(editor.runner, "capture", spy(editor.runner.capture))
    for name in ("tensor", "as_tensor"):
        original = getattr(torch, name)

        def counted(*args, _original=original, **kwargs):
            if in_loop["on"]:
                built["during_loop"] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(torch, name, counted)

    def callback(step, t, z, terms):
        in_loop["on"] = step < STEPS - 1

    editor.edit(inversion, "a green circle", preset="nonstyle", progress=False, callback=callback)
    assert len(seen) >= STEPS and all(isinstance(t, torch.Tensor) and t.dim() == 0 for t in seen)
    assert len({id(t) for t in seen}) == STEPS  # one tensor per step, shared by its calls
    assert built["during_loop"] == 0


def test_phase_timings_synchronise_the_device_before_reading_the_clock(inversions, monkeypatch):
    """CUDA runs asynchronously: the inversion's and the loop's clock reads come after a
    ``synchronize`` of the editor's device (``devices.synchronize``, a no-op on CPU, is tested on a
    mocked CUDA in test_devices.py)."""
    from PIL import Image

    editor, _ = inversions[torch.float32]
    events: list[str] = []
    monkeypatch.setattr(batch, "synchronize", lambda device: events.append(f"sync {torch.device(device)}"))
    clock = batch.time.perf_counter
    monkeypatch.setattr(batch, "time", SimpleNamespace(perf_counter=lambda: events.append("clock") or clock()))
    image = Image.new("RGB", (64, 64), (200, 200, 40))
    editor.edit(image, "a yellow square", source_prompt="a yellow square", preset="nonstyle", num_steps=STEPS,
                progress=False, callback=lambda step, t, z, terms: events.append("step"))
    sync = f"sync {editor.components.device}"
    # inversion: clock, sync, clock; loop: clock, steps, sync, clock; decoding reads the image back.
    first_step = events.index("step")
    assert events[:3] == ["clock", sync, "clock"]
    last_step = len(events) - 1 - events[::-1].index("step")
    assert events[first_step - 1] == "clock" and events[last_step + 1 : last_step + 3] == [sync, "clock"]


def test_policy_loss_scale_of_one_removes_the_fp16_check(tiny_model_path, inversions, count_syncs):
    """``PrecisionPolicy(loss_scale=1)`` turns loss scaling off: float16 then syncs once per step too."""
    _, inversion = inversions[torch.float16]
    policy = PrecisionPolicy(model_dtype=torch.float16, loss_scale=1)
    editor = Editor.from_pretrained(tiny_model_path, dtype=torch.float16, precision=policy)
    assert editor.components.precision is policy
    editor.edit(inversion, "a green circle", preset="nonstyle", progress=False, callback=count_syncs.callback)
    assert count_syncs.per_step() == [1] * (STEPS - 1)
