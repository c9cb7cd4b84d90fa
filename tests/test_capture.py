"""Capture processors record the right internals and leave the UNet output unchanged."""

import pytest
import torch

from gnr_fast.attention import CaptureMode, PassCapture, select_layers
from gnr_fast.config import FeatureSite
from gnr_fast.errors import ConfigError


@pytest.fixture(scope="module")
def setup(tiny_editor):
    torch.manual_seed(0)
    z = torch.randn(1, 4, 8, 8)
    ctx = tiny_editor.embed("a red circle")
    return tiny_editor, z, ctx


def test_layers_in_forward_order(tiny_editor):
    layers = tiny_editor.self_attn_layers
    assert [layer.group for layer in layers] == ["down"] * 6 + ["mid"] + ["up"] * 9
    assert [layer.group_index for layer in layers[:7]] == [0, 1, 2, 3, 4, 5, 0]
    assert all(layer.name.endswith("attn1") for layer in layers)
    assert select_layers(layers, ((1, 3), (0, 0), (8, 9))) == frozenset({1, 2, 15})
    with pytest.raises(ConfigError, match="exceeds"):
        select_layers(layers, ((0, 7), (0, 1), (0, 9)))


def test_captured_maps_equal_hand_computed_softmax(setup):
    editor, z, ctx = setup
    attn_module = dict(editor.components.unet.named_modules())[editor.self_attn_layers[3].name]
    inputs = {}
    handle = attn_module.register_forward_pre_hook(lambda m, args, kw: inputs.update(h=args[0]), with_kwargs=True)
    capture = PassCapture(layers=frozenset({3}), mode=CaptureMode.MAPS)
    with torch.no_grad():
        editor.runner(z, 500, ctx, (capture,))
    handle.remove()
    h = inputs["h"]  # [1, N, C]
    heads = attn_module.heads
    q = attn_module.to_q(h).view(1, h.shape[1], heads, -1).transpose(1, 2)
    k = attn_module.to_k(h).view(1, h.shape[1], heads, -1).transpose(1, 2)
    expected = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)  # [1, H, N, N]
    assert set(capture.maps) == {3}
    torch.testing.assert_close(capture.maps[3], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(capture.maps[3].sum(-1), torch.ones(1, heads, h.shape[1]))


def test_capture_does_not_change_output(setup):
    editor, z, ctx = setup
    with torch.no_grad():
        plain = editor.runner(z, 300, ctx)
        maps = editor.runner(z, 300, ctx, (PassCapture(layers=frozenset(range(16)), mode=CaptureMode.MAPS),))
        qk = editor.runner(z, 300, ctx, (PassCapture(layers=frozenset(range(16)), mode=CaptureMode.QK),))
    torch.testing.assert_close(maps, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(qk, plain)


def test_qk_capture_and_features(setup):
    editor, z, ctx = setup
    capture = PassCapture(
        layers=frozenset({0, 15}), mode=CaptureMode.QK, feature_sites=frozenset({FeatureSite.UP_LAST, FeatureSite.UP})
    )
    with torch.no_grad():
        editor.runner(z, 300, ctx, (capture,))
    assert set(capture.queries) == {0, 15} and not capture.maps
    # [B, H, N, D]: SD 1.x configs name the head *count* attention_head_dim (4), 8 channels / 4 = dim 2
    assert capture.queries[0].shape == (1, 4, 64, 2)
    unet = editor.components.unet
    assert capture.features[FeatureSite.UP_LAST].shape[1] == unet.config.block_out_channels[0]
    assert capture.features[FeatureSite.UP].shape[1] == unet.config.block_out_channels[-1]
    # after the call, a call without this capture records nothing into it
    recorded = capture.features[FeatureSite.UP_LAST]
    with torch.no_grad():
        editor.runner(z + 1, 300, ctx)
    assert capture.features[FeatureSite.UP_LAST] is recorded


def test_a_call_on_another_thread_records_nothing_into_this_threads_captures(setup):
    """A step's no-grad and grad calls may run on two threads at once: each records only its own."""
    from concurrent.futures import ThreadPoolExecutor

    from gnr_fast.attention.capture import capture_features

    editor, z, ctx = setup
    capture = PassCapture(layers=frozenset(), mode=CaptureMode.QK, feature_sites=frozenset({FeatureSite.UP_LAST}))

    def other_call() -> None:
        with torch.no_grad():
            editor.runner(z, 300, ctx)

    with capture_features(editor.components.unet, (capture,)):  # this thread's call is under way
        with ThreadPoolExecutor(1) as pool:
            pool.submit(other_call).result()
    assert not capture.features


def test_unet_without_a_feature_site_is_refused_clearly():
    from gnr_fast.attention.capture import capture_features
    from gnr_fast.errors import UnsupportedArchitectureError

    class Bare(torch.nn.Module):
        pass

    capture = PassCapture(layers=frozenset(), feature_sites=frozenset({FeatureSite.UP_LAST}))
    with pytest.raises(UnsupportedArchitectureError, match="feature site"):
        with capture_features(Bare(), (capture,)):
            pass


def test_unet_with_feature_hooks_still_pickles(tiny_editor):
    import copy
    import io

    unet = tiny_editor.components.unet
    buffer = io.BytesIO()
    torch.save(unet, buffer)  # whole-module pickling, as some users save models
    assert copy.deepcopy(unet) is not unet
