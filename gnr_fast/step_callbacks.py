"""diffusers' step callback, ``callback_on_step_end``, for gnr-fast edits; and its interrupt.

As in diffusers' pipelines, the callback is called after every step as
``callback_on_step_end(owner, step_index, timestep, callback_kwargs)``: ``owner`` is the
:class:`~gnr_fast.editor.Editor` or :class:`~gnr_fast.pipeline.GuideAndRescalePipeline` running the
edit, ``timestep`` the DDIM timestep (an int) and ``callback_kwargs`` a dict holding the tensors named
in ``callback_on_step_end_tensor_inputs`` (:data:`CALLBACK_TENSOR_INPUTS`; default ``["latents"]``).
It returns a dict (or ``None``); a ``"latents"`` entry replaces the latents the next step starts from.
Setting ``owner._interrupt = True`` (diffusers' convention; cleared when an edit starts) stops the
edit after the current step: the result holds the latents reached so far and says so
(``interrupted=True``, ``steps_done``).

gnr-fast's own step observer, ``callback(step, timestep, latent, terms)`` of
:meth:`~gnr_fast.editor.Editor.edit`, keeps working beside it: it sees each image's typed
:class:`~gnr_fast.editing.StepTerms` (γ, energy) read-only, for diagnostics.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from .editing import StepTerms
from .errors import InputError

CALLBACK_TENSOR_INPUTS: dict[str, str] = {
    "latents": "z after the step, [B, 4, h, w] float32 (a returned 'latents' replaces it)",
    "noise_pred": "ε_final of the step, [B, 4, h, w] (DESIGN.md §3 step 7)",
    "noise_pred_uncond": "ε_u, the unconditional noise, [B, 4, h, w]",
    "delta_cfg": "Δcfg, the classifier-free guidance term, [B, 4, h, w]",
    "guider_grad": "∂E/∂z before γ, [B, 4, h, w]; None when no energy guider was active",
    "gamma": "γ, the noise-rescaling factor, [B]",
}
"""The tensors a ``callback_on_step_end`` can ask for, and what each holds."""

StepEndCallback = Callable[[Any, int, int, dict], "dict | None"]
"""diffusers' form: ``callback_on_step_end(owner, step_index, timestep, callback_kwargs) -> dict | None``."""


def callback_tensor_inputs(callback: object, tensor_inputs: Sequence[str] | None) -> list[str]:
    """The tensor names ``callback`` receives, checked against :data:`CALLBACK_TENSOR_INPUTS`.

    A diffusers ``PipelineCallback``/``MultiPipelineCallbacks`` names its own (``tensor_inputs``), as
    in diffusers' pipelines. Raises :class:`InputError` for a callback that is not callable or an
    unknown name.
    """
    if callback is None:
        return []
    from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback

    if not callable(callback):
        raise InputError(f"callback_on_step_end must be callable, got {type(callback).__name__}")
    if isinstance(callback, (PipelineCallback, MultiPipelineCallbacks)):
        tensor_inputs = callback.tensor_inputs
    names = ["latents"] if tensor_inputs is None else list(tensor_inputs)
    unknown = [name for name in names if name not in CALLBACK_TENSOR_INPUTS]
    if unknown:
        raise InputError(
            f"callback_on_step_end_tensor_inputs names {unknown}, which gnr-fast edits do not have; "
            f"choose from {list(CALLBACK_TENSOR_INPUTS)}"
        )
    return names


def _batched(terms: Sequence[StepTerms], name: str) -> torch.Tensor | None:
    """One :data:`CALLBACK_TENSOR_INPUTS` entry (other than ``latents``) over the batch's terms."""
    if name == "gamma":
        return torch.stack([term.gamma.reshape(()) for term in terms])  # [B]
    field = {"noise_pred": "eps_final", "noise_pred_uncond": "eps_u", "delta_cfg": "delta_cfg",
             "guider_grad": "guider_grad"}[name]
    tensors = [getattr(term, field) for term in terms]
    return None if any(t is None for t in tensors) else torch.cat(tensors).detach()


class StepEnd:
    """The loop's step-end hook (:class:`~gnr_fast.editing.StepEndHook`) running a diffusers-form
    callback and honouring ``owner._interrupt``; records how many steps ran and whether it stopped early."""

    def __init__(self, owner: Any, callback: StepEndCallback | None, tensor_inputs: Sequence[str] | None) -> None:
        self.owner = owner
        self.callback = callback
        self.tensor_inputs = callback_tensor_inputs(callback, tensor_inputs)
        self.steps_done = 0
        self.stopped = False
        owner._interrupt = False  # diffusers clears it when a call starts

    def __call__(self, step: int, timestep: int, latents: torch.Tensor, terms: Sequence[StepTerms]) -> tuple[torch.Tensor, bool]:
        self.steps_done = step + 1
        if self.callback is not None:
            kwargs = {name: latents if name == "latents" else _batched(terms, name) for name in self.tensor_inputs}
            returned = self.callback(self.owner, step, timestep, kwargs)
            if returned is not None and returned.get("latents") is not None:
                latents = self._replacement(returned["latents"], latents)
        self.stopped = bool(getattr(self.owner, "_interrupt", False))
        return latents, self.stopped

    @staticmethod
    def _replacement(new: object, old: torch.Tensor) -> torch.Tensor:
        if not isinstance(new, torch.Tensor) or new.shape != old.shape:
            shape = tuple(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__
            raise InputError(f"callback_on_step_end returned latents of shape {shape}; they must keep the shape {tuple(old.shape)}")
        return new.detach().to(device=old.device, dtype=old.dtype)
