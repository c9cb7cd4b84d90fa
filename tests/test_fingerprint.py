"""One fingerprint rule (gnr_fast/fingerprint.py) for the model id and the UNet id of exports."""

from __future__ import annotations

import shutil

import torch

from gnr_fast.fingerprint import LOAD_ONLY_CONFIG_KEYS, fingerprint, unet_fingerprint
from gnr_fast.loading import load_components


def test_ids_do_not_depend_on_where_the_checkpoint_lies(tiny_model_path, tmp_path):
    """A copied checkpoint keeps its model id and its UNet id (the loaders' path entry is left out);
    before the two ids shared one rule, the UNet id hashed the folder's path."""
    copy = tmp_path / "copied"
    shutil.copytree(tiny_model_path, copy)
    a, b = load_components(tiny_model_path), load_components(copy)
    assert dict(a.unet.config)["_name_or_path"] != dict(b.unet.config)["_name_or_path"]
    assert a.model_id == b.model_id
    assert unet_fingerprint(a.unet) == unet_fingerprint(b.unet) != a.model_id


def test_fingerprint_reads_configs_then_extras_then_float32_tensors():
    weights = torch.arange(6, dtype=torch.float16).reshape(2, 3)
    config = {"layers": 2, "_name_or_path": "/somewhere"}
    base = fingerprint([config], [weights])
    assert len(base) == 16
    assert base == fingerprint([{**config, **dict.fromkeys(LOAD_ONLY_CONFIG_KEYS, "x")}], [weights.float()])
    assert base != fingerprint([{**config, "layers": 3}], [weights])  # a config change
    assert base != fingerprint([config], [weights + 1])  # a weight change
    assert base != fingerprint([config], [weights], [b"schedule"])  # extra bytes
