"""Typed captures: what one UNet call records for the guiders (attention internals, block features)."""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from enum import Enum
from typing import Iterator, Literal, Sequence

import torch

from ..config import FeatureSite, LayerRange
from ..errors import ConfigError, UnsupportedArchitectureError

Group = Literal["down", "mid", "up"]


class CaptureMode(str, Enum):
    """How a self-attention layer is recorded."""

    MAPS = "maps"  # materialised A = softmax(scale · Q Kᵀ): [B, H, N, N] (reference mode)
    QK = "qk"  # queries and keys [B, H, N, D] (+ per-row log-sum-exp for constant passes): fast mode


@dataclass(frozen=True)
class SelfAttnLayer:
    """One self-attention (attn1) module of the UNet, in forward order."""

    index: int  # position among all self-attention layers, forward order
    group: Group  # down / mid / up block group
    group_index: int  # position within its group (the reference's per-group counter)
    name: str  # module path, e.g. "down_blocks.0.attentions.0.transformer_blocks.0.attn1"


@dataclass
class PassCapture:
    """Recorder handed to one UNet call; processors and hooks write into it.

    ``rows`` restricts recording to a slice of the batch (for batched calls where only some
    items feed guiders). Tensors keep their autograd graph when the call runs with grad.
    """

    layers: frozenset[int]
    mode: CaptureMode = CaptureMode.MAPS
    feature_sites: frozenset[FeatureSite] = frozenset()
    rows: slice = field(default_factory=lambda: slice(None))
    with_lse: bool = False
    maps: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [B, H, N, N]
    queries: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [B, H, N, D]
    keys: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [B, H, N, D]
    lse: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [B, H, N] float32
    scales: dict[int, float] = field(default_factory=dict)  # layer -> softmax scale
    features: dict[FeatureSite, torch.Tensor] = field(default_factory=dict)  # site -> [B, C, h, w]

    def wants(self, layer: SelfAttnLayer | None) -> bool:
        return layer is not None and layer.index in self.layers

    def record_qk(
        self, index: int, query: torch.Tensor, key: torch.Tensor, scale: float, lse: torch.Tensor | None = None
    ) -> None:
        """Keep Q and K of layer ``index`` ([B, H, N, D]); with ``with_lse`` also each query row's
        log-sum-exp ([B, H, N] float32), taken from ``lse`` when the attention kernel produced it."""
        self.queries[index] = query
        self.keys[index] = key
        self.scales[index] = scale
        if self.with_lse:
            if lse is None:
                from ..ops.attn_map_energy import attention_lse

                lse = attention_lse(query, key, scale=scale)
            self.lse[index] = lse.float() if lse.dtype != torch.float64 else lse


def select_layers(layers: Sequence[SelfAttnLayer], ranges: tuple[LayerRange, LayerRange, LayerRange] | None) -> frozenset[int]:
    """Indices of the layers inside the per-group (start, end) ranges; ``None`` selects all."""
    if ranges is None:
        return frozenset(layer.index for layer in layers)
    by_group = dict(zip(("down", "mid", "up"), ranges))
    counts = {g: sum(1 for layer in layers if layer.group == g) for g in by_group}
    for group, (start, end) in by_group.items():
        if end > counts[group]:
            raise ConfigError(
                f"self_attn_layers range {group}=({start}, {end}) exceeds the {counts[group]} self-attention layers "
                f"of this UNet's {group} blocks"
            )
    return frozenset(
        layer.index for layer in layers if by_group[layer.group][0] <= layer.group_index < by_group[layer.group][1]
    )


def feature_module(unet: torch.nn.Module, site: FeatureSite) -> torch.nn.Module:
    """The UNet module whose output is the feature map at ``site`` (DESIGN.md §4)."""
    if site is FeatureSite.UP_LAST:
        return unet.up_blocks[-1]
    if site is FeatureSite.CONV_NORM_OUT:
        return unet.conv_norm_out
    if site is FeatureSite.UP:
        return unet.up_blocks[1].resnets[1]
    if site is FeatureSite.MID:
        return unet.mid_block
    return unet.down_blocks[1].resnets[1]


_ACTIVE = threading.local()  # .captures: those of the UNet call now running on this thread
_HOOKED_SITES = "_gnr_feature_sites"  # UNet attribute: the sites that carry a recording hook


class _FeatureRecorder:
    """Forward hook of one feature site: hands the module's output to this thread's active captures.

    A module-level class, not a closure, so that a UNet carrying it can still be pickled or copied.
    """

    def __init__(self, site: FeatureSite) -> None:
        self.site = site

    def __call__(self, _module: torch.nn.Module, _inputs: object, output: torch.Tensor) -> None:
        for capture in getattr(_ACTIVE, "captures", ()):
            if self.site in capture.feature_sites:
                capture.features[self.site] = output[capture.rows]


def install_feature_hooks(unet: torch.nn.Module) -> None:
    """Put one permanent forward hook on the module of each :class:`FeatureSite` of ``unet``.

    A hook records into the captures of the call running on its own thread (see
    :func:`capture_features`), so calls on two threads at once never see each other's outputs,
    and no hook is added or removed while another thread may be running the UNet.
    """
    if hasattr(unet, _HOOKED_SITES):
        return
    hooked = set()
    for site in FeatureSite:
        try:
            module = feature_module(unet, site)
        except (AttributeError, IndexError):  # not an SD-shaped UNet at this site: no guider can read it
            continue
        module.register_forward_hook(_FeatureRecorder(site))
        hooked.add(site)
    setattr(unet, _HOOKED_SITES, frozenset(hooked))


@contextlib.contextmanager
def capture_features(unet: torch.nn.Module, captures: tuple[PassCapture, ...]) -> Iterator[None]:
    """Record the outputs of each capture's ``feature_sites`` during one call of ``unet`` on this thread."""
    install_feature_hooks(unet)
    missing = {site for c in captures for site in c.feature_sites} - getattr(unet, _HOOKED_SITES)
    if missing:
        raise UnsupportedArchitectureError(
            f"this UNet has no module at feature site(s) {sorted(s.value for s in missing)}; "
            "gnr-fast supports SD 1.x/2.x UNets only"
        )
    previous = getattr(_ACTIVE, "captures", ())
    _ACTIVE.captures = captures
    try:
        yield
    finally:
        _ACTIVE.captures = previous
