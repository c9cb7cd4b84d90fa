"""Hostile input is refused early with a GnrError (issue 17): lying image headers, truncated and
corrupt files, oversized metadata, animated images, control characters, bad tensors, oversized and
deeply nested config JSON, tampered inversion files — and property-based checks that every failure
of image decoding, request decoding and config parsing is a GnrError, never another exception."""

from __future__ import annotations

import io
import json
import time
import tracemalloc

import numpy as np
import pytest
import torch
from hostile import (
    animated_png,
    encoded,
    png_bomb,
    png_declaring,
    png_with_text,
    webp_declaring,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from gnr_fast import ConfigError, InputError
from gnr_fast.cli import main
from gnr_fast.config import EditConfig
from gnr_fast.errors import GnrError
from gnr_fast.images import prepare_image, read_image
from gnr_fast.inversion import Inversion
from gnr_fast.serving.protocol import EDIT_INPUTS, read_inputs
from gnr_fast.serving.service import (
    MAX_CONFIG_BYTES,
    EditService,
    ServiceConfig,
    parse_config_json,
)

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --- images ---------------------------------------------------------------------------------

BOMBS = {
    "PNG declaring 30000x30000": png_declaring(30000, 30000),
    "PNG declaring 5000x5000": png_declaring(5000, 5000),  # below PIL's own bomb limit: ours refuses it
    "WebP declaring 16000x16000": webp_declaring(16000, 16000),  # WebP's largest side is 16383
    "WebP declaring 2000x2000": webp_declaring(2000, 2000),
}


@pytest.mark.parametrize("name", list(BOMBS))
def test_a_lying_header_is_refused_before_decoding(name):
    data = BOMBS[name]
    assert len(data) < 4096  # a small file: the header is all that can be read cheaply
    tracemalloc.start()
    try:
        with pytest.raises(InputError, match="pixels"):
            prepare_image(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * 1024**2, peak  # measured 0.0–0.1 MB; decoding 30000² RGB would need 2.7 GB


def test_a_real_decompression_bomb_is_refused_in_bounded_memory_and_time():
    """A complete, valid 8000×8000 PNG (64 M pixels in 63 KB): refused from its header."""
    data = png_bomb(8000, 8000)
    assert len(data) < 200_000
    tracemalloc.start()
    started = time.process_time()
    try:
        with pytest.raises(InputError, match="8000x8000"):
            prepare_image(data)
        cpu_s, peak = time.process_time() - started, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * 1024**2, peak  # decoding would allocate 64 MB (L) then 192 MB (RGB)
    assert cpu_s < 1.0, cpu_s  # measured ~0.001 s of CPU; inflating 64 MB takes ~0.2 s


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (encoded()[:200], "truncated"),
        (encoded(fmt="JPEG")[:300], "cannot read"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, "cannot read"),
        (encoded(fmt="BMP"), "not a PNG, JPEG or WebP"),
        (encoded(fmt="TIFF"), "not a PNG, JPEG or WebP"),
        (encoded(fmt="GIF"), "not a PNG, JPEG or WebP"),
        (b"%PDF-1.4 " + b"x" * 100, "not a PNG, JPEG or WebP"),
        (png_with_text(100_000_000), "too large"),  # a 97 KB zTXt chunk that inflates to 100 MB
    ],
    ids=["truncated png", "truncated jpeg", "corrupt png", "bmp", "tiff", "gif", "pdf", "ztxt bomb"],
)
def test_truncated_corrupt_and_other_format_files_are_refused(data, match):
    with pytest.raises(InputError, match=match):
        prepare_image(data)


def test_a_large_plain_text_chunk_is_bounded_by_the_file_size():
    """A 2 MB tEXt chunk is read (PIL caps text at 1 MB per chunk only when compressed); the
    server's byte limit on the file bounds it (see test_service_refuses_an_image_over_its_byte_limit)."""
    assert prepare_image(png_with_text(2_000_000, compressed=False)).original_size == (64, 64)


def test_an_animated_image_is_read_as_its_first_frame():
    image = read_image(animated_png([(255, 0, 0), (0, 255, 0), (0, 0, 255)]))
    assert image.getpixel((10, 10)) == (255, 0, 0)


def test_the_cli_refuses_a_bomb_with_a_one_line_message(tmp_path, capsys):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_declaring(30000, 30000))
    code = main(["edit", str(path), "-s", "a", "-t", "b", "--model", str(tmp_path / "no-model")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("gnr-fast: error:") and "\n" not in err


def _valid_images() -> list[bytes]:
    return [encoded(fmt=fmt, seed=i) for i, fmt in enumerate(("PNG", "JPEG", "WEBP"))] + [
        animated_png([(1, 2, 3), (4, 5, 6)])
    ]


@FUZZ
@given(base=st.sampled_from(_valid_images()), edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)),
                                                               max_size=8), cut=st.integers(0, 10**6))
