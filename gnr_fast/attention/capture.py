"""What one UNet call records for the guiders, described by a frozen spec and returned as outputs.

A capturing call is ``(latents, timestep, context, spec) -> (eps, outputs)``: the
:class:`CaptureSpec` says which self-attention layers, feature sites and batch rows to record;
the call creates a fresh :class:`Recorder` inside its own forward, hands it to the attention
processors (through diffusers' ``cross_attention_kwargs``) and to the feature taps (through the
same keyword argument of the blocks that carry it), and returns the recorder's tensors. Nothing is
written into an object the caller owns, nothing lives in a thread-local, and no attribute of a
diffusers module changes, so ``torch.compile(fullgraph=True)`` traces the whole call as one graph.

:class:`PassCapture` is the per-row view of the returned tensors that the guiders read.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Literal, NamedTuple

import torch

from ..errors import ConfigError, UnsupportedArchitectureError
from .sites import FeatureSite, LayerRange

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
    scale: float = 1.0  # the module's softmax scale (attn.scale)


@dataclass(frozen=True)
class CaptureSpec:
    """What a capturing UNet call records: frozen and hashable, so a compiled backend keeps one
    graph per (spec, batch size, grad mode).

    ``rows`` are the batch rows recorded, contiguous and ascending (plans put the recorded rows of a
    call last, so a spec never depends on where an image sits in a batch beyond its count).
    ``with_lse`` adds each query row's log-sum-exp (for the constant source pass). ``mode`` MAPS
    makes every attention module use the reference's explicit arithmetic and keeps the maps.
    """

    layers: frozenset[int] = frozenset()
    feature_sites: frozenset[FeatureSite] = frozenset()
    rows: tuple[int, ...] = (0,)
    with_lse: bool = False
    mode: CaptureMode = CaptureMode.QK

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", frozenset(self.layers))
        object.__setattr__(self, "feature_sites", frozenset(FeatureSite(s) for s in self.feature_sites))
        rows = tuple(int(r) for r in self.rows)
        if not rows or any(b != a + 1 for a, b in itertools.pairwise(rows)) or rows[0] < 0:
            raise ValueError(f"CaptureSpec.rows must be contiguous ascending non-negative rows, got {self.rows!r}")
        object.__setattr__(self, "rows", rows)
        object.__setattr__(self, "mode", CaptureMode(self.mode))

    @property
    def row_slice(self) -> slice:
        return slice(self.rows[0], self.rows[-1] + 1)

    @property
    def layer_order(self) -> tuple[int, ...]:
        """The recorded layers in the order their tensors are returned."""
        return tuple(sorted(self.layers))

    @property
    def site_order(self) -> tuple[FeatureSite, ...]:
        """The recorded feature sites in the order their tensors are returned."""
        return tuple(sorted(self.feature_sites, key=lambda s: s.value))


class CaptureOutputs(NamedTuple):
    """The tensors a capturing call returns beside ε, each tuple in the spec's layer/site order;
    every tensor holds the spec's rows only (batch ``len(spec.rows)``)."""

    queries: tuple[torch.Tensor, ...]  # [R, H, N, D] per layer (QK mode)
    keys: tuple[torch.Tensor, ...]  # [R, H, N, D] per layer (QK mode)
    lse: tuple[torch.Tensor, ...]  # [R, H, N] float32 per layer (with_lse)
    maps: tuple[torch.Tensor, ...]  # [R, H, N, N] per layer (MAPS mode)
    features: tuple[torch.Tensor, ...]  # [R, C, h, w] per site


class Recorder:
    """Per-forward sink of one capturing call; created inside the call's own forward and read back
    before it returns (never shared between calls or threads)."""

    def __init__(self, spec: CaptureSpec) -> None:
        self.spec = spec
        self.queries: dict[int, torch.Tensor] = {}
        self.keys: dict[int, torch.Tensor] = {}
        self.lse: dict[int, torch.Tensor] = {}
        self.maps: dict[int, torch.Tensor] = {}
        self.features: dict[FeatureSite, torch.Tensor] = {}

    def wants(self, layer: SelfAttnLayer | None) -> bool:
        return layer is not None and layer.index in self.spec.layers

    def outputs(self) -> CaptureOutputs:
        """The recorded tensors in spec order."""
        spec = self.spec
        layers, sites = spec.layer_order, spec.site_order
        if spec.mode is CaptureMode.MAPS:
            maps, queries, keys = tuple(self.maps[i] for i in layers), (), ()
        else:
            maps, queries, keys = (), tuple(self.queries[i] for i in layers), tuple(self.keys[i] for i in layers)
        lse = tuple(self.lse[i] for i in layers) if spec.with_lse and spec.mode is CaptureMode.QK else ()
        return CaptureOutputs(queries, keys, lse, maps, tuple(self.features[s] for s in sites))


@dataclass
class PassCapture:
    """The guider inputs of one batch row of one pass (what the energies read).

    Fast mode builds these from a capturing call's returned tensors (:func:`row_captures`);
    the paper-literal reference step hands empty ones to the runner's recording convention.
    """

    layers: frozenset[int]
    mode: CaptureMode = CaptureMode.MAPS
    feature_sites: frozenset[FeatureSite] = frozenset()
    with_lse: bool = False
    maps: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [1, H, N, N]
    queries: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [1, H, N, D]
    keys: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [1, H, N, D]
    lse: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [1, H, N] float32
    scales: dict[int, float] = field(default_factory=dict)  # layer -> softmax scale
    features: dict[FeatureSite, torch.Tensor] = field(default_factory=dict)  # site -> [1, C, h, w]


