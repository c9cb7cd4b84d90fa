"""An already-loaded diffusers pipeline's modules as gnr-fast :class:`~gnr_fast.loading.Components`.

No weight is copied: the editor calls the pipeline's own UNet, VAE and text encoder, on their
device and in their dtypes, so LoRAs loaded (peft layers) or fused into them are used. What
changes on the shared modules: gnr-fast's attention processors are installed on the UNet (they
compute plain attention when no edit is capturing, so the pipeline still generates as before), and
every module is put in eval mode with ``requires_grad_(False)``, as diffusers' inference does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import ModelLoadError, UnsupportedArchitectureError
from .fingerprint import fingerprint, model_fingerprint
from .loading import Components, module_probes, noise_schedule
from .precision import MODEL_DTYPES, PrecisionPolicy

SUPPORTED_PIPE_CLASSES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "GuideAndRescalePipeline")
"""diffusers pipelines (and their subclasses) whose components an editor can be built on."""

LORA_PARAMETER = "lora_"
"""Parameters whose name holds this are LoRA layers loaded with peft (hashed into the model id)."""


def check_pipe(pipe: Any) -> None:
    """Raise :class:`UnsupportedArchitectureError` unless ``pipe`` is an SD 1.x/2.x text-to-image or
    image-to-image pipeline (:data:`SUPPORTED_PIPE_CLASSES`) with a 4-channel UNet and one text encoder."""
    from diffusers import UNet2DConditionModel

    classes = {cls.__name__ for cls in type(pipe).__mro__}
    if not classes & set(SUPPORTED_PIPE_CLASSES):
        raise UnsupportedArchitectureError(
            f"from_pipe got a {type(pipe).__name__}; supported: {', '.join(SUPPORTED_PIPE_CLASSES)} (Stable Diffusion "
            "1.x/2.x). Load another checkpoint's folder with from_pretrained, or build a StableDiffusionPipeline "
            "from its components."
        )
    unet = getattr(pipe, "unet", None)
    if not isinstance(unet, UNet2DConditionModel) or unet.config.in_channels != 4 or unet.config.addition_embed_type:
        raise UnsupportedArchitectureError(
            f"{type(pipe).__name__}.unet is not an SD 1.x/2.x UNet (UNet2DConditionModel with 4 input channels and no "
            "added conditioning); gnr-fast edits with Stable Diffusion 1.x/2.x text-to-image UNets."
        )
    for name in ("vae", "text_encoder", "tokenizer", "scheduler"):
        if getattr(pipe, name, None) is None:
            raise ModelLoadError(f"{type(pipe).__name__}.{name} is None; from_pipe needs the pipeline's {name}")


def lora_digest(model_id: str, unet: Any, text_encoder: Any) -> str:
    """``model_id`` extended by the LoRA parameters loaded into the modules (unchanged without any),
    so inversions made through one adapter set are not reused with another."""
    lora = [(name, tensor) for module in (unet, text_encoder) for name, tensor in module.named_parameters()
            if LORA_PARAMETER in name]
    if not lora:
        return model_id
    names = [model_id.encode(), *(name.encode() for name, _ in lora)]
    return fingerprint([], [tensor for _, tensor in lora], names)


def components_from_pipe(pipe: Any) -> Components:
    """The :class:`Components` of a loaded :data:`SUPPORTED_PIPE_CLASSES` pipeline, sharing its modules.

    The model id hashes the same weights and configs as a load of the folder (so a float32 pipeline
    and ``Editor.from_pretrained`` of its folder share inversions) plus any loaded LoRA parameters;
    a LoRA fused into the weights changes it only where it touches the hashed weights
    (:data:`~gnr_fast.loading.PROBES`). ``path`` is the folder or hub id the pipeline was loaded from.
    """
    check_pipe(pipe)
    unet, vae, text_encoder = pipe.unet, pipe.vae, pipe.text_encoder
    dtype = unet.dtype
    if dtype not in MODEL_DTYPES:
        raise ModelLoadError(f"the pipeline's UNet is in {dtype}; gnr-fast runs float32, float16 or bfloat16 UNets")
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
        module.eval()
    schedule = noise_schedule(pipe.scheduler.config)
    model_id = model_fingerprint(unet, vae, text_encoder, schedule, module_probes(unet, vae, text_encoder))
    return Components(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=pipe.tokenizer,
        schedule=schedule,
        path=Path(pipe.name_or_path or "."),
        model_id=lora_digest(model_id, unet, text_encoder),
        device=unet.device,
        dtype=dtype,
        precision=PrecisionPolicy(model_dtype=dtype),
    )