def test_fuzzed_image_bytes_decode_or_raise_input_error(base, edits, cut):
    data = bytearray(base)
    for at, value in edits:
        data[at % len(data)] = value
    data = bytes(data[: max(1, cut % (len(data) + 1))])
    try:
        prepare_image(data)
    except GnrError:
        pass  # anything else propagates and fails the test


@FUZZ
@given(data=st.binary(max_size=512))
def test_random_bytes_are_refused_with_input_error(data):
    with pytest.raises(InputError):
        prepare_image(data)


# --- requests -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def service(tiny_editor):
    svc = EditService(tiny_editor, ServiceConfig(default_steps=2, max_steps=50, max_image_bytes=64 * 1024))
    yield svc
    svc.close(timeout_s=30)


def _request(**fields):
    return {"image": encoded(), "source_prompt": "a red circle", "target_prompt": "a green square", **fields}


@pytest.mark.parametrize(
    ("fields", "error", "match"),
    [
        ({"source_prompt": b"a red\x00circle"}, InputError, "control character"),
        ({"target_prompt": "a\x1bsquare"}, InputError, "control character"),
        ({"target_prompt": b"\xc3\x28"}, InputError, "not valid UTF-8"),
        ({"target_prompt": b"\xed\xa0\x80"}, InputError, "not valid UTF-8"),  # an encoded surrogate
        ({"preset": b"non\x00style"}, InputError, "control character"),
        ({"image": png_declaring(30000, 30000)}, InputError, "pixels"),
        ({"config_json": "[" * 100_000 + "]" * 100_000}, InputError, "the limit is 65536"),
        ({"config_json": '{"guiders": ' + "[" * 200 + "]" * 200 + "}"}, ConfigError, "nests 201 levels"),
        ({"config_json": json.dumps({"guiders": [{"name": "cfg", "pad": "x" * MAX_CONFIG_BYTES}]})}, InputError,
         "the limit is 65536"),
        ({"config_json": b"\xff{}"}, InputError, "not valid UTF-8"),
    ],
    ids=["nul source", "escape target", "bad utf8", "surrogate", "nul preset", "bomb", "huge json", "deep json",
         "padded json", "bad utf8 json"],
)
def test_hostile_requests_are_refused(service, fields, error, match):
    with pytest.raises(error, match=match):
        service.edit_job(**_request(**fields))


def test_service_refuses_an_image_over_its_byte_limit(service):
    with pytest.raises(InputError, match="65536 bytes"):
        service.edit_job(**_request(image=png_with_text(100_000, compressed=False)))


def test_tab_and_newline_stay_allowed_in_prompts(service):
    job = service.edit_job(**_request(target_prompt="a green\tsquare\non white"))
    assert job.target_prompt == "a green\tsquare\non white"


def test_brackets_inside_strings_do_not_count_as_nesting():
    data = parse_config_json(json.dumps({"guiders": [{"name": "[" * 50 + "{" * 50}]}))
    assert data["guiders"][0]["name"].startswith("[[")


_tensor = st.one_of(
    st.none(),
    st.binary(max_size=8).map(lambda b: np.array([b], dtype=object)),
    st.text(max_size=8).map(lambda t: np.array([t], dtype=object)),
    st.integers(-(2**31), 2**31 - 1).map(lambda i: np.array([i], dtype=np.int32)),
    st.floats(allow_nan=True).map(lambda f: np.array([f], dtype=np.float32)),
    st.lists(st.binary(max_size=4), max_size=3).map(lambda xs: np.array(xs, dtype=object)),
    st.integers(0, 3).map(lambda n: np.zeros((n, 2), dtype=np.int32)),
    st.just(np.array([None], dtype=object)),
)


@FUZZ
@given(values=st.fixed_dictionaries({f.name: _tensor for f in EDIT_INPUTS}))
def test_request_decoding_fails_only_with_gnr_errors(service, values):
    """What a raw tritonclient could send (pytriton hands the arrays over as numpy): decoding and
    validating it either yields a job or raises a GnrError."""
    data = {name: array for name, array in values.items() if array is not None}
    try:
        fields = read_inputs(data, EDIT_INPUTS)
        service.edit_job(fields["image"], fields["source_prompt"], fields["target_prompt"], preset=fields["preset"],
                         config_json=fields["config"], steps=fields["steps"])
    except GnrError:
        pass


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
    | st.sampled_from(["cfg", "self_attn_map_l2", "identity_rescaler", "range_other_on_cfg_norm", "ddim_50_eps"]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.sampled_from(["guiders", "name", "g_scale", "kwargs", "noise_rescaling_setup", "type", "init_setup",
                         "self_attn_layers_num", "num_steps", "scheduler_type", "align_inversion", "x"]),
        children, max_size=4),
    max_leaves=16,
)


