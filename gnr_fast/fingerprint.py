"""The one rule by which a model or one of its parts gets its short id.

An id is the first 16 hex digits of a SHA-256 over, in order: each config as sorted JSON without the
entries loaders add (:data:`LOAD_ONLY_CONFIG_KEYS`: the folder's path and the load dtype), any extra
bytes, then probe tensors as float32. So a copied checkpoint keeps its ids, and so does a load in
another dtype when the probes are read from the files (``loading.stored_probes``).

* :func:`model_fingerprint` — the checkpoint's model id (UNet, VAE, text encoder, noise schedule):
  saved with inversions, keys the inversion caches.
* :func:`unet_fingerprint` — the UNet alone: what an ONNX export or TensorRT engine is matched by
  (an export depends on nothing else).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any

import torch

LOAD_ONLY_CONFIG_KEYS = frozenset({"_name_or_path", "dtype", "torch_dtype"})
"""Config entries set by the loader (path, load dtype), not by the checkpoint: left out of every id."""

ID_DIGITS = 16


def config_bytes(config: Mapping[str, Any]) -> bytes:
    """``config`` as sorted JSON without :data:`LOAD_ONLY_CONFIG_KEYS` (non-JSON values by ``str``)."""
    kept = {k: v for k, v in config.items() if k not in LOAD_ONLY_CONFIG_KEYS}
    return json.dumps(kept, sort_keys=True, default=str).encode()


def fingerprint(configs: Iterable[Mapping[str, Any]], tensors: Iterable[torch.Tensor], extra: Iterable[bytes] = ()) -> str:
    """The id of ``configs``, then ``extra`` bytes, then ``tensors`` read as float32 (see the module)."""
    digest = hashlib.sha256()
    for config in configs:
        digest.update(config_bytes(config))
    for chunk in extra:
        digest.update(chunk)
    for tensor in tensors:
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:ID_DIGITS]


def model_fingerprint(unet: Any, vae: Any, text_encoder: Any, schedule: Any, probes: list[torch.Tensor]) -> str:
    """The model id: changes when the weights, the configs or the noise schedule change.

    ``probes`` are the ``loading.PROBES`` weights as float32 (``loading.stored_probes``, else
    ``loading.module_probes``). The dtype the model runs in is not part of the id: it is recorded
    beside it (``Inversion.dtype``).
    """
    configs = [dict(unet.config), dict(vae.config), text_encoder.config.to_dict()]
    extra = [schedule.alphas_cumprod.numpy().tobytes(), schedule.prediction_type.encode()]
    return fingerprint(configs, probes, extra)


def unet_fingerprint(unet: torch.nn.Module) -> str:
    """The UNet's id: its config and probe weights (first and last convolution, time embedding, the
    mid block's first convolution), read in float32 — so a float16 copy of one checkpoint has
    another id (its weights differ)."""
    probes = (unet.conv_in.weight, unet.conv_out.weight, unet.time_embedding.linear_1.weight,
              unet.mid_block.resnets[0].conv1.weight)
    return fingerprint([dict(unet.config)], probes)
