"""``GuideAndRescalePipeline``: gnr-fast's editing as a diffusers pipeline, for users of diffusers.

A :class:`diffusers.DiffusionPipeline` registered with the usual Stable Diffusion 1.x/2.x components
(vae, text_encoder, tokenizer, unet, scheduler), so the diffusers habits work: ``from_pretrained(DIR)``
(or a hub id cached earlier, read offline), ``from_pipe(sd_pipe)`` (shares the modules, copies
nothing), ``save_pretrained``, ``.to(device)``, ``set_progress_bar_config(disable=True)``. Calling it
runs the same fast path as :meth:`gnr_fast.Editor.edit` — it *is* an :class:`~gnr_fast.Editor` built
by :meth:`~gnr_fast.Editor.from_pipe` on the pipeline's own modules — so the result is the same bit
for bit. The scheduler contributes its noise schedule (betas, prediction type); inversion and editing
are always DDIM (DESIGN.md §1–3).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from transformers import CLIPTextModel, CLIPTokenizer

from .config import EditConfig
from .editor import Editor
from .errors import InputError
from .hub import resolve_model
from .images import ImageInput
from .inversion import Inversion
from .output_types import OutputType, stack_outputs
from .pipe_components import check_pipe
from .results import Timings
from .step_callbacks import StepEndCallback, callback_tensor_inputs


@dataclass
class GuideAndRescalePipelineOutput(BaseOutput):
    """What :class:`GuideAndRescalePipeline` returns (``return_dict=False``: these fields as a tuple, in order).

    ``images``: a list of one PIL image, ``[1, H, W, 3]`` / ``[1, 3, H, W]`` float32 in [0, 1], or the
    final latents ``[1, 4, h, w]`` (``output_type``, :mod:`gnr_fast.output_types`). ``inversion``: the
    DDIM inversion edited (pass it back as ``image`` to edit again without inverting). ``timings``:
    seconds of inversion, editing, decoding. ``interrupted``: a step callback set
    ``pipe._interrupt = True`` and ``images`` are the partial result after ``steps_done`` steps.
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    inversion: Inversion
    timings: Timings
    interrupted: bool
    steps_done: int


class GuideAndRescalePipeline(DiffusionPipeline):
    """Guide-and-Rescale real-image editing (ECCV 2024) with a Stable Diffusion 1.x/2.x checkpoint.

    ``pipe(image, source_prompt, target_prompt)`` inverts ``image`` and edits it toward
    ``target_prompt``; see :meth:`__call__`.
    """

    _optional_components: list[str] = []

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: SchedulerMixin,
    ) -> None:
        super().__init__()
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)
        self._interrupt = False
        self._editor_key: tuple | None = None
        self._editor: Editor | None = None

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs: Any) -> GuideAndRescalePipeline:
        """diffusers' ``from_pretrained`` on a local SD 1.x/2.x pipeline folder, or a hub id ``org/name``
        read from the local Hugging Face cache (:mod:`gnr_fast.hub`: never downloads)."""
        folder = resolve_model(pretrained_model_name_or_path)
        return super().from_pretrained(folder, **{"local_files_only": True, **kwargs})

    @classmethod
    def from_pipe(cls, pipeline: DiffusionPipeline, **kwargs: Any) -> GuideAndRescalePipeline:
        """diffusers' ``from_pipe``: a pipeline on ``pipeline``'s modules (no copy), refusing pipelines
        other than SD 1.x/2.x text-to-image and image-to-image ones (naming those)."""
        check_pipe(pipeline)
        return super().from_pipe(pipeline, **kwargs)

    @property
    def interrupt(self) -> bool:
        """Whether a step callback asked the running edit to stop (diffusers' ``_interrupt`` convention)."""
        return self._interrupt

    @property
    def editor(self) -> Editor:
        """The :class:`~gnr_fast.Editor` on this pipeline's modules (rebuilt when a module, the device
        or the dtype changed since the last call)."""
        key = (id(self.unet), id(self.vae), id(self.text_encoder), id(self.tokenizer), id(self.scheduler),
               self.unet.device, self.unet.dtype)
        if self._editor is None or key != self._editor_key:
            self._editor, self._editor_key = Editor.from_pipe(self), key
        return self._editor

    def __call__(
        self,
        image: ImageInput | Inversion,
        source_prompt: str | None,
        target_prompt: str,
        preset: str | None = None,
        config: EditConfig | str | Path | None = None,
        num_inference_steps: int | None = None,
        output_type: OutputType = "pil",
        return_dict: bool = True,
        callback_on_step_end: StepEndCallback | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> GuideAndRescalePipelineOutput | tuple:
        """Invert ``image`` with ``source_prompt`` and edit it toward ``target_prompt``.

        1. ``image``: a PIL image, array, path or encoded bytes — or an :class:`Inversion` from an
           earlier call (``output.inversion``; ``source_prompt`` may then be ``None``).
        2. ``preset`` / ``config``: the guidance (:meth:`Editor.edit`; default: the model folder's
           preset, ``nonstyle`` for SD checkpoints). ``num_inference_steps``: DDIM steps (default 50,
           or the inversion's).
        3. ``output_type``: ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"`` (no VAE decode).
        4. ``callback_on_step_end(pipe, step, timestep, callback_kwargs) -> dict`` with the tensors
           named in ``callback_on_step_end_tensor_inputs`` (default ``["latents"]``;
           :data:`gnr_fast.step_callbacks.CALLBACK_TENSOR_INPUTS`); a returned ``"latents"`` replaces
           them, and ``pipe._interrupt = True`` stops the edit after the step (the output is marked
           ``interrupted``).
        5. ``generator`` is accepted for diffusers compatibility and not drawn from: DDIM inversion
           and the Guide-and-Rescale edit are deterministic (no noise is sampled anywhere; only a
           stochastic sampler would draw from it).

        Progress bars follow ``set_progress_bar_config(disable=...)``. Returns a
        :class:`GuideAndRescalePipelineOutput`, or its fields as a tuple with ``return_dict=False``.
        """
        _check_generator(generator)
        self._interrupt = False
        tensor_inputs = callback_tensor_inputs(callback_on_step_end, callback_on_step_end_tensor_inputs)

        def on_step_end(editor: Editor, step: int, timestep: int, kwargs: dict) -> dict | None:
            """The user's callback, called with this pipeline; its ``_interrupt`` stops the editor."""
            returned = callback_on_step_end(self, step, timestep, kwargs)
            editor._interrupt = self._interrupt
            return returned

        result = self.editor.edit(
            image,
            target_prompt,
            source_prompt=source_prompt,
            preset=preset,
            config=config,
            num_steps=num_inference_steps,
            progress=not getattr(self, "_progress_bar_config", {}).get("disable", False),  # diffusers' setting
            output_type=output_type,
            callback_on_step_end=on_step_end if callback_on_step_end is not None else None,
            callback_on_step_end_tensor_inputs=tensor_inputs,
        )
        images = stack_outputs([result.latents if output_type == "latent" else result.image], output_type)
        output = GuideAndRescalePipelineOutput(
            images=images,
            inversion=result.inversion,
            timings=result.timings,
            interrupted=result.interrupted,
            steps_done=result.steps_done,
        )
        return output if return_dict else output.to_tuple()


def _check_generator(generator: object) -> None:
    """Raise :class:`InputError` unless ``generator`` is ``None``, a ``torch.Generator`` or a list of them."""
    items = generator if isinstance(generator, list) else [generator]
    if generator is not None and not all(isinstance(g, torch.Generator) for g in items):
        raise InputError(f"generator must be a torch.Generator, a list of them or None, got {type(generator).__name__}")