@FUZZ
@given(data=_json)
def test_config_parsing_fails_only_with_gnr_errors(data):
    text = json.dumps(data, allow_nan=True)
    try:
        EditConfig.from_dict(parse_config_json(text))
    except GnrError:
        pass


@FUZZ
@given(guider=st.dictionaries(st.sampled_from(["name", "g_scale", "kwargs"]), _json, max_size=3),
       rescale=_json, layers=_json, steps=_json)
def test_structured_configs_fail_only_with_gnr_errors(guider, rescale, layers, steps):
    data = {"guiders": [{"name": "cfg", **guider}], "noise_rescaling_setup": rescale, "self_attn_layers_num": layers,
            "num_steps": steps}
    try:
        EditConfig.from_dict(data)
    except GnrError:
        pass


# --- inversion files ------------------------------------------------------------------------


def _inversion(steps: int = 2) -> Inversion:
    return Inversion(latents=torch.randn(steps + 1, 1, 4, 8, 8), source_prompt="a cat", num_steps=steps,
                     model_id="m", original_size=(64, 64), working_size=(64, 64), content_hash="h")


def _tampered(tmp_path, tensors: dict | None = None, **metadata) -> str:
    from safetensors.torch import save_file

    inv = _inversion()
    meta = {"format": "gnr-fast-inversion", "version": "1", "source_prompt": "a cat", "num_steps": "2",
            "model_id": "m", "original_size": "[64, 64]", "working_size": "[64, 64]", "content_hash": "h"}
    path = tmp_path / "inv.safetensors"
    inv.save(path)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        meta.update(handle.metadata())
    meta.update({k: v for k, v in metadata.items() if v is not None})
    for k in [k for k, v in metadata.items() if v is None]:
        meta.pop(k)
    save_file(tensors if tensors is not None else {"latents": inv.latents}, str(path), metadata=meta)
    return str(path)


TAMPERED = {
    "nan latents": ({"latents": torch.full((3, 1, 4, 8, 8), float("nan"))}, {}),
    "inf latents": ({"latents": torch.full((3, 1, 4, 8, 8), float("inf"))}, {}),
    "integer latents": ({"latents": torch.zeros((3, 1, 4, 8, 8), dtype=torch.int64)}, {}),
    "float16 latents": ({"latents": torch.zeros((3, 1, 4, 8, 8), dtype=torch.float16)}, {}),
    "wrong rank": ({"latents": torch.zeros((3, 4, 8, 8))}, {}),
    "wrong channels": ({"latents": torch.zeros((3, 1, 3, 8, 8))}, {}),
    "steps that lie": (None, {"num_steps": "7"}),
    "steps not a number": (None, {"num_steps": "two"}),
    "working size that lies": (None, {"working_size": "[128, 64]"}),
    "working size not json": (None, {"working_size": "[64,"}),
    "working size not a pair": (None, {"working_size": '{"a": 1}'}),
    "original size negative": (None, {"original_size": "[-1, 64]"}),
    "missing model id": (None, {"model_id": None}),
    "missing prompt": (None, {"source_prompt": None}),
    "extra tensor": ({"latents": torch.zeros(3, 1, 4, 8, 8), "payload": torch.zeros(10**4)}, {}),
}


@pytest.mark.parametrize("case", list(TAMPERED))
def test_a_tampered_inversion_file_is_refused(tmp_path, case):
    tensors, metadata = TAMPERED[case]
    with pytest.raises(InputError):
        Inversion.load(_tampered(tmp_path, tensors, **metadata))


def test_an_untampered_inversion_file_loads(tmp_path):
    assert Inversion.load(_tampered(tmp_path)).num_steps == 2


@FUZZ
@given(edits=st.lists(st.tuples(st.integers(0, 10**5), st.integers(0, 255)), min_size=1, max_size=6))
def test_a_byte_flipped_inversion_file_loads_or_raises_input_error(tmp_path_factory, edits):
    path = tmp_path_factory.mktemp("inv") / "inv.safetensors"
    _inversion().save(path)
    data = bytearray(path.read_bytes())
    for at, value in edits:
        data[at % len(data)] = value
    path.write_bytes(bytes(data))
    try:
        Inversion.load(path)
    except GnrError:
        pass


def test_pil_image_input_is_not_decoded_again():
    """A PIL image a caller already decoded is used as it is (the caller chose to decode it)."""
    pil = Image.new("RGB", (64, 64), (1, 2, 3))
    assert prepare_image(pil).original_size == (64, 64)


def test_png_round_trip_still_works():
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (9, 8, 7)).save(buffer, format="PNG")
    assert read_image(buffer.getvalue()).getpixel((0, 0)) == (9, 8, 7)
