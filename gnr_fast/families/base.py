"""The model-family seam: what differs between UNet families, behind one adapter (STYLE.md §14).

A :class:`ModelFamily` owns everything the engine must know about a family of diffusers UNets:
the UNet call signature and its extra conditioning (tensors beside latents, timestep and text
context, one row per batch row), the text encoder(s), the self-attention layers and feature sites
the guiders read, the latent scale, and the exported model's input/output names, dynamic axes and
shape profiles (as TensorRT's demo/Diffusion declares them per model). Code outside this package
calls :meth:`ModelFamily.call_unet` and never branches on the family.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..attention.capture import SelfAttnLayer, feature_module
from ..attention.processors import install_capture_processors
from ..config import FeatureSite
from ..errors import ConfigError


@dataclass(frozen=True)
class ExtraInput:
    """One extra conditioning tensor of a UNet call: [B, width], float32 at the call's boundary."""

    name: str  # the input's name in an exported graph and in :meth:`ModelFamily.unet_kwargs`
    width: int


@dataclass(frozen=True)
class ShapeProfile:
    """(min, opt, max) shape of every exported input, by name (a TensorRT optimisation profile)."""

    shapes: Mapping[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]


@dataclass(frozen=True)
class ExportIO:
    """An exported UNet's inputs and outputs and which of their axes are dynamic."""

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    dynamic_axes: Mapping[str, Mapping[int, str]]


class ModelFamily(ABC):
    """Adapter of one UNet family; one instance per loaded UNet (it may read the UNet's config)."""

    name: ClassVar[str] = ""
    text_encoders: ClassVar[tuple[str, ...]] = ("text_encoder",)
    """The pipeline subfolders of the text encoder(s) whose outputs make the context (SDXL: two)."""

    def __init__(self, unet_config: Mapping[str, Any]) -> None:
        self.unet_config = dict(unet_config)

    @classmethod
    @abstractmethod
    def matches(cls, unet_config: Mapping[str, Any]) -> bool:
        """Whether a UNet with this diffusers config belongs to the family."""

    @property
    def extra_inputs(self) -> tuple[ExtraInput, ...]:
        """The extra conditioning tensors of a call, in the order :meth:`call_unet` takes them."""
        return ()

    def unet_kwargs(self, extras: Sequence[torch.Tensor]) -> dict[str, Any]:
        """The diffusers keyword arguments carrying ``extras`` (one tensor per :attr:`extra_inputs`)."""
        if len(extras) != len(self.extra_inputs):
            raise ValueError(f"{self.name} UNet calls take {len(self.extra_inputs)} extra input(s) "
                             f"{[e.name for e in self.extra_inputs]}, got {len(extras)}")
        return {}

    def guidance_extras(self, w: Sequence[float], device: torch.device | str = "cpu") -> tuple[torch.Tensor, ...]:
        """The extra inputs of a call whose rows use guidance scales ``w``; a family without a
        guidance-scale embedding has none to give (:class:`ConfigError`)."""
        raise ConfigError(f"{self.name} UNets have no guidance-scale embedding (time_cond_proj_dim); "
                          "only a guidance-distilled or consistency UNet takes per-row guidance scales")

    def call_unet(
        self,
        unet: torch.nn.Module,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        context: torch.Tensor,
        extras: Sequence[torch.Tensor] = (),
        cross_attention_kwargs: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        """The one UNet call: ε (or v) [B, 4, h, w] in the UNet's dtype, inputs already in it."""
        return unet(latents, timestep, encoder_hidden_states=context, cross_attention_kwargs=cross_attention_kwargs,
                    return_dict=False, **self.unet_kwargs(extras))[0]

    def install_captures(self, unet: torch.nn.Module) -> tuple[list[SelfAttnLayer], frozenset[FeatureSite]]:
        """Instrument ``unet`` for the guiders: the self-attention layers in forward order and the
        feature sites its taps can record (capture processors and taps installed once)."""
        return install_capture_processors(unet)

    def feature_module(self, unet: torch.nn.Module, site: FeatureSite) -> torch.nn.Module:
        """The module whose output is the feature map at ``site``."""
        return feature_module(unet, site)

    def latent_scale(self, vae: torch.nn.Module) -> float:
        """z = latent_scale · VAE posterior mean."""
        return float(vae.config.scaling_factor)

    @property
    def export_io(self) -> ExportIO:
        """Names and dynamic axes of the exported plain call (inputs: sample, timestep, context, extras)."""
        extras = tuple(e.name for e in self.extra_inputs)
        axes = {"sample": {0: "batch", 2: "height", 3: "width"}, "timestep": {0: "batch"}, "context": {0: "batch"},
                "eps": {0: "batch", 2: "height", 3: "width"}}
        axes.update({name: {0: "batch"} for name in extras})
        return ExportIO(inputs=("sample", "timestep", "context", *extras), outputs=("eps",), dynamic_axes=axes)

    def shape_profile(self, batch: tuple[int, int, int], latent_hw: tuple[int, int], context_len: int = 77) -> ShapeProfile:
        """The (min, opt, max) shapes of every input for a batch range (min, opt, max) at one latent size."""
        h, w = latent_hw
        channels, dim = int(self.unet_config["in_channels"]), int(self.unet_config["cross_attention_dim"])
        per_row = {"sample": (channels, h, w), "timestep": (), "context": (context_len, dim)}
        per_row.update({e.name: (e.width,) for e in self.extra_inputs})
        return ShapeProfile({name: tuple((b, *shape) for b in batch) for name, shape in per_row.items()})  # type: ignore[misc]