def row_captures(spec: CaptureSpec, outputs: CaptureOutputs, layers: Sequence[SelfAttnLayer]) -> list[PassCapture]:
    """One :class:`PassCapture` per recorded row of a capturing call, as views of ``outputs``."""
    scales = {layer.index: layer.scale for layer in layers}
    order, sites = spec.layer_order, spec.site_order
    result = []
    for j in range(len(spec.rows)):
        rows = slice(j, j + 1)
        result.append(
            PassCapture(
                layers=spec.layers,
                mode=spec.mode,
                feature_sites=spec.feature_sites,
                with_lse=spec.with_lse,
                maps={i: t[rows] for i, t in zip(order, outputs.maps)},
                queries={i: t[rows] for i, t in zip(order, outputs.queries)},
                keys={i: t[rows] for i, t in zip(order, outputs.keys)},
                lse={i: t[rows] for i, t in zip(order, outputs.lse)},
                scales={i: scales[i] for i in order},
                features={s: t[rows] for s, t in zip(sites, outputs.features)},
            )
        )
    return result


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


# --- feature taps ------------------------------------------------------------------------------
#
# A feature site's output reaches the call's recorder through the ``cross_attention_kwargs``
# keyword argument that the UNet passes to its cross-attention blocks:
#   up_blocks[-1], mid_block: a forward hook on the block itself (it is called with the keyword);
#   conv_norm_out: GroupNorm of up_blocks[-1]'s output, applied by that block's tap;
#   up_blocks[1].resnets[1], down_blocks[1].resnets[1]: a forward pre-hook on the attention
#   module right after the resnet (attentions[1]), whose first argument is the resnet's output.


class _BlockOutputTap:
    """Forward hook (with kwargs) recording a block's output into the call's recorder."""

    def __init__(self, site: FeatureSite, norm: torch.nn.Module | None = None) -> None:
        self.site, self.norm = site, norm

    def __call__(self, _module, _args, kwargs, output) -> None:
        recorder = (kwargs.get("cross_attention_kwargs") or {}).get("recorder")
        if recorder is None:
            return
        rows = recorder.spec.row_slice
        if self.site in recorder.spec.feature_sites:
            recorder.features[self.site] = output[rows]
        if self.norm is not None and FeatureSite.CONV_NORM_OUT in recorder.spec.feature_sites:
            recorder.features[FeatureSite.CONV_NORM_OUT] = self.norm(output[rows])


class _InputTap:
    """Forward pre-hook (with kwargs) recording a module's first input into the call's recorder."""

    def __init__(self, site: FeatureSite) -> None:
        self.site = site

    def __call__(self, _module, args, kwargs) -> None:
        recorder = (kwargs.get("cross_attention_kwargs") or {}).get("recorder")
        if recorder is not None and self.site in recorder.spec.feature_sites:
            recorder.features[self.site] = args[0][recorder.spec.row_slice]


_TAPPED: weakref.WeakKeyDictionary[torch.nn.Module, frozenset[FeatureSite]] = weakref.WeakKeyDictionary()
"""UNets that carry taps (so a second editor over the same UNet does not add them twice)."""


def install_feature_taps(unet: torch.nn.Module) -> frozenset[FeatureSite]:
    """Register the permanent feature taps on ``unet`` (once per UNet); return the sites they can record.

    Each tap records only into the recorder of the call it runs in (taken from that call's own
    keyword arguments), so calls on two threads never see each other's outputs. A site whose
    carrier module is missing or takes no ``cross_attention_kwargs`` is left out.
    """
    if unet in _TAPPED:
        return _TAPPED[unet]
    sites: set[FeatureSite] = set()

    def cross(module: object) -> bool:
        return bool(getattr(module, "has_cross_attention", False))

    ups = getattr(unet, "up_blocks", None)
    if ups is not None and len(ups) and cross(ups[-1]):
        norm = getattr(unet, "conv_norm_out", None)
        ups[-1].register_forward_hook(_BlockOutputTap(FeatureSite.UP_LAST, norm), with_kwargs=True)
        sites.add(FeatureSite.UP_LAST)
        if norm is not None:
            sites.add(FeatureSite.CONV_NORM_OUT)
    mid = getattr(unet, "mid_block", None)
    if mid is not None and cross(mid):
        mid.register_forward_hook(_BlockOutputTap(FeatureSite.MID), with_kwargs=True)
        sites.add(FeatureSite.MID)
    for blocks_name, site in (("up_blocks", FeatureSite.UP), ("down_blocks", FeatureSite.DOWN)):
        blocks = getattr(unet, blocks_name, None)
        if blocks is not None and len(blocks) > 1 and cross(blocks[1]) and len(blocks[1].attentions) > 1:
            blocks[1].attentions[1].register_forward_pre_hook(_InputTap(site), with_kwargs=True)
            sites.add(site)
    _TAPPED[unet] = frozenset(sites)
    return _TAPPED[unet]


def check_sites(spec: CaptureSpec, supported: frozenset[FeatureSite]) -> None:
    """Raise :class:`UnsupportedArchitectureError` when ``spec`` asks for a site this UNet lacks."""
    missing = spec.feature_sites - supported
    if missing:
        raise UnsupportedArchitectureError(
            f"this UNet has no module at feature site(s) {sorted(s.value for s in missing)}; "
            "gnr-fast supports SD 1.x/2.x UNets only"
        )
