"""Attention processors that compute attention and record what the guiders need.

Installed once per UNet with ``unet.set_attn_processor``. A capturing call hands its own fresh
:class:`~gnr_fast.attention.capture.Recorder` to every processor through
``cross_attention_kwargs={"recorder": recorder}``; a plain call hands none, and the processors then
compute plain scaled-dot-product attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import UnsupportedArchitectureError
from ..ops.attention_lse import attention_lse, attention_with_lse
from .capture import CaptureMode, Recorder, SelfAttnLayer, install_feature_taps


class CaptureAttnProcessor:
    """Scaled-dot-product attention; for a captured self-attention layer also records its internals.

    In a :attr:`CaptureMode.MAPS` call every attention module computes softmax(scale · Q Kᵀ) V
    explicitly, with the reference implementation's arithmetic, and captured layers keep the map;
    in :attr:`CaptureMode.QK` the output comes from
    :func:`~gnr_fast.ops.attention_lse.attention_with_lse` (also the log-sum-exp when the call
    records it; plain SDPA otherwise) and only Q, K (and lse) are kept — never an N×N map.
    """

    def __init__(self, layer: SelfAttnLayer | None = None) -> None:
        self.layer = layer

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        recorder: Recorder | None = None,
    ) -> torch.Tensor:
        residual = hidden_states
        batch, tokens, _ = hidden_states.shape  # [B, N, C]
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, context.shape[1], batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        heads = attn.heads
        query = attn.to_q(hidden_states)
        key = attn.to_k(context)
        value = attn.to_v(context)
        head_dim = key.shape[-1] // heads
        records = recorder is not None and recorder.wants(self.layer)
        if recorder is not None and recorder.spec.mode is CaptureMode.MAPS:
            # The reference's arithmetic for every attention module of a MAPS-mode call:
            # baddbmm(scale) + fp32 softmax + bmm on [B·H, N, D].
            probs = attn.get_attention_scores(attn.head_to_batch_dim(query), attn.head_to_batch_dim(key), None)
            if records:
                recorder.maps[self.layer.index] = probs.view(batch, heads, *probs.shape[1:])[recorder.spec.row_slice]
            out = attn.batch_to_head_dim(torch.bmm(probs, attn.head_to_batch_dim(value)))
            return self._finish(attn, out, residual)
        query = query.view(batch, -1, heads, head_dim).transpose(1, 2)  # [B, H, N, D]
        key = key.view(batch, -1, heads, head_dim).transpose(1, 2)  # [B, H, M, D]
        value = value.view(batch, -1, heads, head_dim).transpose(1, 2)  # [B, H, M, D]
        scale = None if attn.scale == head_dim**-0.5 else attn.scale
        with_lse = records and recorder.spec.with_lse
        if attention_mask is None:
            # The one attention op (gnr_fast.ops.attention_lse): with the lse for a recorded source
            # pass (CPU: the flash kernel, which returns it; CUDA: Triton / xformers / SDPA), else SDPA.
            out, lse = attention_with_lse(query, key, value, scale=scale, need_lse=with_lse)
        else:
            out, lse = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scale), None
        if records:
            rows = recorder.spec.row_slice
            index = self.layer.index
            recorder.queries[index], recorder.keys[index] = query[rows], key[rows]
            if with_lse:
                if lse is None:  # a masked self-attention (SD UNets have none): the chunked lse
                    lse = attention_lse(query[rows], key[rows], scale=attn.scale)
                else:
                    lse = lse[rows]
                recorder.lse[index] = lse if lse.dtype == torch.float64 else lse.float()
        out = out.transpose(1, 2).reshape(batch, tokens, heads * head_dim)  # [B, N, H·D]
        return self._finish(attn, out, residual)

    @staticmethod
    def _finish(attn, out: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def _check_supported(name: str, attn) -> None:
    unsupported = [
        feature
        for feature in ("spatial_norm", "group_norm", "norm_q", "norm_k", "norm_cross")
        if getattr(attn, feature, None) not in (None, False)
    ]
    if unsupported:
        raise UnsupportedArchitectureError(
            f"attention layer {name} uses {unsupported}, which Stable Diffusion 1.x/2.x UNets do not; gnr-fast "
            "supports SD 1.x/2.x UNets only"
        )


def install_capture_processors(unet: torch.nn.Module) -> tuple[list[SelfAttnLayer], frozenset]:
    """Give every attention module of ``unet`` a :class:`CaptureAttnProcessor` and its feature sites
    their taps (:func:`~gnr_fast.attention.capture.install_feature_taps`); return the
    self-attention layers and the feature sites the taps can record.

    Self-attention layers are the ``attn1`` modules of the transformer blocks, listed in forward
    order (down blocks, mid block, up blocks), matching the reference's per-group counting.
    """
    processors: dict[str, CaptureAttnProcessor] = {}
    layers: list[SelfAttnLayer] = []
    per_group = {"down": 0, "mid": 0, "up": 0}
    ordered = sorted(
        unet.attn_processors,
        key=lambda key: ("down_blocks", "mid_block", "up_blocks").index(key.split(".")[0]),
    )
    modules = dict(unet.named_modules())
    for key in ordered:
        module_name = key.removesuffix(".processor")
        _check_supported(module_name, modules[module_name])
        if module_name.endswith("attn1"):
            group = {"down_blocks": "down", "mid_block": "mid", "up_blocks": "up"}[key.split(".")[0]]
            layer = SelfAttnLayer(index=len(layers), group=group, group_index=per_group[group], name=module_name,
                                  scale=float(modules[module_name].scale))
            per_group[group] += 1
            layers.append(layer)
            processors[key] = CaptureAttnProcessor(layer)
        else:
            processors[key] = CaptureAttnProcessor(None)
    unet.set_attn_processor(processors)
    return layers, install_feature_taps(unet)
